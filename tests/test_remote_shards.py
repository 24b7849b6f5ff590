"""Remote shards (issue #15, point 2): the `webdataset` source reads `http(s)://` URLs (from a local
`http.server` in a thread: no outside network) and `pipe:` commands as it reads local files, retries
transient failures, names what failed, and resumes exactly, with 2 workers."""

from __future__ import annotations

import functools
import gc
import itertools
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from coalign.data.loader import train_batches
from coalign.data.pack import pack, stat
from coalign.data.sources.base import SampleError
from coalign.data.sources.webdataset import WebDatasetSource
from coalign.data.transforms.base import Pipeline
from coalign.data.transforms.image import ImageTransform
from coalign.registry import SOURCES, ConfigError


class Handler(SimpleHTTPRequestHandler):
    """Serves a folder; counts requests per path; `flaky` paths answer 503 the first time, `cut`
    paths send half their body the first time (the Content-Length promises all of it)."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        server = self.server
        server.requests[self.path] += 1
        first = server.requests[self.path] == 1
        if self.path in server.broken or (first and self.path in server.flaky):
            self.send_error(503, "try again")
            return
        if first and self.path in server.cut:
            data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """20 world samples in 4 shards (6, 6, 6, 2) with their manifest, served over HTTP."""
    folder = tmp_path_factory.mktemp("served")
    src = SOURCES.create("world", size=20, image_size=16)
    pack(src, folder / "shards", shard_size=6, progress=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    server.requests, server.flaky, server.cut, server.broken = Counter(), set(), set(), set()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder / "shards", f"http://127.0.0.1:{server.server_address[1]}/shards", server
    server.shutdown()
    server.server_close()


def same_samples(a, b) -> None:
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys() and all(x[k] == y[k] for k in x), i


def test_http_shards_read_like_local_ones(served, tmp_path):
    local, url, server = served
    server.requests.clear()
    remote = WebDatasetSource(path=f"{url}/{{000000..000003}}.tar", open_shards=2, cache_dir=str(tmp_path))
    # Counts come from the manifest beside the shards: nothing else is fetched to build the source.
    assert dict(server.requests) == {"/shards/manifest.json": 1}
    assert set(remote.zero_shot_tasks()) == {"shape", "color", "size", "position"}
    same_samples(remote, WebDatasetSource(path=str(local)))
    cache = remote._cache.folder
    assert len(list(cache.glob("*.tar"))) <= 2  # streamed: only `open_shards` local copies at a time
    assert all(server.requests[f"/shards/{j:06d}.tar"] == 1 for j in range(4))
    report = stat(f"{url}/{{000000..000003}}.tar")
    assert report["samples"] == report["readable"] == 20 and report["bytes"] == sum(
        p.stat().st_size for p in local.glob("*.tar")
    )
    del remote
    gc.collect()
    assert not cache.exists()  # the cache folder goes with the source


def test_transient_failures_are_retried(served):
    _, url, server = served
    server.requests.clear()
    server.flaky, server.cut = {"/shards/000001.tar"}, {"/shards/000002.tar"}
    try:
        remote = WebDatasetSource(path=f"{url}/{{000000..000003}}.tar", retries=2)
        assert [remote[i]["id"] for i in (6, 12)] == ["world-train-6", "world-train-12"]
    finally:
        server.flaky, server.cut = set(), set()
    assert server.requests["/shards/000001.tar"] == 2 and server.requests["/shards/000002.tar"] == 2


def test_unreachable_shards_are_clear_errors_or_counted_skips(served, caplog):
    _, url, server = served
    with pytest.raises(ConfigError, match=r"manifest: cannot fetch .*/nowhere.json: HTTP 404"):
        WebDatasetSource(path=f"{url}/000000.tar", manifest=f"{url}/nowhere.json")
    # A shard the manifest does not list must be fetched to count it: a failure stops the source at start.
    with pytest.raises(ConfigError, match=r"cannot fetch .*/000009.tar: HTTP 404"):
        WebDatasetSource(path=f"{url}/{{000003,000009}}.tar")
    # A listed shard that fails while reading: its samples are skipped, counted and the URL named once.
    server.broken = {"/shards/000001.tar"}
    try:
        remote = WebDatasetSource(path=f"{url}/{{000000..000003}}.tar", retries=1)
        with pytest.raises(SampleError) as err:
            remote[7]
        assert err.value.reason == "unreachable_shard"
        assert (
            "000001.tar" in str(err.value)
            and "HTTP 503" in str(err.value)
            and "after 2 tries" in str(err.value)
        )
        reasons = Counter()
        for i in range(20):
            try:
                remote[i]
            except SampleError as e:
                reasons[e.reason] += 1
        assert reasons == {"unreachable_shard": 6}
    finally:
        server.broken = set()
    assert sum("000001.tar" in r.message for r in caplog.records) == 1


def test_pipe_commands(served):
    local, _, _ = served
    names = [f"pipe:cat '{local}/{j:06d}.tar'" for j in range(4)]
    same_samples(WebDatasetSource(path=names), WebDatasetSource(path=str(local)))
    with pytest.raises(ConfigError, match="exited with status 1"):
        WebDatasetSource(path=["pipe:cat /nonexistent/000000.tar"], retries=0)


def test_resume_over_http_is_exact_with_two_workers(served):
    """Batches 3.. of a run resumed at step 3 are those of an uninterrupted one, and those of the
    same shards read from disk (2 worker processes, each with its own cache)."""
    local, url, _ = served
    pipeline = Pipeline({"image": ImageTransform(size=8)})

    def batches(path, start, count):
        source = WebDatasetSource(path=path, mix_shards=2)
        it = train_batches(source, pipeline, batch_size=8, seed=5, start_step=start, num_workers=2)
        return [next(it) for _ in range(count)]

    full = batches(f"{url}/{{000000..000003}}.tar", 0, 6)
    resumed = batches(f"{url}/{{000000..000003}}.tar", 3, 3)
    on_disk = batches(str(local), 0, 6)
    for a, b in itertools.chain(zip(full[3:], resumed, strict=True), zip(full, on_disk, strict=True)):
        assert list(a["id"]) == list(b["id"])
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
    ids = [i for b in full for i in b["id"]]  # 48 positions: two whole epochs of 20, then 8 more
    assert Counter(ids[:40]) == Counter({f"world-train-{i}": 2 for i in range(20)})
