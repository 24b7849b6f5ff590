"""The one ASGI middleware in front of every route, outermost first: a catch-all that turns any crash
into a JSON 500 (the process never dies on a request) and records metrics; the optional bearer token;
and the body size limit, enforced on the bytes actually read before any route sees the body."""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from fastapi.responses import JSONResponse

from coalign.serve.metrics import Metrics, route_label
from coalign.serve.schemas import encodable

log = logging.getLogger("coalign.serve")
# Routes that carry no index data: open even when a token is set, so the page can load and ask for it.
OPEN_PATHS = ("/", "/health")
OPEN_PREFIX = "/static/"


def is_open(path: str) -> bool:
    """Whether `path` is served without the token."""
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIX)


def error_response(status: int, error: str, detail: Any = None, headers=None) -> JSONResponse:
    """Every error the service sends has this shape: {"error": short message, "detail": what to fix}.
    Strings that came from the request may hold lone surrogates, which UTF-8 cannot encode: replaced."""
    body = encodable({"error": error, "detail": detail})
    return JSONResponse(body, status_code=status, headers=headers)


class Guard:
    """Pure ASGI middleware: catch-all + metrics, then bearer token, then body size."""

    def __init__(self, app, *, routes, metrics: Metrics, token: str | None, max_body_bytes: int):
        self.app, self.routes, self.metrics, self.token = app, routes, metrics, token
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, label = time.perf_counter(), route_label(self.routes, scope)
        state = {"status": 500, "started": False}

        async def send_tracked(message):
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
            await send(message)

        try:
            reject = self._check_token(scope)
            if reject is None:
                reject, receive = await self._buffer_body(scope, receive)
            if reject is not None:
                await reject(scope, receive, send_tracked)
            elif receive is not None:
                await self.app(scope, receive, send_tracked)
            else:
                state["status"] = 499  # the client went away while sending its body
        except Exception:
            log.exception("request %s %s failed", scope.get("method"), scope.get("path"))
            if not state["started"]:
                detail = "the server failed on this request; its log has the traceback"
                await error_response(500, "internal error", detail)(scope, receive, send_tracked)
            state["status"] = 500
        finally:
            self.metrics.observe(scope.get("method", ""), label, state["status"], time.perf_counter() - start)

    def _check_token(self, scope):
        path = scope["path"]
        if self.token is None or is_open(path):
            return None
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, value = given.partition(" ")
        # compare_digest: the time taken must not tell how much of a guessed token was right.
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token.encode()):
            return None
        return error_response(
            401,
            "unauthorized",
            "send the header 'Authorization: Bearer <token>' with the server's token",
            headers={"WWW-Authenticate": "Bearer"},
        )

    async def _buffer_body(self, scope, receive):
        """Read the whole body (at most max_body_bytes) before the app runs, so that neither a false
        Content-Length nor a chunked upload can push more than the limit into the process."""
        limit = self.max_body_bytes
        too_big = error_response(
            413, "request body too large", {"limit": "max_body_bytes", "max_body_bytes": limit}
        )
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                if int(length) > limit:
                    return too_big, receive
            except ValueError:
                return error_response(400, "invalid Content-Length header", length.decode("latin-1")), receive
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return None, receive
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return too_big, receive
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return None, replay
