import pytest
import torch

from coalign.config import load_recipe


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture
def tiny_recipe():
    """The demo recipe shrunk to seconds: the same code path as a real run."""

    def make(*overrides: str):
        base = ["data.train.size=96", "data.eval.heldout_samples.size=24", "data.eval.heldout_combos.size=24"]
        return load_recipe("demo", [*base, *overrides], smoke=True)

    return make
