"""`coalign caption` and `POST /caption` (issue #17) over a smoke-trained coca run: captions per image,
the decoding options, bad input refused before any work, undecodable images skipped and counted,
and the route present only when the served run has a decoder."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from coalign.build import load_run
from coalign.cli import main
from coalign.config import load_recipe
from coalign.registry import SOURCES
from coalign.serve.app import create_app
from coalign.train.loop import train
from test_serve_api import FakeIndex

SIZES = ["data.train.size=64", "data.eval.heldout_samples.size=16", "data.eval.heldout_combos.size=16"]


@pytest.fixture(scope="module")
def coca_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("coca")
    recipe = load_recipe("coca", [*SIZES, "train.steps=2", "eval.evaluators=[]"], smoke=True)
    train(recipe, root / "run", progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three world images as PNG files, and a file that is no image."""
    root = tmp_path_factory.mktemp("images")
    source = SOURCES.create("world", split="test", size=3, modalities=["image"])
    paths = []
    for i in range(3):
        paths.append(root / f"{i}.png")
        Image.fromarray(source[i]["image"]).save(paths[-1])  # the world renders uint8 arrays
    (root / "broken.png").write_bytes(b"not an image")
    return paths, root / "broken.png"


def test_caption_command_prints_one_caption_per_image(coca_run, images, capsys):
    paths, _ = images
    for options in ([], ["--beam", "3", "--max-length", "4"], ["--top-p", "0.9", "--seed", "1"]):
        assert main(["caption", str(coca_run), *map(str, paths), *options, "--batch-size", "2"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.split("\t")[0] for line in lines] == [str(p) for p in paths], options
    assert main(["caption", str(coca_run), str(paths[0]), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert set(row) == {"image", "caption", "score", "stopped"} and row["score"] <= 0.0


def test_caption_command_skips_and_counts_undecodable_images(coca_run, images, capsys):
    paths, broken = images
    assert main(["caption", str(coca_run), str(paths[0]), str(broken)]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1
    assert "1 of 2 images skipped" in captured.err
    assert main(["caption", str(coca_run), str(broken)]) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--beam", "0"], "beam must be at least 1"),
        (["--top-p", "1.5"], "top_p must lie in (0, 1]"),
        (["--max-length", "999"], "max_length 999 exceeds the text tower's context length"),
    ],
)
def test_caption_command_refuses_bad_options(coca_run, images, capsys, argv, message):
    assert main(["caption", str(coca_run), str(images[0][0]), *argv]) == 2
    assert message in capsys.readouterr().err


def test_caption_command_refuses_missing_images_and_runs_without_a_decoder(
    coca_run, images, tiny_run, capsys
):
    assert main(["caption", str(coca_run), "nowhere.png"]) == 2
    assert "image 'nowhere.png' not found" in capsys.readouterr().err
    assert main(["caption", str(tiny_run), str(images[0][0])]) == 2
    assert "has no caption decoder" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not both
        main(["caption", str(coca_run), str(images[0][0]), "--beam", "2", "--top-p", "0.5"])


class RunIndex(FakeIndex):
    """The fake index, served with a real run (what `SearchIndex` loads from its checkpoint)."""

    def __init__(self, root, run_dir):
        super().__init__(root)
        self.checkpoint = run_dir
        self._run = None

    def loaded_run(self):
        self._run = self._run or load_run(self.checkpoint)
        return self._run


def png64(path) -> str:
    buf = io.BytesIO()
    Image.open(path).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_caption_route_answers_schema_valid_requests(coca_run, images, tmp_path):
    paths, broken = images
    client = TestClient(create_app(RunIndex(tmp_path, coca_run)))
    one = client.post("/caption", json={"image": png64(paths[0])})
    assert one.status_code == 200, one.text
    body = one.json()
    assert len(body["captions"]) == 1 and set(body["captions"][0]) == {"caption", "score", "stopped"}
    many = client.post("/caption", json={"images": [png64(p) for p in paths], "beam": 2, "max_length": 5})
    assert many.status_code == 200 and len(many.json()["captions"]) == 3
    sampled = client.post("/caption", json={"image": png64(paths[1]), "top_p": 0.8, "seed": 4})
    assert sampled.status_code == 200
    # greedy over the route is the command's greedy caption
    run = load_run(coca_run)
    from coalign.models.generate import Captioner

    cap = Captioner.of(run.model, run.transforms["text"])
    image = run.transforms["image"](paths[0], np.random.default_rng(0))
    assert body["captions"][0]["caption"] == cap.texts(run.transforms["text"], cap.generate(image[None]))[0]
    assert "/caption" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    "body, status",
    [
        ({}, 422),
        ({"image": "x", "images": ["x"]}, 422),
        ({"image": "PLACEHOLDER", "beam": 0}, 422),
        ({"image": "PLACEHOLDER", "beam": 2, "top_p": 0.5}, 422),
        ({"image": "PLACEHOLDER", "top_p": 0}, 422),
        ({"image": "PLACEHOLDER", "max_length": 999}, 422),
        ({"image": "PLACEHOLDER", "colour": 1}, 422),
        ({"image": "!!notbase64"}, 400),
        ({"image": base64.b64encode(b"not an image").decode()}, 400),
    ],
)
def test_caption_route_refuses_bad_requests(coca_run, images, tmp_path, body, status):
    client = TestClient(create_app(RunIndex(tmp_path, coca_run)))
    body = {k: (png64(images[0][0]) if v == "PLACEHOLDER" else v) for k, v in body.items()}
    response = client.post("/caption", json=body)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error", "detail"}


def test_no_caption_route_without_a_decoder(tiny_run, tmp_path):
    client = TestClient(create_app(RunIndex(tmp_path, tiny_run)))
    assert client.post("/caption", json={"image": "x"}).status_code == 404
    assert "/caption" not in client.get("/openapi.json").json()["paths"]


def test_report_has_a_captions_section_only_with_a_decoder(coca_run, tiny_run, tmp_path):
    import re

    from coalign.evaluate.report import write_report

    page = write_report(coca_run, tmp_path / "coca.html", examples=3).read_text()
    found = dict(re.findall(r'<section id="([^"]+)"><h2>[^<]*</h2>(.*?)</section>', page, flags=re.S))
    assert list(found)[-2:] == ["captions", "recipe"] and 'href="#captions"' in page
    body = found["captions"]
    assert 'class="missing' not in body, body[:300]
    assert body.count('class="query captioned"') == 3 and body.count("<img") == 3
    assert body.count("generated: “") == 3 and "<li>" in body  # generated and reference captions
    plain = write_report(tiny_run, tmp_path / "demo.html").read_text()
    assert 'id="captions"' not in plain and 'href="#captions"' not in plain
