"""`coalign serve --onnx DIR`: queries embedded by onnxruntime from `coalign export onnx` give the torch
server's results, scores within 1e-4; a folder without the tower a request needs is refused clearly."""

from __future__ import annotations

import base64
import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from coalign.registry import ConfigError  # noqa: E402
from coalign.search.query import SearchIndex  # noqa: E402
from coalign.serve.app import create_app  # noqa: E402


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory, tiny_run):
    from coalign.convert.onnx import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "towers"
    export_onnx(tiny_run, out)
    return out


@pytest.mark.slow
def test_an_onnx_server_answers_as_the_torch_server(real_index, tiny_run, onnx_dir, tmp_path):
    folder = real_index.index_dir
    torch_app = TestClient(create_app(SearchIndex.load(folder, tiny_run)))
    onnx_index = SearchIndex.load(folder, tiny_run, onnx=onnx_dir)
    onnx_app = TestClient(create_app(onnx_index))
    texts = ["a small red circle at the top", "a big blue square", "green"]
    np.testing.assert_allclose(
        onnx_index.encode_text(texts), real_index.encode_text(texts), atol=1e-4, rtol=0
    )
    png = real_index.thumbnail_path(real_index.search(real_index.encode_text(["a"]), 1)[0][0].id).read_bytes()
    image = base64.b64encode(png).decode()
    bodies = [
        {"text": texts[0], "k": 10},
        {"text": texts[1], "k": 5, "modality": "text"},
        {"image": image, "k": 8},
        {"combined": {"text": texts[2], "image": image, "weights": [0.6, 0.4]}, "k": 6},
    ]
    for body in bodies:
        want = torch_app.post("/search", json=body).json()["results"]
        got = onnx_app.post("/search", json=body).json()["results"]
        assert len(got) == len(want) == body["k"]
        # Scores to 1e-4; the ids in the same order wherever neighbouring scores are further apart.
        np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in want], atol=1e-4, rtol=0)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            apart = all(abs(w["score"] - o["score"]) > 2e-4 for j, o in enumerate(want) if j != i)
            assert g["id"] == w["id"] or not apart, (body, i)
    emb = onnx_app.post("/embed", json={"text": texts[0]}).json()["embedding"]
    np.testing.assert_allclose(emb, real_index.encode_text(texts[:1])[0], atol=1e-4, rtol=0)

    # A folder without the text tower: text requests are refused naming it, images still served.
    partial = tmp_path / "image-only"
    shutil.copytree(onnx_dir, partial)
    (partial / "text.onnx").unlink()
    report = json.loads((partial / "onnx.json").read_text())
    del report["towers"]["text"]
    (partial / "onnx.json").write_text(json.dumps(report))
    client = TestClient(create_app(SearchIndex.load(folder, tiny_run, onnx=partial)))
    r = client.post("/search", json={"text": texts[0]})
    assert r.status_code == 400 and r.json()["error"] == "this index cannot encode text"
    assert f"'{partial}' has no text tower (it has: image)" in r.json()["detail"]
    assert client.post("/search", json={"image": image, "k": 3}).status_code == 200


def test_onnx_folder_errors_come_at_load(real_index, tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="has no onnx.json: give a folder written by `coalign export onnx"):
        SearchIndex.load(real_index.index_dir, tiny_run, onnx=tmp_path)
    (tmp_path / "onnx.json").write_text(json.dumps({"step": 999_999, "towers": {}}))
    index = SearchIndex.load(real_index.index_dir, tiny_run, onnx=tmp_path)
    with pytest.raises(ConfigError, match="exported at step 999999 but the served checkpoint"):
        index.encode_text(["a"])
