"""Linear probe on frozen features: multinomial logistic regression with a swept weight decay.

The protocol is CLIP's (Radford et al. 2021, A.3) as CLIP_benchmark runs it: carve a stratified
validation split from the training features, sweep the L2 strength on a log grid (a coarse pass, then a
binary refinement around the peak), retrain on train + validation with the chosen value, report test
``acc1`` / ``acc5`` / ``mean_per_class_recall`` (prefixed ``lp_``) and the chosen ``lp_weight_decay``.

The classifier is fitted full-batch with L-BFGS (from zeros, or warm-started from the neighbouring
weight decay's solution during the sweep). The objective is convex, so the fit is its optimum (up to
``max_iter`` / ``tol``) rather than a function of a learning rate, batch size and schedule, and a seed
only decides which samples are shots and which go to validation. The objective is

    mean_i CE(W x_i + b, y_i) + wd / 2 * ||W||^2        (the bias is not decayed)

which is scikit-learn's ``LogisticRegression(C=1 / (n * wd))``. Loss and gradient are computed in
blocks of rows with a closed-form gradient, so memory is (block, C) beyond the features themselves.
"""

from __future__ import annotations

import math
from typing import Any, Self

import pydantic
import torch

from coalign.evaluate.base import FittedEvaluator, register
from coalign.evaluate.classification import classification_metrics
from coalign.registry import ConfigError, StrictModel, format_validation_error


class LinearProbeOptions(StrictModel):
    """How `linear_probe` fits. The default grid is CLIP_benchmark's: 97 points from 1e-6 to 1e2 (12 per
    decade), a first pass over 7 of them, then halving steps of 8, 4, 2, 1 grid points around the peak."""

    max_iter: int = pydantic.Field(100, ge=1)  # L-BFGS iterations per fit (sklearn's default)
    # L-BFGS stops when the loss or the step changes by less than tol, or every |gradient| <= 10 tol:
    # probabilities within ~1e-3 of the exact optimum, and no iterations spent on digits no metric sees.
    tol: float = pydantic.Field(1e-6, gt=0)
    val_fraction: float = pydantic.Field(0.2, gt=0, lt=1)  # per class, of the training samples
    wd_min: float = pydantic.Field(1e-6, gt=0)
    wd_max: float = pydantic.Field(1e2, gt=0)
    wd_steps: int = pydantic.Field(97, ge=1)  # log-spaced grid points from wd_min to wd_max
    wd_coarse: int = pydantic.Field(7, ge=1)  # grid points visited by the first pass
    # Used without a sweep when no class can spare a validation sample (1-shot): a mild prior that
    # keeps the weights finite on the always-separable few-shot set.
    default_weight_decay: float = pydantic.Field(1e-3, ge=0)
    chunk: int = pydantic.Field(65536, gt=0)  # rows per loss block (memory: chunk x C floats)

    @pydantic.model_validator(mode="after")
    def _check_range(self) -> Self:
        if self.wd_min > self.wd_max:
            raise ValueError(f"wd_min ({self.wd_min}) must not exceed wd_max ({self.wd_max})")
        if self.wd_coarse > self.wd_steps:
            raise ValueError(f"wd_coarse ({self.wd_coarse}) must not exceed wd_steps ({self.wd_steps})")
        return self


class LinearProbeEvalConfig(LinearProbeOptions):
    """Options of the `linear_probe` evaluator: the fit's options plus the training subset."""

    shots: int | None = pydantic.Field(None, ge=1)  # samples per class from the training split; None = all
    seed: int = 0

    @classmethod
    def tiny(cls) -> dict:
        return {"max_iter": 20, "wd_steps": 5, "wd_coarse": 3}


def parse_options(cls: type[StrictModel], options: dict[str, Any], evaluator: str) -> Any:
    """Validate the keyword options of a direct call (`linear_probe(...)`, `knn_classify(...)`); a typo
    fails naming the key and the valid ones. Evaluators get theirs validated once, when built."""
    try:
        return cls(**options)
    except pydantic.ValidationError as err:
        raise ConfigError(format_validation_error(err, evaluator, cls)) from None


