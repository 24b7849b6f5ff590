"""ONNX out: one model per tower with a dynamic batch; onnxruntime gives torch's embeddings (1e-4)."""

import json

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from coalign.cli import main  # noqa: E402
from coalign.convert.onnx import export_onnx  # noqa: E402
from coalign.convert.openclip import import_openclip  # noqa: E402
from convert_models import SMALL, TEXTS, make_openclip  # noqa: E402


@pytest.mark.slow
def test_onnx_towers_match_torch_and_open_clip_at_several_batch_sizes(tmp_path):
    oc, _, config = make_openclip(tmp_path, "coalign-test-onnx", SMALL)
    torch.save(oc.state_dict(), tmp_path / "m.pt")
    run = import_openclip(config, tmp_path / "m.pt", tmp_path / "run")
    report = export_onnx(tmp_path / "run", tmp_path / "onnx")
    assert set(report["towers"]) == {"image", "text"}
    assert all(r["max_abs_diff"] <= 1e-4 for r in report["towers"].values())
    on_disk = json.loads((tmp_path / "onnx" / "onnx.json").read_text())
    assert on_disk["towers"]["text"]["input_shape"] == ["batch", 20]
    assert (tmp_path / "onnx" / "vocab.json").is_file() and (tmp_path / "onnx" / "merges.txt").is_file()

    # Real inputs beside export_onnx's own random check: CLIP token ids of captions (padding, "!" = 0)
    # and images, at batch sizes other than the one it was traced with, against OpenCLIP itself.
    image = ort.InferenceSession(str(tmp_path / "onnx" / "image.onnx"), providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(str(tmp_path / "onnx" / "text.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 4, len(TEXTS)):
        ids = run.transforms["text"].encode(TEXTS[:n])
        pixels = torch.randn(n, 3, 32, 32)
        with torch.no_grad():
            want_text = torch.nn.functional.normalize(oc.encode_text(ids), dim=-1).numpy()
            want_image = torch.nn.functional.normalize(oc.encode_image(pixels), dim=-1).numpy()
        got_text = text.run(None, {"text": ids.numpy()})[0]
        got_image = image.run(None, {"image": pixels.numpy()})[0]
        assert np.abs(got_text - want_text).max() <= 1e-4
        assert np.abs(got_image - want_image).max() <= 1e-4


def test_onnx_export_refuses_an_existing_folder(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["export", "onnx", str(tmp_path / "missing-run"), str(tmp_path / "out")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["export", "onnx", str(tmp_path / "missing-run"), str(tmp_path / "new")]) == 2
    assert "does not exist" in capsys.readouterr().err
