"""`coalign report RUN`: one self-contained HTML page that says how a run went.

Everything a reader needs travels in the one file (plots and images as PNG data URIs, CSS inline, no
external URL), so a report can be mailed, attached to an issue or opened offline. Sections: summary,
losses, schedule, eval-metrics, confusion, retrieval, recipe. A section whose data is missing (no
metrics, no checkpoint, no labels) says so on the page instead of failing the whole report.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coalign.data.sources.base import SampleError
from coalign.evaluate.base import Metric
from coalign.evaluate.report_captions import captions_section
from coalign.evaluate.report_model import (
    TOP_K,
    Confusion,
    Example,
    Missing,
    ModelView,
    inspect_model,
)
from coalign.evaluate.report_plots import (
    CSS,
    WIDTH_IN,
    Lines,
    figure,
    heatmap,
    img_tag,
    line_plots,
    png_uri,
    thumbnail,
)
from coalign.evaluate.results import RUN_RESULTS, read_results, run_results_files
from coalign.io import atomic_write_text
from coalign.registry import ConfigError

__all__ = [
    "CSS",
    "SECTIONS",
    "TOP_K",
    "UNREADABLE",
    "WIDTH_IN",
    "Confusion",
    "Example",
    "MetricLog",
    "Missing",
    "ModelView",
    "build_report",
    "confusion_section",
    "eval_section",
    "figure",
    "heatmap",
    "inspect_model",
    "line_plots",
    "losses_section",
    "png_uri",
    "read_metrics",
    "recipe_section",
    "retrieval_section",
    "schedule_section",
    "series",
    "summary_section",
    "thumbnail",
    "write_report",
]

SECTIONS = {
    "summary": "Summary",
    "losses": "Losses",
    "schedule": "Schedule",
    "eval-metrics": "Evaluation metrics",
    "confusion": "Zero-shot confusion",
    "retrieval": "Retrieval examples",
    "recipe": "Recipe",
}
# Sections only some runs have, before the recipe: captions for a model with a caption decoder
OPTIONAL_SECTIONS = {"captions": "Captions"}
UNREADABLE = '<div class="thumb unreadable">unreadable</div>'


# --------------------------------------------------------------------------------------------- metrics


@dataclass
class MetricLog:
    train: dict[int, dict[str, float]]  # step -> metrics
    eval: dict[int, list[Metric]]  # step -> the records of every evaluation at that step
    bad_lines: int = 0
    later_evals: int = 0  # results files not written by the trainer (`coalign eval`, suites)


def read_metrics(run_dir: Path) -> MetricLog:
    """Training rows of metrics.jsonl by step, and the records of every results file of the run by step.

    A resumed run appends to metrics.jsonl, so a step can repeat: the last value of each key at a
    step wins. Unreadable lines are counted, not fatal: a run killed mid-write leaves a truncated last
    line. Evaluations come from the results files (`run_results_files`), never from the log's flat
    keys; of two records of one thing at one step, the later file's wins.
    """
    log = MetricLog({}, {})
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
            step, kind = int(row.pop("step")), row.pop("kind", "train")
        except (ValueError, KeyError, TypeError, AttributeError):
            log.bad_lines += line.strip() != ""
            continue
        if kind == "train":
            log.train.setdefault(step, {}).update({k: v for k, v in row.items() if _number(v)})
    merged: dict[int, dict[tuple, Metric]] = {}
    for file in run_results_files(run_dir):
        results = read_results(file)
        if results.step is None:
            continue
        merged.setdefault(results.step, {}).update((m.identity, m) for m in results.metrics)
        log.later_evals += results.by != "train"
    log.eval = {step: list(merged[step].values()) for step in sorted(merged)}
    return log


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def series(rows: dict[int, dict[str, float]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one key, in step order, over the rows that have it."""
    steps = [s for s in sorted(rows) if key in rows[s]]
    return steps, [rows[s][key] for s in steps]


# --------------------------------------------------------------------------------------------- sections


def _missing(text: str) -> str:
    return f'<p class="missing">{html.escape(text)}</p>'


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _when(path: Path) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))


