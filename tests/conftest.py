import pytest
import torch

from coalign.config import load_recipe


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Sources that cache derived files (the emoji source's rendered PNGs) write under a session
    folder, never into the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COALIGN_CACHE_DIR", str(tmp_path_factory.mktemp("coalign-cache")))
        yield


@pytest.fixture
def tiny_recipe():
    """The demo recipe shrunk to seconds: the same code path as a real run."""

    def make(*overrides: str):
        base = ["data.train.size=96", "data.eval.heldout_samples.size=24", "data.eval.heldout_combos.size=24"]
        return load_recipe("demo", [*base, *overrides], smoke=True)

    return make


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run of the smoke demo trained for 4 steps, once per session: enough for tests that check
    the plumbing around a model (search, serving, suites), not the model. Read it; copy it to write."""
    from coalign.train.loop import train

    root = tmp_path_factory.mktemp("tiny_run")
    sizes = ["data.train.size=96", "data.eval.heldout_samples.size=24", "data.eval.heldout_combos.size=24"]
    recipe = load_recipe("demo", [*sizes, "train.steps=4", "eval.evaluators=[]"], smoke=True)
    train(recipe, root / "run", progress=False)
    return root / "run"


@pytest.fixture(scope="session")
def real_index(tmp_path_factory, tiny_run):
    """A real SearchIndex: the tiny run, a small world split embedded and indexed.
    Session-wide: the serve tests (test_serve_api, test_serve_faults) share one."""
    from coalign.search.embed import embed_source
    from coalign.search.index import build_index
    from coalign.search.query import SearchIndex

    root = tmp_path_factory.mktemp("serve_real")
    spec = {"source": "world", "split": "test", "size": 30}
    embed_source(tiny_run, spec, root / "emb", batch_size=16, shard_size=16, progress=False)
    build_index(root / "emb", sample_queries=10)
    return SearchIndex.load(root / "emb")


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    """A tiny trained run, for objectives that distil from a teacher (a Config field `teacher`)."""
    from coalign.train.loop import train

    out = tmp_path_factory.mktemp("teacher") / "run"
    sizes = ["data.train.size=32", "data.eval={}", "eval.evaluators=[]", "train.steps=1"]
    train(load_recipe("demo", sizes, smoke=True), out, progress=False)
    return out
