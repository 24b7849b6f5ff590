"""Query encoding with onnxruntime: `coalign serve --onnx DIR` and `SearchIndex.load(..., onnx=DIR)`, DIR
written by `coalign export onnx RUN DIR` (one `<modality>.onnx` per tower, described in onnx.json).

The run's transforms still prepare the inputs (the same tokenizer and image preprocessing), so only
the towers change: the exporter checked each against torch's `encode` to 1e-4. A tower the folder
lacks is refused when a query needs it, naming the folder and the towers it has.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from coalign.registry import ConfigError

REPORT = "onnx.json"  # as coalign.convert.onnx writes it


class OnnxTowers:
    def __init__(self, folder: str | Path, threads: int | None = None):
        self.folder = Path(folder)
        path = self.folder / REPORT
        if not path.is_file():
            raise ConfigError(
                f"--onnx '{self.folder}' has no {REPORT}: give a folder written by "
                f"`coalign export onnx RUN {self.folder}`"
            )
        try:
            import onnxruntime
        except ImportError:
            raise ImportError("--onnx needs onnxruntime: pip install 'coalign[convert]'") from None
        self._ort, self.threads = onnxruntime, threads
        self.report = json.loads(path.read_text())
        self.towers: dict[str, dict] = dict(self.report.get("towers", {}))
        self.step = self.report.get("step")
        self._sessions: dict[str, object] = {}
        self._lock = threading.Lock()

    def _session(self, modality: str):
        with self._lock:
            if modality not in self._sessions:
                tower = self.towers.get(modality)
                file = self.folder / tower["file"] if tower else None
                if file is None or not file.is_file():
                    have = ", ".join(m for m, t in self.towers.items() if (self.folder / t["file"]).is_file())
                    raise ConfigError(
                        f"the ONNX folder '{self.folder}' has no {modality} tower (it has: "
                        f"{have or 'none'}); export every tower with `coalign export onnx RUN DIR`, "
                        "or serve without --onnx"
                    )
                options = self._ort.SessionOptions()
                if self.threads:
                    options.intra_op_num_threads = self.threads
                self._sessions[modality] = self._ort.InferenceSession(
                    str(file), options, providers=["CPUExecutionProvider"]
                )
            return self._sessions[modality]

    def encode(self, modality: str, x: np.ndarray, embed_dim: int) -> np.ndarray:
        """(B, E) float32: the tower's normalised embedding of the prepared inputs x (B, ...)."""
        session = self._session(modality)
        name = self.towers[modality].get("input", session.get_inputs()[0].name)
        out = session.run(None, {name: np.ascontiguousarray(x)})[0]
        if out.ndim != 2 or out.shape[1] != embed_dim:
            raise ConfigError(
                f"the ONNX {modality} tower in '{self.folder}' embeds to {out.shape[1:]} but the index "
                f"holds {embed_dim}-dimensional embeddings: export the served run again"
            )
        return out.astype(np.float32, copy=False)
