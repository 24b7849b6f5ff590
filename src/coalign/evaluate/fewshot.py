"""Zero-shot vs CoOp vs linear probe at k shots per class: the comparison CoOp's paper draws.

For every dataset of a suite that names a training split, every label key with class names, and every
non-text modality: zero-shot top-1 (no examples), then CoOp and a linear probe trained on k examples
per class for each k (averaged over `seeds` draws of the k examples). Embeddings come from the
suite's cache, so the sweep encodes each split once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import mean

from coalign.build import LoadedRun
from coalign.config import evaluator_specs
from coalign.evaluate.results import Results
from coalign.evaluate.suites import EmbeddingCache, Suite, evaluate_dataset, run_cache_dir
from coalign.runtime import Runtime

# row name -> evaluator; each row shows its evaluator's headline metric (top-1) per target and label
METHODS = {"zero-shot": "zero_shot", "CoOp": "coop", "linear probe": "linear_probe"}


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
    run: LoadedRun, suite: Suite, shots: list[int], runtime: Runtime, seeds: int = 1, progress: bool = True
) -> FewshotTable:
    cache = EmbeddingCache(run, run_cache_dir(run), runtime, suite.batch_size, progress)
    table = FewshotTable(shots)
    # Options for CoOp and the probe come from the suite's entries of those names, if it has them.
    options = {spec.name: spec.options() for spec in evaluator_specs(suite.tasks)}
    datasets = [name for name, ds in suite.datasets.items() if ds.train is not None]
    if not datasets:
        raise ValueError("the few-shot comparison needs datasets with a `train:` split; this suite has none")
    for name in datasets:
        zero = evaluate_dataset(run, suite, name, [METHODS["zero-shot"]], cache)
        _collect(table, name, "zero-shot", 0, [zero])
        for k in shots:
            for method in ("CoOp", "linear probe"):
                evaluator = METHODS[method]
                base = options.get(evaluator, {})
                runs = [
                    evaluate_dataset(
                        run, suite, name, [{**base, "name": evaluator, "shots": k, "seed": s}], cache
                    )
                    for s in range(seeds)
                ]
                _collect(table, name, method, k, runs)
    return table


def _collect(table: FewshotTable, dataset: str, method: str, k: int, runs: list[Results]) -> None:
    """Add each (target, label)'s headline metric, averaged over the seeds' runs, to the table."""
    values: dict[tuple[str, str], list[float]] = {}
    for results in runs:
        for m in results.metrics:
            if m.evaluator == METHODS[method] and m.headline and m.label is not None:
                values.setdefault((m.target, m.label), []).append(m.value)
    for (target, label), v in values.items():
        table.add(f"{dataset}/{label}" + ("" if target == "image" else f" ({target})"), method, k, mean(v))
