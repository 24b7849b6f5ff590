"""What the routes of a server (coalign.serve.app) and of a front (coalign.serve.front) share about
bodies: the refusal they raise, decoding and checking a client's image, a hit as JSON, "exactly one of"
these fields, and route annotations built per app."""

from __future__ import annotations

import base64
import binascii
import io
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np
from PIL import Image
from pydantic import BaseModel

if TYPE_CHECKING:
    from coalign.search.query import Hit
    from coalign.serve.app import Limits


class ApiError(Exception):
    """An answer to a bad request: `status`, a short `error` and a `detail` naming what to fix."""

    def __init__(self, status: int, error: str, detail: Any = None):
        super().__init__(error)
        self.status, self.error, self.detail = status, error, detail


def decode_base64(value: str) -> bytes:
    if value.startswith("data:"):  # data:image/png;base64,....
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            400, "image is not valid base64", "send the image file's bytes base64-encoded"
        ) from None


def check_image(data: bytes, limits: Limits) -> None:
    """Refuse undecodable or oversized images from the header alone, before anything decodes pixels."""
    if not data:
        raise ApiError(400, "undecodable image", "the image is empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Exception as err:  # PIL raises many types for garbage; all mean the same to a client
        raise ApiError(400, "undecodable image", f"not an image file PIL can read ({err})") from None
    if w * h > limits.max_image_pixels:
        detail = {"limit": "max_image_pixels", "max_image_pixels": limits.max_image_pixels, "got": w * h}
        raise ApiError(413, "image too large", detail)


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def thumbnail_url(item_id: str) -> str:
    return f"/items/{quote(item_id, safe='')}/thumbnail"


def hit_json(hit: Hit) -> dict[str, Any]:
    return {
        "id": hit.id,
        "score": float(hit.score),
        "caption": hit.caption,
        "labels": jsonable(hit.labels or {}),
        "thumbnail": thumbnail_url(hit.id),
    }


def only_one(req: BaseModel, fields: tuple[str, ...]) -> str:
    given = [f for f in fields if getattr(req, f) is not None]
    if len(given) != 1:
        raise ApiError(422, f"give exactly one of: {', '.join(fields)}", {"given": given})
    return given[0]


def takes(**types):
    """Give a route's parameters these annotations: types built for this app (they carry its limits),
    which the module's string annotations could not name."""

    def mark(fn):
        fn.__annotations__.update(types)
        return fn

    return mark
