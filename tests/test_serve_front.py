"""A front over `coalign serve --shards` workers answers as one server over the unsharded index: real
processes on localhost ports (two workers, one front), compared with an app over the whole index; a
front refuses workers that do not cover the index once, and names the worker that fails or is slow."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

import coalign
from coalign.registry import ConfigError
from coalign.serve.front import Backends, create_front

SRC = str(Path(coalign.__file__).resolve().parents[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "COALIGN_TOKEN": ""}
    cmd = [sys.executable, "-m", "coalign", *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited {proc.returncode}:\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"{proc.args} did not start within {timeout} s")


def post(url: str, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url: str, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url + path, timeout=300) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_run):
    """One embedding, indexed twice: whole (Flat) and in 3 parts (Flat each)."""
    from coalign.search.embed import embed_source
    from coalign.search.index import build_index

    root = tmp_path_factory.mktemp("front")
    spec = {"source": "world", "split": "test", "size": 45}
    embed_source(tiny_run, spec, root / "whole", batch_size=16, shard_size=16, progress=False)
    shutil.copytree(root / "whole", root / "sharded")
    build_index(root / "whole", factory="Flat", sample_queries=10)
    build_index(root / "sharded", factory="Flat", sample_queries=10, shards=3)
    return root / "whole", root / "sharded"


def same(a: list[dict], b: list[dict]) -> bool:
    return [h["id"] for h in a] == [h["id"] for h in b] and all(
        abs(x["score"] - y["score"]) <= 1e-5 for x, y in zip(a, b, strict=True)
    )


@pytest.mark.slow
def test_two_workers_and_a_front_answer_as_one_server(folders, tiny_run):
    from coalign.search.query import SearchIndex
    from coalign.serve.app import create_app

    whole, sharded = folders
    one = TestClient(create_app(SearchIndex.load(whole)))
    procs = []
    try:
        w1, u1 = start("serve", str(tiny_run), str(sharded), "--shards", "0")
        w2, u2 = start("serve", str(tiny_run), str(sharded), "--shards", "1", "2")
        procs += [w1, w2]
        front, uf = start("serve-front", "--backend", u2, "--backend", u1, "--timeout", "60", "--wait", "900")
        procs.append(front)
        for p, u in ((w1, u1), (w2, u2), (front, uf)):
            wait_ready(p, u)

        status, health = get(uf, "/health")
        health = json.loads(health)
        assert (
            status == 200 and health["items"] == 45 and health["shards"] == {"served": [0, 1, 2], "total": 3}
        )
        assert json.loads(get(u2, "/health")[1])["shards"] == {"served": [1, 2], "total": 3}

        ids = pq.read_table(whole / "metadata.parquet").column("id").to_pylist()
        picked = [quote(ids[i], safe="") for i in (0, 7, 44)]
        items = [json.loads(get(uf, f"/items/{i}")[1]) for i in picked]
        assert items == [one.get(f"/items/{i}").json() for i in picked] and items[1]["id"] == ids[7]
        queries = [
            {"text": items[0]["caption"], "k": 10},
            {"text": "a small red circle", "k": 45},
            {"id": ids[7], "k": 5},
            {"vector": [0.1] * health["embed_dim"], "k": 8},
            {"text": "a blue square", "k": 6, "filter": {"shape": 1}},
        ]
        for q in queries:
            status, got = post(uf, "/search", q)
            assert status == 200, (q, got)
            want = one.post("/search", json=q).json()["results"]
            assert same(got["results"], want), q
            assert len(got["results"]) == len(want) > 0
        thumb = get(uf, f"/items/{picked[1]}/thumbnail")
        assert thumb == (200, one.get(f"/items/{picked[1]}/thumbnail").content)
        body, ctype = _form(thumb[1], k="4")
        req = urllib.request.Request(uf + "/search/image", body, {"Content-Type": ctype}, method="POST")
        with urllib.request.urlopen(req, timeout=300) as r:
            got = json.loads(r.read())["results"]
        want = one.post("/search/image", files={"file": ("q.png", thumb[1])}, data={"k": "4"}).json()
        assert same(got, want["results"]) and len(got) == 4
        embedded = post(uf, "/embed", {"text": "a red circle"})[1]
        want = one.post("/embed", json={"text": "a red circle"}).json()
        assert {k: v for k, v in embedded.items() if k != "embedding"} == {
            k: v for k, v in want.items() if k != "embedding"
        }
        # another process: its matmuls may split the sums otherwise (float rounding, no more)
        assert max(abs(a - b) for a, b in zip(embedded["embedding"], want["embedding"], strict=True)) < 1e-5
        # A worker's 4xx is the front's: the same status and error as one server.
        for bad in ({"id": "no-such-item"}, {"image": "not base64!"}, {"text": "a", "k": 1000}):
            status, got = post(uf, "/search", bad)
            assert (status, got["error"]) == (lambda r: (r.status_code, r.json()["error"]))(
                one.post("/search", json=bad)
            )

        w1.terminate()  # a worker goes away: the front names it
        w1.wait(30)
        status, got = post(uf, "/search", {"text": "a red circle"})
        assert status == 502 and got["detail"]["backend"] == u1, got
        assert get(uf, "/health")[0] == 502
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def _form(data: bytes, **fields: str) -> tuple[bytes, str]:
    from coalign.serve.front import _multipart

    return _multipart(data, fields)


# --------------------------------------------------------------------- fake workers on real ports


def fake_worker(health: dict, search_status: int = 200, delay: float = 0.0):
    """A stdlib HTTP server that answers /health with `health`, and POST /search after `delay` s
    with `search_status` (200: no hits)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status: int, body: dict):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send(200, health)

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            time.sleep(delay)
            if search_status == 200:
                self._send(200, {"results": [], "took_ms": 0.0})
            else:
                self._send(search_status, {"error": f"fake {search_status}", "detail": "from the fake"})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def health(served, total=3):
    shards = None if served is None else {"served": served, "total": total}
    return {
        "status": "ok",
        "items": 9,
        "modalities": ["image", "text"],
        "auth": False,
        "embed_dim": 4,
        "shards": shards,
    }


