"""Hugging Face CLIP in and out: a local `transformers` CLIPModel folder (config.json, weights,
tokenizer files, preprocessor_config.json) <-> a coalign run; SigLIP's in `hf_siglip.py`, which the
two entry points here hand a SigLIP folder or run to.

The towers correspond one to one: HF's `pre_layrnorm` is the ViT's `norm_pre`, `post_layernorm`
(applied to the class token) its final norm, `final_layer_norm` the text tower's, q/k/v projections
the rows of coalign's fused `qkv`, `visual_projection` / `text_projection` the bias-free linear heads.
HF's text tower is causal and pools at the first end-of-text token, as a converted coalign text tower
does with `eos_id`. A coalign part with no HF counterpart (a conv stem, mean pooling, a patch
projection with a bias, an MLP head, a tokenizer other than CLIP's, ...) is refused by name before
anything is written.

"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from coalign.build import LoadedRun, load_run
from coalign.convert.hf_weights import weights_from_hf, weights_to_hf
from coalign.convert.run import ConversionError, check_out, placeholder_data, write_run
from coalign.data.transforms.clip_bpe import MERGES_FILE, VOCAB_FILE, read_vocabulary

ACTS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}
RESAMPLE = {"bicubic": 3, "bilinear": 2}  # PIL's codes, as preprocessor_config.json stores them


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "Hugging Face conversion needs transformers: pip install 'coalign[convert]'"
        ) from None
    return transformers


# ------------------------------------------------------------------------------------------- export


def hf_towers(recipe, family: str) -> None:
    """An image and a text tower and nothing else, as Hugging Face's CLIP and SigLIP have."""
    towers = recipe.model.towers
    if set(towers) != {"image", "text"} or recipe.model.fusion is not None:
        raise ConversionError(
            f"Hugging Face {family} has an image and a text tower only; this run has {sorted(towers)}"
            + (" and a fusion part" if recipe.model.fusion is not None else "")
        )


def require(checks: dict[str, tuple[Any, Any]], family: str) -> None:
    """Refuse the first option `where: (got, need)` whose value has no Hugging Face `family` form."""
    for where, (got, need) in checks.items():
        if got != need:
            raise ConversionError(f"{where} is {got!r}; Hugging Face {family} needs {need!r}")


def encoder_config(cfg) -> dict[str, Any]:
    """The transformer fields of a CLIP / SigLIP vision or text config, from a coalign tower's."""
    return {
        "hidden_size": cfg.width,
        "intermediate_size": int(cfg.width * cfg.mlp_ratio),
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.heads,
        "hidden_act": ACTS[cfg.act],
        "layer_norm_eps": cfg.norm_eps,
    }


def hf_config(run: LoadedRun) -> dict[str, Any]:
    """CLIPConfig keyword arguments for a run, or ConversionError naming the part that has no HF form."""
    recipe = run.recipe
    towers = recipe.model.towers
    hf_towers(recipe, "CLIP")
    if recipe.model.head != "linear":
        raise ConversionError(
            f"model.head '{recipe.model.head}': Hugging Face CLIP projects with a linear map"
        )
    image, text = run.model.towers["image"].cfg, run.model.towers["text"].cfg
    wrong = {
        "model.towers.image.encoder": (towers["image"].encoder, "vit"),
        "model.towers.text.encoder": (towers["text"].encoder, "text_transformer"),
        "data.transforms.text.transform": (recipe.data.transforms["text"].transform, "clip_bpe"),
    }
    for where, (got, need) in wrong.items():
        if got != need:
            raise ConversionError(
                f"{where} '{got}' has no Hugging Face CLIP equivalent (only '{need}' exports)"
            )
    checks = {
        "model.towers.image.stem": (image.stem, "patch"),
        "model.towers.image.class_token": (image.class_token, True),
        "model.towers.image.pool": (image.pool, "cls"),
        "model.towers.image.patch_bias": (image.patch_bias, False),
        "model.towers.image.norm_pre": (image.norm_pre, True),
        "model.towers.text.causal": (text.causal, True),
        "model.towers.text.pool": (text.pool, "eos"),
        "model.towers.text.eos_id": (text.eos_id, run.transforms["text"].eot),
        "model.towers.text.pooled_proj": (text.pooled_proj, False),
    }
    require(checks, "CLIP")

    def common(cfg) -> dict[str, Any]:
        return encoder_config(cfg) | {"projection_dim": recipe.model.embed_dim}

    tok = run.transforms["text"]
    return {
        "text_config": common(text)
        | {
            "vocab_size": text.vocab_size,
            "max_position_embeddings": text.context_length,
            "bos_token_id": tok.sot,
            "eos_token_id": tok.eot,
            "pad_token_id": tok.eot,
        },
        "vision_config": common(image) | {"image_size": image.image_size, "patch_size": image.patch_size},
        "projection_dim": recipe.model.embed_dim,
    }


