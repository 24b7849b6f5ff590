"""Random-init OpenCLIP models for the converter tests (`tests/test_convert_*.py`): nothing downloaded."""

from __future__ import annotations

import json

import torch

VISION = {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8}
TEXT = {"context_length": 20, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 2}
SMALL = {"embed_dim": 32, "quick_gelu": True, "vision_cfg": VISION, "text_cfg": TEXT}
# "!" is token 0, the padding id too; the long one is cut at the context length
TEXTS = ["a photo of a cat!", "Hello, World!! 😀", "!!! ! !", "", "a long caption " * 10, "café &amp; co"]


def make_openclip(tmp_path, name, cfg, seed=0):
    """A random-init OpenCLIP model (eval mode), its eval preprocessing and its config file. Every weight
    is moved off its init (unit norms, zero biases), so a weight converted wrongly shows. A config with
    a preprocess_cfg is written as a hub folder's open_clip_config.json (model_cfg + preprocess_cfg)."""
    import open_clip

    cfg = dict(cfg)
    pre = cfg.pop("preprocess_cfg", None)
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    path = tmp_path / f"{name}.json"
    if pre is not None:
        path = tmp_path / "open_clip_config.json"
        path.write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pre}))
    kwargs = (
        {}
        if pre is None
        else {"image_mean": pre["mean"], "image_std": pre["std"], "image_resize_mode": pre["resize_mode"]}
    )
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval(), preprocess, path


def features(out):
    """get_*_features gives a tensor in transformers 4 and an output with the projection in 5."""
    return out if torch.is_tensor(out) else out.pooler_output


def load_quietly(model_class, folder):
    """`model_class.from_pretrained(folder)`, with its loading info and the warnings it logged."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model, info = model_class.from_pretrained(folder, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    return model.eval(), info, [r.getMessage() for r in records if r.levelno >= logging.WARNING]


def assert_same_embeddings(run, hf_model, images, ids, **text_inputs):
    """A coalign run's image and text embeddings equal a transformers model's (fp32, 1e-5); the HF
    text tower reads `text_inputs` (default: the same `ids`)."""
    import torch.nn.functional as F

    text_inputs = text_inputs or {"input_ids": ids}
    with torch.no_grad():
        for modality, ours, theirs in (
            ("image", images, hf_model.get_image_features(pixel_values=images)),
            ("text", ids, hf_model.get_text_features(**text_inputs)),
        ):
            expected = F.normalize(features(theirs), dim=-1)
            torch.testing.assert_close(run.model.encode(modality, ours), expected, rtol=0, atol=1e-5)
