"""scikit-learn's handwritten digits as a built-in image-text source: real images that need no files.

`sklearn.datasets.load_digits` ships 1,797 8x8 greyscale scans (values 0..16) inside scikit-learn,
so this source, like the built-in world, works offline and costs nothing to set up. Each image is
upscaled with bicubic interpolation to `image_size` and given captions written from several
templates that name the digit as a word ("seven") or a numeral ("7"), so the text tower has to learn
that both mean the same class.

The train/test split is a fixed function of the data, not of any seed: within each class, in
sklearn's order, every 5th image (positions 4, 9, 14, ...) is a test image. So the split is
stratified (80/20 per class), identical on every machine and run, and results of different seeds
are measured on the same test images. The seed only chooses the captions.
"""

from __future__ import annotations

import functools

import numpy as np
import pydantic
from PIL import Image

from coalign.data.sample import Sample
from coalign.data.sources.base import Source, ZeroShotTask, check_split
from coalign.registry import SOURCES, StrictModel

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPLITS = {"train": 0, "test": 1}
TEST_EVERY = 5  # every 5th image of each class is a test image: a stratified 80/20 split

# Training captions; `{word}` is "seven", `{numeral}` is "7".
TEMPLATES = [
    "a handwritten {word}",
    "the digit {numeral}",
    "a photo of the number {word}",
    "a scanned handwritten {numeral}",
    "the digit {word}, written by hand",
    "an image of a {word}",
    "a {numeral} written by hand",
    "a blurry scan of the digit {word}",
]
# Zero-shot prompts are worded differently from every training caption (but in words that the
# captions use), so zero-shot accuracy measures whether the text tower learnt the class words, not
# whether it memorised sentences.
ZERO_SHOT_TEMPLATES = ["the number {}", "a {} digit", "a handwritten {} digit", "a scan of the number {}"]


@functools.cache
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) float images with values 0..16, and (1797,) int64 digits, read-only."""
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as err:
        raise ImportError(
            f"the 'digits' source reads scikit-learn's bundled digits; install it with "
            f"`pip install scikit-learn` ({err})"
        ) from None
    bunch = sklearn_load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)
    targets = np.asarray(bunch.target, dtype=np.int64)
    images.flags.writeable = targets.flags.writeable = False
    return images, targets


def split_indices(split: str) -> np.ndarray:
    """Sorted indices into sklearn's digits that belong to `split` (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"split '{split}' is not valid; valid splits: {', '.join(SPLITS)}")
    _, targets = load_digits()
    test = np.zeros(len(targets), dtype=bool)
    for digit in range(len(DIGIT_NAMES)):
        members = np.flatnonzero(targets == digit)  # ascending: sklearn's order within the class
        test[members[TEST_EVERY - 1 :: TEST_EVERY]] = True
    return np.flatnonzero(test if split == "test" else ~test)


def upscale(image: np.ndarray, size: int) -> np.ndarray:
    """(8, 8) values 0..16 -> (size, size, 3) uint8, bicubic, white ink on black (as MNIST)."""
    grey = Image.fromarray(np.asarray(image, dtype=np.float32) * (255.0 / 16.0))  # mode "F"
    if grey.size != (size, size):
        grey = grey.resize((size, size), Image.BICUBIC)
    pixels = np.clip(np.rint(np.asarray(grey)), 0, 255).astype(np.uint8)  # bicubic overshoots a little
    return np.repeat(pixels[..., None], 3, axis=-1)


def captions_for(digit: int, rng: np.random.Generator, count: int) -> list[str]:
    """`count` distinct captions of `digit`, templates drawn without replacement."""
    picked = rng.choice(len(TEMPLATES), size=count, replace=False)
    return [TEMPLATES[int(t)].format(word=DIGIT_NAMES[digit], numeral=str(digit)) for t in picked]


class DigitsConfig(StrictModel):
    split: str = "train"
    image_size: int = 32
    captions: int = 1  # captions per sample (evaluation splits use several for retrieval)
    seed: int = 0  # chooses captions only; the split is fixed

    @classmethod
    def tiny(cls) -> dict:
        return {}  # 1,797 tiny images are already smoke-sized

    @pydantic.field_validator("split")
    @classmethod
    def _split(cls, value: str) -> str:
        return check_split(value, SPLITS)

    @pydantic.field_validator("captions")
    @classmethod
    def _captions(cls, value: int) -> int:
        if not 1 <= value <= len(TEMPLATES):
            raise ValueError(f"captions must be between 1 and {len(TEMPLATES)} (one per template)")
        return value

    @pydantic.field_validator("image_size")
    @classmethod
    def _image_size(cls, value: int) -> int:
        if value < 8:
            raise ValueError("image_size must be at least 8 (the scans are 8x8)")
        return value


@SOURCES.register("digits")
class DigitsSource(Source):
    """sklearn's digits: `sample["image"]` a (H, W, 3) uint8 array, `sample["text"]` captions,
    `sample["label"]["digit"]` the digit 0..9."""

    Config = DigitsConfig

    def __init__(self, cfg: DigitsConfig | None = None, **kwargs):
        self.cfg = cfg or DigitsConfig(**kwargs)
        self.indices = split_indices(self.cfg.split)
        self._images: dict[int, np.ndarray] = {}  # upscaled images, ~3 KB each at 32 px

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(f"digits index {index} out of range 0..{len(self) - 1}")
        images, targets = load_digits()
        original = int(self.indices[index])
        digit = int(targets[original])
        if original not in self._images:
            self._images[original] = upscale(images[original], self.cfg.image_size)
            self._images[original].flags.writeable = False  # shared between calls: nobody may edit it
        rng = np.random.default_rng([self.cfg.seed, SPLITS[self.cfg.split], index])
        texts = captions_for(digit, rng, self.cfg.captions)
        return {
            "id": f"digits-{original}",
            "image": self._images[original],
            "text": texts[0] if len(texts) == 1 else texts,
            "label": {"digit": digit},
        }

    def zero_shot_tasks(self) -> dict[str, ZeroShotTask]:
        return {"digit": ZeroShotTask("digit", list(DIGIT_NAMES), list(ZERO_SHOT_TEMPLATES))}
