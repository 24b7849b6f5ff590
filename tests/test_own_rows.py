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


# objectives that encode, fuse or decode the batch again: under two ranks each does it for its own
# rows of the gathered batch only (the local loss), not for the whole global batch on every rank
AGAIN = ["itm", "mlm", "wra", "mae", "data2vec", "m3ae", "caption"]


def _again_worker(rank: int, names: list[str], root: str) -> None:
    """test_distributed's check (2 processes == 1, loss and gradients), recording the rows that each
    call of the fusion part, a tower's `encode_patches` and the caption decoder gets, in the
    single-process reference and under the two ranks."""
    import test_distributed
    from coalign.models.decoder import Decoder
    from coalign.models.encoders.audio import AudioTransformer
    from coalign.models.encoders.points import PointTransformer
    from coalign.models.encoders.vit import ViT
    from coalign.models.model import MultimodalModel

    phase, seen = ["ranks"], []
    reference = test_distributed._reference

    def in_reference(*args):
        phase[0] = "reference"
        try:
            return reference(*args)
        finally:
            phase[0] = "ranks"

    def counting(cls, method, rows_of):
        original = getattr(cls, method)

        def counted(self, *args, **kwargs):
            seen.append((phase[0], rows_of(*args)))
            return original(self, *args, **kwargs)

        setattr(cls, method, counted)

    counting(MultimodalModel, "fuse", lambda tokens: max(t.tokens.shape[0] for t in tokens.values()))
    for tower in (ViT, AudioTransformer, PointTransformer):
        counting(tower, "encode_patches", lambda x, keep=None: x.shape[0])
    counting(Decoder, "forward", lambda text, context: text.tokens.shape[0])
    test_distributed._reference = in_reference
    for name in names:
        seen.clear()
        _worker(rank, [name], str(Path(root) / name), None)
        most = {p: max((r for q, r in seen if q == p), default=0) for p in ("reference", "ranks")}
        (Path(root) / f"{name}-rows{rank}.txt").write_text(f"{most['reference']} {most['ranks']}")


def test_objectives_that_encode_again_do_it_for_their_own_rows(tmp_path):
    for name in AGAIN:
        (tmp_path / name).mkdir()
    mp.spawn(_again_worker, args=(AGAIN, str(tmp_path)), nprocs=2, join=True)
    for name in AGAIN:
        found = [tuple(map(int, (tmp_path / f"{name}-rows{r}.txt").read_text().split())) for r in range(2)]
        (reference, _), (_, zero), (_, one) = found[0], *found
        # the whole batch's rows (or ITM's pairs) in one process; split between the two ranks under two
        assert 0 < zero < reference and 0 < one < reference and zero + one == reference, (name, found)
