"""`coalign report`: train a tiny run once, write its page, and check each section against the run's own
data (metrics.jsonl, results.json) and against brute-force recomputation from the checkpoint; a folder
with parts missing still gives a page that says what is missing; the page is self-contained (checked in
headless Chromium too, which also takes the screenshot)."""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from coalign.cli.report import add_report
from coalign.evaluate.report import SECTIONS, read_metrics, thumbnail, write_report
from coalign.evaluate.results import read_results
from parts import one_thread

EVAL_SAMPLES = 24
EXAMPLES = 4
PNG_URI = "data:image/png;base64,"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from coalign.config import load_recipe
    from coalign.train.loop import train

    root = tmp_path_factory.mktemp("report")
    recipe = load_recipe(
        "demo",
        [
            "data.train.size=96",
            f"data.eval.heldout_samples.size={EVAL_SAMPLES}",
            "data.eval.heldout_combos.size=8",
        ]
        + ["train.steps=4", "train.log_every=1", "train.threads=1"],  # tiny ops: a 2nd thread only waits
        smoke=True,
    )
    recipe.train.eval_every = 2  # smoke turns periodic evaluation off; two eval steps make a curve
    train(recipe, root / "run", progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def page(run_dir) -> str:
    out = write_report(run_dir, run_dir.parent / "page" / "report.html", examples=EXAMPLES)
    assert out == run_dir.parent / "page" / "report.html"
    return out.read_text()


def sections(page: str) -> dict[str, str]:
    found = re.findall(r'<section id="([^"]+)"><h2>[^<]*</h2>(.*?)</section>', page, flags=re.S)
    return dict(found)


def png(uri: str) -> Image.Image:
    assert uri.startswith(PNG_URI)
    return Image.open(io.BytesIO(base64.b64decode(uri[len(PNG_URI) :])))


def test_every_section_has_content_and_plots_are_pngs(page):
    found = sections(page)
    assert list(found) == list(SECTIONS)
    for sid, body in found.items():
        assert 'class="missing' not in body, (sid, body[:300])
    for sid in ("losses", "schedule", "eval-metrics", "confusion"):
        uris = re.findall(r'<img class="plot" src="([^"]+)"', found[sid])
        assert uris, sid
        for uri in uris:
            image = png(uri)
            assert image.format == "PNG" and image.width > 100 and image.height > 100
    assert "2 evaluation step(s): 2, 4" in found["eval-metrics"]


def test_summary_headline_numbers_are_results_json(run_dir, page):
    summary = sections(page)["summary"]
    results = read_results(run_dir / "results.json").flat()
    value = results["heldout_samples"]["zero_shot/image/shape/acc1"]
    row = re.search(r"<td>zero_shot/image/shape/acc1</td><td>([^<]*)</td>", summary)
    assert row and row.group(1) == f"{100 * value:.1f}%"
    assert "<dt>steps</dt><dd>4 of 4</dd>" in summary
    assert "<dt>checkpoint</dt><dd>step_00000004</dd>" in summary


@pytest.fixture(scope="module")
def brute(run_dir: Path):
    """The checkpoint, the first eval source, each image embedded on its own (N, E), and a text encoder,
    for recomputing the report's numbers by hand."""
    from coalign.build import build_source, load_run

    run = load_run(run_dir)
    source = build_source(run.recipe.data.eval["heldout_samples"], "test")
    rng = np.random.default_rng(0)
    with one_thread(), torch.no_grad():
        images = torch.cat(
            [
                run.model.encode("image", run.transforms["image"](source[i]["image"], rng)[None])
                for i in range(EVAL_SAMPLES)
            ]
        )  # (N, E)

    def text(texts: list[str]) -> torch.Tensor:
        with one_thread(), torch.no_grad():
            return F.normalize(run.model.encode("text", run.transforms["text"].encode(texts)), dim=-1)

    return run, source, images, text


def test_confusion_matrices_match_brute_force(run_dir, page, brute):
    run, source, images, text = brute
    figures = re.findall(
        r'<figure class="confusion" data-label="(\w+)" data-modality="image" data-matrix="([^"]+)"', page
    )
    tasks = source.zero_shot_tasks()
    assert [k for k, _ in figures] == list(tasks)
    results = read_results(run_dir / "results.json").flat()["heldout_samples"]
    for key, matrix in figures:
        task = tasks[key]
        classes = torch.stack(
            [F.normalize(text([t.format(c) for t in task.templates]).mean(0), dim=0) for c in task.classnames]
        )
        logits = images @ classes.T  # (N, C)
        expected = np.zeros((len(task.classnames),) * 2, dtype=int)
        for i in range(EVAL_SAMPLES):
            expected[source[i]["label"][key], int(logits[i].argmax())] += 1
        got = np.array(json.loads(html.unescape(matrix)))
        top2 = logits.topk(2).values
        assert (got == expected).all(), (
            f"{key}: smallest top-2 margin {float((top2[:, 0] - top2[:, 1]).min()):.2e}"
        )
        # The trainer's own evaluation saw the same 24 samples: its top-1 is the matrix's trace.
        assert got.trace() / got.sum() == pytest.approx(results[f"zero_shot/image/{key}/acc1"])


def test_retrieval_grid_marks_hits_and_shows_the_source_images(page, brute):
    run, source, images, text = brute
    body = sections(page)["retrieval"]
    queries = re.findall(
        r'<div class="query" data-owner="(\d+)"><p class="caption">“([^”]*)”.*?</div></div>', body
    )
    assert len(queries) == EXAMPLES
    for owner, caption in queries:
        owner, caption = int(owner), html.unescape(caption)
        assert caption == source[owner]["text"][0]
        scores = (text([caption]) @ images.T)[0]  # (N,)
        block = body[body.index(f'data-owner="{owner}"') :]
        tiles = re.findall(
            r'<figure class="tile (hit|miss)" data-index="(\d+)" data-hit="(\d)">'
            r'<img class="thumb" src="([^"]+)"',
            block,
        )[:5]
        assert len(tiles) == 5
        shown = [int(i) for _, i, _, _ in tiles]
        assert shown[0] == int(scores.argmax()) and set(shown) == set(scores.topk(5).indices.tolist())
        for mark, index, hit, uri in tiles:
            assert (mark == "hit") == (hit == "1") == (int(index) == owner)
            assert np.array_equal(np.asarray(png(uri).convert("RGB")), source[int(index)]["image"])
        rank = int(re.search(r"own image at rank (\d+) of 24", block).group(1))
        assert rank == int((scores >= scores[owner]).sum())
    assert 'class="tile miss"' in body and "✗" in body


def test_page_references_no_external_url(page):
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]*", "", page)  # base64 holds "//" by chance
    assert not re.search(r"(https?:)?//[a-z0-9]", text, flags=re.I), "external URL in the page"
    assert "url(" not in page and "@import" not in page
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', page))
    assert all(href.startswith("#") for href in re.findall(r'href="([^"]*)"', page))