def check_features(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, num_classes: int
) -> None:
    """Shapes and label ranges of a train/test feature pair; errors name the offending tensor."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    for name, x in (("train_x", train_x), ("test_x", test_x)):
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train_x has D={train_x.shape[1]} but test_x has D={test_x.shape[1]}")
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError(f"need training and test samples, got {len(train_x)} and {len(test_x)}")
    for name, y, n in (("train_y", train_y, len(train_x)), ("test_y", test_y, len(test_x))):
        if y.dtype != torch.long or y.shape != (n,):
            raise ValueError(
                f"{name} must be a LongTensor of shape ({n},), got dtype={y.dtype} shape={tuple(y.shape)}"
            )
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} values must lie in [0, {num_classes}), got range [{lo}, {hi}]")


def _shuffled_by_class(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices grouped by class, in a seeded random order within each class; each one's position
    within its class; the count of each class present). All (N,) but the counts, (K,)."""
    labels = labels.cpu()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=gen)  # (N,)
    _, order = labels[perm].sort(stable=True)  # stable: the random order survives within a class
    _, counts = labels.unique(return_counts=True)  # (K,) sorted by class, as the groups are
    start = torch.cumsum(counts, 0) - counts  # (K,) first position of each class group
    rank = torch.arange(len(labels)) - start.repeat_interleave(counts)  # (N,)
    return perm[order], rank, counts


def sample_shots(labels: torch.Tensor, shots: int, seed: int = 0) -> torch.Tensor:
    """Indices of `shots` random samples of every class present in `labels`, sorted ascending.

    The same (labels, shots, seed) always gives the same indices. Raises naming every class that has
    fewer than `shots` samples, so a few-shot result never silently uses fewer shots for some class.
    """
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    classes, counts = labels.cpu().unique(return_counts=True)
    short = {int(c): int(n) for c, n in zip(classes, counts, strict=True) if n < shots}
    if short:
        listing = ", ".join(f"class {c}: {n}" for c, n in sorted(short.items()))
        raise ValueError(f"{shots}-shot sampling needs {shots} samples per class; too few in {listing}")
    grouped, rank, _ = _shuffled_by_class(labels, seed)
    return grouped[rank < shots].sort().values


