"""Hugging Face SigLIP in and out: a random-init SiglipModel (small SiglipConfig) with a fast
tokenizer -> `coalign import hf` -> the same embeddings and ids -> `coalign export hf` -> the same
tensors; a coalign SigLIP-shaped run -> export -> SiglipModel.from_pretrained with no warnings -> the
same embeddings; what has no SigLIP form refused by name; and the towers' SigLIP options."""

import json

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from coalign.build import load_run  # noqa: E402
from coalign.cli import main  # noqa: E402
from coalign.config import load_recipe  # noqa: E402
from coalign.convert.hf import export_hf, import_hf  # noqa: E402
from coalign.convert.run import ConversionError  # noqa: E402
from coalign.evaluate.results import read_results  # noqa: E402
from coalign.registry import ENCODERS, ConfigError  # noqa: E402
from convert_models import assert_same_embeddings, load_quietly  # noqa: E402

TEXTS = [
    "a photo of a cat",
    "Two DOGS, running on the grass!",
    "naïve café — 東京 ✓ emoji 🐱",
    "   leading and trailing   spaces   ",
    "a long caption " * 12,
    "x",
]
TOKENIZER_CAPTIONS = ["a photo of a cat", "two dogs running on the grass", "a red square", "the sky"] * 8


def siglip_tokenizer(length):
    """A small fast tokenizer shaped as SigLIP's: `</s>` ends every caption and pads, no start token."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False
    )
    tok.train_from_iterator(TOKENIZER_CAPTIONS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="</s>", eos_token="</s>", unk_token="<unk>", model_max_length=length
    )


def perturb(model):
    """Random-init biases and norms are 0 / 1: move every tensor so each one matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random-init SiglipModel from a small config, saved with a fast tokenizer."""
    folder = tmp_path_factory.mktemp("hf") / "siglip"
    tokenizer = siglip_tokenizer(12)
    config = transformers.SiglipConfig(
        text_config={
            "vocab_size": 300,  # more rows than the tokenizer has tokens, as released models have
            "hidden_size": 32,
            "intermediate_size": 56,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 12,
            "pad_token_id": 1,
            "bos_token_id": None,
            "eos_token_id": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 24,
            "patch_size": 8,
        },
    )
    torch.manual_seed(3)
    model = perturb(transformers.SiglipModel(config)).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


def test_import_gives_siglips_ids_and_embeddings_and_exports_back_the_same_tensors(hf_folder, tmp_path):
    folder, model = hf_folder
    run = import_hf(folder, tmp_path / "run")
    image, text = run.model.towers["image"].cfg, run.model.towers["text"].cfg
    assert (image.pool, image.class_token, image.norm_pre, image.act) == ("map", False, False, "gelu_tanh")
    assert (text.pool, text.pooled_proj, text.causal, run.recipe.model.head) == (
        "last",
        True,
        False,
        "identity",
    )

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    enc = tokenizer(TEXTS, padding="max_length", truncation=True, return_tensors="pt")
    ids = run.transforms["text"].encode(TEXTS)
    assert torch.equal(ids, enc["input_ids"]), "the folder's ids, padded to max_length with </s>"
    assert (ids[:, -1] == 1).all() and ids.shape == (len(TEXTS), 12)

    images = torch.randn(3, 3, 24, 24)
    assert_same_embeddings(run, model, images, ids, input_ids=enc["input_ids"])
    from coalign.checkpoint import load_weights

    weights = load_weights(run.checkpoint)
    assert torch.equal(weights["objectives.0.logit_scale"], model.logit_scale.detach().reshape(()))
    assert torch.equal(weights["objectives.0.logit_bias"], model.logit_bias.detach().reshape(()))

    export_hf(tmp_path / "run", tmp_path / "back")
    again, info, warnings = load_quietly(transformers.SiglipModel, tmp_path / "back")
    assert not any(info.values()) and not warnings, (info, warnings)
    mine, back = model.state_dict(), again.state_dict()
    assert mine.keys() == back.keys()
    for key, value in back.items():
        assert torch.equal(value, mine[key]), key
    pre = json.loads((tmp_path / "back" / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "SiglipImageProcessor" and not pre["do_center_crop"]
    assert pre["size"] == {"height": 24, "width": 24} and pre["image_mean"] == [0.5, 0.5, 0.5]


@pytest.fixture(scope="module")
def siglip_run(tmp_path_factory):
    """A coalign run with SigLIP's towers, trained for 2 steps with the siglip objective."""
    from coalign.train.loop import train

    out = tmp_path_factory.mktemp("siglip_run") / "run"
    image = "model.towers.image"
    overrides = [
        "data.train.size=32",
        "data.eval={}",
        "eval.evaluators=[]",
        "train.steps=2",
        "objectives=[{name: siglip}]",
        "model.head=identity",
        "model.embed_dim=32",
        "data.transforms.text.context_length=10",
        f"{image}.stem=patch",
        f"{image}.class_token=false",
        f"{image}.norm_pre=false",
        f"{image}.pool=map",
        f"{image}.act=gelu_tanh",
        f"{image}.norm_eps=1e-6",
        "model.towers.text.pool=last",
        "model.towers.text.pooled_proj=true",
    ]
    recipe = load_recipe("demo", overrides, smoke=True)
    assert recipe.model.towers["image"].options()["width"] == 32, "the smoke towers' width"
    train(recipe, out, progress=False)
    return out


