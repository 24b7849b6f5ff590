"""Hugging Face SigLIP in and out: a local `transformers` SiglipModel folder (config.json, weights,
tokenizer.json, preprocessor_config.json) <-> a coalign run.

SigLIP's towers are coalign's with the options SigLIP needs, and the correspondence is one to one:
the ViT has no class token and no `norm_pre` (`class_token: false`, `norm_pre: false`), a patch
projection with a bias, learnt positions, `post_layernorm` (the transformer's final norm) and the
attention-pooling head (`pool: map`: HF's `vision_model.head`, its `nn.MultiheadAttention` tensors
copied as they are); the text tower is bidirectional, reads the whole padded sequence and pools its
last position (`pool: last`), then `text_model.head`, a Linear with bias (`pooled_proj: true`). Neither
side projects again (`model.head: identity`). The `siglip` objective's logit scale and bias are
SiglipModel's `logit_scale` and `logit_bias`.

Tokenizer: a fast tokenizer (`tokenizer.json`), which transformers 5 loads for a SigLIP folder with no
extra package (`AutoTokenizer` reads the `tokenizer_class` the folder's tokenizer_config.json names),
and which coalign's `bpe` text transform reads with the same `tokenizers` library, so both give the
same ids. The released google/siglip-* folders carry only `spiece.model`: those convert with the
`siglip_spm` text transform, which tokenizes through transformers' SiglipTokenizer itself (it needs
sentencepiece), and export writes that spiece.model back. Either way the ids are checked against the
folder's own tokenizer before anything is written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from coalign.build import LoadedRun
from coalign.convert.hf import (
    ACTS,
    encoder_config,
    hf_towers,
    preprocessor_config,
    read_preprocessing,
    require,
    write_folder,
)
from coalign.convert.hf_weights import blocks_from_hf, blocks_to_hf
from coalign.convert.run import ConversionError, placeholder_data, write_run
from coalign.data.transforms.siglip_spm import SPIECE_FILE, read_tokenizer
from coalign.data.transforms.text import TOKENIZER_FILE

IMG, TXT = "towers.image", "towers.text"
V, T = "vision_model", "text_model"
# SigLIP's own starting values (big_vision: t' = ln 10, b = -10), for a run whose objective learns none
DEFAULT_SCALE, DEFAULT_BIAS = math.log(10.0), -10.0
# captions the import checks coalign's ids against the folder's tokenizer with
PROBES = ["a photo of a cat.", "Two DOGS,  running!", "", "naïve café — 東京 ✓", "word " * 200]


def is_siglip(run: LoadedRun) -> bool:
    """Whether a run has any part only SigLIP has (then it exports as SigLIP or not at all)."""
    towers = run.model.towers
    image = getattr(towers["image"], "cfg", None) if "image" in towers else None
    text = getattr(towers["text"], "cfg", None) if "text" in towers else None
    return (
        run.recipe.model.head == "identity"
        or getattr(image, "pool", None) == "map"
        or getattr(text, "pool", None) == "last"
    )


# ------------------------------------------------------------------------------------------ weights


def map_head_keys(ours: str, theirs: str) -> dict[str, str]:
    """coalign AttentionPool names -> HF SiglipMultiheadAttentionPoolingHead names."""
    names = {"probe": "probe", "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    for p in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"):
        names[f"attention.{p}"] = f"attention.{p}"
    for p in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        names[f"mlp.{p}"] = f"mlp.{p}"
    return {f"{ours}.{a}": f"{theirs}.{b}" for a, b in names.items()}


def tensor_names() -> dict[str, str]:
    """coalign model tensor -> SiglipModel tensor, for everything outside the transformer blocks."""
    names = {
        f"{IMG}.patch_embed.weight": f"{V}.embeddings.patch_embedding.weight",
        f"{IMG}.patch_embed.bias": f"{V}.embeddings.patch_embedding.bias",
        f"{TXT}.token_embed.weight": f"{T}.embeddings.token_embedding.weight",
        f"{TXT}.proj.weight": f"{T}.head.weight",
        f"{TXT}.proj.bias": f"{T}.head.bias",
    }
    for p in ("weight", "bias"):
        names[f"{IMG}.transformer.norm.{p}"] = f"{V}.post_layernorm.{p}"
        names[f"{TXT}.transformer.norm.{p}"] = f"{T}.final_layer_norm.{p}"
    return names | map_head_keys(f"{IMG}.map", f"{V}.head")


def weights_to_hf(sd: dict[str, torch.Tensor], depth_image: int, depth_text: int) -> dict[str, torch.Tensor]:
    """A coalign SigLIP-shaped model's state dict -> SiglipModel's (without logit scale and bias)."""
    out = {theirs: sd[ours] for ours, theirs in tensor_names().items()}
    out[f"{V}.embeddings.position_embedding.weight"] = sd[f"{IMG}.pos_embed"][0]  # (P, D)
    out[f"{T}.embeddings.position_embedding.weight"] = sd[f"{TXT}.pos_embed"][0]  # (L, D)
    out |= blocks_to_hf(sd, f"{IMG}.transformer", f"{V}.encoder", depth_image)
    return out | blocks_to_hf(sd, f"{TXT}.transformer", f"{T}.encoder", depth_text)


def weights_from_hf(
    sd: dict[str, torch.Tensor], depth_image: int, depth_text: int
) -> dict[str, torch.Tensor]:
    """SiglipModel's state dict -> coalign Task weights (`model.` tensors, the siglip scale and bias)."""
    out = {ours: sd[theirs] for ours, theirs in tensor_names().items()}
    out[f"{IMG}.pos_embed"] = sd[f"{V}.embeddings.position_embedding.weight"].unsqueeze(0)
    out[f"{TXT}.pos_embed"] = sd[f"{T}.embeddings.position_embedding.weight"].unsqueeze(0)
    out |= blocks_from_hf(sd, f"{IMG}.transformer", f"{V}.encoder", depth_image)
    out |= blocks_from_hf(sd, f"{TXT}.transformer", f"{T}.encoder", depth_text)
    weights = {f"model.{k}": v for k, v in out.items()}
    weights["objectives.0.logit_scale"] = sd["logit_scale"].reshape(())
    weights["objectives.0.logit_bias"] = sd["logit_bias"].reshape(())
    return weights


