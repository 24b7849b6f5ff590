"""Weighted k-nearest-neighbour classification on frozen features (the InstDisc / DINO protocol).

Features are L2-normalised, so similarity is cosine. Each test sample's k most similar training
samples vote for their class with weight exp(sim / T); the summed votes are the class scores handed to
`classification_metrics` (``knn_acc1``, ``knn_acc5`` when C > 5, ``knn_mean_per_class_recall``). No
fitting and no hyperparameter search, so kNN is the cheap companion of the linear probe.

Memory stays bounded on large splits: test rows are taken `chunk` at a time and the training set
`train_chunk` rows at a time, keeping a running top-k, so the largest block is chunk x train_chunk.
"""

from __future__ import annotations

from typing import Any

import pydantic
import torch
import torch.nn.functional as F

from coalign.evaluate.base import FittedEvaluator, register
from coalign.evaluate.classification import classification_metrics
from coalign.evaluate.linear_probe import check_features, parse_options, sample_shots
from coalign.registry import StrictModel


class KnnOptions(StrictModel):
    """How `knn_classify` votes; defaults are DINO's (k=20, T=0.07)."""

    k: int = pydantic.Field(20, ge=1)  # neighbours per test sample (capped at the training set size)
    temperature: float = pydantic.Field(0.07, gt=0)
    chunk: int = pydantic.Field(4096, gt=0)  # test rows per block
    train_chunk: int = pydantic.Field(65536, gt=0)  # training rows per block


class KnnEvalConfig(KnnOptions):
    """Options of the `knn` evaluator: the vote's options plus the training subset."""

    shots: int | None = pydantic.Field(None, ge=1)  # samples per class from the training split; None = all
    seed: int = 0

    @classmethod
    def tiny(cls) -> dict:
        return {"k": 3}


@torch.no_grad()
def nearest(
    train_x: torch.Tensor, test_x: torch.Tensor, k: int, chunk: int = 4096, train_chunk: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities (M, k), training indices (M, k)) of each test row's k most cosine-similar training
    rows, most similar first. Which of several exactly tied rows at the k-th place is kept is unspecified."""
    train = F.normalize(train_x.float(), dim=1)  # (N, D)
    test = F.normalize(test_x.float().to(train.device), dim=1)  # (M, D)
    k = min(k, len(train))
    sims, idxs = [], []
    for i in range(0, len(test), chunk):
        q = test[i : i + chunk]  # (m, D)
        best_s = q.new_empty(len(q), 0)
        best_i = torch.empty(len(q), 0, dtype=torch.long, device=q.device)
        for j in range(0, len(train), train_chunk):
            s = q @ train[j : j + train_chunk].T  # (m, n)
            s, at = s.topk(min(k, s.shape[1]), dim=1)  # (m, <=k)
            cand_s, cand_i = torch.cat([best_s, s], dim=1), torch.cat([best_i, at + j], dim=1)
            best_s, pos = cand_s.topk(min(k, cand_s.shape[1]), dim=1)  # merge with the running top-k
            best_i = cand_i.gather(1, pos)
        sims.append(best_s)
        idxs.append(best_i)
    return torch.cat(sims), torch.cat(idxs)


@torch.no_grad()
def knn_scores(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 4096,
    train_chunk: int = 65536,
) -> torch.Tensor:
    """(M, C) class scores: the sum of exp(sim / T) over each test row's k nearest neighbours of that
    class. Each row is scaled by exp(-max sim / T), which keeps small temperatures finite and leaves the
    order of its scores, hence every metric, unchanged."""
    sims, idx = nearest(train_x, test_x, k, chunk, train_chunk)  # (M, k), (M, k)
    weights = ((sims - sims[:, :1]) / temperature).exp()  # (M, k); the first column is the largest
    votes = torch.zeros(len(sims), num_classes, device=sims.device)
    return votes.scatter_add_(1, train_y.to(idx.device)[idx], weights)


def knn_classify(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    **options: Any,
) -> dict[str, float]:
    """Temperature-weighted kNN accuracy of `test_x` against the labelled `train_x`; `options` are
    `KnnOptions` fields (k=20, temperature=0.07, chunk, train_chunk), checked by name and value.

    Returns ``knn_acc1``, ``knn_acc5`` (only when C > 5) and ``knn_mean_per_class_recall``.
    """
    opts = parse_options(KnnOptions, options, "knn")
    return knn_metrics(train_x, train_y, test_x, test_y, num_classes, opts)


def knn_metrics(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    opts: KnnOptions,
) -> dict[str, float]:
    """`knn_classify` with options already validated (the evaluator's Config is a KnnOptions)."""
    check_features(train_x, train_y, test_x, test_y, num_classes)
    vote = {name: getattr(opts, name) for name in KnnOptions.model_fields}
    scores = knn_scores(train_x, train_y, test_x, num_classes, **vote)  # (M, C)
    metrics = classification_metrics(scores, test_y.to(scores.device))
    return {f"knn_{name}": v for name, v in metrics.items()}


@register("knn")
class Knn(FittedEvaluator):
    """kNN per modality and label against the dataset's training split (options: `KnnEvalConfig`).
    Target: the modality; label: the key; metrics `knn_acc1` (headline), `knn_acc5`,
    `knn_mean_per_class_recall`. Runs on the runtime's device."""

    Config = KnnEvalConfig
    headlines = frozenset({"knn_acc1"})

    def fit(self, train_x, train_y, test_x, test_y, num_classes: int) -> dict[str, float]:
        cfg: KnnEvalConfig = self.config
        if cfg.shots is not None:
            keep = sample_shots(train_y, cfg.shots, cfg.seed).to(train_x.device)
            train_x, train_y = train_x[keep], train_y[keep]
        return knn_metrics(train_x, train_y, test_x, test_y, num_classes, cfg)