def test_a_siglip_shaped_run_exports_and_transformers_gives_the_same_embeddings(siglip_run, tmp_path):
    assert main(["export", "hf", str(siglip_run), str(tmp_path / "hf")]) == 0
    hf, info, warnings = load_quietly(transformers.SiglipModel, tmp_path / "hf")
    assert not any(info.values()) and not warnings, (info, warnings)
    run = load_run(siglip_run)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    enc = tokenizer(TEXTS, padding="max_length", truncation=True, return_tensors="pt")
    ids = run.transforms["text"].encode(TEXTS)
    assert list(enc) == ["input_ids"], "no attention mask: SigLIP's text tower reads the padded sequence"
    assert torch.equal(enc["input_ids"], ids)
    size = run.model.towers["image"].cfg.image_size
    images = torch.randn(3, 3, size, size)
    assert_same_embeddings(run, hf, images, ids, **enc)
    with torch.no_grad():
        from coalign.checkpoint import load_weights

        weights = load_weights(run.checkpoint)
        assert torch.equal(hf.logit_scale.reshape(()), weights["objectives.0.logit_scale"])
        assert torch.equal(hf.logit_bias.reshape(()), weights["objectives.0.logit_bias"])
    # and back: the exported folder imports as the same model
    again = import_hf(tmp_path / "hf", tmp_path / "again")
    mine = run.model.state_dict()
    assert again.model.state_dict().keys() == mine.keys()
    for key, value in again.model.state_dict().items():
        assert torch.equal(value, mine[key]), key
    assert torch.equal(again.transforms["text"].encode(TEXTS), ids)


def test_eval_and_embed_run_on_an_imported_siglip_model(hf_folder, tmp_path):
    folder, _ = hf_folder
    run_dir = tmp_path / "run"
    assert main(["import", "hf", str(folder), str(run_dir)]) == 0
    assert main(["eval", str(run_dir), "--max-samples", "16", "--batch-size", "16"]) == 0
    results = read_results(next((run_dir / "eval").glob("step_*.json")))
    assert {"zero_shot", "retrieval"} <= {m.evaluator for m in results.metrics}
    assert all(0 <= m.value <= 1 for m in results.metrics)
    embed = ["embed", str(run_dir), "{source: world, split: test, size: 8}", str(tmp_path / "emb")]
    assert main([*embed, "--batch-size", "4", "--thumbnail-size", "0", "--no-progress"]) == 0


