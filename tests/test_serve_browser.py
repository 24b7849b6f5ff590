"""End to end in a real browser: train a tiny run, embed and index a small world split, serve it with
uvicorn on a free local port, and drive the page with headless Chromium (Playwright): type a query,
press Enter, check that the page ranks first what `SearchIndex.search` ranks first, click a result to
search by it, and take a screenshot (also into $COALIGN_SCREENSHOT_DIR when set)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
QUERY = "a large blue square at the bottom"
TOKEN = "browser-test-token"
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def sync_playwright():
    """Playwright's entry point; skips (before any training) when Playwright or Chromium is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install playwright)")
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    return sync_playwright


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_run):
    # A few training steps suffice: the test compares the page with the library, not the model with truth.
    from coalign.search.embed import embed_source
    from coalign.search.index import build_index
    from coalign.search.query import SearchIndex

    root = tmp_path_factory.mktemp("serve_browser")
    spec = {"source": "world", "split": "test", "size": 40}
    embed_source(tiny_run, spec, root / "emb", batch_size=20, shard_size=20, progress=False)
    build_index(root / "emb", sample_queries=10)
    return SearchIndex.load(root / "emb")


class Server:
    """uvicorn in a thread, on a socket bound before start (no race for the port); stopped on exit."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start within 20 s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
        assert not self.thread.is_alive(), "the test server did not stop"


def _screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("COALIGN_SCREENSHOT_DIR"):
        target = Path(os.environ["COALIGN_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / name)
    return path


def _wait_for_answer(page, seq: int) -> None:
    """Until the grid holds answer number `seq` and every thumbnail in it has loaded."""
    page.wait_for_selector(f'#results[data-seq="{seq}"]', timeout=TIMEOUT_MS)
    loaded = "[...document.querySelectorAll('.result img.thumb')].every(i => i.complete && i.naturalWidth)"
    page.wait_for_function(f"() => {loaded}", timeout=TIMEOUT_MS)


def _ids(page) -> list[str]:
    return page.eval_on_selector_all(".result", "cards => cards.map(c => c.dataset.id)")


def _launch(p):
    return p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000)


def test_page_searches_by_text_and_by_clicking_a_result(sync_playwright, index, tmp_path):
    from coalign.serve.app import create_app

    expected = index.search(index.encode_text([QUERY]), 10, "image")[0]
    with Server(create_app(index)) as server, sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(server.url + "/")
            page.wait_for_function(
                "() => document.querySelector('#status').textContent.includes('items')", timeout=TIMEOUT_MS
            )
            assert f"{len(index)} items" in page.text_content("#status")

            page.fill("#query", QUERY)
            page.press("#query", "Enter")
            _wait_for_answer(page, 1)
            cards = page.locator(".result")
            assert cards.count() == len(expected) == 10
            assert cards.first.get_attribute("data-id") == expected[0].id
            ids = _ids(page)
            assert ids == [h.id for h in expected]
            assert page.text_content(".result .score") == f"{expected[0].score:.3f}"
            assert page.text_content(".result .caption") == (expected[0].caption or "(no caption)")
            assert "results in" in page.text_content("#status")
            _screenshot(page, tmp_path, "serve_page.png")

            # A click searches by that item (its stored image); the upload button by an image file.
            by_item = index.search(index.encode_image([index.thumbnail_path(ids[3])]), 10, "image")[0]
            cards.nth(3).click()
            _wait_for_answer(page, 2)
            # Image-to-image scores of a barely trained model can sit 1e-7 apart: compare the top hit and
            # the set, not the order of near-ties.
            assert _ids(page)[0] == by_item[0].id and set(_ids(page)) == {h.id for h in by_item}
            assert ids[3] in _ids(page)
            assert "items like" in page.text_content("#query-label")
            _screenshot(page, tmp_path, "serve_page_clicked.png")

            image = index.thumbnail_path(ids[5])
            by_image = index.search(index.encode_image([image]), 10, "image")[0]
            page.set_input_files("#upload", str(image))
            _wait_for_answer(page, 3)
            assert _ids(page)[0] == by_image[0].id and set(_ids(page)) == {h.id for h in by_image}
            assert page.is_hidden("#error") and not errors
        finally:
            browser.close()


def test_page_sends_the_token_and_shows_errors(sync_playwright, index, tmp_path):
    from coalign.serve.app import create_app

    with Server(create_app(index, token=TOKEN)) as server, sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(server.url + "/")  # no token yet: the page asks for one and a search fails with 401
            page.wait_for_selector("#token-row:not([hidden])")
            page.fill("#query", QUERY)
            page.press("#query", "Enter")
            page.wait_for_selector("#error:not([hidden])")
            assert "unauthorized" in page.text_content("#error")

            page.goto(server.url + f"/?token={TOKEN}")
            page.wait_for_function("() => !location.search.includes('token')")  # taken out of the address bar
            page.fill("#query", QUERY)
            page.press("#query", "Enter")
            _wait_for_answer(page, 1)  # thumbnails load through fetch + Authorization, as blobs
            assert page.locator(".result").count() == 10 and page.is_hidden("#error")

            page.fill("#query", "x" * 1000 + "y")  # over max_text_chars: the input's maxlength cuts it...
            page.evaluate("document.querySelector('#query').removeAttribute('maxlength')")
            page.fill("#query", "x" * 1001)  # ...so lift it: the server's limit answers, the page shows it
            page.press("#query", "Enter")
            page.wait_for_selector("#error:not([hidden])")
            assert "max_text_chars" in page.text_content("#error")
            _screenshot(page, tmp_path, "serve_page_error.png")
        finally:
            browser.close()
