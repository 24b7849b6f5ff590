"""FSDP2 with missing modalities and with torch.compile, with two real gloo processes.

A rank whose batch has no rows of a modality still runs that tower (on a stand-in row whose
features keep no rows, `train/fsdp.py` `stand_ins`): without it the ranks' collectives fall out of
step (the other rank waits in the tower's all-gather; with gloo here, the next collective of the
rank that skipped it meets that all-gather, and gloo aborts on the mismatched sizes). The recipe
below drops text from half the samples, with 2 samples per rank, so that in some steps one rank has
text rows and the other none (checked below on the batches themselves). The runs must end (the
spawn is bounded by a deadline: a hang fails the test instead of stalling the suite) with the
weights of one process on the same global batches, to 1e-5, plain and with GradCache (micro-batches
of one sample, which lack text more often still).

The same ranks then train with `train.compile: true` on top of FSDP (backend aot_eager: dynamo
captures the sharded towers, FSDP's hooks run eagerly around them) and must end with the weights of
the uncompiled FSDP run, to 1e-5.
"""

from __future__ import annotations

import contextlib
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from coalign.build import build_source, build_transforms, prepare_transforms
from coalign.config import load_recipe
from coalign.data.loader import train_batches
from coalign.data.transforms.base import Pipeline
from coalign.data.world import MODALITIES
from coalign.models.model import Features, StandIn
from coalign.registry import ConfigError
from parts import tiny_batch, tiny_model, transforms_for, world
from test_fsdp import BASE, _assert_same, _free_port, _weights

MISSING = ["data.batch_size=4", "data.drop_modalities={text: 0.5}"]
# MAE re-encodes each rank's own image rows: a rank with none runs a stand-in row weighted 0
MISSING_MAE = [
    "data.batch_size=4",
    "data.drop_modalities={image: 0.5}",
    "objectives=[{name: clip}, {name: mae}]",
]
# momentum copies, updated after every step: ALBEF's of the whole model (itc), data2vec's teacher of a
# tower; decays of 0.5 so that the copies move well beyond the tolerance in 4 steps
MOMENTUM = [
    "objectives=[{name: itc, momentum: 0.5}, {name: data2vec, modality: image, top_k: 1, momentum: 0.5}]"
]
# the spawned ranks, one run after another; "compiled" with the aot_eager backend (dynamo's capture
# and autograd tracing of the sharded towers without inductor's C++ build, a minute on this CPU)
RUNS = [
    ("missing", [*MISSING]),
    ("missing_gradcache", [*MISSING, "train.accumulate=2"]),
    ("missing_mae", [*MISSING_MAE]),
    ("momentum", [*MOMENTUM]),
    ("uncompiled", []),
    ("compiled", ["train.compile=true", "train.compile_backend=aot_eager"]),
]
COLLECTIVE_S = 300  # a rank waiting longer than this in one collective fails (a hang becomes an error)
DEADLINE_S = 1200  # and the test fails, killing the ranks, if they have not ended by then


def _recipe(*extra: str):
    return load_recipe("demo", [*BASE, *extra], smoke=True)


def _train_in_ranks(rank: int, root: str, port: int) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    from coalign.train.loop import train

    dist.init_process_group("gloo", timeout=timedelta(seconds=COLLECTIVE_S))  # train() keeps it
    out = Path(root)
    try:
        for name, overrides in RUNS:
            graphs = counters["stats"]["unique_graphs"]
            with open(out / f"{name}{rank}.log", "w") as log, contextlib.redirect_stdout(log):
                train(_recipe("train.fsdp=true", *overrides), out / name, progress=False)
            (out / f"{name}{rank}.graphs").write_text(str(counters["stats"]["unique_graphs"] - graphs))
        dist.barrier()  # no rank tears the group down while another's last collective is in flight
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    """RUNS trained in two processes; fails, rather than waits, if they have not ended in time."""
    root = tmp_path_factory.mktemp("fsdp_modality")
    context = mp.spawn(_train_in_ranks, args=(str(root), _free_port()), nprocs=2, join=False)
    end = time.monotonic() + DEADLINE_S
    while not context.join(timeout=5):
        if time.monotonic() > end:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
                p.join()
            logs = {p.name: p.read_text()[-2000:] for p in root.glob("*.log")}
            pytest.fail(f"the 2-process FSDP runs did not end within {DEADLINE_S} s (a hang); logs: {logs}")
    return root


