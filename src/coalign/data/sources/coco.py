"""COCO captions files (`annotations/captions_train2017.json`): one sample per image, all its captions.

The layout is COCO's: `{"images": [{"id", "file_name", ...}], "annotations": [{"image_id", "caption",
"id"}, ...]}`, five (sometimes six or seven) captions per image. The split is the file: name
`captions_val2017.json` for val2017. Images are read from `image_root`; by default the folder COCO's
own layout puts them in (`<root>/annotations/captions_val2017.json` -> `<root>/val2017/`) when it
exists, else the folder of the JSON file.

A sample is `{"id": image id, "image": path, "text": [caption, ...]}`: training draws one caption per
sample per step (the text transform's `captions: 1`, CLIP's practice with COCO), retrieval evaluation
encodes every caption of every image, as CLIP_benchmark does. Images are ordered by id (as
torchvision's CocoCaptions, which CLIP_benchmark reads COCO through). A missing image file is a
counted `missing_image` skip (the image transform finds it), an image without captions an
`empty_caption` skip; captions of an image id the file does not list are ignored. A file that is not
JSON, or not in this layout (an `instances_*.json` has no captions), is a one-line ConfigError.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from coalign.data.sample import Sample
from coalign.data.sources.base import Source, write_example_images
from coalign.data.sources.csv import existing_file, resolve_path
from coalign.registry import SOURCES, ConfigError, StrictModel

_COCO_FILE = re.compile(r"captions_(\w+)\.json")


def read_json(path: Path, kind: str) -> Any:
    """A whole JSON file, or a one-line ConfigError naming it."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except OSError as err:
        raise ConfigError(f"{kind} source: cannot read '{path}': {err.strerror or err}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ConfigError(f"{kind} source '{path}': not a JSON file ({err})") from None


class CaptionedImages(Source):
    """Images with several captions each, read from a JSON index: `ids[i]`, `files[i]` (relative to
    `image_root`, None when the record names none) and `texts[i]` (its captions)."""

    kind = "captioned images"

    def __init__(self, image_root: Path, ids: list[str], files: list[str | None], texts: list[list[str]]):
        self.image_root = image_root
        self.ids, self.files, self.texts = ids, files, texts

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.kind} index {index} out of range 0..{len(self) - 1}")
        where = f"{self.kind} image {self.ids[index]}"
        image = resolve_path(self.image_root, self.files[index], where)  # SampleError when it names none
        return {"id": self.ids[index], "image": image, "text": list(self.texts[index]), "label": {}}


def coco_image_root(path: Path) -> Path:
    """COCO's layout: `<root>/annotations/captions_<split>.json` has its images in `<root>/<split>/`."""
    found = _COCO_FILE.fullmatch(path.name)
    if found and path.parent.name == "annotations" and (path.parent.parent / found[1]).is_dir():
        return path.parent.parent / found[1]
    return path.parent


class COCOConfig(StrictModel):
    path: str  # a COCO captions JSON (captions_<split>.json): the file is the split
    image_root: str | None = None  # default: <root>/<split>/ in COCO's layout, else the JSON's folder

    @classmethod
    def tiny(cls) -> dict:
        return {}


@SOURCES.register("coco")
class COCOSource(CaptionedImages):
    """A COCO captions JSON as samples {"id", "image": path, "text": [its captions]}."""

    Config = COCOConfig
    kind = "coco"

    def __init__(self, cfg: COCOConfig | None = None, **kwargs: Any):
        self.cfg = cfg or COCOConfig(**kwargs)
        path = existing_file(self.cfg.path, "coco")
        data = read_json(path, "coco")
        layout = "a COCO captions file has 'images' and 'annotations' lists"
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), list) for k in ("images", "annotations")
        ):
            raise ConfigError(f"coco source '{path}': {layout}; this file has not")
        annotations = data["annotations"]
        if annotations and not any(isinstance(a, dict) and "caption" in a for a in annotations[:100]):
            raise ConfigError(f"coco source '{path}': its annotations have no 'caption' (an instances file?)")
        images = {im["id"]: im for im in data["images"] if isinstance(im, dict) and "id" in im}
        texts: dict[Any, list[str]] = {i: [] for i in images}
        for a in annotations:
            if isinstance(a, dict) and a.get("image_id") in texts and isinstance(a.get("caption"), str):
                texts[a["image_id"]].append(a["caption"])
        order = sorted(images, key=lambda i: (not isinstance(i, int), i if isinstance(i, int) else str(i)))
        root = Path(self.cfg.image_root).expanduser() if self.cfg.image_root else coco_image_root(path)
        names = [images[i].get("file_name") for i in order]
        super().__init__(
            root,
            [str(i) for i in order],
            [n if isinstance(n, str) else None for n in names],
            [texts[i] for i in order],
        )
        if not self.ids:
            raise ConfigError(f"coco source '{path}': no images listed")

    @classmethod
    def example(cls, folder: Path) -> dict[str, Any]:
        images_dir = folder / "val2017"
        rows = write_example_images(images_dir, count=4)
        images = [
            {"id": 100 + i, "file_name": rel, "height": 16, "width": 16} for i, (rel, _, _) in enumerate(rows)
        ]
        annotations = [
            {"id": 1000 + 10 * i + k, "image_id": 100 + i, "caption": f"{text}, caption {k}"}
            for i, (_, text, _) in enumerate(rows)
            for k in range(5)
        ]
        (folder / "annotations").mkdir(exist_ok=True)
        path = folder / "annotations" / "captions_val2017.json"
        path.write_text(
            json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations})
        )
        return {"path": str(path)}  # images found in val2017/ by COCO's layout
