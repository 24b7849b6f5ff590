"""Classification metrics and CLIP-style class embeddings (prompt ensembling).

Metric names follow CLIP_benchmark: ``acc1``, ``acc5``, ``mean_per_class_recall``.

Tie rule: the prediction is the arg-max logit, lowest class index first on ties (as ``torch.argmax``).
Top-k uses the same order, (logit descending, class index ascending), so acc1 agrees with the
arg-max predictions and results never depend on ``topk``'s unspecified tie order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

_SENTINEL = "\x00classname\x00"


def _check_labels(name: str, labels: torch.Tensor, n: int, num_classes: int) -> None:
    if labels.dtype != torch.long or labels.dim() != 1:
        raise ValueError(
            f"{name} must be a 1-D LongTensor, got dtype={labels.dtype} shape={tuple(labels.shape)}"
        )
    if labels.shape[0] != n:
        raise ValueError(f"{name} has {labels.shape[0]} entries, expected {n}")
    if n:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} values must lie in [0, {num_classes}), got range [{lo}, {hi}]")


def _target_rank(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Position of each target in the (logit desc, index asc) order. (N, C), (N,) -> (N,)."""
    target_logit = logits.gather(1, targets[:, None])  # (N, 1)
    idx = torch.arange(logits.shape[1], device=logits.device)[None, :]  # (1, C)
    ahead = (logits > target_logit) | ((logits == target_logit) & (idx < targets[:, None]))  # (N, C)
    return ahead.sum(dim=1)


@torch.no_grad()
def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) LongTensor of counts; row = true class, column = predicted class."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if preds.dim() != 1:
        raise ValueError(f"preds must be 1-D, got shape {tuple(preds.shape)}")
    _check_labels("preds", preds, preds.shape[0], num_classes)
    _check_labels("targets", targets.to(preds.device), preds.shape[0], num_classes)
    flat = targets.to(preds.device) * num_classes + preds  # (N,)
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


@torch.no_grad()
def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Accuracy metrics from (N, C) logits and (N,) integer targets.

    Returns ``acc1``; ``acc5`` (top-5 accuracy) only when C > 5; and ``mean_per_class_recall``, the mean
    over classes present in ``targets`` of per-class recall (sklearn's balanced accuracy, as used by
    CLIP_benchmark). Ties follow the module's tie rule.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (N, C), got shape {tuple(logits.shape)}")
    n, c = logits.shape
    if n == 0 or c == 0:
        raise ValueError(f"need at least one sample and one class, got N={n}, C={c}")
    if torch.isnan(logits).any():
        raise ValueError("logits contain NaN")
    targets = targets.to(logits.device)
    _check_labels("targets", targets, n, c)

    return _summarise(_target_rank(logits, targets), logits.argmax(dim=1), targets, c)


def _summarise(rank: torch.Tensor, preds: torch.Tensor, targets: torch.Tensor, c: int) -> dict[str, float]:
    """Metrics from each sample's target rank (N,) and arg-max prediction (N,)."""
    out = {"acc1": (rank < 1).double().mean().item()}
    if c > 5:
        out["acc5"] = (rank < 5).double().mean().item()
    cm = confusion_matrix(preds, targets, c)  # (C, C)
    support = cm.sum(dim=1)  # (C,)
    present = support > 0
    recall = cm.diagonal()[present].double() / support[present].double()
    out["mean_per_class_recall"] = recall.mean().item()
    return out


@torch.no_grad()
def chunked_classification_metrics(
    features: torch.Tensor, classes: torch.Tensor, targets: torch.Tensor, chunk: int = 16384
) -> dict[str, float]:
    """`classification_metrics(features @ classes.T, targets)` without the (N, C) logit matrix: logits
    are formed `chunk` rows at a time and reduced to each row's target rank and prediction at once,
    so memory is O(chunk * C + N) however many samples there are. Identical numbers."""
    if features.dim() != 2 or classes.dim() != 2 or features.shape[1] != classes.shape[1]:
        raise ValueError(
            "features (N, D) and classes (C, D) must share D, "
            f"got {tuple(features.shape)} and {tuple(classes.shape)}"
        )
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    n, c = features.shape[0], classes.shape[0]
    if n == 0 or c == 0:
        raise ValueError(f"need at least one sample and one class, got N={n}, C={c}")
    targets = targets.to(features.device)
    _check_labels("targets", targets, n, c)
    ranks, preds = [], []
    for i in range(0, n, chunk):
        logits = features[i : i + chunk] @ classes.T  # (chunk, C)
        if torch.isnan(logits).any():
            raise ValueError("logits contain NaN")
        ranks.append(_target_rank(logits, targets[i : i + chunk]))
        preds.append(logits.argmax(dim=1))
    return _summarise(torch.cat(ranks), torch.cat(preds), targets, c)


def _fill(template: str, classname: str) -> str:
    """Format a template with ``{}`` or ``{c}`` (or both) standing for the class name."""
    try:
        filled = template.format(_SENTINEL, c=_SENTINEL)
    except (IndexError, KeyError, ValueError) as err:
        raise ValueError(
            f"template {template!r} must use '{{}}' or '{{c}}' for the class name: {err}"
        ) from err
    if _SENTINEL not in filled:
        raise ValueError(f"template {template!r} has no '{{}}' or '{{c}}' placeholder for the class name")
    return filled.replace(_SENTINEL, classname)


def class_embeddings(
    encode_text: Callable[[list[str]], torch.Tensor], classnames: list[str], templates: list[str]
) -> torch.Tensor:
    """CLIP prompt ensembling: one unit-norm (C, D) embedding per class.

    Every template is filled with every class name (class-major order: all templates of class 0,
    then class 1, ...), ``encode_text`` is called once on all C*T prompts, each prompt embedding is
    L2-normalised, the T embeddings of a class are averaged, and the mean is L2-normalised again.
    """
    if not classnames:
        raise ValueError("classnames is empty")
    if not templates:
        raise ValueError("templates is empty")
    prompts = [_fill(t, name) for name in classnames for t in templates]
    emb = encode_text(prompts)
    c, t = len(classnames), len(templates)
    if emb.dim() != 2 or emb.shape[0] != c * t:
        raise ValueError(
            f"encode_text returned shape {tuple(emb.shape)}, expected ({c * t}, D) for {c * t} prompts"
        )
    emb = F.normalize(emb, dim=-1).view(c, t, -1)  # (C, T, D)
    return F.normalize(emb.mean(dim=1), dim=-1)  # (C, D)