def summary_section(run_dir: Path, recipe: dict, log: MetricLog) -> str:
    from coalign.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(run_dir)
    last = max(log.train, default=None)
    planned = (recipe.get("train") or {}).get("steps")
    facts = [
        ("run", f"{recipe.get('name', '(no recipe.yaml)')}  ({run_dir.resolve()})"),
        ("steps", f"{last if last is not None else '?'} of {planned or '?'}"),
        ("checkpoint", checkpoint.name if checkpoint else "none"),
        ("trained", _when(checkpoint or run_dir / "metrics.jsonl") if (checkpoint or log.train) else "?"),
        ("report written", time.strftime("%Y-%m-%d %H:%M")),
        ("objectives", ", ".join(str(o.get("name")) for o in recipe.get("objectives") or []) or "?"),
        ("modalities", ", ".join((recipe.get("model") or {}).get("towers") or {}) or "?"),
    ]
    if last is not None and "loss" in log.train[last]:
        facts.append(("final loss", f"{log.train[last]['loss']:.4f}"))
    report = run_dir / "data_report.json"
    if report.exists():
        skipped = json.loads(report.read_text()).get("skipped") or {}
        facts.append(("skipped samples", ", ".join(f"{n} {k}" for k, n in skipped.items()) or "none"))
    if log.bad_lines:
        facts.append(("unreadable metric lines", str(log.bad_lines)))
    dl = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in facts)
    out = f'<dl class="facts">{dl}</dl>'
    results_path = run_dir / RUN_RESULTS
    if results_path.exists():
        metrics, origin = read_results(results_path).metrics, f"{RUN_RESULTS} (final evaluation)"
    elif log.eval:
        step = max(log.eval)
        metrics, origin = log.eval[step], f"the last evaluation (step {step}; no {RUN_RESULTS} yet)"
    else:
        return out + _missing(f"No {RUN_RESULTS} and no evaluation results: no headline numbers.")
    rows = [m for m in metrics if m.headline]
    datasets = list(dict.fromkeys(m.dataset for m in rows))
    keys = list(dict.fromkeys(m.key for m in rows))
    value = {(m.dataset, m.key): m.value for m in rows}
    pct = lambda d, k: f"{100 * value[d, k]:.1f}%" if (d, k) in value else ""
    cells = [[k] + [pct(d, k) for d in datasets] for k in keys]
    out += f'<p class="note">Headline numbers from {html.escape(origin)}.</p>'
    return out + _table(["metric", *datasets], cells, "headline")


def losses_section(log: MetricLog) -> str:
    if not log.train:
        return _missing("No training rows in metrics.jsonl: nothing to plot.")
    keys = sorted({k for row in log.train.values() for k in row})
    lines = {k.removesuffix("_loss"): series(log.train, k) for k in keys if k.endswith("_loss")}
    if "loss" in keys:
        lines["loss (total)"] = series(log.train, "loss")
    panels = [("loss per objective", lines)] if lines else []
    panels += [(k, {k: series(log.train, k)}) for k in keys if "/" in k]  # objectives' own metrics
    if not panels:
        return _missing("metrics.jsonl has training rows but no loss values.")
    return line_plots(panels)


def schedule_section(log: MetricLog) -> str:
    names = {"lr": "learning rate", "samples_per_s": "throughput (samples/s)", "grad_norm": "gradient norm"}
    panels = [(title, {k: series(log.train, k)}) for k, title in names.items() if series(log.train, k)[0]]
    if not panels:
        return _missing("No learning rate or throughput in metrics.jsonl.")
    return line_plots(panels)


def eval_section(log: MetricLog) -> str:
    """One axis per (dataset, evaluator), one line per headline metric of that evaluator (zero-shot
    top-1 per modality and label, retrieval recall@1 and @5, ...), over the evaluation steps."""
    if not log.eval:
        return _missing("No evaluation rows: no results files in eval/ (nothing to plot).")
    first: dict[tuple, Metric] = {}  # identity -> its first record, in the order evaluations came
    for step in sorted(log.eval):
        for m in log.eval[step]:
            if m.headline:
                first.setdefault(m.identity, m)
    datasets = list(dict.fromkeys(m.dataset for m in first.values()))
    panels: dict[str, Lines] = {}
    # Lines in the order the evaluators list their metrics (recall@1 before @5); datasets as first seen.
    for m in sorted(first.values(), key=lambda m: datasets.index(m.dataset)):
        line = " ".join(p for p in (m.target, m.label, m.name) if p is not None)
        panels.setdefault(f"{m.dataset}: {m.evaluator}", {})[line] = _eval_series(log, m.identity)
    if not panels:
        return _missing("The evaluation results hold no headline metrics to plot.")
    steps = sorted(log.eval)
    shown = ", ".join(map(str, steps)) if len(steps) <= 12 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"
    note = f"{len(steps)} evaluation step(s): {shown}"
    note += f"; {log.later_evals} from later `coalign eval` runs." if log.later_evals else "."
    plots = line_plots(list(panels.items()), ncols=2, fractions=True, legend_out=True)
    return f'<p class="note">{html.escape(note)}</p>{plots}'


def _eval_series(log: MetricLog, identity: tuple) -> tuple[list[int], list[float]]:
    points = [(s, m.value) for s in sorted(log.eval) for m in log.eval[s] if m.identity == identity]
    return [s for s, _ in points], [v for _, v in points]


def confusion_section(view: ModelView) -> str:
    if not view.confusions:
        return _missing(f"Dataset '{view.dataset}' has no labels with zero-shot class names.")
    intro = (
        f"Zero-shot predictions (arg-max over prompt-ensembled class embeddings) on the first "
        f"{view.samples} samples of '{view.dataset}' with {view.checkpoint.name}. Colour: share of the "
        f"true class (row); numbers: counts."
    )
    figs = "".join(
        f'<figure class="confusion" data-label="{html.escape(c.key)}" '
        f'data-modality="{html.escape(c.modality)}" data-matrix="{json.dumps(c.matrix.tolist())}">'
        f"{heatmap(c)}</figure>"
        for c in view.confusions
    )
    return f'<p class="note">{html.escape(intro)}</p><div class="figures">{figs}</div>'


