"""The plumbing of benchmarks/vs_openclip.py: tiny sizes, 2 steps per side, every figure finite.

No figure is asserted: the benchmark's numbers are for people to read, not for tests to pin."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("open_clip_train")
pytest.importorskip("pandas")  # OpenCLIP's csv loader

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_openclip.py"
TINY = [
    "--train-size", "16", "--test-size", "12", "--batch-size", "8", "--steps", "2", "--warmup", "1",
    "--width", "32", "--depth", "1", "--heads", "2", "--embed-dim", "16", "--context-length", "16",
    "--precision", "fp32",
]  # fmt: skip


def load_benchmark(name: str = "vs_openclip"):
    """A script of benchmarks/ as a module (vs_openclip.py, or another beside it)."""
    spec = importlib.util.spec_from_file_location(name, BENCH.with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finite(values: dict) -> bool:
    return all(isinstance(v, float | int) and math.isfinite(v) for v in values.values())


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["scenes", "world"])
def test_both_sides_train_two_steps_and_report_finite_figures(tmp_path, dataset):
    adam = ["--betas", "0.9", "0.95", "--eps", "1e-7"]  # not either side's default
    report = load_benchmark().main(
        [*TINY, *adam, "--dataset", dataset, "--seeds", "0", "--out", str(tmp_path)]
    )
    assert set(report["sides"]) == {"coalign", "openclip"}
    for side in report["sides"].values():
        (run,) = side["runs"]
        assert set(run["zero_shot"]) == {"shape", "color", "size", "position"}
        assert {"text_to_image_r@1", "text_to_image_r@5"} <= set(run["retrieval"])
        assert run["samples_per_s"] > 0 and run["wall_s"] > 0
        assert finite(side["mean"]) and finite(side["std"])
    assert set(report["coalign_at_least_openclip"]) == {"shape", "color", "size", "position"}
    # the same architecture on both sides: the same training FLOPs per pair, counted independently
    coalign, openclip = (
        report["sides"][s]["runs"][0]["train_flops_per_sample"] for s in ("coalign", "openclip")
    )
    assert coalign > 0 and math.isclose(coalign, openclip, rel_tol=0.05)
    assert 0 < report["sides"]["coalign"]["runs"][0]["fraction_of_matmul_peak"] < 1
    assert (tmp_path / f"data-{dataset}" / "train.csv").read_text().startswith("filepath,title,")
    # both sides ran the AdamW they were given (open_clip_train otherwise picks betas by model name)
    recipe = yaml.safe_load((tmp_path / dataset / "coalign" / "coalign-seed0.yaml").read_text())
    assert (recipe["train"]["betas"], recipe["train"]["eps"]) == ([0.9, 0.95], 1e-7)
    params = (tmp_path / dataset / "openclip" / "openclip-logs" / "openclip-seed0" / "params.txt").read_text()
    assert {"beta1: 0.9", "beta2: 0.95", "eps: 1e-07"} <= set(params.splitlines())
    # the probe reads both sides' runs where the benchmark left them
    probe = load_benchmark("vs_openclip_probe").main(
        [
            "--dataset", dataset, "--data-dir", str(tmp_path / f"data-{dataset}"), "--folds", "2",
            "--precision", "fp32", f"co={tmp_path / dataset / 'coalign' / 'coalign-seed0'}",
            f"oc={tmp_path / dataset / 'openclip' / 'openclip-logs' / 'openclip-seed0'}",
        ]
    )  # fmt: skip
    for name in ("co", "oc"):
        labels = probe["runs"][name]
        assert set(labels) == {"shape", "color", "size", "position"}
        assert all(0 <= v["zero_shot"] <= 1 and 0 <= v["linear_probe"] <= 1 for v in labels.values())
    zero_shot = report["sides"]["coalign"]["runs"][0]["zero_shot"]  # the same evaluation as the benchmark's
    assert {k: v["zero_shot"] for k, v in probe["runs"]["co"].items()} == pytest.approx(zero_shot, abs=1e-4)


def test_the_linear_probe_reads_a_label_the_features_hold_and_not_one_they_do_not():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    held = np.eye(5)[y] + 0.15 * rng.standard_normal((300, 5))  # the label, plus noise
    noise = rng.standard_normal((300, 5))
    probe = load_benchmark("vs_openclip_probe").probe_accuracy
    assert probe(held, y) > 0.98
    assert probe(noise, y) < 0.35  # chance is 0.2


def test_the_probe_refuses_a_run_that_is_no_folder_in_one_line(tmp_path, capsys):
    (tmp_path / "test.csv").write_text("filepath,title,shape,color,size,position\n")
    with pytest.raises(SystemExit):
        load_benchmark("vs_openclip_probe").main(["--data-dir", str(tmp_path), f"co={tmp_path / 'nope'}"])
    (message,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert "NAME=FOLDER" in message and "nope" in message


def test_the_two_sides_get_the_same_architecture():
    bench = load_benchmark()
    a = bench.parse_args(["--width", "96", "--depth", "3", "--heads", "3", "--patch-size", "16"])
    oc = bench.openclip_config(a)
    recipe = bench.coalign_recipe(a, Path("train.csv"), ["shape"], seed=0)
    image, text = recipe["model"]["towers"]["image"], recipe["model"]["towers"]["text"]
    vision = oc["vision_cfg"]
    assert (vision["width"], vision["layers"], vision["patch_size"]) == (96, 3, 16)
    assert vision["width"] // vision["head_width"] == image["heads"] == 3
    assert (image["width"], image["depth"], image["patch_size"]) == (96, 3, 16)
    assert (oc["text_cfg"]["width"], oc["text_cfg"]["layers"], oc["text_cfg"]["heads"]) == (96, 3, 3)
    assert (text["width"], text["depth"], text["heads"]) == (96, 3, 3)
    assert oc["embed_dim"] == recipe["model"]["embed_dim"]
    assert oc["text_cfg"]["context_length"] == recipe["data"]["transforms"]["text"]["context_length"]