def test_a_run_with_a_part_siglip_lacks_is_refused_by_name(siglip_run, tmp_path, capsys):
    import shutil

    changed = tmp_path / "run"
    shutil.copytree(siglip_run, changed)
    path = changed / "recipe.yaml"
    recipe = yaml.safe_load(path.read_text())
    recipe["model"]["towers"]["text"]["causal"] = True  # no tensor of its own: the run still loads
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(
        ConversionError, match="model.towers.text.causal is True; Hugging Face SigLIP needs False"
    ):
        export_hf(changed, tmp_path / "out")
    assert main(["export", "hf", str(changed), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.towers.text.causal" in err
    assert not (tmp_path / "out").exists()


def test_a_folder_without_a_tokenizer_is_refused_naming_both_kinds(hf_folder, tmp_path):
    """(spiece.model-only folders convert: test_convert_hf_siglip_spm.py)"""
    import shutil

    folder, _ = hf_folder
    bare = tmp_path / "siglip"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("tokenizer*.json"))
    with pytest.raises(
        FileNotFoundError, match=r"no tokenizer: SigLIP's is a spiece.model .* or a tokenizer.json"
    ):
        import_hf(bare, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- the towers' options


def test_vit_attention_pooling_is_siglips_head():
    """pool: map equals HF's SiglipMultiheadAttentionPoolingHead on the same tensors."""
    from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

    vit = ENCODERS.create(
        "vit",
        width=32,
        depth=1,
        heads=4,
        image_size=16,
        patch_size=8,
        pool="map",
        class_token=False,
        norm_pre=False,
        act="gelu_tanh",
        norm_eps=1e-6,
    ).eval()
    assert vit.num_prefix_tokens == 0 and vit.pos_embed.shape == (1, 4, 32) and not hasattr(vit, "cls_token")
    config = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=128, num_attention_heads=4)
    head = perturb(SiglipMultiheadAttentionPoolingHead(config)).eval()
    names = {"layernorm": "norm"}
    vit.map.load_state_dict(
        {
            names.get(k.split(".")[0], k.split(".")[0]) + k[len(k.split(".")[0]) :]: v
            for k, v in head.state_dict().items()
        }
    )
    tokens = torch.randn(3, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit.map(tokens), head(tokens), rtol=0, atol=1e-6)
        out = vit(torch.randn(2, 3, 16, 16))
    assert out.tokens.shape == (2, 4, 32) and vit.pool(out).shape == (2, 32)


def test_text_pool_last_reads_the_padded_sequence():
    """pool: last is position -1, and it sees the padding (changing a pad id changes it), where
    pool: eos ignores what follows the caption's end (eos_id 7)."""
    ids = torch.tensor([[5, 6, 7, 0, 0, 0], [8, 9, 10, 11, 12, 13]])
    other = ids.clone()
    other[0, 4] = 3
    for pool, moves in (("last", True), ("eos", False)):
        torch.manual_seed(0)
        tower = ENCODERS.create(
            "text_transformer",
            width=16,
            depth=1,
            heads=2,
            vocab_size=20,
            context_length=6,
            pool=pool,
            pooled_proj=True,
            eos_id=7,
        ).eval()
        with torch.no_grad():
            a, b = tower.pool(tower(ids)), tower.pool(tower(other))
            out = tower(ids)
            if pool == "last":
                torch.testing.assert_close(a, tower.proj(out.tokens[:, -1]))
        assert (not torch.allclose(a[0], b[0])) == moves
        torch.testing.assert_close(a[1], b[1])


def test_a_cls_pool_without_a_class_token_is_refused():
    with pytest.raises(ConfigError, match="pool 'cls' needs class_token: true"):
        ENCODERS.create("vit", width=32, depth=1, heads=2, image_size=16, patch_size=8, class_token=False)
    with pytest.raises(ValueError, match="model.embed_dim \\(16\\) must equal"):
        from coalign.registry import HEADS

        HEADS.get("identity")(32, 16)
