"""Every registered encoder honours the contract (timm-style: tests iterate the registry), built from
its Config's tiny settings; and the image and text encoders' own behaviour."""

import pytest
import torch

from coalign.registry import ENCODERS
from parts import tiny_encoder


@pytest.mark.parametrize("name", ENCODERS.names())
def test_encoder_contract_forward_pool_backward(name):
    cls = ENCODERS.get(name)
    enc = tiny_encoder(name, depth=2)  # two blocks: checkpointing must chain them
    x = cls.example_input(enc.cfg, batch=3)
    out = enc(x)
    assert out.tokens.ndim == 3 and out.tokens.shape[0] == 3 and out.tokens.shape[2] == enc.width
    if out.mask is not None:
        assert out.mask.shape == out.tokens.shape[:2] and out.mask.dtype == torch.bool
    pooled = enc.pool(out)
    assert pooled.shape == (3, enc.width)
    pooled.sum().backward()
    assert all(p.grad is not None for p in enc.parameters() if p.requires_grad)
    # Gradient checkpointing gives the same gradients.
    grads = [p.grad.clone() for p in enc.parameters()]
    enc.zero_grad()
    enc.set_grad_checkpointing(True)
    enc.pool(enc(x)).sum().backward()
    for g, p in zip(grads, enc.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pool", ["eos", "mean", "first"])
@pytest.mark.parametrize("causal", [False, True])
def test_text_padding_does_not_change_the_embedding(pool, causal):
    enc = tiny_encoder("text_transformer", pool=pool, causal=causal).eval()
    ids = torch.tensor([[1, 7, 8, 9, 2, 0, 0, 0, 0, 0, 0, 0]])
    short = torch.tensor([[1, 7, 8, 9, 2, 0]])  # same caption, less padding
    torch.testing.assert_close(enc.pool(enc(ids)), enc.pool(enc(short)), rtol=1e-5, atol=1e-5)
    other = torch.tensor([[1, 7, 8, 10, 2, 0, 0, 0, 0, 0, 0, 0]])  # one word differs
    if causal and pool == "first":
        return  # <bos> sees nothing after itself under a causal mask
    assert not torch.allclose(enc.pool(enc(ids)), enc.pool(enc(other)))


# 32 x 32 images (the tiny image transform's) in patches of 8: a 4 x 4 grid of 16 patches
PATCH8 = {"patch_size": 8}


def test_vit_keeps_a_subset_of_patches():
    enc = tiny_encoder("vit", **PATCH8)
    x = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[0, 5, 9], [1, 2, 15]])
    assert enc(x, keep=keep).tokens.shape == (2, 4, 32)


def test_vit_rejects_indivisible_image_size():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        ENCODERS.create("vit", image_size=30, patch_size=8, width=32, depth=1, heads=2)


def test_flip_masking_keeps_a_random_subset_in_training_only():
    enc = tiny_encoder("vit", **PATCH8, mask_ratio=0.75)  # 16 patches -> keep 4
    x = torch.randn(2, 3, 32, 32)
    assert enc.train()(x).tokens.shape == (2, 1 + 4, 32)
    assert enc.eval()(x).tokens.shape == (2, 1 + 16, 32)
    with pytest.raises(Exception, match="mask_ratio"):
        tiny_encoder("vit", **PATCH8, mask_ratio=1.0)


def test_conv_stem_and_sincos_positions():
    enc = tiny_encoder("vit", **PATCH8, stem="conv")  # patch 8 -> three stride-2 convs
    assert enc(torch.randn(2, 3, 32, 32)).tokens.shape == (2, 17, 32)
    # Position codes start distinct for every patch, so position is visible from the first step.
    pos = enc.pos_embed[0, 1:]
    assert torch.cdist(pos, pos).add(torch.eye(16) * 1e3).min() > 0.1
    with pytest.raises(ValueError, match="power-of-two"):
        ENCODERS.create("vit", image_size=36, patch_size=6, width=32, depth=1, heads=2, stem="conv")
