"""`coalign serve-front --backend URL --backend URL ...`: one search API over several `coalign serve`
workers, each holding some parts of a sharded index (`coalign serve RUN INDEX --shards 0 1`).

Every worker holds the whole embedding folder (metadata, thumbnails: small) and the FAISS parts it
serves (the large part), so a worker can encode any query and describe any item. The front asks each
worker's /health at start and refuses to run unless together they serve every part exactly once, with
the same items, modalities and embedding size. Then:

  POST /search, /search/image   sent to every worker in parallel; their top-k, each over the worker's
                                own parts with global scores, are merged by score (equal scores: the
                                worker of the lower parts first, as one index orders equal rows)
  POST /embed, GET /items/...   sent to one worker (in turn): every worker can answer them
  GET /health                   every worker's; GET /metrics, the page: the front's own

The front validates requests with the same schema models as a worker (`schemas.request_models`) and
relays a worker's 4xx answer unchanged, so clients see one server. A worker that cannot be reached or
fails answers 502, one that does not answer within `timeout` 504, the detail naming the worker. The
front has no model: re-ranking (`rerank`), which needs the top hits of the whole corpus before the
fusion model runs, is not offered by a front.
"""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import PlainTextResponse, Response

from coalign.registry import ConfigError
from coalign.search.shards import merge_hits
from coalign.serve import schemas
from coalign.serve.app import Limits, finish, install_errors
from coalign.serve.bodies import ApiError, takes
from coalign.serve.metrics import Metrics
from coalign.serve.schemas import EmbedMany, EmbedOne, Health, Item, SearchResults, Text

UPSTREAM = {
    502: {
        "description": "a worker failed or could not be reached; the detail names it",
        "model": schemas.ErrorBody,
    },
    504: {"description": "a worker did not answer in time; the detail names it", "model": schemas.ErrorBody},
}