@pytest.fixture
def servers():
    made = []

    def make(*args, **kw):
        server, url = fake_worker(*args, **kw)
        made.append(server)
        return url

    yield make
    for s in made:
        s.shutdown()
        s.server_close()


def test_a_front_refuses_workers_that_do_not_cover_the_index_once(servers):
    a, b = servers(health([0, 1])), servers(health([1, 2]))
    with pytest.raises(ConfigError, match=rf"part 1 of 3 is served by both {a} and {b}"):
        Backends([a, b]).connect(5)
    with pytest.raises(ConfigError, match=r"no backend serves parts \[2\] of 3.*--shards 2"):
        Backends([a]).connect(5)
    whole = servers(health(None))
    with pytest.raises(ConfigError, match="the whole \\(unsharded\\) index is served by both"):
        Backends([whole, servers(health(None))]).connect(5)
    other = servers({**health([2]), "embed_dim": 8})
    with pytest.raises(ConfigError, match="serve different indexes \\(embed_dim: 4 and 8\\)"):
        Backends([a, other]).connect(5)
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match=f"backend {closed} did not answer GET /health within 0.5 s"):
        Backends([whole, closed]).connect(0.5)
    for bad, match in ((["localhost:8001"], "is not a URL"), ([], "at least one --backend")):
        with pytest.raises(ConfigError, match=match):
            Backends(bad)


def test_a_front_names_the_worker_that_fails_or_times_out_and_relays_4xx(servers):
    ok = servers(health([0]))
    cases = [
        (servers(health([1, 2]), search_status=500), 502, "backend failed"),
        (servers(health([1, 2]), delay=3.0), 504, "backend timed out"),
        (servers(health([1, 2]), search_status=404), 404, "fake 404"),
    ]
    for url, status, error in cases:
        backends = Backends([ok, url], timeout=1.0)
        backends.connect(5)
        client = TestClient(create_front(backends), raise_server_exceptions=False)
        r = client.post("/search", json={"text": "a red circle"})
        assert (r.status_code, r.json()["error"]) == (status, error), r.text
        if status >= 500:
            assert r.json()["detail"]["backend"] == url
    backends = Backends([ok, servers(health([1, 2]))])
    backends.connect(5)
    client = TestClient(create_front(backends))
    assert client.post("/search", json={"text": "a", "k": 3}).json()["results"] == []
    assert client.get("/health").json()["shards"] == {"served": [0, 1, 2], "total": 3}
    assert client.post("/search", json={"text": "a", "rerank": 5}).status_code == 422  # no model here