# ------------------------------------------------------------------------------------------- export


def siglip_config(run: LoadedRun) -> dict[str, Any]:
    """SiglipConfig keyword arguments for a run, or ConversionError naming the part without an HF form."""
    recipe = run.recipe
    hf_towers(recipe, "SigLIP")
    if recipe.model.head != "identity":
        raise ConversionError(
            f"model.head '{recipe.model.head}': Hugging Face SigLIP has no projection after its towers' "
            "own heads (only 'identity' exports)"
        )
    image, text = run.model.towers["image"].cfg, run.model.towers["text"].cfg
    wrong = {
        "model.towers.image.encoder": (recipe.model.towers["image"].encoder, "vit"),
        "model.towers.text.encoder": (recipe.model.towers["text"].encoder, "text_transformer"),
        "data.transforms.text.transform": (recipe.data.transforms["text"].transform, "bpe"),
    }
    for where, (got, need) in wrong.items():
        if got != need and not (where.startswith("data.") and got == "siglip_spm"):
            raise ConversionError(
                f"{where} '{got}' has no Hugging Face SigLIP equivalent (only '{need}' exports)"
            )
    checks = {
        "model.towers.image.stem": (image.stem, "patch"),
        "model.towers.image.class_token": (image.class_token, False),
        "model.towers.image.norm_pre": (image.norm_pre, False),
        "model.towers.image.patch_bias": (image.patch_bias, True),
        "model.towers.image.pool": (image.pool, "map"),
        "model.towers.text.causal": (text.causal, False),
        "model.towers.text.pool": (text.pool, "last"),
        "model.towers.text.pooled_proj": (text.pooled_proj, True),
    }
    require(checks, "SigLIP")

    sp = run.transforms["text"].specials
    return {
        "text_config": encoder_config(text)
        | {
            "vocab_size": text.vocab_size,
            "max_position_embeddings": text.context_length,
            "projection_size": text.width,
            "pad_token_id": sp.pad,
            "bos_token_id": sp.bos,
            "eos_token_id": sp.eos,
        },
        "vision_config": encoder_config(image)
        | {"image_size": image.image_size, "patch_size": image.patch_size, "vision_use_head": True},
    }


def scale_and_bias(run: LoadedRun) -> tuple[torch.Tensor, torch.Tensor]:
    """(ln scale, bias) of the run's first objective that learns both, as (1,) tensors (SigLIP's
    starting values when none does)."""
    from coalign.checkpoint import load_weights

    weights = load_weights(run.checkpoint)
    for key, value in weights.items():
        if key.startswith("objectives.") and key.endswith(".logit_scale"):
            bias = weights.get(key.removesuffix("logit_scale") + "logit_bias")
            if bias is not None:
                return value.reshape(1).float(), bias.reshape(1).float()
    return torch.tensor([DEFAULT_SCALE]), torch.tensor([DEFAULT_BIAS])