def stratified_split(
    labels: torch.Tensor, fraction: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices), each sorted: per class, round(fraction * n) samples, at
    least one, go to validation, and at least one stays for training. A class with a single sample keeps
    it for training (it cannot be both learnt and validated), so with one shot per class validation is
    empty."""
    grouped, rank, counts = _shuffled_by_class(labels, seed)
    n_val = (counts.double() * fraction).round().long().clamp(min=1)  # (K,)
    n_val = torch.minimum(n_val, counts - 1)  # 0 for single-sample classes
    is_val = rank < n_val.repeat_interleave(counts)  # (N,) in grouped order
    return grouped[~is_val].sort().values, grouped[is_val].sort().values


def _loss_and_grad(
    w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor, wd: float, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The probe objective and its gradient in closed form (softmax - onehot), block by block."""
    n = len(x)
    loss = x.new_zeros(())
    gw, gb = torch.zeros_like(w), torch.zeros_like(b)  # (C, D), (C,)
    for i in range(0, n, chunk):
        xc, yc = x[i : i + chunk], y[i : i + chunk]  # (n, D), (n,)
        logp = torch.addmm(b, xc, w.T).log_softmax(dim=1)  # (n, C)
        loss -= logp.gather(1, yc[:, None]).sum()
        g = logp.exp_()  # (n, C) softmax
        g[torch.arange(len(yc), device=g.device), yc] -= 1.0
        gw.addmm_(g.T, xc)
        gb += g.sum(dim=0)
    loss = loss / n + 0.5 * wd * w.square().sum()
    return loss, gw.div_(n).add_(w, alpha=wd), gb.div_(n)


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    max_iter: int = 100,
    chunk: int = 65536,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    tol: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (C, D), b (C,)) minimising the module's objective by full-batch L-BFGS, from zeros or from
    `init` (a warm start: the objective is convex, so the start changes the iterations, not the optimum)."""
    x = x.float()
    if init is None:
        w = torch.zeros(num_classes, x.shape[1], device=x.device)
        b = torch.zeros(num_classes, device=x.device)
    else:
        w, b = init[0].clone(), init[1].clone()
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=10,
        line_search_fn="strong_wolfe",
        tolerance_grad=10 * tol,
        tolerance_change=tol,
    )

    def closure() -> torch.Tensor:  # the gradient is closed-form, so no autograd graph (and no_grad is fine)
        loss, gw, gb = _loss_and_grad(w, b, x, y, weight_decay, chunk)
        w.grad, b.grad = gw, gb
        return loss

    opt.step(closure)
    return w, b


def weight_decay_grid(opts: LinearProbeOptions) -> list[float]:
    """The log-spaced candidate weight decays, smallest first."""
    lo, hi = math.log10(opts.wd_min), math.log10(opts.wd_max)
    return torch.logspace(lo, hi, opts.wd_steps, dtype=torch.float64).tolist()


def sweep_weight_decay(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    opts: LinearProbeOptions,
) -> tuple[float, tuple[torch.Tensor, torch.Tensor], dict[float, float]]:
    """(chosen weight decay, its fitted (W, b), {weight decay: validation acc1} for every value tried).

    CLIP_benchmark's search: the coarse pass visits `wd_coarse` evenly spaced grid points; then, with a
    step of half the coarse spacing, it compares the peak with its neighbours a step either side and
    halves the step until it is one grid point. Of equally accurate values the largest wins: the most
    regularised of equally good probes, and the fastest to fit (CLIP_benchmark keeps whichever it tried
    first, which depends on the visiting order). Each fit warm-starts from the fitted
    value nearest on the grid (the regularisation path is smooth), the coarse pass from strong to weak
    decay, which cuts the L-BFGS iterations several-fold.
    """
    grid = weight_decay_grid(opts)
    acc: dict[int, float] = {}
    fits: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def best(idxs: list[int]) -> int:
        for i in sorted(set(idxs), reverse=True):
            if i in acc:
                continue
            near = min(fits, key=lambda j: (abs(j - i), -j), default=None)
            init = None if near is None else fits[near]
            w, b = fit_logistic(
                train_x, train_y, num_classes, grid[i], opts.max_iter, opts.chunk, init, opts.tol
            )
            pred = torch.addmm(b, val_x.float(), w.T).argmax(dim=1)  # (V,)
            acc[i], fits[i] = (pred == val_y).double().mean().item(), (w, b)
        return max(idxs, key=lambda i: (acc[i], i))

    last = len(grid) - 1
    coarse = sorted({round(j * last / max(opts.wd_coarse - 1, 1)) for j in range(opts.wd_coarse)})
    peak = best(coarse)
    step = (coarse[1] - coarse[0]) // 2 if len(coarse) > 1 else 0
    while step > 0:
        peak = best([max(peak - step, 0), peak, min(peak + step, last)])
        step //= 2
    return grid[peak], fits[peak], {grid[i]: a for i, a in sorted(acc.items())}


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    *,
    shots: int | None = None,
    seed: int = 0,
    **options: Any,
) -> dict[str, float]:
    """Fit a linear probe on (train_x, train_y), report on (test_x, test_y).

    `shots` keeps that many random training samples per class (`sample_shots`). The weight decay is
    swept on a stratified `val_fraction` of the (few-shot) training set, then the probe is refitted on
    all of it. With one shot per class no validation sample can be spared (holding out a class's only
    sample leaves nothing to learn it from), so the sweep is skipped and `default_weight_decay` is used;
    the same happens whenever every class has a single training sample. `options`: `LinearProbeOptions`.

    Returns ``lp_acc1``, ``lp_acc5`` (only when C > 5), ``lp_mean_per_class_recall``, ``lp_weight_decay``.
    """
    opts = parse_options(LinearProbeOptions, options, "linear_probe")
    return fit_and_score(train_x, train_y, test_x, test_y, num_classes, opts, shots, seed)


def fit_and_score(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    opts: LinearProbeOptions,
    shots: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """`linear_probe` with options already validated (the evaluator's Config is a LinearProbeOptions)."""
    check_features(train_x, train_y, test_x, test_y, num_classes)
    device = train_x.device
    if shots is not None:
        keep = sample_shots(train_y, shots, seed).to(device)
        train_x, train_y = train_x[keep], train_y[keep]
    fit_idx, val_idx = stratified_split(train_y, opts.val_fraction, seed)
    if len(val_idx):
        fit_idx, val_idx = fit_idx.to(device), val_idx.to(device)
        wd, init, _ = sweep_weight_decay(
            train_x[fit_idx], train_y[fit_idx], train_x[val_idx], train_y[val_idx], num_classes, opts
        )
    else:
        wd, init = opts.default_weight_decay, None
    w, b = fit_logistic(train_x, train_y, num_classes, wd, opts.max_iter, opts.chunk, init, opts.tol)
    logits = torch.addmm(b, test_x.float().to(device), w.T)  # (M, C)
    out = {f"lp_{k}": v for k, v in classification_metrics(logits, test_y.to(device)).items()}
    out["lp_weight_decay"] = float(wd)
    return out


@register("linear_probe")
class LinearProbe(FittedEvaluator):
    """Linear probe per modality and label on the dataset's training split (options:
    `LinearProbeEvalConfig`). Target: the modality; label: the key; metrics `lp_acc1` (headline),
    `lp_acc5`, `lp_mean_per_class_recall`, `lp_weight_decay`. Fitted on the runtime's device."""

    Config = LinearProbeEvalConfig
    headlines = frozenset({"lp_acc1"})

    def fit(self, train_x, train_y, test_x, test_y, num_classes: int) -> dict[str, float]:
        cfg: LinearProbeEvalConfig = self.config
        return fit_and_score(train_x, train_y, test_x, test_y, num_classes, cfg, cfg.shots, cfg.seed)
