"""The HTTP API over a `SearchIndex`: embed, search (by text, image, vector or item id), item metadata
and thumbnails, health, Prometheus metrics, and the static search page.

The app talks to the index only through the SearchIndex interface (coalign.search.query), so the tests
run it over a small fake index. One ASGI middleware guards every request, outermost first: a catch-all
that turns any crash into a JSON 500 (the process never dies on a request) and records metrics, the
optional bearer token, and the body size limit (see coalign.serve.guard).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from coalign.data.sources.base import SampleError
from coalign.registry import ConfigError
from coalign.search.combine import combine_vectors
from coalign.serve import schemas
from coalign.serve.bodies import ApiError, check_image, decode_base64, hit_json, only_one, takes
from coalign.serve.caption import add_caption_route
from coalign.serve.guard import Guard, error_response, is_open
from coalign.serve.metrics import Metrics
from coalign.serve.schemas import EmbedMany, EmbedOne, Health, Item, SearchResults, Text, short

if TYPE_CHECKING:
    from coalign.search.query import SearchIndex

STATIC = Path(__file__).parent / "static"


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 5 * 1024 * 1024
    max_text_chars: int = 1000
    max_k: int = 100
    max_batch: int = 64
    max_image_pixels: int = 25_000_000  # a 5 MB PNG can hold a decompression bomb; refuse before decoding

    def __post_init__(self):
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")


def create_app(index: SearchIndex, token: str | None = None, limits: Limits | None = None) -> FastAPI:
    """The API over `index`. With `token`, every route but /health and the page needs the bearer token."""
    limits = limits or Limits()
    token = token or None  # an empty token would let "Bearer " in: treat it as no token
    app = FastAPI(title="coalign search", docs_url=None, redoc_url=None)
    from coalign.search.rerank import supports_rerank

    EmbedRequest, SearchRequest = schemas.request_models(
        limits, list(index.modalities), int(index.embed_dim), can_rerank=supports_rerank(index)
    )
    metrics = Metrics()
    # One encode or search at a time: on CPU, parallel requests would only fight over the same cores, and
    # the app stays safe over any object with the SearchIndex methods, thread-safe or not (the tests' fake).
    model_lock = threading.Lock()

    def check_text(text: str) -> None:
        if not text.strip():
            raise ApiError(422, "text is empty", "send a non-empty query")
        if len(text) > limits.max_text_chars:
            detail = {"limit": "max_text_chars", "max_text_chars": limits.max_text_chars, "got": len(text)}
            raise ApiError(422, "text too long", detail)

    def encode_texts(texts: list[str]) -> np.ndarray:
        for t in texts:
            check_text(t)
        try:
            with model_lock:
                return np.asarray(index.encode_text(texts), dtype=np.float32)
        except ConfigError as err:  # the model has no text tower
            raise ApiError(400, "this index cannot encode text", str(err)) from None

    def encode_image(image: bytes | Path) -> np.ndarray:
        if isinstance(image, bytes):
            check_image(image, limits)
        try:
            with model_lock:
                return np.asarray(index.encode_image([image]), dtype=np.float32)
        except (SampleError, Image.DecompressionBombError) as err:
            raise ApiError(400, "undecodable image", str(err)) from None
        except ConfigError as err:  # the model has no image tower
            raise ApiError(400, "this index cannot encode images", str(err)) from None

    def target_modality(modality: str | None) -> str:
        valid = list(index.modalities)
        if modality is None:
            return "image" if "image" in valid else valid[0]
        if modality not in valid:
            raise ApiError(400, f"unknown modality '{short(modality)}'", {"valid": valid})
        return modality

    def check_k(k: int) -> None:
        if not 1 <= k <= limits.max_k:
            raise ApiError(
                422, "k out of range", {"limit": "max_k", "min": 1, "max_k": limits.max_k, "got": k}
            )

    def check_filter(flt: dict | None) -> None:
        """The filter limits the schema documents (pydantic checks the types, not the sizes)."""
        if flt is not None and (
            not 1 <= len(flt) <= 16
            or any(isinstance(v, list) and not 1 <= len(v) <= 100 for v in flt.values())
        ):
            detail = {"labels": "1 to 16", "values per label": "1 to 100"}
            raise ApiError(
                422, "filter must name 1 to 16 labels, each with a value or 1 to 100 values", detail
            )

    def run_search(
        vectors: np.ndarray,
        k: int,
        modality: str,
        started: float,
        filter: dict | None = None,
        rerank: tuple[str, int] | None = None,
    ) -> dict[str, Any]:
        # The filter goes to the index only when given: any object with the SearchIndex methods serves.
        extra = {} if filter is None else {"filter": filter}
        with model_lock:
            try:
                hits = index.search(vectors, max(k, rerank[1] if rerank else 0), modality, **extra)[0]
            except ConfigError:  # a label no item has: the (schema-valid) filter matches nothing
                hits = []
            if rerank is not None:  # (query text, how many hits): ITM re-ranking, search/rerank.py
                from coalign.search.rerank import rerank_hits

                hits = rerank_hits(index, rerank[0], hits, rerank[1], modality)[:k]
        return {
            "results": [hit_json(h) for h in hits],
            "took_ms": round((time.perf_counter() - started) * 1e3, 2),
        }

    def item_vector(item_id: str) -> np.ndarray:
        if index.item(item_id) is None:
            raise ApiError(404, "unknown item", {"id": short(item_id)})
        thumb = index.thumbnail_path(item_id)
        if thumb is None:  # 404 like the thumbnail route: the request is fine, the image does not exist
            raise ApiError(404, "item has no stored image to search by", {"id": short(item_id)})
        return encode_image(thumb)

    def combined_vector(c) -> np.ndarray:
        """A text and an image as one query (coalign.search.query.combine_vectors); the schema's rules
        (at least one part, weights > 0) checked here too, each refusal naming its rule."""
        if c.text is None and c.image is None:
            raise ApiError(422, "a combined query needs a text, an image or both", {"given": []})
        if len(c.weights) != 2 or not all(math.isfinite(w) and w > 0 for w in c.weights):
            raise ApiError(422, "weights must be 2 numbers > 0 (text, image)", {"got": c.weights})
        parts, weights = [], []
        if c.text is not None:
            parts.append(encode_texts([c.text])[0])
            weights.append(c.weights[0])
        if c.image is not None:
            parts.append(encode_image(decode_base64(c.image))[0])
            weights.append(c.weights[1])
        try:
            return combine_vectors(parts, weights, c.combine)
        except ConfigError as err:  # a product of embeddings that is zero: no direction to search by
            raise ApiError(400, "cannot combine these parts", str(err)) from None

    install_errors(app)
    # Which parts of a sharded index this server searches: what a front checks before it merges workers.
    shards = index.shard_info() if hasattr(index, "shard_info") else None

    @app.get("/health", response_model=Health)
    def health():
        return {
            "status": "ok",
            "items": len(index),
            "modalities": list(index.modalities),
            "auth": bool(token),
            "embed_dim": int(index.embed_dim),
            "shards": shards,
        }

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: {"content": {"text/plain": {}}}})
    def prometheus():
        gauges = {
            "coalign_index_items": ("Items in the search index.", len(index)),
            "coalign_index_embed_dim": ("Embedding dimension of the index.", int(index.embed_dim)),
        }
        return PlainTextResponse(
            metrics.render(gauges), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    errors = {**schemas.BAD_CONTENT, **schemas.INVALID}

    @app.post("/embed", response_model=EmbedOne | EmbedMany, responses=errors)
    @takes(req=EmbedRequest)
    def embed(req):
        field = only_one(req, ("text", "texts", "image"))
        if field == "texts":
            if not 1 <= len(req.texts) <= limits.max_batch:
                detail = {"limit": "max_batch", "max_batch": limits.max_batch, "got": len(req.texts)}
                raise ApiError(422, "texts must hold 1 to max_batch items", detail)
            emb = encode_texts(req.texts)
            return {"modality": "text", "embeddings": emb.tolist(), "dim": int(emb.shape[1])}
        emb = encode_texts([req.text]) if field == "text" else encode_image(decode_base64(req.image))
        return {
            "modality": "text" if field == "text" else "image",
            "embedding": emb[0].tolist(),
            "dim": int(emb.shape[1]),
        }

    @app.post("/search", response_model=SearchResults, responses={**errors, **schemas.NOT_FOUND})
    @takes(req=SearchRequest)
    def search(req):
        started = time.perf_counter()
        field = only_one(req, schemas.QUERY_FIELDS)
        check_k(req.k)
        check_filter(req.filter)
        modality = target_modality(req.modality)
        if getattr(req, "rerank", None) is not None:
            from coalign.search.rerank import check_rerank

            check_k(req.rerank)
            try:
                with model_lock:
                    check_rerank(index, req.rerank, modality, field == "text")
            except ConfigError as err:
                raise ApiError(400, "cannot rerank", str(err)) from None
        if field == "text":
            vectors = encode_texts([req.text])
        elif field == "image":
            vectors = encode_image(decode_base64(req.image))
        elif field == "id":
            vectors = item_vector(req.id)
        elif field == "combined":
            vectors = combined_vector(req.combined)
        else:
            vec = np.asarray(req.vector, dtype=np.float64)[None]
            # Scaled by its largest entry first, so that neither 1e-320 nor 1e308 under- or overflows
            # in the squares: every finite, non-zero vector has a direction to search by.
            peak = float(np.abs(vec).max(initial=0.0)) if np.isfinite(vec).all() else math.nan
            if vec.shape[1] != index.embed_dim or not 0 < peak < math.inf:
                detail = {"embed_dim": int(index.embed_dim), "got": int(vec.shape[1])}
                raise ApiError(422, "vector must hold embed_dim finite numbers, not all zero", detail)
            vec = vec / peak
            vectors = (vec / np.linalg.norm(vec)).astype(np.float32)  # unit vectors: scores are cosines
        rerank = (req.text, req.rerank) if getattr(req, "rerank", None) is not None else None
        return run_search(vectors, req.k, modality, started, req.filter, rerank)

    @app.post("/search/image", response_model=SearchResults, responses=errors)
    @takes(
        # "image-file": the bytes of an image file; that they decode is checked (400).
        file=Annotated[UploadFile, File(json_schema_extra={"format": "image-file"})],
        # A form has no null, and FastAPI reads an empty field as absent: "" is documented as the default.
        k=Annotated[schemas.FormInt, Form(), schemas.form_field({"minimum": 1, "maximum": limits.max_k}, 10)],
        modality=Annotated[Text, Form(), schemas.form_field({"enum": list(index.modalities)}, None)],
    )
    def search_upload(file, k=10, modality=None):
        started = time.perf_counter()
        check_k(k)
        modality = target_modality(modality)
        return run_search(encode_image(file.file.read()), k, modality, started)

    # The thumbnail route comes first: ids may contain '/' (image-folder ids are relative paths).
    @app.get(
        "/items/{item_id:path}/thumbnail",
        response_class=Response,
        responses={**schemas.PNG, **schemas.NOT_FOUND},
    )
    def thumbnail(item_id: str):
        # Only a known id, and only the file the index names for it (always inside the index folder).
        path = index.thumbnail_path(item_id) if index.item(item_id) is not None else None
        root = getattr(index, "index_dir", None)  # belt and braces: the index already promises this
        if (
            root is not None
            and path is not None
            and not Path(path).resolve().is_relative_to(Path(root).resolve())
        ):
            path = None
        if path is None or not Path(path).is_file():
            raise ApiError(404, "no thumbnail for this item", {"id": short(item_id)})
        return FileResponse(path, media_type="image/png")

    @app.get("/items/{item_id:path}", response_model=Item, responses=schemas.NOT_FOUND)
    def item(item_id: str):
        hit = index.item(item_id)
        if hit is None:
            raise ApiError(404, "unknown item", {"id": short(item_id)})
        out = hit_json(hit)
        del out["score"]  # a score means nothing here; `path` is never sent: server paths stay private
        return out

    add_caption_route(app, index, limits, model_lock)  # POST /caption, when the run has a caption decoder
    return finish(app, metrics, token, limits)


def install_errors(app: FastAPI) -> None:
    """Every refusal as ErrorBody JSON: the app's own, FastAPI's validation and Starlette's 404 / 405."""

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return error_response(err.status, err.error, err.detail)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err: RequestValidationError):
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in err.errors()]
        return error_response(422, "invalid request", detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err: StarletteHTTPException):
        return error_response(err.status_code, str(err.detail), None, headers=getattr(err, "headers", None))

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")


def finish(app: FastAPI, metrics: Metrics, token: str | None, limits: Limits) -> FastAPI:
    """The OpenAPI document with what the Guard answers, the static files, and the Guard itself."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = schemas.document_guard(doc, token=bool(token), is_open=is_open)
        return app.openapi_schema

    app.openapi = openapi
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(
        Guard, routes=app.router.routes, metrics=metrics, token=token, max_body_bytes=limits.max_body_bytes
    )
    return app
