"""benchmarks/vs_openclip_combine.py: seeds from a summary (mean and sample std only) and from per-seed
reports combine to the mean and sample standard deviation over every seed."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_openclip_combine.py"


def load():
    spec = importlib.util.spec_from_file_location("vs_openclip_combine", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(seed: int, shape: float, loss: float) -> dict:
    return {
        "seed": seed,
        "samples_per_s": 100.0 + seed,
        "wall_s": 10.0,
        "final_loss": loss,
        "fraction_of_matmul_peak": 0.2,
        "zero_shot": {"shape": shape},
        "retrieval": {"text_to_image_r@1": shape / 2},
    }


def test_summary_and_runs_combine_to_the_statistics_of_every_seed(tmp_path, capsys):
    shapes, losses = [0.31, 0.42, 0.37, 0.29, 0.40], [0.9, 0.7, 0.8, 1.0, 0.6]
    runs = [_run(s, shapes[s], losses[s]) for s in range(5)]
    first = {  # seeds 0-2 as the acceptance file keeps them: summary only, under a dataset key
        "scenes": {
            "sides": {
                "coalign": {
                    "seeds": [0, 1, 2],
                    "mean": {"zero_shot/shape": statistics.fmean(shapes[:3]),
                             "final_loss": statistics.fmean(losses[:3])},
                    "std": {"zero_shot/shape": statistics.stdev(shapes[:3]),
                            "final_loss": statistics.stdev(losses[:3])},
                }
            }
        }
    }  # fmt: skip
    a, b = tmp_path / "first.json", tmp_path / "rest.json"
    a.write_text(json.dumps(first))
    b.write_text(json.dumps({"dataset": "scenes", "sides": {"coalign": {"runs": runs[3:]}}}))
    out = load().main(["--dataset", "scenes", str(a), str(b)])
    side = out["sides"]["coalign"]
    assert side["seeds"] == [0, 1, 2, 3, 4]
    assert side["mean"]["zero_shot/shape"] == pytest.approx(statistics.fmean(shapes), abs=1e-4)
    assert side["std"]["zero_shot/shape"] == pytest.approx(statistics.stdev(shapes), abs=1e-4)
    assert side["std"]["final_loss"] == pytest.approx(statistics.stdev(losses), abs=1e-4)
    assert "samples_per_s" not in side["mean"]  # only the per-seed files report it: not over 5 seeds
    assert json.loads(capsys.readouterr().out)["sides"]["coalign"] == side


def test_a_seed_counted_twice_is_refused(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"dataset": "scenes", "sides": {"coalign": {"runs": [_run(1, 0.3, 0.8)]}}}))
    with pytest.raises(SystemExit, match=r"seed\(s\) \[1\] already counted"):
        load().main(["--dataset", "scenes", str(path), str(path)])


def test_side_equals_file_takes_one_side_only(tmp_path):
    both = {
        "dataset": "scenes",
        "sides": {"coalign": {"runs": [_run(0, 0.4, 0.7)]}, "openclip": {"runs": [_run(0, 0.9, 0.5)]}},
    }
    again = {"dataset": "scenes", "sides": {"openclip": {"runs": [_run(0, 0.2, 0.9)]}}}
    (tmp_path / "both.json").write_text(json.dumps(both))
    (tmp_path / "again.json").write_text(json.dumps(again))
    out = load().main(
        ["--dataset", "scenes", f"coalign={tmp_path / 'both.json'}", str(tmp_path / "again.json")]
    )
    assert out["sides"]["coalign"]["mean"]["zero_shot/shape"] == 0.4
    assert out["sides"]["openclip"]["mean"]["zero_shot/shape"] == 0.2  # not both files' seed 0
    assert out["coalign_at_least_openclip"] == {"shape": True}
    with pytest.raises(SystemExit, match="no side 'coalign'; it holds \\['openclip'\\]"):
        load().main(["--dataset", "scenes", f"coalign={tmp_path / 'again.json'}"])