def test_recipe_section_is_the_resolved_recipe(run_dir, page):
    pre = re.search(r'<pre class="recipe">(.*?)</pre>', sections(page)["recipe"], flags=re.S)
    assert pre and html.unescape(pre.group(1)) == (run_dir / "recipe.yaml").read_text()


def test_cli_writes_the_report(run_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="coalign")
    add_report(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["report", str(run_dir), "--out", str(tmp_path / "r.html"), "--max-samples", "8", "--examples", "2"]
    )
    assert args.func(args) == 0
    assert f"report: {tmp_path / 'r.html'}" in capsys.readouterr().out
    written = html.unescape((tmp_path / "r.html").read_text())
    assert "on the first 8 samples of 'heldout_samples'" in written
    assert len(re.findall(r'<div class="query"', written)) == 2
    args = parser.parse_args(["report", str(tmp_path / "nowhere")])
    with pytest.raises(FileNotFoundError, match="not a folder"):
        args.func(args)


def test_folder_without_metrics_or_checkpoint_says_what_is_missing(run_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run_dir / "recipe.yaml", bare / "recipe.yaml")
    found = sections(write_report(bare).read_text())
    assert list(found) == list(SECTIONS)
    assert "<dt>checkpoint</dt><dd>none</dd>" in found["summary"]
    assert "no headline numbers" in found["summary"]
    assert "No training rows in metrics.jsonl" in found["losses"]
    assert "No learning rate or throughput" in found["schedule"]
    assert "No evaluation rows" in found["eval-metrics"]
    for sid in ("confusion", "retrieval"):
        assert "no model to load: no checkpoint in" in found[sid]
    assert "name: demo" in found["recipe"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No recipe.yaml in the run folder" in write_report(empty).read_text()


def test_metrics_of_a_resumed_run_keep_the_last_row_per_step(tmp_path):
    from coalign.evaluate.base import Metric, metric_dict
    from coalign.evaluate.results import DatasetInfo, Results, step_results_path, write_results

    rows = [{"step": s, "kind": "train", "loss": 10.0 - s, "lr": 0.1} for s in (1, 2, 3)]
    rows += [
        {"step": s, "kind": "train", "loss": 5.0 - s, "lr": 0.2} for s in (2, 3, 4)
    ]  # resumed from step 1
    rows += [{"step": 4, "kind": "eval", "a/zero_shot/image/k/acc1": 0.5}]  # the log's flat view: not read
    lines = [json.dumps(r) for r in rows] + ['{"step": 5, "kind": "tr']  # killed mid-write
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    def acc(value: float) -> Metric:
        return Metric("zero_shot", "a", "image", "k", "acc1", value, "zeroshot_classification", True)

    info = {"a": DatasetInfo(3), "b": DatasetInfo(3)}
    write_results(step_results_path(tmp_path, 4), Results([acc(0.5)], info, step=4, by="train"))
    write_results(step_results_path(tmp_path, 6), Results([acc(0.75)], info, step=6, by="eval"))
    (tmp_path / "eval" / "fewshot.json").write_text('{"not": "a results file"}')  # not named as one
    (tmp_path / "recipe.yaml").write_text("name: <b>escaped</b>\n")
    log = read_metrics(tmp_path)
    assert {s: r["loss"] for s, r in log.train.items()} == {1: 9.0, 2: 3.0, 3: 2.0, 4: 1.0}
    assert log.train[2]["lr"] == 0.2
    assert {s: metric_dict(m) for s, m in log.eval.items()} == {
        4: {"zero_shot/image/k/acc1": 0.5},
        6: {"zero_shot/image/k/acc1": 0.75},
    }
    assert log.bad_lines == 1 and log.later_evals == 1
    text = write_report(tmp_path).read_text()
    found = sections(text)
    assert PNG_URI in found["losses"] and PNG_URI in found["eval-metrics"]
    assert "1 from later `coalign eval` runs" in html.unescape(found["eval-metrics"])
    assert "<b>escaped</b>" not in text and "&lt;b&gt;escaped&lt;/b&gt;" in text


def test_thumbnail_reads_arrays_paths_and_bytes(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    for value in (pixels, str(tmp_path / "x.png"), (tmp_path / "x.png").read_bytes()):
        assert np.array_equal(np.asarray(png(thumbnail(value)).convert("RGB")), pixels)
    assert png(thumbnail(np.zeros((400, 200, 3), dtype=np.uint8))).size == (64, 128)  # fits 128, keeps aspect
    assert thumbnail(str(tmp_path / "missing.png")) is None
    assert thumbnail(b"not an image") is None


# --------------------------------------------------------------------------------------------- browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
]


@pytest.mark.slow
def test_page_renders_in_chromium(page, run_dir, tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install playwright)")
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    path = run_dir.parent / "page" / "report.html"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000)
        try:
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            requests: list[str] = []
            errors: list[str] = []
            tab.on("request", lambda r: requests.append(r.url))
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.goto(path.as_uri())
            tab.wait_for_load_state("load")
            for sid in SECTIONS:
                assert tab.is_visible(f"section#{sid} h2"), sid
            images = tab.eval_on_selector_all(
                "img", "imgs => imgs.map(i => i.complete && i.naturalWidth > 0)"
            )
            assert len(images) >= 4 + 5 * EXAMPLES and all(images)
            assert tab.locator(".tile.hit .thumb, .tile.miss .thumb").count() == 5 * EXAMPLES
            assert not errors
            assert all(u.startswith(("file:", "data:")) for u in requests), requests
            shot = tmp_path / "report.png"
            tab.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert Image.open(shot).height > 2000  # the whole page, not the viewport
    if os.environ.get("COALIGN_SCREENSHOT_DIR"):
        target = Path(os.environ["COALIGN_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target / "report.png")
