"""OpenCLIP in: a model config JSON (as `open_clip` keeps them: `model_configs/*.json`, or the
`open_clip_config.json` of a hub folder) plus its state dict (`.pt`, `.bin` or `.safetensors`) ->
a coalign run.

What carries over: OpenCLIP's ViT image tower (class-token or mean pooling, `ln_pre` or none, patch
projection without bias, learnt or fixed sin-cos positions, copied as they are), its causal text
tower (pooled at the end-of-text token, which `argmax` pooling finds in CLIP's vocabulary), QuickGELU
or GELU, layer-norm eps, the bias-free projections, the learnt logit scale (and SigLIP's logit bias),
CLIP's tokenizer and the evaluation preprocessing (resize the shorter side, centre crop, mean/std).
Anything else (ResNet, timm or Hugging Face towers, layer scale, attentional pooling, CoCa's class
token, custom attention blocks, another tokenizer) is refused, naming the option, before any weight
is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from coalign.build import LoadedRun
from coalign.convert.run import ConversionError, placeholder_data, write_run
from coalign.data.transforms.clip_bpe import openclip_vocabulary
from coalign.data.transforms.image import CLIP_MEAN, CLIP_STD

# OpenCLIP block names -> coalign's (models/layers.py Block)
BLOCK = {
    "ln_1.": "norm1.",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.": "attn.proj.",
    "ln_2.": "norm2.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}
EOT_ID = 49407  # CLIP's <end_of_text>, the highest id: what OpenCLIP's `argmax` pooling finds
# Options that must keep these values (anything else changes the computation in a way coalign's towers
# do not express); the message names the option.
BLOCK_FIXED = {  # the transformer-block options both towers share
    "ls_init_value": None,
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
}
VISION_FIXED = {
    **BLOCK_FIXED,
    "attentional_pool": False,
    "timm_model_name": None,
    "act_kwargs": None,
}
TEXT_FIXED = {
    **BLOCK_FIXED,
    "embed_cls": False,
    "no_causal_mask": False,
    "proj_bias": False,
    "proj_type": "linear",
    "hf_model_name": None,
    "hf_tokenizer_name": None,
    "tokenizer_mode": None,
    "act_kwargs": None,
}


def read_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model config, preprocess config) from an OpenCLIP model JSON or a hub `open_clip_config.json`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"OpenCLIP model config '{path}' not found")
    try:
        raw = json.loads(path.read_text())
    except ValueError as err:
        raise ConversionError(f"OpenCLIP model config '{path}' is not JSON: {err}") from None
    model = raw.get("model_cfg", raw)
    if not isinstance(model, dict) or "vision_cfg" not in model or "text_cfg" not in model:
        raise ConversionError(f"'{path}' is not an OpenCLIP model config (needs vision_cfg and text_cfg)")
    return model, {**raw.get("preprocess_cfg", {}), **model.get("preprocess_cfg", {})}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors` or a torch file (a plain state dict or a training checkpoint
    holding one under `state_dict`; DDP's `module.` and torch.compile's `_orig_mod.` prefixes removed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a TorchScript archive (OpenAI's own .pt files), a pickle of objects
            raise ConversionError(
                f"cannot read '{path}' as a state dict: {str(err).splitlines()[0]}"
            ) from None
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConversionError(f"'{path}' holds no state dict of tensors")
    out = {}
    for key, value in sd.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def _fixed(cfg: dict[str, Any], fixed: dict[str, Any], where: str) -> None:
    for key, value in fixed.items():
        if cfg.get(key, value) not in (value, None if value is False else value):
            raise ConversionError(
                f"OpenCLIP {where}.{key} = {cfg[key]!r} has no coalign equivalent (only {value!r} converts)"
            )


def _eps(cfg: dict[str, Any], where: str) -> float:
    norm = dict(cfg.get("norm_kwargs") or {})
    eps = norm.pop("eps", 1e-5)
    if norm:
        raise ConversionError(f"OpenCLIP {where}.norm_kwargs {sorted(norm)} have no coalign equivalent")
    return float(eps)


def openclip_recipe(model: dict[str, Any], preprocess: dict[str, Any], name: str) -> dict[str, Any]:
    """The coalign recipe (a dict) of an OpenCLIP model config; ConversionError for what cannot map."""
    v, t = dict(model["vision_cfg"]), dict(model["text_cfg"])
    _fixed(v, VISION_FIXED, "vision_cfg")
    _fixed(t, TEXT_FIXED, "text_cfg")
    for key, cfg in (("vision_cfg", v), ("text_cfg", t)):
        if not isinstance(cfg.get("layers", 12), int):
            raise ConversionError(
                f"OpenCLIP {key}.layers = {cfg['layers']!r}: a ResNet tower does not convert"
            )
    size = v.get("image_size", 224)
    if not isinstance(size, int):
        if len(set(size)) != 1:
            raise ConversionError(f"OpenCLIP vision_cfg.image_size {size}: only square images convert")
        size = size[0]
    pool = {"tok": "cls", "avg": "mean"}.get(v.get("pool_type", "tok"))
    if pool is None:
        raise ConversionError(
            f"OpenCLIP vision_cfg.pool_type {v['pool_type']!r}: only 'tok' and 'avg' convert"
        )
    if v.get("final_ln_after_pool") and pool == "mean":
        raise ConversionError("OpenCLIP vision_cfg.final_ln_after_pool with pool_type 'avg' does not convert")
    if v.get("pos_embed_type", "learnable") not in ("learnable", "sin_cos_2d"):
        raise ConversionError(f"OpenCLIP vision_cfg.pos_embed_type {v['pos_embed_type']!r} does not convert")
    text_pool = t.get("pool_type", "argmax")
    eos_id = EOT_ID if text_pool == "argmax" else t.get("eos_id", 2) if text_pool == "eos" else None
    if eos_id != EOT_ID:
        raise ConversionError(
            f"OpenCLIP text_cfg.pool_type {text_pool!r} (eos_id {t.get('eos_id')}): only pooling at CLIP's "
            f"end-of-text token ({EOT_ID}) converts"
        )
    if t.get("pad_id", 0) != 0:
        raise ConversionError(f"OpenCLIP text_cfg.pad_id {t['pad_id']}: CLIP's tokenizer pads with 0")
    resize = preprocess.get("resize_mode", "shortest")
    if resize not in ("shortest", "squash"):
        raise ConversionError(
            f"OpenCLIP preprocess resize_mode {resize!r}: only 'shortest' and 'squash' convert"
        )
    act = "quick_gelu" if model.get("quick_gelu") else "gelu"
    width = v.get("width", 768)
    image = {
        "encoder": "vit",
        "image_size": size,
        "patch_size": v.get("patch_size", 16),
        "width": width,
        "depth": v.get("layers", 12),
        "heads": width // v.get("head_width", 64),
        "mlp_ratio": v.get("mlp_ratio", 4.0),
        "pool": pool,
        "patch_bias": False,
        "norm_pre": not v.get("no_ln_pre", False),
        "act": act,
        "norm_eps": _eps(v, "vision_cfg"),
        "mask_ratio": v.get("patch_dropout", 0.0),
    }
    text = {
        "encoder": "text_transformer",
        "vocab_size": t.get("vocab_size", 49408),
        "context_length": t.get("context_length", 77),
        "width": t.get("width", 512),
        "depth": t.get("layers", 12),
        "heads": t.get("heads", 8),
        "mlp_ratio": t.get("mlp_ratio", 4.0),
        "causal": True,
        "pool": "eos",
        "eos_id": EOT_ID,
        "pad_id": 0,
        "act": act,
        "norm_eps": _eps(t, "text_cfg"),
    }
    transforms = {
        "image": {
            "transform": "image_crop",
            "size": size,
            "resize": resize,
            "interpolation": preprocess.get("interpolation", "bicubic"),
            "mean": list(preprocess.get("mean", CLIP_MEAN)),
            "std": list(preprocess.get("std", CLIP_STD)),
        },
        "text": {"transform": "clip_bpe", "context_length": text["context_length"]},
    }
    bias = model.get("init_logit_bias")
    objective = {"name": "siglip"} if bias is not None else {"name": "clip"}
    return {
        "name": name,
        "data": placeholder_data(transforms),
        "model": {"embed_dim": model.get("embed_dim", 512), "towers": {"image": image, "text": text}},
        "objectives": [objective],
    }


def _block(rest: str) -> str:
    index, _, name = rest.partition(".")
    for theirs, ours in BLOCK.items():
        if name.startswith(theirs):
            return f"blocks.{index}.{ours}{name[len(theirs) :]}"
    return f"blocks.{index}.?{name}"  # unknown: left for load_strict to report


def openclip_weights(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An OpenCLIP CLIP / CustomTextCLIP state dict under coalign's Task names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        key = key.removeprefix("text.")  # CustomTextCLIP keeps its text tower under `text.`
        if key.startswith("visual."):
            k = key[len("visual.") :]
            tower = "model.towers.image."
            if k == "conv1.weight":
                out[tower + "patch_embed.weight"] = value
            elif k == "class_embedding":
                out[tower + "cls_token"] = value.reshape(1, 1, -1)
            elif k == "positional_embedding":
                out[tower + "pos_embed"] = value.unsqueeze(0)
            elif k.startswith("ln_pre."):
                out[tower + "norm_pre." + k[len("ln_pre.") :]] = value
            elif k.startswith("ln_post."):
                out[tower + "transformer.norm." + k[len("ln_post.") :]] = value
            elif k.startswith("transformer.resblocks."):
                out[tower + "transformer." + _block(k[len("transformer.resblocks.") :])] = value
            elif k == "proj":
                out["model.heads.image.weight"] = value.T.contiguous()
            else:
                out[f"?visual.{k}"] = value
        elif key == "token_embedding.weight":
            out["model.towers.text.token_embed.weight"] = value
        elif key == "positional_embedding":
            out["model.towers.text.pos_embed"] = value.unsqueeze(0)
        elif key.startswith("transformer.resblocks."):
            out["model.towers.text.transformer." + _block(key[len("transformer.resblocks.") :])] = value
        elif key.startswith("ln_final."):
            out["model.towers.text.transformer.norm." + key[len("ln_final.") :]] = value
        elif key == "text_projection":
            out["model.heads.text.weight"] = value.T.contiguous()
        elif key in ("logit_scale", "logit_bias"):
            out[f"objectives.0.{key}"] = value.reshape(())
        else:
            out[f"?{key}"] = value
    return out


def import_openclip(
    config: Path, checkpoint: Path, out: Path, vocabulary: Path | None = None, name: str | None = None
) -> LoadedRun:
    """Convert; `vocabulary` is CLIP's BPE file (default: the one the installed open_clip ships)."""
    model_cfg, preprocess = read_config(config)
    recipe = openclip_recipe(model_cfg, preprocess, name or Path(out).name)
    vocabulary = vocabulary or openclip_vocabulary()
    if vocabulary is None:
        raise FileNotFoundError(
            "no CLIP vocabulary: pass --vocab (open_clip's bpe_simple_vocab_16e6.txt.gz file)"
        )
    weights = openclip_weights(read_state_dict(checkpoint))
    origin = {"format": "openclip", "config": str(config), "checkpoint": str(checkpoint)}
    return write_run(Path(out), recipe, weights, origin, Path(vocabulary))
