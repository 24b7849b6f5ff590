"""The API's request and response bodies, and the OpenAPI document that describes them truthfully.

Two kinds of refusal, one per status: 422 means the body breaks the published schema (a type, a bound,
"exactly one of"), so every limit the app enforces is written into the schema from the same `Limits`;
400 means content no schema can describe (bytes that are no image, a model without the tower asked for).
The request models are built per app because the bounds (max_k, embed_dim, the index's modalities)
are the app's own. Pydantic checks types strictly (`k: true` is no k); the app checks the limits
itself so that each refusal names the limit (`max_k`, `max_text_chars`, ...).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, WithJsonSchema

if TYPE_CHECKING:
    from collections.abc import Iterable

    from coalign.serve.app import Limits

# A lone surrogate is valid JSON ("\ud800") and Python's JSON reader keeps it, but it is no Unicode
# character: UTF-8 cannot encode it, so the tokenizer, the index's ids and the JSON answer all would fail.
# Refused (not cleaned): a cleaned query would be a different query than the client sent, and the
# client, almost always one that cut a UTF-16 pair in half, is better told.
_SURROGATE = re.compile("[\ud800-\udfff]")
ECHO_CHARS = 64  # the most of a client's string that an error echoes back


def _no_surrogate(value: str) -> str:
    found = _SURROGATE.search(value)
    if found:
        raise ValueError(
            f"holds a lone surrogate (U+{ord(found.group()):04X} at index {found.start()}); "
            "send valid Unicode"
        )
    return value


Text = Annotated[str, AfterValidator(_no_surrogate)]


# Python's whitespace (str.isspace, what str.strip() removes), spelled out: `\S` would mean less in the
# Rust and JavaScript engines that read the schema (they count no \x1c-\x1f as space), and a client
# could then send a text that the schema allows and the app finds blank.
PY_SPACE = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NOT_BLANK = f"[^{PY_SPACE}]"  # literal characters only: every regex engine reads a class of them alike


def _decimal(value: Any) -> Any:
    if isinstance(value, str) and not re.fullmatch("[0-9]+", value):
        raise ValueError("must be written as a decimal integer, such as 10")
    return value


def _whole_number(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer as JSON Schema counts them: 3, or 3.0 (JSON has one number type), never true, 1.5 or "3".
JsonInt = Annotated[StrictInt, BeforeValidator(_whole_number)]

# A form field is text: an integer in one is its decimal digits, not "1.0", " 3", "+3" or "1_0".
FormInt = Annotated[int, BeforeValidator(_decimal)]


def short(value: str) -> str:
    """At most ECHO_CHARS of a client's string, "..." marking a cut, surrogates replaced: an error may
    say what it refused, but never mirrors a 70 KB id back, nor fails to encode it."""
    value = _SURROGATE.sub("\ufffd", value)
    return value if len(value) <= ECHO_CHARS else value[:ECHO_CHARS] + "..."


def encodable(value: Any) -> Any:
    """`value` with every string safe for UTF-8 (surrogates replaced), for bodies built from input."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {encodable(k): encodable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encodable(v) for v in value]
    return value


class ErrorBody(BaseModel):
    """Every error the service sends: a short message and what to fix (a string, a list or an object)."""

    error: str
    detail: Any  # required, may be null


class ShardInfo(BaseModel):
    served: list[int]  # the parts of the sharded index this server searches
    total: int  # how many parts the index has


class Health(BaseModel):
    status: str
    items: int
    modalities: list[str]
    auth: bool
    embed_dim: int
    shards: ShardInfo | None  # None: a single-file index (or exact search)


class EmbedOne(BaseModel):
    modality: str
    embedding: list[float]
    dim: int


class EmbedMany(BaseModel):
    modality: str
    embeddings: list[list[float]]
    dim: int


class Item(BaseModel):
    id: str
    caption: str | None
    labels: dict[str, Any]
    thumbnail: str


class Hit(Item):
    score: float


class SearchResults(BaseModel):
    results: list[Hit]
    took_ms: float


def _exactly_one(fields: Iterable[str]) -> dict[str, Any]:
    """JSON Schema for "exactly one of these fields is given and not null", the app's own rule."""
    return {"oneOf": [{"required": [f], "properties": {f: {"not": {"type": "null"}}}} for f in fields]}


def _at_least_one(fields: Iterable[str]) -> dict[str, Any]:
    """JSON Schema for "at least one of these fields is given and not null"."""
    return {"anyOf": [{"required": [f], "properties": {f: {"not": {"type": "null"}}}} for f in fields]}


QUERY_FIELDS = ("text", "image", "vector", "id", "combined")  # a search names exactly one
PARTS = ("text", "image")  # a combined query has at least one


def _described(tp: Any, **schema: Any) -> Any:
    """`tp` with JSON Schema keywords added to its own schema (inside the non-null branch of an optional
    field), for the schema only: the app checks these limits itself, naming them in its errors."""
    return Annotated[tp, Field(json_schema_extra=schema)]


LabelValue = JsonInt | Text  # a label's value in a search filter


