"""The HTTP API over a fake index: every route answers good input, and every bad input gets the right
4xx with a JSON error naming what is wrong; the token guards the data; metrics count requests; the
thumbnail route never reads a path the index did not name for a known item."""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from coalign.data.transforms.image import decode_image
from coalign.registry import ConfigError
from coalign.search.query import Hit
from coalign.serve.app import Limits, create_app

DIM = 16
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square"]


def _vec(key: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def _png(rgb: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return buf.getvalue()


FakeHit = Hit  # the fake index returns the real hit record


class FakeIndex:
    """The SearchIndex interface over deterministic vectors. Item i's vector is the sum of the vector of
    its caption and of its colour, so a text query equal to a caption, or the item's image, ranks it first."""

    modalities = ["image", "text"]
    embed_dim = DIM

    def __init__(self, root: Path):
        self.root = root
        (root / "thumbnails").mkdir(parents=True, exist_ok=True)
        self.items: list[FakeHit] = []
        self.colors: list[tuple[int, int, int]] = []
        for i, (color, shape) in enumerate((c, s) for s in SHAPES for c in COLORS):
            item_id = f"item-{i}" if i < 11 else "cats/001.jpg"  # folder sources have ids with '/'
            self.items.append(
                FakeHit(item_id, 0.0, i, f"a {color} {shape}", None, {"color": i % 6, "shape": i // 6})
            )
            self.colors.append((20 * i, 255 - 20 * i, (70 * i) % 256))
            if i != 3:  # item-3 has no thumbnail
                (root / "thumbnails" / f"{i}.png").write_bytes(_png(self.colors[-1]))
        vectors = np.stack(
            [_vec(h.caption) + self._color_vec(c) for h, c in zip(self.items, self.colors, strict=True)]
        )
        self.vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        self.by_id = {h.id: h for h in self.items}

    @staticmethod
    def _color_vec(rgb) -> np.ndarray:
        return _vec("color:" + ",".join(str(int(x)) for x in rgb))

    def __len__(self) -> int:
        return len(self.items)

    def encode_text(self, texts: list[str]) -> np.ndarray:
        if any("boom" in t for t in texts):
            raise RuntimeError("the model fell over")  # stands for any bug deep in the library
        return np.stack([_vec(t) for t in texts])

    def encode_image(self, images: list) -> np.ndarray:
        return np.stack([self._color_vec(np.asarray(decode_image(im))[0, 0]) for im in images])

    def search(
        self, vectors: np.ndarray, k: int, modality: str = "image", filter: dict | None = None
    ) -> list[list[FakeHit]]:
        assert modality in self.modalities
        scores = vectors @ self.vectors.T
        if filter is not None:  # as SearchIndex: every label must match, a list means any of its values
            if set(filter) - {"color", "shape"}:
                raise ConfigError(f"no label '{sorted(set(filter) - {'color', 'shape'})[0]}' in this index")
            ok = [
                all(h.labels[n] in (v if isinstance(v, list) else [v]) for n, v in filter.items())
                for h in self.items
            ]
            scores = np.where(ok, scores, -np.inf)
            k = min(k, sum(ok))
        out = []
        for row in scores:
            order = np.argsort(-row)[:k]
            out.append([FakeHit(**{**vars(self.items[j]), "score": float(row[j])}) for j in order])
        return out

    def item(self, id: str) -> FakeHit | None:
        return self.by_id.get(id)

    def thumbnail_path(self, id: str) -> Path | None:
        hit = self.by_id.get(id)
        path = self.root / "thumbnails" / f"{hit.row}.png" if hit else None
        return path if path is not None and path.is_file() else None


class CarelessIndex(FakeIndex):
    """Breaks the contract on purpose: names a file outside the index for unknown ids."""

    def thumbnail_path(self, id: str) -> Path | None:
        return super().thumbnail_path(id) or Path("/etc/passwd")


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> FakeIndex:
    return FakeIndex(tmp_path_factory.mktemp("fake_index"))


@pytest.fixture
def client(index) -> TestClient:
    return TestClient(create_app(index))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_error(response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and body["error"]
    for word in words:
        assert word in response.text, (word, response.text)
    return body


def test_health_page_and_static_files(client, index):
    assert client.get("/health").json() == {
        "status": "ok",
        "items": 12,
        "modalities": ["image", "text"],
        "auth": False,
        "embed_dim": DIM,
        "shards": None,
    }
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="query"' in page.text and 'id="results"' in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200


def test_embed_text_batch_and_image(client, index):
    one = client.post("/embed", json={"text": "a red circle"}).json()
    assert one["modality"] == "text" and one["dim"] == DIM
    np.testing.assert_allclose(one["embedding"], _vec("a red circle"), rtol=1e-6)
    many = client.post("/embed", json={"texts": ["a", "b", "c"]}).json()
    assert len(many["embeddings"]) == 3 and many["dim"] == DIM
    img = client.post("/embed", json={"image": "data:image/png;base64," + b64(_png((1, 2, 3)))}).json()
    assert img["modality"] == "image"
    np.testing.assert_allclose(img["embedding"], index._color_vec((1, 2, 3)), rtol=1e-6)


def test_search_by_text_image_vector_id_and_upload(client, index):
    r = client.post("/search", json={"text": "a blue square", "k": 5}).json()
    assert len(r["results"]) == 5 and r["took_ms"] >= 0
    top = r["results"][0]
    assert top["id"] == "item-8" and top["caption"] == "a blue square"
    assert top["labels"] == {"color": 2, "shape": 1} and top["thumbnail"] == "/items/item-8/thumbnail"
    scores = [x["score"] for x in r["results"]]
    assert scores == sorted(scores, reverse=True)

    by_image = client.post("/search", json={"image": b64(_png(index.colors[5])), "modality": "text"})
    assert by_image.json()["results"][0]["id"] == "item-5"
    by_vector = client.post("/search", json={"vector": (3 * index.vectors[2]).tolist(), "k": 1}).json()
    assert [x["id"] for x in by_vector["results"]] == ["item-2"]
    assert by_vector["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)  # scaled, then normalised
    by_id = client.post("/search", json={"id": "item-7", "k": 3}).json()
    assert by_id["results"][0]["id"] == "item-7"
    upload = client.post(
        "/search/image", files={"file": ("q.png", _png(index.colors[4]), "image/png")}, data={"k": "2"}
    )
    assert [x["id"] for x in upload.json()["results"]][:1] == ["item-4"]


def test_items_and_thumbnails(client, index):
    item = client.get("/items/item-1").json()
    assert item == {
        "id": "item-1", "caption": "a green circle", "labels": {"color": 1, "shape": 0},
        "thumbnail": "/items/item-1/thumbnail",
    }  # fmt: skip
    thumb = client.get("/items/item-1/thumbnail")
    assert thumb.headers["content-type"] == "image/png"
    assert thumb.content == (index.root / "thumbnails" / "1.png").read_bytes()
    # An id with a '/' works both raw and percent-encoded (the form search results link to).
    assert client.get("/items/cats/001.jpg").json()["id"] == "cats/001.jpg"
    r = client.post("/search", json={"text": "a orange square", "k": 1}).json()["results"][0]
    assert r["thumbnail"] == "/items/cats%2F001.jpg/thumbnail"
    assert client.get(r["thumbnail"]).content == (index.root / "thumbnails" / "11.png").read_bytes()


BAD = [
    ("/search", {}, 422, ["exactly one"]),
    ("/search", {"text": "a", "id": "item-1"}, 422, ["exactly one"]),
    ("/search", {"txt": "a red circle"}, 422, ["invalid request", "txt"]),
    ("/search", {"text": 5}, 422, ["invalid request"]),
    ("/search", {"text": "   "}, 422, ["empty"]),
    ("/search", {"text": "x" * 1001}, 422, ["max_text_chars"]),
    ("/search", {"text": "a", "k": 101}, 422, ["max_k"]),
    ("/search", {"text": "a", "k": 0}, 422, ["max_k"]),
    ("/search", {"text": "a", "k": "many"}, 422, ["invalid request"]),
    ("/search", {"image": "!!not base64!!"}, 400, ["base64"]),
    ("/search", {"image": b64(b"GIF89a but not really")}, 400, ["undecodable image"]),
    ("/search", {"image": ""}, 400, ["undecodable image"]),
    ("/search", {"text": "a", "modality": "audio"}, 400, ["unknown modality", "image", "text"]),
    ("/search", {"vector": [1.0, 2.0]}, 422, ["embed_dim"]),
    ("/search", {"vector": [0.0] * DIM}, 422, ["embed_dim"]),
    ("/search", {"id": "no-such-item"}, 404, ["unknown item"]),
    ("/search", {"id": "item-3"}, 404, ["no stored image"]),  # like its thumbnail: 404
    ("/embed", {}, 422, ["exactly one"]),
    ("/embed", {"text": ""}, 422, ["empty"]),
    ("/embed", {"texts": []}, 422, ["max_batch"]),
    ("/embed", {"texts": ["a"] * 65}, 422, ["max_batch"]),
    ("/embed", {"texts": ["a", "y" * 1001]}, 422, ["max_text_chars"]),
    ("/embed", {"image": "%%%"}, 400, ["base64"]),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "words"), BAD, ids=[f"{p}:{b}"[:60] for p, b, _, _ in BAD]
)
def test_bad_json_inputs_answer_4xx_with_a_json_error(client, path, body, status, words):
    assert_error(client.post(path, json=body), status, *words)


def test_other_bad_requests(client):
    for bad in ("NaN", "Infinity"):  # Python's JSON reader accepts these literals; the vector check must not
        vector = ", ".join([bad] + ["0.5"] * (DIM - 1))
        r = client.post(
            "/search", content=f'{{"vector": [{vector}]}}', headers={"content-type": "application/json"}
        )
        assert_error(r, 422, "embed_dim")
    assert_error(
        client.post("/search", content=b"{not json", headers={"content-type": "application/json"}), 422
    )
    assert_error(client.post("/search/image", data={"k": "3"}), 422, "file")
    garbage = {"file": ("x.png", b"\x89PNG but truncated", "image/png")}
    assert_error(client.post("/search/image", files=garbage), 400, "undecodable image")
    ok_file = {"file": ("x.png", _png((1, 1, 1)), "image/png")}
    assert_error(client.post("/search/image", files=ok_file, data={"k": "500"}), 422, "max_k")
    assert_error(client.post("/search/image", files=ok_file, data={"modality": "smell"}), 400, "valid")
    assert_error(client.get("/items/no-such-item"), 404, "unknown item")
    assert_error(client.get("/items/item-3/thumbnail"), 404, "no thumbnail")  # item without one
    assert_error(client.get("/nowhere"), 404)
    assert_error(client.get("/search"), 405)


def test_body_size_limit_by_header_and_by_bytes_read(index):
    client = TestClient(create_app(index, limits=Limits(max_body_bytes=1000)))
    assert client.post("/search", json={"text": "a red circle"}).status_code == 200
    body = assert_error(client.post("/search", json={"text": "a" * 2000}), 413, "max_body_bytes")
    assert body["detail"]["max_body_bytes"] == 1000

    def chunks():  # no Content-Length: the limit must hold on the bytes actually read
        for _ in range(10):
            yield b" " * 200

    assert_error(client.post("/search", content=chunks()), 413, "max_body_bytes")
    lying = client.post(
        "/search", content=b'{"text": "' + b"a" * 1500 + b'"}', headers={"content-length": "12"}
    )
    assert lying.status_code in (400, 413)
    assert_error(
        client.post("/search", content=b"{}", headers={"content-length": "nope"}), 400, "Content-Length"
    )


def test_image_pixel_limit_refuses_before_decoding(index):
    client = TestClient(create_app(index, limits=Limits(max_image_pixels=1000)))
    assert_error(
        client.post("/search", json={"image": b64(_png((0, 0, 0), size=40))}), 413, "max_image_pixels"
    )
    assert client.post("/search", json={"image": b64(_png((0, 0, 0), size=30))}).status_code == 200


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="max_k"):
        Limits(max_k=0)


def test_token_guards_data_routes_but_not_health_or_page(index):
    client = TestClient(create_app(index, token="s3cret"))
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic s3cret"},
        {"Authorization": "Bearer"},
    ):
        r = client.post("/search", json={"text": "a red circle"}, headers=headers)
        assert_error(r, 401, "Bearer")
        assert r.headers["www-authenticate"] == "Bearer"
    for path in ("/metrics", "/items/item-1", "/items/item-1/thumbnail", "/openapi.json"):
        assert_error(client.get(path), 401)
    good = {"Authorization": "Bearer s3cret"}
    assert client.post("/search", json={"text": "a red circle"}, headers=good).status_code == 200
    assert client.get("/items/item-1/thumbnail", headers=good).status_code == 200
    assert client.get("/health").json()["auth"] is True
    assert client.get("/").status_code == 200 and client.get("/static/app.js").status_code == 200
    # An oversized body from a client without the token is refused by the token check first.
    assert client.post("/search", content=b"x" * 6_000_000).status_code == 401


def test_empty_token_means_no_token(index):
    assert TestClient(create_app(index, token="")).post("/search", json={"text": "a"}).status_code == 200


def test_a_crash_answers_500_json_and_the_server_keeps_going(client):
    assert_error(client.post("/search", json={"text": "boom"}), 500, "internal error")
    assert client.post("/search", json={"text": "a red circle"}).status_code == 200


def test_metrics_count_requests_by_route_and_status(index):
    client = TestClient(create_app(index))
    for _ in range(3):
        client.post("/search", json={"text": "a red circle"})
    client.post("/search", json={"text": "a", "k": 1000})
    client.get("/items/../../etc/passwd")
    client.get("/items/item-1/thumbnail")
    text = client.get("/metrics").text
    assert client.get("/metrics").headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'coalign_http_requests_total{method="POST",route="/search",status="200"} 3' in text
    assert 'coalign_http_requests_total{method="POST",route="/search",status="422"} 1' in text
    assert 'coalign_http_requests_total{method="GET",route="unmatched",status="404"} 1' in text
    assert 'route="/items/{item_id:path}/thumbnail",status="200"} 1' in text
    assert 'coalign_http_request_duration_seconds_bucket{route="/search",le="+Inf"} 4' in text
    assert 'coalign_http_request_duration_seconds_count{route="/search"} 4' in text
    assert re.search(r"^coalign_index_items 12$", text, re.M) and "# TYPE coalign_index_items gauge" in text
    for line in text.splitlines():  # every sample line is `name{labels} value`
        assert line.startswith("#") or re.fullmatch(r"[a-z_]+(\{.*\})? [0-9.e+-]+", line), line


@pytest.mark.parametrize(
    "path",
    [
        "/items/../../etc/passwd/thumbnail",
        "/items/..%2F..%2Fetc%2Fpasswd/thumbnail",
        "/items/%2Fetc%2Fpasswd/thumbnail",
        "/items/item-1%2F..%2F..%2F..%2Fetc%2Fpasswd/thumbnail",
    ],
)
def test_thumbnail_route_cannot_escape(tmp_path, path):
    # Even over an index that breaks its contract, only a known item's thumbnail is ever served.
    client = TestClient(create_app(CarelessIndex(tmp_path)))
    r = client.get(path)
    assert r.status_code == 404 and "root:" not in r.text


def _serve_args(*argv: str):
    from coalign.cli.serve import add_serve

    parser = argparse.ArgumentParser(prog="coalign")
    add_serve(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_serve_command_builds_the_app_with_the_env_token(monkeypatch, index):
    import uvicorn

    from coalign.search.query import SearchIndex

    ran, loaded = {}, {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    monkeypatch.setattr(
        SearchIndex, "load", classmethod(lambda cls, *a, **kw: loaded.update(a=a, kw=kw) or index)
    )
    monkeypatch.setenv("COALIGN_TOKEN", "from-env")
    args = _serve_args("runs/demo", "emb/demo", "--port", "9001", "--max-k", "7")
    assert args.func(args) == 0
    assert ran["host"] == "127.0.0.1" and ran["port"] == 9001
    assert loaded == {
        "a": (Path("emb/demo"),),
        "kw": {"checkpoint": Path("runs/demo"), "device": "cpu", "shards": None},
    }
    client = TestClient(ran["app"])
    assert client.get("/metrics").status_code == 401
    r = client.post("/search", json={"text": "a", "k": 8}, headers={"Authorization": "Bearer from-env"})
    assert_error(r, 422, "max_k")
    with pytest.raises(ConfigError, match="max_k"):
        args = _serve_args("runs/demo", "emb/demo", "--max-k", "0")
        args.func(args)


@pytest.mark.slow
def test_end_to_end_over_a_real_index(real_index):
    index = real_index
    client = TestClient(create_app(index))
    assert client.get("/health").json()["items"] == len(index) == 30
    query = "a small red circle at the top"
    expected = [h.id for h in index.search(index.encode_text([query]), 5, "image")[0]]
    assert [
        r["id"] for r in client.post("/search", json={"text": query, "k": 5}).json()["results"]
    ] == expected
    emb = client.post("/embed", json={"text": query}).json()["embedding"]
    np.testing.assert_allclose(emb, index.encode_text([query])[0], atol=1e-6)
    by_vector = client.post("/search", json={"vector": emb, "k": 5}).json()["results"]
    assert [r["id"] for r in by_vector] == expected
    text_side = client.post("/search", json={"text": query, "k": 3, "modality": "text"}).json()["results"]
    assert [r["id"] for r in text_side] == [
        h.id for h in index.search(index.encode_text([query]), 3, "text")[0]
    ]

    first = expected[0]
    item = client.get(f"/items/{first}").json()
    assert item["caption"] == index.item(first).caption and "path" not in item
    png = client.get(item["thumbnail"]).content
    assert png == index.thumbnail_path(first).read_bytes()
    want = [h.id for h in index.search(index.encode_image([png]), 5, "image")[0]]
    upload = client.post("/search/image", files={"file": ("q.png", png, "image/png")}, data={"k": "5"})
    by_id = [r["id"] for r in client.post("/search", json={"id": first, "k": 5}).json()["results"]]
    for got in ([r["id"] for r in upload.json()["results"]], by_id):
        # A barely trained model puts images 1e-7 apart: compare the top hit and the set, not near-ties.
        assert got[0] == want[0] and set(got) == set(want)
    # A PNG whose header reads but whose pixels are cut off fails inside the model's transform: 400.
    assert_error(client.post("/search", json={"image": b64(png[: len(png) // 2])}), 400, "undecodable")
    assert client.get("/items/..%2F..%2Fmanifest.json/thumbnail").status_code == 404
    assert client.get("/items/..%2Fmanifest.json").status_code == 404


# --------------------------------------------------------------------------------- combined queries


def test_combined_queries_weight_a_text_and_an_image(client, index):
    from coalign.search.combine import combine_vectors

    png = (index.root / "thumbnails" / "4.png").read_bytes()
    text_vec, image_vec = index.encode_text(["a red square"])[0], index.encode_image([png])[0]
    for weights, combine in (
        ([0.7, 0.3], "sum"),
        ([1e-300, 2e-300], "sum"),
        ([1e308, 1.0], "sum"),
        ([1, 1], "product"),
    ):
        body = {
            "combined": {"text": "a red square", "image": b64(png), "weights": weights, "combine": combine},
            "k": 5,
        }
        got = client.post("/search", json=body).json()["results"]
        q = combine_vectors([text_vec, image_vec], weights, combine)
        want = index.search(q, 5)[0]
        assert [(r["id"], round(r["score"], 5)) for r in got] == [(h.id, round(h.score, 5)) for h in want]
    # Only the ratio of the weights counts; one part alone is that part's query.
    a = client.post("/search", json={"combined": {"text": "a", "image": b64(png), "weights": [2, 6]}}).json()
    b = client.post(
        "/search", json={"combined": {"text": "a", "image": b64(png), "weights": [0.25, 0.75]}}
    ).json()
    assert [(r["id"], round(r["score"], 6)) for r in a["results"]] == [
        (r["id"], round(r["score"], 6)) for r in b["results"]
    ]
    alone = client.post("/search", json={"combined": {"image": b64(png), "weights": [0.1, 5]}, "k": 4}).json()
    assert alone["results"] == client.post("/search", json={"image": b64(png), "k": 4}).json()["results"]


@pytest.mark.parametrize(
    ("combined", "words"),
    [
        ({}, "text, an image or both"),
        ({"text": None, "image": None}, "text, an image or both"),
        ({"text": "a", "weights": [0, 1]}, "weights"),
        ({"text": "a", "weights": [-1, 1]}, "weights"),
        ({"text": "a", "weights": [1]}, "weights"),
        ({"text": "a", "weights": [1, 1, 1]}, "weights"),
        ({"text": "a", "weights": [True, 1]}, "invalid request"),
        ({"text": "a", "combine": "max"}, "invalid request"),
        ({"text": "a", "colour": "red"}, "invalid request"),
        ({"text": " "}, "text is empty"),
    ],
)
def test_a_bad_combined_query_is_refused_naming_the_rule(client, combined, words):
    assert_error(client.post("/search", json={"combined": combined}), 422, words)


def test_combined_is_one_query_field_and_documented(client, index):
    assert_error(client.post("/search", json={"text": "a", "combined": {"text": "a"}}), 422, "exactly one")
    assert_error(client.post("/search", json={"combined": {"image": "not base64!"}}), 400, "base64")
    doc = client.get("/openapi.json").json()["components"]["schemas"]
    combined = doc["Combined"]
    assert combined["anyOf"] == [
        {"required": ["text"], "properties": {"text": {"not": {"type": "null"}}}},
        {"required": ["image"], "properties": {"image": {"not": {"type": "null"}}}},
    ]
    weights = combined["properties"]["weights"]
    assert (weights["minItems"], weights["maxItems"], weights["items"]["exclusiveMinimum"]) == (2, 2, 0)
    assert {"required": ["combined"], "properties": {"combined": {"not": {"type": "null"}}}} in doc[
        "SearchRequest"
    ]["oneOf"]


@pytest.mark.slow
def test_a_combined_query_is_the_cli_query_over_a_real_index(real_index):
    client = TestClient(create_app(real_index))
    first = real_index.item("0") or real_index.search(real_index.encode_text(["a"]), 1)[0][0]
    png = real_index.thumbnail_path(first.id).read_bytes()
    body = {"combined": {"text": "a red circle", "image": b64(png), "weights": [0.7, 0.3]}, "k": 6}
    got = client.post("/search", json=body).json()["results"]
    q = real_index.encode_query("a red circle", png, (0.7, 0.3))  # what `coalign search --text --image` runs
    want = real_index.search(q, 6)[0]
    assert [r["id"] for r in got] == [h.id for h in want]
    np.testing.assert_allclose([r["score"] for r in got], [h.score for h in want], atol=1e-5)