def fast_tokenizer(run: LoadedRun, transformers):
    """The run's tokenizer.json as a transformers fast tokenizer that writes what coalign's text
    transform writes: its start and end tokens (a post-processor template), padding with its pad
    token to context_length, and input_ids alone (SigLIP's text tower reads no attention mask)."""
    from tokenizers import Tokenizer, processors

    transform = run.transforms["text"]
    tok = Tokenizer.from_str((run.run_dir / TOKENIZER_FILE).read_text(encoding="utf-8"))
    sp, name = transform.specials, tok.id_to_token
    template = " ".join(
        [
            *([name(sp.bos)] if sp.bos is not None else []),
            "$A",
            *([name(sp.eos)] if sp.eos is not None else []),
        ]
    )
    specials = [(name(i), i) for i in (sp.bos, sp.eos) if i is not None]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    tok.no_padding()
    tok.no_truncation()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=name(sp.pad),
        bos_token=name(sp.bos) if sp.bos is not None else None,
        eos_token=name(sp.eos) if sp.eos is not None else None,
        model_max_length=transform.cfg.context_length,
        padding_side="right",
        truncation_side="right",
        model_input_names=["input_ids"],
    )


def export_siglip(run: LoadedRun, out: Path, transformers) -> Path:
    """Write the run as a SiglipModel folder: config.json, model.safetensors, tokenizer.json with its
    tokenizer_config.json, and preprocessor_config.json."""
    config = transformers.SiglipConfig(**siglip_config(run))
    image, text = run.model.towers["image"].cfg, run.model.towers["text"].cfg
    weights = weights_to_hf(run.model.state_dict(), image.depth, text.depth)
    weights["logit_scale"], weights["logit_bias"] = scale_and_bias(run)
    model = transformers.SiglipModel(config)
    model.load_state_dict(weights, strict=True)
    pre = preprocessor_config(run) | {"image_processor_type": "SiglipImageProcessor"}
    spm = run.recipe.data.transforms["text"].transform == "siglip_spm"
    # SiglipTokenizer's spiece.model as the run keeps it, or the run's tokenizer.json as a fast one
    tokenizer = run.transforms["text"].tokenizer if spm else fast_tokenizer(run, transformers)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")

    return write_folder(out, fill)


# ------------------------------------------------------------------------------------------- import


def import_siglip(folder: Path, out: Path, name: str | None, transformers) -> LoadedRun:
    """A local SiglipModel folder -> a coalign run (its weights, tokenizer and preprocessing)."""
    config = transformers.SiglipConfig.from_pretrained(folder)
    v, t = config.vision_config, config.text_config
    acts = {hf: ours for ours, hf in ACTS.items()}
    for where, act in (("vision_config", v.hidden_act), ("text_config", t.hidden_act)):
        if act not in acts:
            raise ConversionError(f"{where}.hidden_act '{act}' has no coalign equivalent ({', '.join(acts)})")
    if not getattr(v, "vision_use_head", True):
        raise ConversionError(
            "vision_config.vision_use_head is false: SiglipModel's image embedding is its head's"
        )
    widths = {"vision_config.hidden_size": v.hidden_size, "text_config.projection_size": t.projection_size}
    if len(set(widths.values()) | {t.hidden_size}) != 1:
        raise ConversionError(
            f"text_config.hidden_size {t.hidden_size}, {', '.join(f'{k} {x}' for k, x in widths.items())} "
            "differ; coalign converts SigLIP models whose towers and text head share one width"
        )
    if getattr(v, "num_channels", 3) != 3:
        raise ConversionError(f"vision_config.num_channels is {v.num_channels}; coalign's images have 3")
    tokenizer = folder_tokenizer(folder, transformers)
    length = min(t.max_position_embeddings, tokenizer.model_max_length)
    if isinstance(tokenizer, transformers.PreTrainedTokenizerFast):
        text_t = {
            "transform": "bpe",
            "context_length": length,
            # what describe() reports before the file is read (the transform's floor: 256 bytes + 3)
            "vocab_size": max(min(len(tokenizer), t.vocab_size), 259),
            "pad_token": tokenizer.pad_token,
            **added_specials(tokenizer),
        }
    else:  # SiglipTokenizer's spiece.model, read by the same class: `</s>` ends a caption
        text_t = {"transform": "siglip_spm", "context_length": length}

    def tower(cfg) -> dict[str, Any]:
        return {
            "width": cfg.hidden_size,
            "depth": cfg.num_hidden_layers,
            "heads": cfg.num_attention_heads,
            "mlp_ratio": cfg.intermediate_size / cfg.hidden_size,
            "act": acts[cfg.hidden_act],
            "norm_eps": cfg.layer_norm_eps,
        }

    image_t = read_preprocessing(folder, v.image_size, crop=False, mean=(0.5,) * 3, std=(0.5,) * 3)
    eos = text_t.get("eos_token", tokenizer.eos_token if text_t["transform"] == "siglip_spm" else None)
    recipe = {
        "name": name or Path(out).name,
        "data": placeholder_data({"image": image_t, "text": text_t}),
        "model": {
            "embed_dim": v.hidden_size,
            "head": "identity",
            "towers": {
                "image": {
                    "encoder": "vit",
                    "image_size": v.image_size,
                    "patch_size": v.patch_size,
                    "class_token": False,
                    "norm_pre": False,
                    "patch_bias": True,
                    "pool": "map",
                    **tower(v),
                },
                "text": {
                    "encoder": "text_transformer",
                    "vocab_size": t.vocab_size,
                    "context_length": t.max_position_embeddings,
                    "causal": False,
                    "pool": "last",
                    "pooled_proj": True,
                    **({"eos_id": tokenizer.convert_tokens_to_ids(eos)} if eos else {}),
                    **tower(t),
                },
            },
        },
        "objectives": [{"name": "siglip"}],
    }
    check_ids(text_t, tokenizer, folder)
    model = transformers.SiglipModel.from_pretrained(folder)
    weights = weights_from_hf(model.state_dict(), v.num_hidden_layers, t.num_hidden_layers)
    return write_run(Path(out), recipe, weights, {"format": "hf-siglip", "folder": str(folder)}, folder)


