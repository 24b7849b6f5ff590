"""A folder of images, each captioned by a same-name `.txt` file beside it (`foo.jpg` + `foo.txt`).

Files are found recursively and sorted so that index i is the same file on every machine. With
`labels_from_folders`, the top-level subfolders are classes (sorted names -> indices), which also
gives a zero-shot task. Images are not opened here; the image transform decodes and reports them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydantic

from coalign.data.sample import Sample
from coalign.data.sources.base import Source, ZeroShotTask, write_example_images
from coalign.data.sources.labels import DEFAULT_TEMPLATES
from coalign.registry import SOURCES, ConfigError, StrictModel

IMAGE_EXTENSIONS = [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"]


class FolderConfig(StrictModel):
    path: str
    extensions: list[str] = IMAGE_EXTENSIONS
    labels_from_folders: bool = False  # top-level subfolder names become sample["label"]["class"]

    @classmethod
    def tiny(cls) -> dict:
        return {}

    @pydantic.field_validator("extensions")
    @classmethod
    def _normalise(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one extension")
        return [e.lower() if e.startswith(".") else "." + e.lower() for e in v]


@SOURCES.register("image_folder")
class ImageFolderSource(Source):
    """Images under `path` as samples {"id": relative path, "image": absolute path, "text", "label"}."""

    Config = FolderConfig

    def __init__(self, cfg: FolderConfig | None = None, **kwargs: Any):
        self.cfg = cfg or FolderConfig(**kwargs)
        self.root = Path(self.cfg.path).expanduser().absolute()
        if not self.root.is_dir():
            raise ConfigError(f"image_folder source: path '{self.root}' does not exist or is not a folder")
        exts = set(self.cfg.extensions)
        self.files = sorted(
            p.relative_to(self.root) for p in self.root.rglob("*") if p.suffix.lower() in exts and p.is_file()
        )
        if not self.files:
            listing = ", ".join(sorted(exts))
            raise ConfigError(f"image_folder source: no images with extensions {listing} under '{self.root}'")
        self.classes: list[str] = []
        if self.cfg.labels_from_folders:
            loose = [str(p) for p in self.files if len(p.parts) < 2]
            if loose:
                raise ConfigError(
                    f"image_folder source: labels_from_folders is set but {len(loose)} image(s) are not in a "
                    f"class subfolder of '{self.root}' (e.g. '{loose[0]}')"
                )
            self.classes = sorted({p.parts[0] for p in self.files})
        self._class_index = {c: i for i, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(f"image_folder index {index} out of range 0..{len(self) - 1}")
        rel = self.files[index]
        image = self.root / rel
        caption = image.with_suffix(".txt")
        try:
            text = caption.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:  # no caption file: "" becomes an empty_caption skip in the text transform
            text = ""
        label = {"class": self._class_index[rel.parts[0]]} if self.classes else {}
        return {"id": rel.as_posix(), "image": str(image), "text": text, "label": label}

    @classmethod
    def example(cls, folder: Path) -> dict[str, Any]:
        for rel, caption, _ in write_example_images(folder, classes=True):
            (folder / rel).with_suffix(".txt").write_text(caption)
        return {"path": str(folder), "labels_from_folders": True}

    def zero_shot_tasks(self) -> dict[str, ZeroShotTask]:
        if not self.classes:
            return {}
        names = [c.replace("_", " ") for c in self.classes]
        return {"class": ZeroShotTask("class", names, list(DEFAULT_TEMPLATES))}
