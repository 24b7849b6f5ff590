"""SigLIP folders as released: `spiece.model` (SiglipTokenizer) and no tokenizer.json. A SentencePiece
model trained here on generated text + a random-init SiglipModel saved with SiglipTokenizer ->
`coalign import hf` -> SiglipTokenizer's ids and SiglipModel's embeddings -> `coalign export hf` ->
SiglipModel.from_pretrained with no warnings and AutoTokenizer (a SiglipTokenizer) give the same; the
run keeps its own copy of the tokenizer files; the `siglip_spm` transform trained on captions."""

import random
import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from coalign.build import load_run  # noqa: E402
from coalign.cli import main  # noqa: E402
from coalign.convert.hf import import_hf  # noqa: E402
from coalign.data.transforms.siglip_spm import SiglipSPMTransform, train_spiece  # noqa: E402
from convert_models import assert_same_embeddings, load_quietly  # noqa: E402
from parts import world  # noqa: E402
from test_convert_hf_siglip import perturb  # noqa: E402

LENGTH = 16
STRINGS = [
    "a photo of a cat",
    "A PHOTO OF A CAT.",
    "Two DOGS, running -- on the grass!?",
    "naïve café — 東京 ✓ emoji 🐱",
    "Ünïcödé ÀÉÎ straße ﬁ ½",
    "   leading and\ttrailing \n spaces   ",
    "it's (the) [best] {one}; isn't it: yes/no & 100% #1 @home",
    "a long caption about a red square " * 10,
    "",
    "...!!!",
    "x",
    "▁ underline and </s> inside",
]
WORDS = [
    "a",
    "the",
    "photo",
    "of",
    "cat",
    "dog",
    "red",
    "blue",
    "square",
    "circle",
    "sky",
    "grass",
    "running",
    "two",
    "on",
    "café",
    "naïve",
    "東京",
    "straße",
]  # noqa: SIM905


def spiece(path):
    """A SentencePiece unigram model (as SigLIP's: <pad> 0, </s> 1, <unk> 2) on generated text."""
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ran", "tse", "qu", "vor", "ny", "zé", "dü", "ph", "str", "ix", "东", "京"]
    words = WORDS + ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(300)]
    texts = [" ".join(rng.choices(words, k=rng.randint(2, 12))) for _ in range(1500)]
    path.write_bytes(train_spiece(texts, vocab_size=300))
    return path


@pytest.fixture(scope="module")
def spm_folder(tmp_path_factory):
    """A random-init SiglipModel from a small config, saved with SiglipTokenizer(vocab_file=...)."""
    root = tmp_path_factory.mktemp("spm")
    tokenizer = transformers.SiglipTokenizer(
        vocab_file=str(spiece(root / "trained.model")), model_max_length=LENGTH
    )
    config = transformers.SiglipConfig(
        text_config={
            "vocab_size": len(tokenizer) + 8,
            "hidden_size": 32,
            "intermediate_size": 56,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": LENGTH,
            "pad_token_id": 1,
            "bos_token_id": None,
            "eos_token_id": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 8,
        },
    )
    torch.manual_seed(5)
    model = perturb(transformers.SiglipModel(config)).eval()
    folder = root / "siglip"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert (folder / "spiece.model").is_file() and not (folder / "tokenizer.json").exists()
    assert 200 <= len(tokenizer) <= 300
    return folder, model


def siglip_ids(folder):
    tok = transformers.SiglipTokenizer.from_pretrained(folder)
    enc = tok(STRINGS, padding="max_length", max_length=LENGTH, truncation=True, return_tensors="pt")
    return enc["input_ids"]


def test_a_spiece_folder_imports_with_siglips_ids_and_exports_back(spm_folder, tmp_path):
    folder, model = spm_folder
    copy = tmp_path / "siglip"
    shutil.copytree(folder, copy)
    assert main(["import", "hf", str(copy), str(tmp_path / "run")]) == 0
    shutil.rmtree(copy)  # the run reads its own copy of the tokenizer files from here on
    run = load_run(tmp_path / "run")
    assert run.recipe.data.transforms["text"].transform == "siglip_spm"
    assert (tmp_path / "run" / "spiece.model").read_bytes() == (folder / "spiece.model").read_bytes()

    ids = run.transforms["text"].encode(STRINGS)
    theirs = siglip_ids(folder)
    assert torch.equal(ids, theirs), "SiglipTokenizer's ids, padded to max_length with </s>"
    assert ids.shape == (len(STRINGS), LENGTH) and (ids[:, -1] == 1).all()
    # SigLIP's canonicalisation: lower case, punctuation gone (so "...!!!" is as empty as "")
    assert torch.equal(ids[0], ids[1]) and torch.equal(ids[8], ids[9]) and (ids[8] == 1).all()
    assert len(set(map(tuple, ids.tolist()))) == len(STRINGS) - 2
    assert_same_embeddings(run, model, torch.randn(3, 3, 16, 16), ids)

    assert main(["export", "hf", str(tmp_path / "run"), str(tmp_path / "back")]) == 0
    again, info, warnings = load_quietly(transformers.SiglipModel, tmp_path / "back")
    assert not any(info.values()) and not warnings, (info, warnings)
    mine, back = model.state_dict(), again.state_dict()
    assert mine.keys() == back.keys()
    for key, value in back.items():
        assert torch.equal(value, mine[key]), key
    assert (tmp_path / "back" / "spiece.model").read_bytes() == (folder / "spiece.model").read_bytes()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert isinstance(tok, transformers.SiglipTokenizer) and tok.model_max_length == LENGTH
    enc = tok(STRINGS, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    assert torch.equal(enc, theirs), "the exported tokenizer pads to the run's context_length by itself"
    assert_same_embeddings(run, again, torch.randn(3, 3, 16, 16), enc)


def test_a_bad_spiece_model_or_none_is_refused_before_anything_is_written(spm_folder, tmp_path):
    folder, _ = spm_folder
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "spiece.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        import_hf(broken, tmp_path / "run")
    (broken / "spiece.model").unlink()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer: SigLIP's is a spiece.model"):
        import_hf(broken, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_siglip_spm_trained_on_captions_saves_loads_and_is_siglips(tmp_path):
    source = world(["text"])
    transform = SiglipSPMTransform(context_length=12, vocab_size=80, fit_samples=200)
    transform.fit(source, tmp_path)
    again = SiglipSPMTransform(context_length=12)
    again.load(tmp_path)
    texts = [*STRINGS, *source.captions(20)]
    ids = transform.encode(texts)
    assert torch.equal(again.encode(texts), ids)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert torch.equal(
        tok(texts, padding="max_length", truncation=True, return_tensors="pt")["input_ids"], ids
    )
    assert 20 < again.describe()["vocab_size"] <= 80 and again.describe()["eos_id"] == 1
    dropped = SiglipSPMTransform(context_length=12, token_dropout=0.5, path=str(tmp_path / "spiece.model"))
    rows = dropped.encode([texts[0]] * 8, rng=np.random.default_rng(0))
    words = (ids[0] != 1).sum()
    assert ((rows != 1).sum(1) <= words).all() and ((rows != 1).sum(1) < words).any()
    assert (rows == 1).any(1).all(), "every row still ends in </s>"