def request_models(limits: Limits, modalities: list[str], embed_dim: int, can_rerank: bool = False):
    """(EmbedRequest, SearchRequest) whose schemas carry this app's limits; `rerank` only where the
    served run can (`can_rerank`: it has an ITM fusion part), so the schema documents what the model does."""
    QueryText = _described(Text, minLength=1, maxLength=limits.max_text_chars, pattern=NOT_BLANK)
    # "base64-image": base64 of an image file, or a data: URL; that it decodes is checked (400).
    Image64 = _described(Text, format="base64-image")
    K = _described(JsonInt, minimum=1, maximum=limits.max_k)

    class EmbedRequest(BaseModel):
        model_config = ConfigDict(
            extra="forbid", strict=True, json_schema_extra=_exactly_one(("text", "texts", "image"))
        )
        text: QueryText | None = None
        texts: _described(list[QueryText], minItems=1, maxItems=limits.max_batch) | None = None
        image: Image64 | None = None

    # Not all zero: a zero vector has no direction to search by.
    Vector = _described(
        list[float], minItems=embed_dim, maxItems=embed_dim, **{"not": {"items": {"const": 0}}}
    )

    # A part's weight in a combined query: > 0 (a part that should not count is left out), any size:
    # only the ratio of the two matters.
    Weight = _described(float, exclusiveMinimum=0)

    class Combined(BaseModel):
        """A text and an image as one query (composed retrieval: "this picture, but red"): the weighted
        sum of their normalised embeddings, or with "product" their elementwise product (Symile)."""

        model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_at_least_one(PARTS))
        text: QueryText | None = None
        image: Image64 | None = None
        weights: _described(list[Weight], minItems=2, maxItems=2) = [0.5, 0.5]  # (text, image)
        combine: Literal["sum", "product"] = "sum"

    class SearchRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_exactly_one(QUERY_FIELDS))
        text: QueryText | None = None
        image: Image64 | None = None
        vector: Vector | None = None
        id: Text | None = None
        combined: Combined | None = None
        k: K = 10
        # Which index to search; default "image" when there is one. An unknown name answers 400.
        modality: _described(Text, enum=modalities) | None = None
        # Only items whose labels match: {"shape": 2, "color": [0, 3]}; an unknown label answers 400.
        filter: (
            _described(
                dict[Text, LabelValue | _described(list[LabelValue], minItems=1, maxItems=100)],
                minProperties=1,
                maxProperties=16,
            )
            | None
        ) = None
        if can_rerank:  # re-rank the top `rerank` hits by the run's image-text matching head (text queries)
            rerank: K | None = None

    return EmbedRequest, SearchRequest


def form_field(schema: dict[str, Any], default: Any) -> WithJsonSchema:
    """The schema of an optional form field, an enum of strings or integer bounds, that also allows ""
    for the default (FastAPI's reading of an empty field)."""
    if "enum" in schema:  # one enum, not anyOf: schemathesis would take "" for a breach of the first branch
        doc: dict[str, Any] = {"type": "string", "enum": [*schema["enum"], ""]}
    else:
        doc = {"anyOf": [{"type": "integer", **schema}, {"const": ""}]}
    if default is not None:
        doc["default"] = default
    return WithJsonSchema(doc)


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "model": ErrorBody}


# What each route may answer besides 200, for FastAPI's `responses=`.
BAD_CONTENT = {
    400: _error("content the schema cannot judge: an undecodable image, an unknown modality or filter label")
}
INVALID = {422: _error("the request breaks this schema: a type, a bound, exactly one query field")}
NOT_FOUND = {404: _error("no such item, or the item has no stored image")}
PNG = {200: {"description": "the thumbnail", "content": {"image/png": {}}}}


def document_guard(openapi: dict[str, Any], *, token: bool, is_open) -> dict[str, Any]:
    """Add to `openapi` what the Guard middleware answers, which FastAPI cannot see: 500 everywhere,
    400 (bad Content-Length) and 413 on routes that take a body, and with a token, the bearer scheme
    and 401 on every route `is_open(path)` leaves guarded. FastAPI's own 422 body, never sent here
    (the app answers ErrorBody), is replaced by ErrorBody."""
    ref = {"$ref": "#/components/schemas/ErrorBody"}
    body = {"application/json": {"schema": ref}}
    components = openapi.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    if token:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, ops in openapi.get("paths", {}).items():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            if "422" in responses and "HTTPValidationError" in str(responses["422"]):
                responses["422"] = {"description": INVALID[422]["description"], "content": body}
            responses.setdefault(
                "500", {"description": "the server failed; its log has why", "content": body}
            )
            if "requestBody" in op:
                responses.setdefault("400", {"description": "an invalid Content-Length", "content": body})
                responses.setdefault(
                    "413", {"description": "the body exceeds max_body_bytes", "content": body}
                )
            if token and not is_open(path):
                op["security"] = [{"bearer": []}]
                responses["401"] = {
                    "description": "no or a wrong bearer token",
                    "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
                    "content": body,
                }
            op["responses"] = dict(sorted(responses.items()))
    return openapi
