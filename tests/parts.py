"""Tiny instances of registered parts, built from their Configs' tiny settings (`Registry.tiny`).

The harness behind `test_registries.py`, shared with the tests of single parts: nothing here names a
registered entry. An encoder is paired with a transform by the modality both declare, its input
options (image_size, vocab_size, ...) come from that transform's `describe()`, and raw values come
from the built-in world, which renders every modality.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coalign.build import prepare_transforms
from coalign.config import ModelConfig
from coalign.data.collate import collate
from coalign.data.sample import base_modality
from coalign.data.sources.base import Source
from coalign.data.transforms.base import Pipeline, Transform
from coalign.models.encoders.base import Encoder, fill_inputs
from coalign.models.model import MultimodalModel
from coalign.registry import DECODERS, ENCODERS, FUSION, SOURCES, TRANSFORMS

EMBED_DIM = 16
# The world's settings for raw values: few samples, short clips, small clouds and images. Captions:
# two per sample, so that a text transform picks among them in training.
WORLD = {"size": 32, "image_size": 32, "captions": 2, "num_points": 256, "audio_seconds": 0.3}


def world(modalities: list[str], split: str = "train", **options: Any) -> Source:
    return SOURCES.create("world", **{**WORLD, "modalities": modalities, "split": split, **options})


def of_modality(registry: Any, modality: str) -> list[str]:
    """The registered names whose class declares `modality` (encoders, transforms)."""
    return [n for n in registry.names() if getattr(registry.get(n), "modality", "") == modality]


def transform_for(modality: str) -> str:
    names = of_modality(TRANSFORMS, modality)
    assert names, f"no registered transform declares modality '{modality}'; its encoders cannot be fed"
    return names[0]


# The modality's own built-in tower first: the pretrained wrappers (hf_text, timm) come before
# them in name order, but are tested by their own files and need weights or an architecture.
BUILT_IN = ("vit", "text_transformer", "audio_transformer", "point_transformer", "tabular_transformer")


def encoder_for(modality: str) -> str:
    names = of_modality(ENCODERS, modality)
    assert names, f"no registered encoder declares modality '{modality}'"
    return next((n for n in BUILT_IN if n in names), names[0])


def tiny_transform(name: str, fit_on: Source | None = None, **overrides: Any) -> Transform:
    """The transform at its tiny settings, fitted on `fit_on` (a tokenizer, tabular statistics)."""
    transform = TRANSFORMS.create(name, **{**TRANSFORMS.tiny(name), **overrides})
    if fit_on is not None:
        transform.fit(fit_on, None)
    return transform


def tower_inputs(modality: str) -> dict[str, Any]:
    """What the tiny transform of `modality` tells its encoder, from its Config alone (no fitting)."""
    name = transform_for(modality)
    cfg = TRANSFORMS.validate(name, TRANSFORMS.tiny(name))
    return TRANSFORMS.get(name).describe_config(cfg)


def tiny_encoder_options(name: str, inputs: dict[str, Any] | None = None, **overrides: Any) -> dict:
    """The encoder's tiny settings, with the inputs (image_size, ...) of its modality's tiny transform."""
    cls = ENCODERS.get(name)
    inputs = tower_inputs(cls.modality) if inputs is None else inputs
    return fill_inputs(ENCODERS.config_class(name), {**ENCODERS.tiny(name), **overrides}, inputs)


def tiny_encoder(name: str, **overrides: Any) -> Encoder:
    return ENCODERS.create(name, **tiny_encoder_options(name, **overrides))


def tiny_fusion(context: str, query: str, name: str | None = None) -> dict[str, Any]:
    """The `model.fusion` spec of a tiny fusion part (the first registered one, or `name`)."""
    name = name or FUSION.names()[0]
    return {"fusion": name, **FUSION.tiny(name), "query": query, "context": context}


def needs_fusion(cfg: Any) -> bool:
    """Whether an objective's Config reads fused tokens (then its tiny model gets a fusion part)."""
    return bool(getattr(cfg, "needs_fusion", False))


def tiny_decoder(context: str, text: str, name: str | None = None) -> dict[str, Any]:
    """The `model.decoder` spec of a tiny caption decoder (the first registered one, or `name`)."""
    name = name or DECODERS.names()[0]
    return {"decoder": name, **DECODERS.tiny(name), "text": text, "context": context}


def needs_decoder(cfg: Any) -> bool:
    """Whether an objective's Config trains a caption decoder (then its tiny model gets one)."""
    return bool(getattr(cfg, "needs_decoder", False))


def tiny_model(
    transforms: dict[str, Transform],
    towers: dict[str, str] | None = None,
    head: str = "linear",
    fusion: dict[str, Any] | None = None,
    decoder: dict[str, Any] | None = None,
) -> MultimodalModel:
    """A model with one tower per modality key of `transforms` (its first encoder, or `towers[m]`),
    and the fusion part `fusion` (a `model.fusion` spec, e.g. from `tiny_fusion`) and the caption
    decoder `decoder` (from `tiny_decoder`; the text tower it continues is built causal) when given."""
    modalities = [k for k in transforms if "@" not in k]
    specs = {}
    for m in modalities:
        encoder = (towers or {}).get(m) or encoder_for(transforms[m].modality)
        specs[m] = {"encoder": encoder, **ENCODERS.tiny(encoder)}
    if decoder is not None:
        specs[decoder["text"]]["causal"] = True
    cfg = ModelConfig(embed_dim=EMBED_DIM, towers=specs, head=head, fusion=fusion, decoder=decoder)
    return MultimodalModel.from_config(cfg, {m: transforms[m].describe() for m in modalities})


def transforms_for(keys: list[str], source: Source, run_dir: Path) -> dict[str, Transform]:
    """One tiny transform per batch key, prepared as training prepares them: each modality's fitted
    on `source` (saving what it learnt in `run_dir`), each view `<modality>@<view>` loading that."""
    transforms = {key: tiny_transform(transform_for(base_modality(key))) for key in keys}
    prepare_transforms(transforms, source, run_dir, resume=False)
    return transforms


def tiny_batch(
    source: Source,
    transforms: dict[str, Transform],
    size: int = 6,
    missing: str | None = None,
    seed: int = 0,
    lacking: Sequence[int] | None = None,
) -> dict[str, Any]:
    """A collated batch of the first `size` samples; with `missing`, every other sample (or the
    samples `lacking`) lacks that modality (and its views), so objectives see a presence mask."""
    rng = np.random.default_rng(seed)
    pipeline = Pipeline(transforms)
    samples = []
    for i in range(size):
        sample = dict(source[i])
        if missing is not None and (i % 2 == 1 if lacking is None else i in lacking):
            sample.pop(missing, None)
        samples.append(pipeline(sample, rng))
    return collate(samples, list(transforms))


def bad_grads(*modules: torch.nn.Module, every: bool = False) -> list[str]:
    """Trainable parameters whose gradient is not finite (or, with `every`, missing)."""
    bad = []
    for i, module in enumerate(modules):
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:
                bad += [f"{i}.{name}: no gradient"] if every else []
            elif not torch.isfinite(p.grad).all():
                bad.append(f"{i}.{name}: non-finite gradient")
    return bad


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread inside the block, as each rank of a 2-process test runs (torchrun's
    OMP_NUM_THREADS=1): the same kernels give the same bits, where matmuls split over another number
    of threads may round a value apart. Also quicker for strings of tiny ops, where two threads
    wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
