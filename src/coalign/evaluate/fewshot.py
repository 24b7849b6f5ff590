"""Zero-shot vs CoOp vs linear probe at k shots per class: the comparison CoOp's paper draws.

For every dataset of a suite that names a training split, every label key with class names, and every
non-text modality: zero-shot top-1 (no examples), then CoOp and a linear probe trained on k examples
per class for each k (averaged over `seeds` draws of the k examples). Embeddings come from the
suite's cache, so the sweep encodes each split once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import mean
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from coalign.build import LoadedRun
    from coalign.evaluate.runner import Suite

METHODS = {  # row name -> (evaluator, its top-1 metric)
    "zero-shot": ("zero_shot", "acc1"),
    "CoOp": ("coop", "acc1"),
    "linear probe": ("linear_probe", "lp_acc1"),
}


@dataclass
class FewshotTable:
    shots: list[int]
    # values[dataset/modality/label][method][k] = top-1 accuracy (k = 0 for zero-shot)
    values: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)

    def add(self, target: str, method: str, k: int, value: float) -> None:
        self.values.setdefault(target, {}).setdefault(method, {})[k] = value

    def rows(self) -> tuple[list[str], list[list]]:
        header = ["target", "method", "0", *map(str, self.shots)]
        rows = []
        for target, methods in self.values.items():
            for method in METHODS:
                if method in methods:
                    by_k = methods[method]
                    rows.append([target, method, *(by_k.get(k) for k in [0, *self.shots])])
        return header, rows

    def markdown(self) -> str:
        header, rows = self.rows()
        header = [*header[:2], "zero-shot", *(f"k={k}" for k in self.shots)]
        lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
        for row in rows:
            cells = ["–" if v is None else f"{100 * v:.1f}" for v in row[2:]]
            lines.append("| " + " | ".join([*row[:2], *cells]) + " |")
        return "\n".join(lines) + "\n"


def fewshot_table(
    run: LoadedRun, suite: Suite, shots: list[int], seeds: int = 1, progress: bool = True
) -> FewshotTable:
    from coalign.config import evaluator_specs
    from coalign.evaluate.runner import EmbeddingCache, evaluate_dataset, run_cache_dir

    cache = EmbeddingCache(run, run_cache_dir(run), suite.batch_size, progress)
    table = FewshotTable(shots)
    # Options for CoOp and the probe come from the suite's entries of those names, if it has them.
    options = {spec.name: spec.options() for spec in evaluator_specs(suite.tasks)}
    datasets = [name for name, ds in suite.datasets.items() if ds.train is not None]
    if not datasets:
        raise ValueError("the few-shot comparison needs datasets with a `train:` split; this suite has none")
    for name in datasets:
        zero = evaluate_dataset(run, suite, name, ["zero_shot"], cache)
        _collect(table, name, "zero-shot", 0, [zero])
        for k in shots:
            for method in ("CoOp", "linear probe"):
                evaluator = METHODS[method][0]
                base = options.get(evaluator, {})
                runs = [
                    evaluate_dataset(
                        run, suite, name, [{**base, "name": evaluator, "shots": k, "seed": s}], cache
                    )
                    for s in range(seeds)
                ]
                _collect(table, name, method, k, runs)
    return table


def _collect(table: FewshotTable, dataset: str, method: str, k: int, runs: list[dict[str, float]]) -> None:
    """Add each target's top-1 (averaged over the seeds' runs) to the table."""
    evaluator, metric = METHODS[method]
    for key in runs[0]:
        parts = key.split("/")
        if len(parts) == 4 and parts[0] == evaluator and parts[3] == metric:
            target = f"{dataset}/{parts[2]}" + ("" if parts[1] == "image" else f" ({parts[1]})")
            table.add(target, method, k, mean(r[key] for r in runs))