class Backends:
    """The workers behind a front: HTTP calls (stdlib urllib, no proxy) with a timeout, in parallel."""

    def __init__(self, urls: list[str], timeout: float = 30.0, token: str | None = None):
        if not urls:
            raise ConfigError("a front needs at least one --backend URL (a `coalign serve` worker)")
        bad = [u for u in urls if not u.startswith(("http://", "https://"))]
        if bad:
            raise ConfigError(f"--backend '{bad[0]}' is not a URL; give one like http://127.0.0.1:8001")
        if not timeout > 0:
            raise ConfigError(f"--timeout must be a positive number of seconds, got {timeout}")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout, self.token = timeout, token
        # No proxy: the workers are this front's own machines, whatever http_proxy says.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._pool = ThreadPoolExecutor(max_workers=4 * len(urls), thread_name_prefix="front")
        self._turn = itertools.cycle(range(len(urls)))
        self._lock = threading.Lock()
        self.health: dict[str, Any] = {}

    def call(self, url: str, method: str, path: str, body: bytes | None = None, ctype: str | None = None):
        """(status, content type, body) of one request to one worker; unreachable or slow: ApiError."""
        headers = {"Content-Type": ctype} if ctype else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(url + path, data=body, method=method, headers=headers)
        try:
            with self._opener.open(req, timeout=self.timeout) as r:
                return r.status, r.headers.get_content_type(), r.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers.get_content_type(), err.read()
        except TimeoutError:
            raise self._timed_out(url) from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, TimeoutError):
                raise self._timed_out(url) from None
            raise ApiError(502, "backend unreachable", {"backend": url, "reason": str(err.reason)}) from None
        except (OSError, http.client.HTTPException) as err:
            raise ApiError(502, "backend failed", {"backend": url, "reason": repr(err)}) from None

    def _timed_out(self, url: str) -> ApiError:
        return ApiError(504, "backend timed out", {"backend": url, "timeout_s": self.timeout})

    def answer(self, url: str, status: int, ctype: str, data: bytes) -> bytes:
        """The body of a 200; a worker's 4xx relayed as the same error; anything else a 502 naming it."""
        if status == 200:
            return data
        try:
            body = json.loads(data) if ctype == "application/json" else None
        except ValueError:
            body = None
        if status == 401:  # the client passed the front's guard: the worker refused the front's token
            raise ApiError(502, "backend refused the front's token", {"backend": url, "status": status})
        if 400 <= status < 500 and isinstance(body, dict) and "error" in body:
            raise ApiError(status, body["error"], body.get("detail"))
        error = body.get("error") if isinstance(body, dict) else data[:200].decode("utf-8", "replace")
        raise ApiError(502, "backend failed", {"backend": url, "status": status, "error": error})

    def one(self, method: str, path: str, body: bytes | None = None, ctype: str | None = None) -> bytes:
        with self._lock:
            url = self.urls[next(self._turn)]
        return self.answer(url, *self.call(url, method, path, body, ctype))

    def every(self, method: str, path: str, body: bytes | None = None, ctype: str | None = None) -> list:
        """Every worker's answer, in worker order; the first failure (else the first 4xx) is raised."""

        def ask(url: str):
            try:
                return url, self.call(url, method, path, body, ctype)
            except ApiError as err:
                return url, err

        answers = list(self._pool.map(ask, self.urls))
        failed = [a for _, a in answers if isinstance(a, ApiError)]
        if failed:
            raise failed[0]
        failed = [(u, a) for u, a in answers if a[0] >= 500 or a[0] == 401]
        for url, a in failed + answers:
            if a[0] != 200:
                self.answer(url, *a)
        return [json.loads(a[2]) for _, a in answers]

    def connect(self, wait_s: float = 60.0) -> dict[str, Any]:
        """Wait for every worker's /health, check that together they serve every part once, order them
        by their parts, and return what the front serves."""
        deadline = time.monotonic() + wait_s
        healths = {}
        for url in self.urls:
            while True:
                try:
                    healths[url] = json.loads(self.answer(url, *self.call(url, "GET", "/health")))
                    break
                except (ApiError, ValueError) as err:
                    if time.monotonic() > deadline:
                        detail = getattr(err, "detail", None)
                        why = detail.get("reason") if isinstance(detail, dict) else None
                        why = why or getattr(err, "error", err)
                        raise ConfigError(
                            f"backend {url} did not answer GET /health within {wait_s:g} s ({why}); "
                            "is `coalign serve` running there?"
                        ) from None
                    time.sleep(0.25)
        first = self.urls[0]
        for url, h in healths.items():
            if "embed_dim" not in h or "shards" not in h:
                raise ConfigError(
                    f"backend {url} is not a `coalign serve` worker (its /health lacks embed_dim)"
                )
            for key in ("items", "modalities", "embed_dim"):
                if h[key] != healths[first][key]:
                    raise ConfigError(
                        f"backends {first} and {url} serve different indexes ({key}: {healths[first][key]} "
                        f"and {h[key]}); a front merges workers of one sharded index"
                    )
        parts = {u: h["shards"] or {"served": [0], "total": 1} for u, h in healths.items()}
        totals = {p["total"] for p in parts.values()}
        if len(totals) > 1:
            raise ConfigError(f"the backends' indexes have different numbers of parts ({sorted(totals)})")
        (total,) = totals
        owner: dict[int, str] = {}
        for url, p in parts.items():
            for s in p["served"]:
                if s in owner:
                    what = f"part {s} of {total}" if total > 1 else "the whole (unsharded) index"
                    raise ConfigError(
                        f"{what} is served by both {owner[s]} and {url}: its hits would count twice; "
                        "give each worker its own parts (`coalign serve RUN INDEX --shards ...`)"
                    )
                owner[s] = url
        missing = [s for s in range(total) if s not in owner]
        if missing:
            raise ConfigError(
                f"no backend serves parts {missing} of {total}: start a worker with "
                f"`coalign serve RUN INDEX --shards {' '.join(map(str, missing))}` and add it with --backend"
            )
        self.urls.sort(key=lambda u: min(parts[u]["served"]))  # equal scores: lower rows first
        self.health = {
            **{k: healths[first][k] for k in ("items", "modalities", "embed_dim")},
            "shards": None if total == 1 else {"served": list(range(total)), "total": total},
        }
        return self.health


