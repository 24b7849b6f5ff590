"""The report's captions section, for a run whose model has a caption decoder (coca): images of the
first eval dataset with the caption the model generates (greedy) beside their reference captions,
and, on the world, which attribute words the generated caption gets right."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import torch

from coalign.data.sample import captions as caption_list
from coalign.data.sources.base import SampleError
from coalign.data.world import ATTRIBUTES
from coalign.evaluate.report_model import Missing
from coalign.evaluate.report_plots import img_tag, thumbnail


@torch.no_grad()
def captions_section(run_dir: Path, examples: int = 8) -> str:
    from coalign.build import build_source, load_run
    from coalign.evaluate.captioning import parse_attributes
    from coalign.models.generate import Captioner
    from coalign.runtime import Runtime

    run = load_run(run_dir, Runtime.create("fp32"))
    decoder = run.model.decoder
    if decoder is None:
        raise Missing("The model has no caption decoder.")
    if not run.recipe.data.eval:
        raise Missing("The recipe names no evaluation dataset (data.eval): no images to caption.")
    name, spec = next(iter(run.recipe.data.eval.items()))
    source = build_source(spec, f"data.eval.{name}")
    image_key, text = decoder.context, run.transforms[decoder.text]
    picked = sorted({int(p) for p in np.linspace(0, len(source) - 1, min(max(examples, 1), len(source)))})
    rng, samples, images = np.random.default_rng(0), [], []
    for i in picked:
        try:
            sample = source[i]
            images.append(run.transforms[image_key](sample[image_key], rng))
            samples.append((i, sample))
        except (SampleError, KeyError):
            continue
    if not samples:
        raise Missing(f"Dataset '{name}' has no images to caption.")
    captioner = Captioner.of(run.model, text)
    device = next(run.model.parameters()).device
    generated = captioner.texts(text, captioner.generate(torch.stack(images).to(device)))
    rows = []
    for (i, sample), caption in zip(samples, generated, strict=True):
        uri = thumbnail(sample.get(image_key))
        img = img_tag(uri, str(sample.get("id", f"sample {i}")), "thumb") if uri else ""
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in caption_list(sample.get(decoder.text)))
        labels = sample.get("label") or {}
        said = parse_attributes(caption)
        marks = "".join(
            f'<span class="{"hit" if said[k] == labels[k] else "miss"}">{k} '
            f"{'✓' if said[k] == labels[k] else '✗'}</span> "
            for k in ATTRIBUTES
            if k in labels
        )
        rows.append(
            f'<div class="query captioned" data-index="{i}">{img}<div><p class="caption generated">'
            f"generated: “{html.escape(caption)}” {marks}</p><p>references:</p><ul>{refs}</ul></div></div>"
        )
    intro = (
        f"Greedy captions of {len(samples)} images of '{name}' spread over the set, with "
        f"{run.checkpoint.name}, beside the set's own captions; ✓/✗: whether the generated caption "
        f"states each attribute of the image (world datasets)."
    )
    return f'<p class="note">{html.escape(intro)}</p><div class="examples">{"".join(rows)}</div>'
