"""Distillation from a trained coalign run: match the teacher's in-batch similarity distributions.

With s = a @ b.T the (M, M) cosine similarities of the batch's pairs (student: S, teacher: S^t) and
p = softmax(s / T), the loss is Hinton et al.'s (2015) soft-target KL, in both directions:

    loss = T^2 * 1/2 ( 1/M sum_i KL(p^t_i. || p_i.)  +  1/M sum_j KL(p^t_.j || p_.j) )

(rows: a -> b, columns: b -> a). The T^2 keeps the gradient's size roughly independent of T when
T > 1; note that s is a cosine in [-1, 1], so T is a temperature on cosines, as CLIP's 0.07 is
(the gradient with respect to s is T (p - p^t) / M, so small temperatures want a larger weight).
Only the similarity structure is distilled, so teacher and student may have different widths,
depths and embedding sizes; the recipe combines this objective with `clip` by weight.

The batch's tensors come from the *student's* transforms, so the teacher must read them as it was
trained to: the same tokenizer (set the student's `data.transforms.text.path` to the teacher run's
`tokenizer.json`) and the same image size. `bind` checks what it can see and fails clearly: the
input sizes always, and the vocabularies token for token when it is also given the student's transforms.

Local loss (several ranks): the KL terms of this rank's rows and columns, each against the whole
gathered batch. The teacher encodes each rank's own rows, and its features are gathered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydantic
import torch
import torch.nn.functional as F

from coalign.build import load_run
from coalign.data.sample import base_modality
from coalign.data.transforms.base import Transform
from coalign.models.model import Features, MultimodalModel
from coalign.objectives.base import Objective, ObjectiveConfig, paired
from coalign.objectives.contrastive import whole
from coalign.objectives.distributed import Rows, encode_own_rows, own_rows
from coalign.registry import OBJECTIVES, ConfigError


class DistillConfig(ObjectiveConfig):
    teacher: str  # a coalign run folder (its latest checkpoint) or one checkpoint folder
    temperature: float = pydantic.Field(1.0, gt=0)
    modalities: tuple[str, str] = ("image", "text")


def distill_kl(
    a: torch.Tensor,
    b: torch.Tensor,
    ta: torch.Tensor,
    tb: torch.Tensor,
    temperature: float,
    rows: Rows | None = None,
) -> torch.Tensor:
    """The loss above; a, b: student (M, E), ta, tb: teacher (M, E'), all normalised. With `rows`,
    the local loss of those rows and columns (see `Rows.mean`)."""
    if whole(rows):
        student = a @ b.T / temperature  # (M, M)
        teacher = (ta @ tb.T / temperature).to(student.dtype)  # (M, M)

        def kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # row mean of KL(softmax t || softmax s)
            return F.kl_div(s.log_softmax(-1), t.log_softmax(-1), reduction="batchmean", log_target=True)

        loss = temperature**2 * 0.5 * (kl(student, teacher) + kl(student.T, teacher.T))
        return loss if rows is None else rows.world * loss

    def kl_rows(x: torch.Tensor, y: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
        """(m,) KL(softmax teacher || softmax student) of this rank's rows of x against every y."""
        s = rows.take(x) @ y.T / temperature  # (m, M)
        t = (rows.take(tx) @ ty.T / temperature).to(s.dtype)
        return F.kl_div(s.log_softmax(-1), t.log_softmax(-1), reduction="none", log_target=True).sum(-1)

    return temperature**2 * 0.5 * rows.mean(kl_rows(a, b, ta, tb) + kl_rows(b, a, tb, ta))


def check_compatible(
    student: MultimodalModel,
    teacher_transforms: dict[str, Transform],
    modalities: list[str],
    where: str,
    student_transforms: dict[str, Transform] | None = None,
) -> None:
    """Fail unless the teacher can read the student's batch tensors for `modalities` (base names).

    Always: each input setting the teacher's transforms describe (vocab_size, context_length, pad_id,
    image_size, ...) must equal the student tower's setting of the same name. When the student's
    transforms are given as well, text vocabularies must be identical, token for token.
    """
    problems = []
    for m in modalities:
        if m not in student.towers:
            problems.append(f"the student has no '{m}' tower")
            continue
        expected = teacher_transforms[m].describe()
        cfg = getattr(student.towers[m], "cfg", None)
        for key, value in expected.items():
            got = getattr(cfg, key, None)
            if got is not None and got != value:
                problems.append(f"{m}.{key}: teacher {value}, student {got}")
        ours = getattr(teacher_transforms[m], "tokenizer", None)
        theirs = getattr((student_transforms or {}).get(m), "tokenizer", None)
        if ours is not None and theirs is not None and ours.get_vocab() != theirs.get_vocab():
            problems.append(f"{m}: the student's tokenizer differs from the teacher's")
    if problems:
        raise ConfigError(
            f"{where}: the teacher cannot read the student's inputs: {'; '.join(problems)}. The batch "
            "comes from the student's transforms: use the teacher's tokenizer (data.transforms.text.path: "
            "<teacher run>/tokenizer.json) and its image size"
        )


@OBJECTIVES.register("distill")
class Distill(Objective):
    Config = DistillConfig
    name = "distill"
    needs_inputs = True  # the teacher re-encodes the batch's inputs (gathered too under several ranks)

    def __init__(self, cfg: DistillConfig | None = None, **kwargs: Any):
        super().__init__(cfg, **kwargs)
        # The teacher sits in a plain list, not as a submodule: nn.Module registers only direct
        # Module attributes, so the teacher stays out of parameters() (never optimised, never
        # clipped), out of state_dict() (the student's checkpoint holds only the student; resume
        # reloads the teacher from `teacher`), and out of task.train() (it stays in eval mode).
        self._teacher: list[MultimodalModel] = []

    def bind(self, model: MultimodalModel, transforms: dict[str, Transform] | None = None) -> None:
        where = "objectives: distill.teacher"
        if not Path(self.cfg.teacher).exists():
            raise ConfigError(f"{where}: no run or checkpoint folder '{self.cfg.teacher}'")
        run = load_run(self.cfg.teacher)
        bases = [base_modality(m) for m in self.cfg.modalities]
        missing = [m for m in bases if m not in run.model.towers]
        if missing:
            raise ConfigError(f"{where}: the teacher has no {missing} tower; it has {run.model.modalities}")
        check_compatible(model, run.transforms, bases, where, transforms)
        run.model.requires_grad_(False).eval()
        self._teacher[:] = [run.model]

    @property
    def teacher(self) -> MultimodalModel:
        if not self._teacher:
            raise RuntimeError("distill: bind(model) loads the teacher; call it before forward")
        return self._teacher[0]

    def forward(self, features: dict[str, Features], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        ma, mb = self.cfg.modalities
        a, b = paired(features, batch, ma, mb)
        if a.ndim != 2 or b.ndim != 2:
            raise ValueError(f"distill needs one item per sample, got {tuple(a.shape)} and {tuple(b.shape)}")
        teacher = self.teacher
        if next(teacher.parameters()).device != a.device:  # Task.to(device) does not reach it
            teacher.to(a.device)

        def encode(part: dict[str, Any]) -> dict[str, Features]:
            return {m: teacher.features(base_modality(m), part[m]) for m in (ma, mb) if m in part}

        tf = encode_own_rows(encode, batch)  # each rank its own rows, gathered
        ta, tb = paired(tf, batch, ma, mb)
        rows = own_rows(batch, (ma, mb), a.shape[0])
        return {"distill_loss": distill_kl(a, b, ta, tb, self.cfg.temperature, rows)}
