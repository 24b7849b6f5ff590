"""OpenCLIP in: randomly initialised OpenCLIP models of several configs, converted, give OpenCLIP's
image and text embeddings (fp32, 1e-5); CLIP's preprocessing gives open_clip's pixels."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

open_clip = pytest.importorskip("open_clip")

from coalign.convert.openclip import import_openclip  # noqa: E402
from coalign.convert.run import ConversionError  # noqa: E402
from convert_models import SMALL, TEXT, TEXTS, VISION, make_openclip  # noqa: E402

CONFIGS = {
    "quickgelu_tok": SMALL,
    "gelu_avg_noln_eps": {
        "embed_dim": 24,
        "vision_cfg": {**VISION, "pool_type": "avg", "no_ln_pre": True, "norm_kwargs": {"eps": 1e-6}},
        "text_cfg": {**TEXT, "norm_kwargs": {"eps": 1e-6}, "mlp_ratio": 2.0},
    },
    "siglip_style_custom_text": {
        "embed_dim": 32,
        "custom_text": True,
        "init_logit_bias": -10,
        "vision_cfg": {**VISION, "pos_embed_type": "sin_cos_2d", "image_size": 48, "patch_size": 16},
        "text_cfg": {**TEXT, "pool_type": "eos", "eos_id": 49407, "final_ln_after_pool": True},
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "squash"},
    },
}


def photos(n=3, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(57, 40), (40, 90), (33, 33)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("suffix", [".pt"])
def test_converted_openclip_gives_the_same_embeddings(tmp_path, name, suffix):
    model, preprocess, config = make_openclip(tmp_path, f"coalign-test-{name}", CONFIGS[name])
    ckpt = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    run = import_openclip(config, ckpt, tmp_path / "run")

    ids = run.transforms["text"].encode(TEXTS)
    assert torch.equal(ids, open_clip.tokenize(TEXTS, context_length=20))
    images = photos()
    ours_px = torch.stack([run.transforms["image"](im, np.random.default_rng(0)) for im in images])
    theirs_px = torch.stack([preprocess(im) for im in images])
    torch.testing.assert_close(ours_px, theirs_px, rtol=0, atol=1e-6)

    with torch.no_grad():
        for modality, ours_in, theirs in (
            ("image", theirs_px, model.encode_image(theirs_px)),
            ("text", ids, model.encode_text(ids)),
        ):
            torch.testing.assert_close(
                run.model.encode(modality, ours_in), F.normalize(theirs, dim=-1), rtol=0, atol=1e-5
            )
    objective = run_objective_weights(run)
    assert torch.allclose(objective["logit_scale"], model.logit_scale.reshape(()))
    if model.logit_bias is not None:
        assert torch.allclose(objective["logit_bias"], model.logit_bias.reshape(()))


def run_objective_weights(run):
    from coalign.checkpoint import load_weights

    w = load_weights(run.checkpoint)
    return {k.split(".")[-1]: v for k, v in w.items() if k.startswith("objectives.0.")}


def test_safetensors_and_a_plain_state_dict(tmp_path):
    from safetensors.torch import save_file

    model, _, config = make_openclip(tmp_path, "coalign-test-plain", CONFIGS["quickgelu_tok"], seed=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    run = import_openclip(config, tmp_path / "m.safetensors", tmp_path / "run")
    ids = open_clip.tokenize(TEXTS, context_length=20)
    with torch.no_grad():
        torch.testing.assert_close(
            run.model.encode("text", ids), F.normalize(model.encode_text(ids), dim=-1), rtol=0, atol=1e-5
        )


def test_unconvertible_parts_are_named(tmp_path):
    bad = {**CONFIGS["quickgelu_tok"], "vision_cfg": {**VISION, "ls_init_value": 1e-5}}
    model, _, config = make_openclip(tmp_path, "coalign-test-ls", bad)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    with pytest.raises(ConversionError, match="vision_cfg.ls_init_value"):
        import_openclip(config, tmp_path / "m.pt", tmp_path / "run")
    assert not (tmp_path / "run").exists()
    good = CONFIGS["quickgelu_tok"]
    model, _, config = make_openclip(tmp_path, "coalign-test-good", good)
    sd = model.state_dict()
    sd.pop("ln_final.bias")
    torch.save(sd, tmp_path / "short.pt")
    with pytest.raises(ConversionError, match="no weights for model.towers.text.transformer.norm.bias"):
        import_openclip(config, tmp_path / "short.pt", tmp_path / "run")
    assert not list(tmp_path.glob(".run.*")), "a failed conversion leaves nothing behind"
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        import_openclip(config, tmp_path / "m.pt", tmp_path / "taken")


def test_an_imported_run_is_not_resumed_but_says_how_to_train_from_it(tmp_path):
    from coalign.train.loop import train

    model, _, config = make_openclip(tmp_path, "coalign-test-resume", CONFIGS["quickgelu_tok"])
    torch.save(model.state_dict(), tmp_path / "m.pt")
    import_openclip(config, tmp_path / "m.pt", tmp_path / "run")
    with pytest.raises(ValueError, match=r"imported \(openclip\).*no optimizer state.*model.init_from"):
        train(None, tmp_path / "run", resume=True, progress=False)
