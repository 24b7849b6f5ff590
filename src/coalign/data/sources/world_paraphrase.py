"""The built-in world described in other words: the same images and labels as the `world` source,
with captions and zero-shot prompts that use none of the words the world's own captions use for the
attributes ("a crimson three-cornered shape up high" for "a red triangle at the top").

It measures whether a text tower understands language or only the 400-caption vocabulary it was
trained on: a pretrained language model (a locked MiniLM, LiT-style) knows that "crimson" is a red
and "three-cornered" a triangle; a tokenizer and a tower trained on the world's captions have never
met these words. Evaluation only: zero-shot with paraphrased class names and templates, retrieval
with paraphrased captions.
"""

from __future__ import annotations

import re

import numpy as np

from coalign.data.sample import Sample
from coalign.data.sources.base import ZeroShotTask
from coalign.data.world import ATTRIBUTES, SPLITS, WorldConfig, WorldSource
from coalign.registry import SOURCES

# Per attribute value, rewordings that avoid the world's own words for it (world.py SYNONYMS).
PARAPHRASES = {
    "circle": ["round disc", "ring-like round form", "perfectly round blob"],
    "square": ["four-sided box", "block with four equal sides", "boxy quadrilateral"],
    "triangle": ["three-cornered shape", "three-sided figure", "pointed wedge"],
    "diamond": ["rhombus", "lozenge", "kite-like rhombus"],
    "cross": ["plus sign", "plus symbol", "pair of crossing bars"],
    "red": ["crimson", "scarlet", "cherry-colored"],
    "green": ["emerald", "grass-colored", "leafy"],
    "blue": ["navy", "azure", "sapphire"],
    "yellow": ["golden", "lemon-colored", "canary"],
    "purple": ["violet", "lavender", "plum-colored"],
    "orange": ["tangerine", "amber", "pumpkin-colored"],
    "small": ["miniature", "petite", "minute"],
    "large": ["huge", "enormous", "giant"],
    "top": ["up high", "near the ceiling of the picture", "high up in the frame"],
    "bottom": ["down low", "near the floor of the picture", "low down in the frame"],
    "left": ["toward the west edge", "in the western half", "at the west side"],
    "right": ["toward the east edge", "in the eastern half", "at the east side"],
}
STRUCTURES = [
    "a {size} {color} {shape} {pos}",
    "{pos}: a {color} {shape}, {size}",
    "an image showing a {shape} that looks {color} and {size}, {pos}",
    "we see a {size} {shape} painted {color} {pos}",
]
# One rewording per class (the first), in prompts worded unlike the world's ZERO_SHOT_TEMPLATES.
TEMPLATES = {
    "shape": ["an image showing a {}", "somewhere in the photo: a {}", "the outline of a {}"],
    "color": ["an item painted {}", "something tinted {}", "a {} item"],
    "size": ["a {} item", "an item that is {}", "something {}"],
    "position": ["an item {}", "something placed {}", "a figure {}"],
}
PARAPHRASE_STREAM = 101  # the captions' own random stream [seed, split, index, 101]


def paraphrase(attrs: dict[str, str], rng: np.random.Generator) -> str:
    words = {k: str(rng.choice(PARAPHRASES[v])) for k, v in attrs.items()}
    text = str(rng.choice(STRUCTURES)).format(
        shape=words["shape"], color=words["color"], size=words["size"], pos=words["position"]
    )
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


@SOURCES.register("world_paraphrase")
class WorldParaphraseSource(WorldSource):
    """`world`'s samples (same images, same labels) with paraphrased captions and prompts."""

    Config = WorldConfig

    def __getitem__(self, index: int) -> Sample:
        sample = dict(super().__getitem__(index))  # a copy: the world's cache keeps its own captions
        if "text" in sample:
            attrs = {k: ATTRIBUTES[k][int(sample["label"][k])] for k in ATTRIBUTES}
            rng = np.random.default_rng([self.cfg.seed, SPLITS[self.cfg.split], index, PARAPHRASE_STREAM])
            texts = [paraphrase(attrs, rng) for _ in range(self.cfg.captions)]
            sample["text"] = texts[0] if len(texts) == 1 else texts
        return sample

    def zero_shot_tasks(self) -> dict[str, ZeroShotTask]:
        return {
            k: ZeroShotTask(k, [PARAPHRASES[v][0] for v in values], TEMPLATES[k])
            for k, values in ATTRIBUTES.items()
        }
