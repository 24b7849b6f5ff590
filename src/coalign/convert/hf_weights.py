"""The tensor maps between coalign's towers and Hugging Face's: CLIPModel's state dict both ways, and
the encoder layers that CLIP and SigLIP share (`hf_siglip.py` maps the rest of SigLIP's). coalign
keeps q, k and v as one fused `qkv`; HF keeps three projections."""

from __future__ import annotations

import torch

# coalign block names -> Hugging Face CLIPEncoderLayer names (qkv handled apart)
BLOCK = {
    "norm1.": "layer_norm1.",
    "norm2.": "layer_norm2.",
    "attn.proj.": "self_attn.out_proj.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
}


def blocks_to_hf(sd: dict[str, torch.Tensor], ours: str, theirs: str, depth: int) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(depth):
        a, b = f"{ours}.blocks.{i}.", f"{theirs}.layers.{i}."
        for name, hf in BLOCK.items():
            for p in ("weight", "bias"):
                out[f"{b}{hf}{p}"] = sd[f"{a}{name}{p}"]
        for p in ("weight", "bias"):
            q, k, v = sd[f"{a}attn.qkv.{p}"].chunk(3, dim=0)  # rows: q of every head, then k, then v
            out |= {
                f"{b}self_attn.q_proj.{p}": q,
                f"{b}self_attn.k_proj.{p}": k,
                f"{b}self_attn.v_proj.{p}": v,
            }
    return out


def blocks_from_hf(
    sd: dict[str, torch.Tensor], ours: str, theirs: str, depth: int
) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(depth):
        a, b = f"{ours}.blocks.{i}.", f"{theirs}.layers.{i}."
        for name, hf in BLOCK.items():
            for p in ("weight", "bias"):
                out[f"{a}{name}{p}"] = sd[f"{b}{hf}{p}"]
        for p in ("weight", "bias"):
            out[f"{a}attn.qkv.{p}"] = torch.cat([sd[f"{b}self_attn.{x}_proj.{p}"] for x in "qkv"])
    return out


def weights_to_hf(sd: dict[str, torch.Tensor], depth_image: int, depth_text: int) -> dict[str, torch.Tensor]:
    """A coalign model state dict (image ViT + text transformer, linear heads) -> CLIPModel's."""
    img, txt = "towers.image", "towers.text"
    out = {
        "vision_model.embeddings.class_embedding": sd[f"{img}.cls_token"].reshape(-1),
        "vision_model.embeddings.patch_embedding.weight": sd[f"{img}.patch_embed.weight"],
        "vision_model.embeddings.position_embedding.weight": sd[f"{img}.pos_embed"][0],
        "text_model.embeddings.token_embedding.weight": sd[f"{txt}.token_embed.weight"],
        "text_model.embeddings.position_embedding.weight": sd[f"{txt}.pos_embed"][0],
        "visual_projection.weight": sd["heads.image.weight"],
        "text_projection.weight": sd["heads.text.weight"],
    }
    for p in ("weight", "bias"):
        out[f"vision_model.pre_layrnorm.{p}"] = sd[f"{img}.norm_pre.{p}"]
        out[f"vision_model.post_layernorm.{p}"] = sd[f"{img}.transformer.norm.{p}"]
        out[f"text_model.final_layer_norm.{p}"] = sd[f"{txt}.transformer.norm.{p}"]
    out |= blocks_to_hf(sd, f"{img}.transformer", "vision_model.encoder", depth_image)
    out |= blocks_to_hf(sd, f"{txt}.transformer", "text_model.encoder", depth_text)
    return out


def weights_from_hf(
    sd: dict[str, torch.Tensor], depth_image: int, depth_text: int
) -> dict[str, torch.Tensor]:
    """CLIPModel's state dict -> coalign Task weights (`model.` tensors and the clip logit scale)."""
    img, txt = "towers.image", "towers.text"
    out = {
        f"{img}.cls_token": sd["vision_model.embeddings.class_embedding"].reshape(1, 1, -1),
        f"{img}.patch_embed.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        f"{img}.pos_embed": sd["vision_model.embeddings.position_embedding.weight"].unsqueeze(0),
        f"{txt}.token_embed.weight": sd["text_model.embeddings.token_embedding.weight"],
        f"{txt}.pos_embed": sd["text_model.embeddings.position_embedding.weight"].unsqueeze(0),
        "heads.image.weight": sd["visual_projection.weight"],
        "heads.text.weight": sd["text_projection.weight"],
    }
    for p in ("weight", "bias"):
        out[f"{img}.norm_pre.{p}"] = sd[f"vision_model.pre_layrnorm.{p}"]
        out[f"{img}.transformer.norm.{p}"] = sd[f"vision_model.post_layernorm.{p}"]
        out[f"{txt}.transformer.norm.{p}"] = sd[f"text_model.final_layer_norm.{p}"]
    out |= blocks_from_hf(sd, f"{img}.transformer", "vision_model.encoder", depth_image)
    out |= blocks_from_hf(sd, f"{txt}.transformer", "text_model.encoder", depth_text)
    weights = {f"model.{k}": v for k, v in out.items()}
    weights["objectives.0.logit_scale"] = sd["logit_scale"].reshape(())
    return weights
