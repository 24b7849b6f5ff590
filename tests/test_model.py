"""MultimodalModel: encode, views, and groups of items per sample."""

import torch

from coalign.config import ModelConfig
from coalign.models.model import MultimodalModel


def _model():
    torch.manual_seed(0)
    cfg = ModelConfig(
        embed_dim=16,
        towers={
            "image": {"encoder": "vit", "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
            "text": {"encoder": "text_transformer", "width": 32, "depth": 1, "heads": 2},
        },
    )
    inputs = {"image": {"image_size": 32}, "text": {"vocab_size": 40, "context_length": 8}}
    return MultimodalModel.from_config(cfg, inputs).eval()


def test_encode_is_normalised_and_views_use_the_same_tower():
    model = _model()
    img = torch.randn(3, 3, 32, 32)
    ids = torch.tensor([[1, 5, 6, 2, 0, 0, 0, 0]] * 3)
    feats = model({"image": img, "image@v1": img, "text": ids, "present": {}, "id": ["a", "b", "c"]})
    assert set(feats) == {"image", "image@v1", "text"}
    torch.testing.assert_close(feats["image"].embedding, feats["image@v1"].embedding)
    torch.testing.assert_close(model.encode("text", ids).norm(dim=-1), torch.ones(3))


def test_group_inputs_encode_real_items_and_zero_the_rest():
    model = _model()
    a = [1, 5, 6, 2, 0, 0, 0, 0]
    b = [1, 7, 2, 0, 0, 0, 0, 0]
    empty = [0] * 8
    group = torch.tensor([[a, b], [b, empty]])  # (B=2, k=2, L=8); sample 1 has one caption
    feats = model.features("text", group)
    assert feats.embedding.shape == (2, 2, 16)
    assert feats.group_mask.tolist() == [[True, True], [True, False]]
    single = model.encode("text", torch.tensor([a, b]))
    torch.testing.assert_close(feats.embedding[0], single, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feats.embedding[1, 0], single[1], rtol=1e-5, atol=1e-6)
    assert feats.embedding[1, 1].abs().sum() == 0
    assert torch.isfinite(feats.embedding).all()


def test_grad_checkpointing_is_a_recipe_option_and_changes_no_gradient(tiny_recipe):
    """model.towers.<m>.grad_checkpointing: recomputed activations, the same gradients."""
    from coalign.build import build_model, build_source, build_transforms, prepare_transforms
    from coalign.data.loader import BatchDataset
    from coalign.data.transforms.base import Pipeline
    from coalign.models.layers import Transformer

    grads = []
    for flag in (False, True):
        recipe = tiny_recipe(
            f"model.towers.image.grad_checkpointing={flag}", f"model.towers.text.grad_checkpointing={flag}"
        )
        source = build_source(recipe.data.train, "data.train")
        transforms = build_transforms(recipe)
        prepare_transforms(transforms, source, None, resume=False)
        torch.manual_seed(0)
        model = build_model(recipe, transforms).train()
        blocks = [m for m in model.modules() if isinstance(m, Transformer)]
        assert blocks and all(b.grad_checkpointing == flag for b in blocks)
        batch = BatchDataset(source, Pipeline(transforms), 8, 0)[0]
        feats = model(batch)
        (feats["image"].embedding @ feats["text"].embedding.T).logsumexp(1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], msg=key)
