"""ONNX out: one model per tower, `<modality>.onnx`, input (batch, ...) -> L2-normalised embedding
(batch, embed_dim), the batch dimension dynamic. Each file is checked with onnxruntime before the
folder is put in place: on random inputs of several batch sizes its output may differ from torch's
`model.encode` by at most `atol` (1e-4), or the export fails naming the tower and the difference.

Beside the models: `onnx.json` (each tower's input name, shape, dtype and the measured difference,
and the image transform's size, mean and std), and the text transform's vocabulary files, so that a
client without coalign can prepare inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from coalign.build import LoadedRun, load_run
from coalign.convert.run import ConversionError, check_out

BATCHES = (1, 3, 8)  # batch sizes every exported tower is checked at
REPORT = "onnx.json"


def _libraries():
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as err:
        raise ImportError(f"ONNX export needs {err.name}: pip install 'coalign[convert]'") from None
    return onnx, onnxruntime


class TowerEmbedding(nn.Module):
    """One tower and its head: input -> (B, E) normalised embedding, as `MultimodalModel.encode`
    without its cut of text padding: that cut's width depends on the values of the input, which a
    graph with static shapes cannot hold (the embeddings are the same either way)."""

    def __init__(self, model: nn.Module, modality: str):
        super().__init__()
        self.model, self.modality = model, modality

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(self.modality, x).embedding


def example(run: LoadedRun, modality: str, batch: int, seed: int) -> torch.Tensor:
    tower = run.model.towers[modality]
    torch.manual_seed(seed)
    return type(tower).example_input(tower.cfg, batch)


def export_tower(run: LoadedRun, modality: str, path: Path, opset: int) -> None:
    wrapper = TowerEmbedding(run.model, modality).eval()
    x = example(run, modality, 2, seed=0)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (x,),
            dynamo=True,
            opset_version=opset,
            input_names=[modality],
            output_names=[f"{modality}_embedding"],
            dynamic_shapes={"x": {0: batch}},
            verbose=False,
        )
    program.save(str(path))


def check_tower(run: LoadedRun, modality: str, path: Path, atol: float) -> float:
    """The largest |onnxruntime - torch| over random inputs of each batch size in BATCHES."""
    _, ort = _libraries()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    worst = 0.0
    for i, b in enumerate(BATCHES):
        x = example(run, modality, b, seed=100 + i)
        with torch.no_grad():
            expected = run.model.encode(modality, x).numpy()
        got = session.run(None, {name: x.numpy()})[0]
        if got.shape != expected.shape:
            raise ConversionError(f"ONNX {modality} tower: batch {b} gives {got.shape}, not {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    if not worst <= atol:
        raise ConversionError(f"ONNX {modality} tower differs from torch by {worst:.2e} (over {atol:.0e})")
    return worst


def describe(run: LoadedRun, modality: str, file: str, diff: float) -> dict[str, Any]:
    x = example(run, modality, 1, seed=0)
    out = {
        "file": file,
        "input": modality,
        "input_shape": ["batch", *x.shape[1:]],
        "input_dtype": str(x.dtype).removeprefix("torch."),
        "output": f"{modality}_embedding",
        "output_shape": ["batch", run.model.embed_dim],
        "max_abs_diff": diff,
        "batches": list(BATCHES),
    }
    spec = run.recipe.data.transforms.get(modality)
    if spec is not None:
        out["transform"] = {"transform": spec.transform, **spec.options()}
    return out


def export_onnx(run_path: Path, out: Path, opset: int = 18, atol: float = 1e-4) -> dict[str, Any]:
    """Write and check `<modality>.onnx` for every tower; returns the report written to onnx.json."""
    out = Path(out)
    check_out(out)
    _libraries()
    run = load_run(run_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        report: dict[str, Any] = {"run": str(run.run_dir), "step": run.step, "opset": opset, "towers": {}}
        for modality in run.model.modalities:
            file = f"{modality}.onnx"
            export_tower(run, modality, tmp / file, opset)
            diff = check_tower(run, modality, tmp / file, atol)
            report["towers"][modality] = describe(run, modality, file, diff)
        for name in ("vocab.json", "merges.txt", "tokenizer.json"):  # what the text transform reads
            if (run.run_dir / name).is_file():
                shutil.copyfile(run.run_dir / name, tmp / name)
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["towers"] = {m: {**r, "file": str(out / r["file"])} for m, r in report["towers"].items()}
    return report
