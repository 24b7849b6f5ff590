"""Caption evaluation of a model with a caption decoder (CoCa): BLEU-4 and CIDEr-D against the eval
set's reference captions, and, on the built-in world, the accuracy of each attribute word.

BLEU-4 (Papineni et al. 2002) and CIDEr-D (Vedantam et al. 2015) are computed by the COCO caption
evaluation's own scorers (`pycocoevalcap`, extra `captions`; its BLEU and CIDEr are pure Python).
Its PTB tokenizer needs Java, so captions are tokenised here instead as that tokenizer leaves plain
captions: lower case, punctuation removed, words split on spaces. CIDEr-D's document frequencies
come from the references of the set evaluated, as in the COCO evaluation.

The world's captions state shape, colour, size and position in words (`data/world.py`: a shape
name, a colour name, a size synonym such as "tiny" or "big", a position phrase such as "near the
top"). `parse_attributes` reads them back from a generated caption: an attribute counts as right
when the caption names its true value and no other value of it; naming none, or two, is wrong.
"""

from __future__ import annotations

import re

import numpy as np
import pydantic
import torch

from coalign.data.sample import captions as caption_list
from coalign.data.world import ATTRIBUTES, SYNONYMS
from coalign.evaluate.base import EvalContext, Evaluator, Metric, register
from coalign.evaluate.embed import EmbeddedSet
from coalign.registry import ConfigError, StrictModel

_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> str:
    """Lower case, punctuation removed, one space between words (what PTB tokenisation and the COCO
    evaluation's punctuation filter leave of a plain caption)."""
    return " ".join(_WORD.findall(text.lower()))


def bleu4_cider_d(candidates: list[str], references: list[list[str]]) -> dict[str, float]:
    """{"bleu4", "cider_d"} of candidate i against references[i] (corpus-level, COCO's scorers)."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        raise ConfigError("BLEU and CIDEr-D need pycocoevalcap: pip install 'coalign[captions]'") from None
    if len(candidates) != len(references) or not candidates:
        raise ValueError(
            f"need one reference list per candidate, got {len(candidates)} and {len(references)}"
        )
    gts = {i: [tokenize(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [tokenize(c)] for i, c in enumerate(candidates)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider_d": float(cider)}


def _phrases() -> dict[str, list[list[str]]]:
    """attribute -> per value (in label order), the phrases that state it in a world caption."""
    return {
        attr: [[tokenize(p) for p in SYNONYMS.get(v, [v])] for v in values]
        for attr, values in ATTRIBUTES.items()
    }


def parse_attributes(caption: str) -> dict[str, int | None]:
    """attribute -> the label index the caption states (None: no value, or more than one)."""
    text = f" {tokenize(caption)} "
    out: dict[str, int | None] = {}
    for attr, values in _phrases().items():
        said = [i for i, phrases in enumerate(values) if any(f" {p} " in text for p in phrases)]
        out[attr] = said[0] if len(said) == 1 else None
    return out


def attribute_accuracy(captions: list[str], labels: dict[str, list[int]]) -> dict[str, float]:
    """attribute -> the fraction of captions that state the true value (only the attributes in
    `labels`), and "all": the fraction right on every one of them."""
    parsed = [parse_attributes(c) for c in captions]
    keys = [k for k in ATTRIBUTES if k in labels]
    right = {k: [p[k] == int(y) for p, y in zip(parsed, labels[k], strict=True)] for k in keys}
    out = {k: float(np.mean(v)) for k, v in right.items()}
    if keys:
        out["all"] = float(np.mean([all(right[k][i] for k in keys) for i in range(len(captions))]))
    return out


class CaptioningConfig(StrictModel):
    beam: int = pydantic.Field(1, ge=1)  # 1: greedy
    max_length: int | None = pydantic.Field(None, ge=2)  # None: the text tower's context length
    max_samples: int | None = pydantic.Field(500, ge=1)  # generation is slow: the first N images

    @classmethod
    def tiny(cls) -> dict:
        return {"max_samples": 6}


@register("captioning")
class Captioning(Evaluator):
    """Captions for the set's images, scored against the set's captions (and the world's attributes)."""

    Config = CaptioningConfig
    task = "captioning"
    headlines = frozenset({"cider_d", "attribute_acc"})
    needs_decoder = True  # generates with the caption decoder (run by the coca smoke test, test_recipes.py)

    def __call__(self, eset: EmbeddedSet, ctx: EvalContext) -> list[Metric]:
        from coalign.models.generate import Captioner, Decoding

        decoder = getattr(ctx.model, "decoder", None)
        if decoder is None or ctx.source is None:
            raise ConfigError(
                "captioning generates with the model's caption decoder; this model has none "
                "(train a recipe with model.decoder, e.g. coca)"
            )
        image, text = decoder.context, decoder.text
        captioner = Captioner.of(ctx.model, ctx.transforms[text])
        decoding = Decoding(beam=self.config.beam, max_length=self.config.max_length)
        rows = eset.has(image).nonzero().squeeze(1)[: self.config.max_samples]
        index = eset.indices if eset.indices is not None else torch.arange(len(eset))
        rng = np.random.default_rng(0)
        generated, references = [], []
        device = ctx.runtime.device
        for start in range(0, len(rows), ctx.batch_size):
            samples = [ctx.source[int(index[r])] for r in rows[start : start + ctx.batch_size]]
            images = torch.stack([ctx.transforms[image](s[image], rng) for s in samples]).to(device)
            with ctx.runtime.autocast():
                out = captioner.generate(images, decoding)
            generated += captioner.texts(ctx.transforms[text], out)
            references += [caption_list(s.get(text)) for s in samples]
        keep = [i for i, refs in enumerate(references) if refs]
        if not keep:
            return []
        scores = bleu4_cider_d([generated[i] for i in keep], [references[i] for i in keep])
        records = self.metrics(eset, image, None, scores)
        labels = {k: eset.labels[k][rows].tolist() for k in ATTRIBUTES if k in eset.labels}
        for key, value in attribute_accuracy(generated, labels).items():
            label = None if key == "all" else key
            records.append(self.metric(eset, image, label, "attribute_acc", value, headline=key == "all"))
        return records