def _multipart(data: bytes, fields: dict[str, str]) -> tuple[bytes, str]:
    """A multipart/form-data body: the upload as `file`, and the given text fields."""
    boundary = uuid.uuid4().hex
    out = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="query"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode(),
        data,
        b"\r\n",
    ]
    for name, value in fields.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.append(value.encode() + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def _quoted(item_id: str) -> str:
    """An id as one path segment ('/' too: ids of folder sources hold it), surrogates kept as bytes."""
    return quote(item_id.encode("utf-8", "surrogatepass"), safe="")


def create_front(backends: Backends, token: str | None = None, limits: Limits | None = None) -> FastAPI:
    """The API of a `coalign serve` worker over `backends` (connected: `Backends.connect` ran)."""
    if not backends.health:
        raise ConfigError("connect the backends first (Backends.connect)")
    limits = limits or Limits()
    token = token or None
    info = backends.health
    modalities = list(info["modalities"])
    EmbedRequest, SearchRequest = schemas.request_models(limits, modalities, int(info["embed_dim"]))
    app = FastAPI(title="coalign search (front)", docs_url=None, redoc_url=None)
    metrics = Metrics()
    install_errors(app)
    as_json = "application/json"
    errors = {**schemas.BAD_CONTENT, **schemas.INVALID, **UPSTREAM}

    @app.get("/health", response_model=Health, responses=UPSTREAM)
    def health():
        backends.every("GET", "/health")  # every worker answers, or the failing one is named
        return {**info, "status": "ok", "auth": bool(token)}

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: {"content": {"text/plain": {}}}})
    def prometheus():
        gauges = {
            "coalign_index_items": ("Items in the search index.", int(info["items"])),
            "coalign_index_embed_dim": ("Embedding dimension of the index.", int(info["embed_dim"])),
            "coalign_front_backends": ("Workers behind this front.", len(backends.urls)),
        }
        return PlainTextResponse(
            metrics.render(gauges), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    def merged(answers: list[dict], k: int, started: float) -> dict[str, Any]:
        hits = merge_hits([a["results"] for a in answers], k)
        return {"results": hits, "took_ms": round((time.perf_counter() - started) * 1e3, 2)}

    @app.post("/embed", response_model=EmbedOne | EmbedMany, responses=errors)
    @takes(req=EmbedRequest)
    def embed(req):
        body = json.dumps(req.model_dump(exclude_none=True)).encode()
        return json.loads(backends.one("POST", "/embed", body, as_json))

    @app.post("/search", response_model=SearchResults, responses={**errors, **schemas.NOT_FOUND})
    @takes(req=SearchRequest)
    def search(req):
        started = time.perf_counter()
        body = json.dumps(req.model_dump(exclude_none=True)).encode()
        return merged(backends.every("POST", "/search", body, as_json), req.k, started)

    @app.post("/search/image", response_model=SearchResults, responses=errors)
    @takes(
        file=Annotated[UploadFile, File(json_schema_extra={"format": "image-file"})],
        k=Annotated[schemas.FormInt, Form(), schemas.form_field({"minimum": 1, "maximum": limits.max_k}, 10)],
        modality=Annotated[Text, Form(), schemas.form_field({"enum": modalities}, None)],
    )
    def search_upload(file, k=10, modality=None):
        started = time.perf_counter()
        fields = {"k": str(k), **({"modality": modality} if modality else {})}
        body, ctype = _multipart(file.file.read(), fields)
        return merged(backends.every("POST", "/search/image", body, ctype), k, started)

    @app.get(
        "/items/{item_id:path}/thumbnail",
        response_class=Response,
        responses={**schemas.PNG, **schemas.NOT_FOUND, **UPSTREAM},
    )
    def thumbnail(item_id: str):
        data = backends.one("GET", f"/items/{_quoted(item_id)}/thumbnail")
        return Response(data, media_type="image/png")

    @app.get("/items/{item_id:path}", response_model=Item, responses={**schemas.NOT_FOUND, **UPSTREAM})
    def item(item_id: str):
        return json.loads(backends.one("GET", f"/items/{_quoted(item_id)}"))

    return finish(app, metrics, token, limits)