def _rows_per_rank(run: Path, steps: int, missing=MISSING, key: str = "text") -> list[tuple[int, int]]:
    """(rank 0's, rank 1's) number of `key` rows in each step's batch, as the runs saw them."""
    recipe = _recipe(*missing)
    source = build_source(recipe.data.train, "data.train")
    transforms = build_transforms(recipe)
    prepare_transforms(transforms, source, run, resume=True)  # the run's fitted tokenizer
    pipeline = Pipeline(transforms, recipe.data.drop_modalities)
    per_rank = []
    for rank in (0, 1):
        batches = train_batches(source, pipeline, recipe.data.batch_size, recipe.seed, 0, shard=(rank, 2))
        rows = []
        for _ in range(steps):
            present = next(batches)["present"]
            rows.append(int(present[key].sum()) if key in present else 0)
        per_rank.append(rows)
    return list(zip(*per_rank, strict=True))


@pytest.mark.parametrize("modality", MODALITIES)
def test_a_stand_in_runs_its_tower_keeps_no_rows_and_sends_exactly_zero_gradient(modality, tmp_path):
    source = world([modality])
    transforms = transforms_for([modality], source, tmp_path)
    model = tiny_model(transforms)
    row = tiny_batch(source, transforms, size=2)[modality][:1]

    def grads(batch: dict) -> tuple[Features, dict[str, torch.Tensor | None]]:
        model.zero_grad(set_to_none=True)
        features = model(batch)[modality]
        sum(t.float().sum() for t in features.differentiable()).backward()
        return features, {n: p.grad for n, p in model.named_parameters()}

    real, of_real = grads({modality: row})
    stand_in, of_stand_in = grads({modality: StandIn(row)})
    assert real.embedding.shape[0] == 1
    for empty, full in zip(stand_in.differentiable(), real.differentiable(), strict=True):
        assert empty.shape == (0, *full.shape[1:])  # no rows: nothing of it reaches a loss
    # the parameters a real row reaches (the tower's, its head's) all get a gradient, and it is 0
    assert [n for n, g in of_stand_in.items() if g is not None] == [
        n for n, g in of_real.items() if g is not None
    ]
    assert all(torch.equal(g, torch.zeros_like(g)) for g in of_stand_in.values() if g is not None)


@pytest.mark.slow
def test_a_rank_without_rows_of_a_modality_neither_hangs_nor_changes_the_weights(ranks, tmp_path):
    from coalign.train.loop import train

    train(_recipe(*MISSING), tmp_path / "one", progress=False)
    assert "coalign: FSDP: " in (ranks / "missing0.log").read_text()  # it did shard
    rows = _rows_per_rank(tmp_path / "one", _recipe().train.steps)
    assert any(min(r) == 0 < max(r) for r in rows), rows  # one rank had text rows, the other none
    _assert_same(tmp_path / "one", ranks / "missing")
    _assert_same(tmp_path / "one", ranks / "missing_gradcache")


@pytest.mark.slow
def test_mae_on_a_rank_without_image_rows_neither_hangs_nor_changes_the_weights(ranks, tmp_path):
    """MAE encodes each rank's own image rows of the gathered batch again; a rank that owns none runs
    the sharded image tower on a stand-in row weighted 0, so neither rank waits for the other."""
    from coalign.train.loop import train

    train(_recipe(*MISSING_MAE), tmp_path / "one", progress=False)
    rows = _rows_per_rank(tmp_path / "one", _recipe().train.steps, MISSING_MAE, "image")
    assert any(min(r) == 0 < max(r) for r in rows), rows  # one rank had image rows, the other none
    _assert_same(tmp_path / "one", ranks / "missing_mae")


@pytest.mark.slow
def test_momentum_copies_are_sharded_as_their_sources_and_follow_them_as_in_one_process(ranks, tmp_path):
    """The EMA update meets sharded towers (DTensors) and their copies: ALBEF's momentum model and
    data2vec's teacher must follow their sources as they do in one process."""
    from coalign.train.loop import train

    train(_recipe(*MOMENTUM), tmp_path / "one", progress=False)
    weights = _weights(ranks / "momentum")
    assert any(".momentum.shadow." in k for k in weights)
    assert any(".teacher.shadow." in k for k in weights)
    _assert_same(tmp_path / "one", ranks / "momentum")


def test_an_unknown_compile_backend_fails_at_load_naming_the_field():
    with pytest.raises(
        ConfigError, match="train.compile_backend: unknown torch.compile backend 'nope'.*aot_eager"
    ):
        load_recipe("demo", ["train.compile_backend=nope"])


@pytest.mark.slow
def test_compiled_fsdp_towers_train_as_uncompiled_ones(ranks):
    assert int((ranks / "compiled0.graphs").read_text()) > 0  # dynamo did capture graphs
    assert int((ranks / "uncompiled0.graphs").read_text()) == 0
    _assert_same(ranks / "uncompiled", ranks / "compiled")
