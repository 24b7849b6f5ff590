"""Karpathy's split files for COCO, Flickr30k and Flickr8k (`dataset_coco.json`, `dataset_flickr30k.json`).

The layout: `{"dataset": "coco" | "flickr30k" | "flickr8k", "images": [{"filename", "filepath" (COCO
only, e.g. "val2014"), "split": "train" | "val" | "test" | "restval", "sentences": [{"raw", "tokens",
...}, ...], "imgid", ...}]}`. One source reads all of them; `split` picks the images, several joined
by `+` (`train+restval`, the usual COCO training set of 113k images). The test split is what
CLIP_benchmark evaluates retrieval on (5,000 COCO images, 1,000 Flickr30k images), with every
caption of every image: a sample's "text" is the list of its sentences' `raw` text (the tokens
joined by spaces where a sentence has no `raw`).

Images are read from `image_root` (default: the JSON's folder) joined with `filepath` when the record
has one (COCO's `val2014/COCO_val2014_...jpg`), else `filename` (Flickr's `1000092795.jpg`). A missing
image file is a counted `missing_image` skip, as in every source. A split with no image in this file
(Flickr has no `restval`) is a ConfigError that lists the splits the file has, with their sizes.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pydantic

from coalign.data.sources.base import write_example_images
from coalign.data.sources.coco import CaptionedImages, read_json
from coalign.data.sources.csv import existing_file
from coalign.registry import SOURCES, ConfigError, StrictModel, suggest

SPLITS = ("train", "val", "test", "restval")


def _sentence(s: Any) -> str | None:
    if isinstance(s, dict):
        if isinstance(s.get("raw"), str):
            return s["raw"]
        if isinstance(s.get("tokens"), list):
            return " ".join(t for t in s["tokens"] if isinstance(t, str))
    return None


class KarpathyConfig(StrictModel):
    path: str  # dataset_coco.json, dataset_flickr30k.json or dataset_flickr8k.json
    split: str = "train"  # train | val | test | restval, or several joined by '+': train+restval
    image_root: str | None = None  # default: the JSON's folder

    @classmethod
    def tiny(cls) -> dict:
        return {}

    @pydantic.field_validator("split")
    @classmethod
    def _split(cls, value: str) -> str:
        for part in value.split("+"):
            if part not in SPLITS:
                raise ValueError(
                    f"'{part}' is not a Karpathy split{suggest(part, SPLITS)}; valid: {', '.join(SPLITS)}, "
                    "or several joined by '+' (train+restval)"
                )
        return value

    def splits(self) -> set[str]:
        return set(self.split.split("+"))


@SOURCES.register("karpathy")
class KarpathySource(CaptionedImages):
    """A Karpathy split file as samples {"id": filepath/filename, "image": path, "text": [sentences]}."""

    Config = KarpathyConfig
    kind = "karpathy"

    def __init__(self, cfg: KarpathyConfig | None = None, **kwargs: Any):
        self.cfg = cfg or KarpathyConfig(**kwargs)
        path = existing_file(self.cfg.path, "karpathy")
        data = read_json(path, "karpathy")
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ConfigError(
                f"karpathy source '{path}': a Karpathy split file is an object with an 'images' list "
                "(dataset_coco.json, dataset_flickr30k.json); this file is not"
            )
        self.dataset = str(data.get("dataset", ""))
        records = [im for im in data["images"] if isinstance(im, dict)]
        wanted = self.cfg.splits()
        picked = [im for im in records if im.get("split") in wanted]
        if not picked:
            sizes = Counter(str(im.get("split")) for im in records)
            have = ", ".join(f"{s} ({n})" for s, n in sorted(sizes.items())) or "none"
            raise ConfigError(
                f"karpathy source '{path}': no images in split '{self.cfg.split}'; it has: {have}"
            )
        files: list[str | None] = []
        for im in picked:
            name = im.get("filename")
            folder = im.get("filepath")
            if not isinstance(name, str):
                files.append(None)
            else:
                files.append(f"{folder}/{name}" if isinstance(folder, str) and folder else name)
        ids = [f or str(im.get("imgid", i)) for i, (f, im) in enumerate(zip(files, picked, strict=True))]
        texts = [[t for t in map(_sentence, im.get("sentences") or []) if t is not None] for im in picked]
        root = Path(self.cfg.image_root).expanduser() if self.cfg.image_root else path.parent
        super().__init__(root, ids, files, texts)

    @classmethod
    def example(cls, folder: Path) -> dict[str, Any]:
        """A tiny dataset_coco.json: images under val2014/, two per split, five sentences each."""
        rows = write_example_images(folder / "val2014", count=8)
        images = []
        for i, (rel, text, _) in enumerate(rows):
            sentences = [
                {"raw": f"{text}, view {k}.", "tokens": [*text.split(), "view", str(k)]} for k in range(5)
            ]
            images.append(
                {
                    "filepath": "val2014",
                    "filename": rel,
                    "imgid": i,
                    "cocoid": 500 + i,
                    "split": SPLITS[i % len(SPLITS)],
                    "sentids": list(range(5 * i, 5 * i + 5)),
                    "sentences": [{**s, "imgid": i, "sentid": 5 * i + k} for k, s in enumerate(sentences)],
                }
            )
        (folder / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
        return {"path": str(folder / "dataset_coco.json"), "split": "train+restval"}
