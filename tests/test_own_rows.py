"""Teachers and momentum models encode only their rank's rows (`encode_own_rows`), with two real
gloo processes: the loss and gradients still equal one process's on the whole batch (for the
objectives that use one: `itc`'s and `mlm`'s momentum model, `distill`'s teacher), and each rank's
momentum model saw its own rows, not the gathered batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from coalign.models.ema import EMA
from test_distributed import _worker

pytestmark = pytest.mark.slow

NAMES = ["itc", "distill", "mlm"]


def _counting_worker(rank: int, names: list[str], root: str, teacher: str) -> None:
    """test_distributed's check (2 processes == 1, loss and gradients), recording the rows each
    call of a momentum model gets."""
    rows: list[int] = []
    forward = EMA.forward

    def counted(self, batch, *args, **kwargs):
        if isinstance(batch, dict):
            rows.append(max(len(v) for v in batch.values() if isinstance(v, torch.Tensor)))
        return forward(self, batch, *args, **kwargs)

    EMA.forward = counted
    _worker(rank, names, root, teacher)
    (Path(root) / f"rows{rank}.txt").write_text(" ".join(map(str, rows)))


def test_teachers_encode_their_own_rows_and_match_one_process(tmp_path, teacher):
    from test_registries import objective_setup

    (tmp_path / "probe").mkdir()
    _, _, batch = objective_setup("itc", tmp_path / "probe")
    n = len(batch["id"])
    mp.spawn(_counting_worker, args=(NAMES, str(tmp_path), str(teacher)), nprocs=2, join=True)
    for rank in range(2):
        rows = [int(r) for r in (tmp_path / f"rows{rank}.txt").read_text().split()]
        # the one-process reference encodes all n rows; under the two ranks each encodes its half
        assert n in rows and any(r <= (n + 1) // 2 for r in rows), (n, rows)