def retrieval_section(view: ModelView) -> str:
    if view.gallery is None:
        return _missing("The model has no image tower (or no image was embedded): no images to retrieve.")
    if not view.examples:
        return _missing(f"Dataset '{view.dataset}' has no captions to query with.")
    intro = (
        f"Top {TOP_K} of {view.samples} '{view.dataset}' images for a few of its captions. Green (✓): the "
        f"caption's own image; red (✗): another image. Ranks count ties against the own image, as the "
        f"recall metrics do."
    )
    rows = []
    for ex in view.examples:
        tiles = []
        for rank, (i, score) in enumerate(ex.top, 1):
            hit = i == ex.owner
            try:
                raw = view.source[i]
                uri = thumbnail(raw.get(view.gallery))
            except SampleError:
                raw, uri = {}, None
            img = img_tag(uri, str(raw.get("id", f"sample {i}")), "thumb") if uri else UNREADABLE
            mark = "✓" if hit else "✗"
            tiles.append(
                f'<figure class="tile {"hit" if hit else "miss"}" data-index="{i}" data-hit="{int(hit)}">'
                f"{img}<figcaption>#{rank} · {score:.3f} {mark}</figcaption></figure>"
            )
        where = f"own image at rank {ex.own_rank} of {view.samples}"
        rows.append(
            f'<div class="query" data-owner="{ex.owner}"><p class="caption">“{html.escape(ex.caption)}” '
            f'<span class="rank">{where}</span></p><div class="tiles">{"".join(tiles)}</div></div>'
        )
    return f'<p class="note">{html.escape(intro)}</p><div class="examples">{"".join(rows)}</div>'


def recipe_section(run_dir: Path) -> str:
    path = run_dir / "recipe.yaml"
    if not path.exists():
        return _missing("No recipe.yaml in the run folder.")
    return f'<pre class="recipe">{html.escape(path.read_text())}</pre>'


# --------------------------------------------------------------------------------------------- the page


def _guarded(build: Callable[[], str]) -> str:
    """A section's HTML, or a note in its place: a report with one broken section beats no report."""
    try:
        return build()
    except Missing as err:
        return _missing(str(err))
    except Exception as err:  # noqa: BLE001  (shown on the page, with its type, not swallowed)
        return f'<p class="missing error">Could not build this section: {html.escape(repr(err))}</p>'


def build_report(run_dir: str | Path, *, max_samples: int = 500, examples: int = 8) -> str:
    """The report page of `run_dir` as one HTML string."""
    import yaml

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"'{run_dir}' is not a folder; expected a run folder from `coalign train`")
    if max_samples < 1:
        raise ConfigError(f"max_samples must be >= 1, got {max_samples}")
    if examples < 0:
        raise ConfigError(f"examples must be >= 0, got {examples}")
    try:  # only names and counts come from it here; the recipe section shows the file as it is
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    except (OSError, yaml.YAMLError):
        recipe = None
    recipe = recipe if isinstance(recipe, dict) else {}
    log = read_metrics(run_dir)
    view: ModelView | Exception
    try:
        view = inspect_model(run_dir, max_samples, examples)
    except Exception as err:  # noqa: BLE001  (the two model sections show it)
        view = err

    def with_view(section: Callable[[ModelView], str]) -> Callable[[], str]:
        def build() -> str:
            if isinstance(view, Exception):
                raise view
            return section(view)

        return build

    bodies = {
        "summary": lambda: summary_section(run_dir, recipe, log),
        "losses": lambda: losses_section(log),
        "schedule": lambda: schedule_section(log),
        "eval-metrics": lambda: eval_section(log),
        "confusion": with_view(confusion_section),
        "retrieval": with_view(retrieval_section),
        "recipe": lambda: recipe_section(run_dir),
    }
    if (recipe.get("model") or {}).get("decoder"):  # report_captions.py
        recipe_body = bodies.pop("recipe")
        bodies |= {"captions": lambda: captions_section(run_dir, examples), "recipe": recipe_body}
    titles = {**SECTIONS, **OPTIONAL_SECTIONS}
    title = f"coalign report: {recipe.get('name', run_dir.name)}"
    nav = "".join(f'<a href="#{sid}">{html.escape(titles[sid])}</a>' for sid in bodies)
    sections = "".join(
        f'<section id="{sid}"><h2>{html.escape(titles[sid])}</h2>{_guarded(build)}</section>'
        for sid, build in bodies.items()
    )
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>coalign <span>run report</span></h1>"
        f'<p class="status">{html.escape(str(run_dir.resolve()))}</p></header>'
        f"<nav>{nav}</nav><main>{sections}</main></body></html>\n"
    )


def write_report(
    run_dir: str | Path, out: str | Path | None = None, *, max_samples: int = 500, examples: int = 8
) -> Path:
    """Write the report of `run_dir` to `out` (default RUN/report.html) and return its path."""
    page = build_report(run_dir, max_samples=max_samples, examples=examples)
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    atomic_write_text(path, page)
    return path