def preprocessor_config(run: LoadedRun) -> dict[str, Any]:
    """CLIPImageProcessor settings for the run's image transform (`image_crop` or `image`)."""
    spec = run.recipe.data.transforms["image"]
    t = run.transforms["image"].cfg
    crop = spec.transform == "image_crop" and t.resize == "shortest"
    if spec.transform not in ("image_crop", "image"):
        raise ConversionError(
            f"data.transforms.image '{spec.transform}' has no CLIPImageProcessor equivalent"
        )
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": t.size} if crop else {"height": t.size, "width": t.size},
        "resample": RESAMPLE[getattr(t, "interpolation", "bicubic")],
        "do_center_crop": crop,
        "crop_size": {"height": t.size, "width": t.size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(t.mean),
        "image_std": list(t.std),
        "do_convert_rgb": True,
    }


def export_hf(run_path: Path, out: Path) -> Path:
    """Write the run as a CLIPModel folder (config.json, model.safetensors, the tokenizer's files:
    vocab.json, merges.txt, tokenizer.json, ...; preprocessor_config.json), or as a SiglipModel folder
    when its towers are SigLIP's (`hf_siglip.py`)."""
    out = Path(out)
    check_out(out)
    transformers = _transformers()
    run = load_run(run_path)
    from coalign.convert.hf_siglip import export_siglip, is_siglip

    if is_siglip(run):
        return export_siglip(run, out, transformers)
    config = transformers.CLIPConfig(**hf_config(run))
    image, text = run.model.towers["image"].cfg, run.model.towers["text"].cfg
    weights = weights_to_hf(run.model.state_dict(), image.depth, text.depth)
    weights["logit_scale"] = logit_scale(run)
    model = transformers.CLIPModel(config)
    model.load_state_dict(weights, strict=True)
    pre = preprocessor_config(run)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer = transformers.CLIPTokenizer(
            vocab=str(run.run_dir / VOCAB_FILE),
            merges=str(run.run_dir / MERGES_FILE),
            model_max_length=text.context_length,
        )
        tokenizer.save_pretrained(tmp)
        for name in (VOCAB_FILE, MERGES_FILE):  # the slow tokenizer's files too, byte for byte
            shutil.copyfile(run.run_dir / name, tmp / name)
        (tmp / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")

    return write_folder(out, fill)


def write_folder(out: Path, fill) -> Path:
    """`fill(tmp)` writes the files into a hidden folder beside OUT, renamed to OUT once complete
    (so a failed export leaves nothing behind); OUT must be new or empty (`check_out`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        fill(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def logit_scale(run: LoadedRun) -> torch.Tensor:
    """ln(scale) of the run's first objective that learns one (CLIP's 1 / 0.07 when none does)."""
    from coalign.checkpoint import load_weights

    for key, value in load_weights(run.checkpoint).items():
        if key.startswith("objectives.") and key.endswith(".logit_scale"):
            return value.reshape(()).float()
    return torch.tensor(math.log(1 / 0.07))


# ------------------------------------------------------------------------------------------- import


def import_hf(folder: Path, out: Path, name: str | None = None) -> LoadedRun:
    """A local CLIPModel or SiglipModel folder -> a coalign run (its weights, tokenizer and
    preprocessing)."""
    folder, transformers = Path(folder), _transformers()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"'{folder}' has no config.json; is it a Hugging Face model folder?")
    check_out(Path(out))
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("model_type") == "siglip":
        from coalign.convert.hf_siglip import import_siglip

        return import_siglip(folder, Path(out), name, transformers)
    if raw.get("model_type") != "clip":
        raise ConversionError(
            f"'{folder}' holds a '{raw.get('model_type')}' model; Hugging Face CLIP and SigLIP "
            "(model_type 'clip', 'siglip') convert"
        )
    vocab_dir = vocabulary_folder(folder)
    config = transformers.CLIPConfig.from_pretrained(folder)
    v, t = config.vision_config, config.text_config
    acts = {hf: ours for ours, hf in ACTS.items()}
    for where, act in (("vision_config", v.hidden_act), ("text_config", t.hidden_act)):
        if act not in acts:
            raise ConversionError(f"{where}.hidden_act '{act}' has no coalign equivalent ({', '.join(acts)})")
    vocab, _ = read_vocabulary(vocab_dir)
    eos = vocab["<|endoftext|>"] if t.eos_token_id == 2 else t.eos_token_id  # 2: HF's legacy argmax pooling

    def tower(cfg) -> dict[str, Any]:
        return {
            "width": cfg.hidden_size,
            "depth": cfg.num_hidden_layers,
            "heads": cfg.num_attention_heads,
            "mlp_ratio": cfg.intermediate_size / cfg.hidden_size,
            "act": acts[cfg.hidden_act],
            "norm_eps": cfg.layer_norm_eps,
        }

    size = v.image_size
    image_t = read_preprocessing(
        folder, size, True, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    )
    recipe = {
        "name": name or Path(out).name,
        "data": placeholder_data(
            {
                "image": image_t,
                "text": {"transform": "clip_bpe", "context_length": t.max_position_embeddings},
            }
        ),
        "model": {
            "embed_dim": config.projection_dim,
            "towers": {
                "image": {
                    "encoder": "vit",
                    "image_size": size,
                    "patch_size": v.patch_size,
                    "pool": "cls",
                    "patch_bias": False,
                    **tower(v),
                },
                "text": {
                    "encoder": "text_transformer",
                    "vocab_size": t.vocab_size,
                    "context_length": t.max_position_embeddings,
                    "causal": True,
                    "pool": "eos",
                    "eos_id": eos,
                    "pad_id": 0,
                    **tower(t),
                },
            },
        },
        "objectives": [{"name": "clip"}],
    }
    model = transformers.CLIPModel.from_pretrained(folder)
    weights = weights_from_hf(model.state_dict(), v.num_hidden_layers, t.num_hidden_layers)
    origin = {"format": "hf-clip", "folder": str(folder)}
    try:
        return write_run(Path(out), recipe, weights, origin, vocab_dir)
    finally:
        if vocab_dir != folder:  # written from tokenizer.json for the run to copy
            shutil.rmtree(vocab_dir, ignore_errors=True)


def read_preprocessing(folder: Path, size: int, crop: bool, mean, std) -> dict[str, Any]:
    """The `image_crop` transform for the folder's preprocessor_config.json; where it is silent, the
    model family's defaults (CLIP: shortest side + centre crop; SigLIP: squashed, mean/std 0.5)."""
    path = folder / "preprocessor_config.json"
    pre = json.loads(path.read_text()) if path.is_file() else {}
    crop = pre.get("do_center_crop", crop)
    return {
        "transform": "image_crop",
        "size": size,
        "resize": "shortest" if crop else "squash",
        "interpolation": {3: "bicubic", 2: "bilinear"}.get(pre.get("resample", 3), "bicubic"),
        "mean": list(pre.get("image_mean", mean)),
        "std": list(pre.get("image_std", std)),
    }


def vocabulary_folder(folder: Path) -> Path:
    """The folder's CLIP vocabulary as vocab.json + merges.txt (written from tokenizer.json when the
    folder has only that), or a one-line error."""
    if (folder / VOCAB_FILE).is_file() and (folder / MERGES_FILE).is_file():
        return folder
    if (folder / "tokenizer.json").is_file():
        model = json.loads((folder / "tokenizer.json").read_text()).get("model", {})
        if model.get("type") == "BPE" and model.get("end_of_word_suffix") == "</w>":
            from coalign.data.transforms.clip_bpe import write_vocabulary

            merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            tmp = Path(tempfile.mkdtemp(prefix="coalign-vocab-"))
            write_vocabulary(model["vocab"], merges, tmp)
            return tmp
    raise FileNotFoundError(
        f"'{folder}' has no CLIP tokenizer (vocab.json + merges.txt, or a CLIP BPE tokenizer.json)"
    )
