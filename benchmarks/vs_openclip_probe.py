"""Where a label is lost: zero-shot against a linear probe on the same image embeddings, per label, as JSON.

    python benchmarks/vs_openclip_probe.py --dataset scenes --data-dir runs/vs_openclip/data-scenes \
        co=runs/vs_openclip/scenes/coalign/coalign-seed0 \
        oc=runs/vs_openclip/scenes/openclip/openclip-logs/openclip-seed0

Each NAME=RUN is a run that `vs_openclip.py` left under its --out: a coalign run folder, or an
`open_clip_train` log folder (`openclip-logs/openclip-seedK`, its model config two levels up in
`openclip-model/`). The held-out images go through the run's image tower, then per label: the
zero-shot accuracy of `vs_openclip.evaluate` (text prompts), and the accuracy of a logistic
regression trained on those embeddings (K-fold, every image held out once): what the image embedding
holds about the label, with no text involved. A label whose probe is low is lost in the image tower;
one whose probe is high and zero-shot low is lost between the towers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_openclip as vs  # noqa: E402
from machine import describe  # noqa: E402
from scenes import DATASETS, read_manifest  # noqa: E402

from coalign.runtime import Runtime  # noqa: E402


def probe_accuracy(x: np.ndarray, y: np.ndarray, folds: int = 3, seed: int = 0) -> float:
    """Mean held-out accuracy of a multinomial logistic regression on (N, E) features, K folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    split = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return float(cross_val_score(LogisticRegression(C=10.0, max_iter=2000), x, y, cv=split).mean())


def encoders_of(run: Path, runtime: Runtime) -> vs.Encoders:
    if (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("epoch_*.pt")):
        configs = sorted((run.parent.parent / "openclip-model").glob("*.json"))
        if not configs:
            raise SystemExit(f"{run}: an open_clip_train run without ../../openclip-model/*.json")
        return vs.openclip_encoders(configs[0], run, runtime)[0]
    return vs.coalign_encoders(run, runtime)[0]


def probe_run(run: Path, dataset, test: Path, runtime: Runtime, folds: int) -> dict:
    encoders = encoders_of(run, runtime)
    paths, _, labels = read_manifest(test, list(dataset.labels))
    images = encoders.images(paths)
    zero_shot = vs.evaluate(encoders, dataset, test, images)["zero_shot"]
    images = images.numpy()
    return {
        key: {
            "zero_shot": round(zero_shot[key], 4),
            "linear_probe": round(probe_accuracy(images, np.asarray(labels[key]), folds), 4),
            "chance": round(1 / len(names), 4),
        }
        for key, names in dataset.labels.items()
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="NAME=RUN")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="scenes")
    p.add_argument("--data-dir", type=Path, required=True, help="vs_openclip.py's data folder (test.csv)")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    test = a.data_dir / "test.csv"
    named = [spec.split("=", 1) for spec in a.runs]
    bad = [
        spec for spec, pair in zip(a.runs, named, strict=True) if len(pair) != 2 or not Path(pair[1]).is_dir()
    ]
    if bad or not test.is_file():
        p.error(f"every run is NAME=FOLDER of an existing folder (got {bad})" if bad else f"no {test}")
    runtime = Runtime.create(a.precision)
    report = {
        "benchmark": "vs_openclip_probe",
        "dataset": a.dataset,
        "test_csv": str(test),
        "machine": describe(),
        "runs": {
            name: probe_run(Path(run), DATASETS[a.dataset], test, runtime, a.folds) for name, run in named
        },
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