def folder_tokenizer(folder: Path, transformers):
    """The folder's tokenizer.json as the fast tokenizer transformers builds from it (its
    tokenizer_config.json's special tokens and length), else its spiece.model as SiglipTokenizer, or a
    one-line error."""
    if (folder / TOKENIZER_FILE).is_file():
        tok = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    elif (folder / SPIECE_FILE).is_file():
        tok = read_tokenizer(folder)
    else:
        raise FileNotFoundError(
            f"'{folder}' has no tokenizer: SigLIP's is a {SPIECE_FILE} (SiglipTokenizer) "
            f"or a {TOKENIZER_FILE}"
        )
    if tok.pad_token is None:
        raise ConversionError(f"'{folder}': its tokenizer has no pad_token; SigLIP pads every caption")
    return tok


def added_specials(tokenizer) -> dict[str, str]:
    """bos_token / eos_token names for coalign's text transform: the tokens the folder's tokenizer
    puts before and after a caption (its post-processor), whatever it calls them."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    at = next((i for i in range(len(full)) if full[i : i + len(bare)] == bare), None)
    if at is None or len(full) - len(bare) > 2 or at > 1:
        raise ConversionError(
            f"the tokenizer writes {full} for 'a' ({bare} without special tokens); "
            "coalign writes at most one token before and one after a caption"
        )
    before, after = full[:at], full[at + len(bare) :]
    out = {}
    if before:
        out["bos_token"] = tokenizer.convert_ids_to_tokens(before[0])
    if after:
        out["eos_token"] = tokenizer.convert_ids_to_tokens(after[0])
    return out


def check_ids(text_t: dict[str, Any], tokenizer, folder: Path) -> None:
    """coalign's text transform `text_t`, reading the folder's tokenizer files, gives the ids the
    folder's tokenizer gives (padded to context_length, as SigLIP pads) on PROBES, before anything is
    written; a one-line error otherwise (never a run that silently tokenizes differently)."""
    from coalign.registry import TRANSFORMS

    name = text_t["transform"]
    options = {k: v for k, v in text_t.items() if k != "transform"}
    ours = TRANSFORMS.create(name, where="data.transforms.text", path=str(folder), **options).encode(PROBES)
    length = text_t["context_length"]
    theirs = tokenizer(PROBES, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    theirs = theirs["input_ids"]
    if not torch.equal(ours, theirs):
        row = int((ours != theirs).any(1).nonzero()[0])
        raise ConversionError(
            f"'{folder}': coalign's text transform tokenizes {PROBES[row]!r} as {ours[row][:8].tolist()}..., "
            f"the folder's tokenizer as {theirs[row][:8].tolist()}..."
        )
