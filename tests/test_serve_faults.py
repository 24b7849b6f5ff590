"""Fault injection against the HTTP API (issue #10, point 7): input a client can send but should not,
each answered with a JSON 4xx that names the field and never a 500; metrics whose label set stays
bounded whatever methods and paths arrive; error bodies that never echo an unbounded input; and an
OpenAPI schema that tells the truth, checked by schemathesis against the served app."""

from __future__ import annotations

import random
import re
import string

import pytest
from fastapi.testclient import TestClient

from coalign.serve.app import create_app
from test_serve_api import DIM, FakeIndex, assert_error

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"content-type": "application/json", **AUTH}


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> FakeIndex:
    return FakeIndex(tmp_path_factory.mktemp("fake_index"))


@pytest.fixture
def client(index) -> TestClient:
    return TestClient(create_app(index, token=TOKEN), raise_server_exceptions=False)


# A lone surrogate is valid JSON text ("\ud800") but no Unicode string: Python's JSON reader lets it
# through, and UTF-8 (the tokenizer, the index's Parquet ids, the JSON answer) cannot encode it.
SURROGATE = [
    ("/search", r'{"text": "a \ud800 b"}', "text"),
    ("/search", r'{"text": "\udfff"}', "text"),
    ("/search", r'{"id": "item-\ud800"}', "id"),
    ("/search", r'{"text": "a", "modality": "\ud800"}', "modality"),
    ("/search", r'{"image": "\ud800"}', "image"),
    ("/embed", r'{"text": "\ud800"}', "text"),
    ("/embed", r'{"texts": ["fine", "\ud800"]}', "texts"),
]


@pytest.mark.parametrize(("path", "body", "field"), SURROGATE, ids=[f"{p}:{f}" for p, _, f in SURROGATE])
def test_a_lone_surrogate_is_refused_naming_the_field(client, path, body, field):
    detail = assert_error(client.post(path, content=body, headers=JSON), 422, "surrogate")["detail"]
    assert any(d["loc"][:2] == ["body", field] for d in detail), detail
    assert client.post("/search", json={"text": "a red circle"}, headers=AUTH).status_code == 200


def test_a_lone_surrogate_in_a_path_or_form_is_no_500(client):
    r = client.get("/items/%ED%A0%80", headers=AUTH)  # the UTF-8 bytes of U+D800: not UTF-8
    assert_error(r, 404)
    # A form field holding those bytes (the test client cannot encode a surrogate itself).
    body = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n\r\n\x89PNG\r\n'
        b'--b\r\nContent-Disposition: form-data; name="modality"\r\n\r\n\xed\xa0\x80\r\n--b--\r\n'
    )
    headers = {"content-type": "multipart/form-data; boundary=b", **AUTH}
    r = client.post("/search/image", content=body, headers=headers)
    assert r.status_code in (400, 422), r.text


def _label_lines(client) -> set[str]:
    text = client.get("/metrics", headers=AUTH).text
    return {line.rpartition(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_metrics_labels_stay_bounded_whatever_methods_and_paths_arrive(client):
    rng = random.Random(0)
    word = lambda n: "".join(rng.choices(string.ascii_letters, k=n))  # noqa: E731
    junk = [(word(8).upper(), "/" + word(12)) for _ in range(300)]

    def send(method, path):  # unauthenticated (401), then with the token: 405 and 404
        client.request(method, path)
        client.request(method, "/items/" + word(30))
        client.request(method, "/search", headers=AUTH)
        client.request("GET", path, headers=AUTH)

    for method, path in junk[:5]:
        send(method, path)
    _label_lines(client)  # /metrics counts itself from its second call on
    before = _label_lines(client)
    for method, path in junk[5:]:
        send(method, path)
    after = _label_lines(client)
    assert after == before, sorted(after - before)[:5]
    methods = {m for line in after for m in re.findall(r'method="([^"]*)"', line)}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}, methods
    assert 'coalign_http_requests_total{method="other",route="/search",status="405"}' in after


def test_a_404_does_not_echo_a_long_id(client):
    long_id = "x" * 70_000
    for r in (
        client.post("/search", json={"id": long_id}, headers=AUTH),
        client.get("/items/" + long_id[:60_000], headers=AUTH),  # the test client refuses longer URLs
        client.get(f"/items/{long_id[:60_000]}/thumbnail", headers=AUTH),
    ):
        body = assert_error(r, 404)
        assert len(r.content) < 300, len(r.content)
        assert body["detail"]["id"] == "x" * 64 + "...", body["detail"]
    assert assert_error(client.post("/search", json={"id": "short"}, headers=AUTH), 404)["detail"] == {
        "id": "short"
    }
    huge = {"text": "a", "modality": "m" * 100_000}  # nor a long unknown modality
    assert len(assert_error(client.post("/search", json=huge, headers=AUTH), 400, "valid").get("error")) < 120


@pytest.mark.parametrize("k", [True, False, 1.5, "3", [3], None])
def test_k_must_be_a_strict_integer(client, k):
    assert_error(client.post("/search", json={"text": "a", "k": k}, headers=AUTH), 422, "k")


def test_k_may_be_written_3_0_as_json_schema_counts_integers(client):
    r = client.post("/search", json={"text": "a", "k": 3.0}, headers=AUTH)
    assert r.status_code == 200 and len(r.json()["results"]) == 3


def test_k_in_an_upload_form_must_be_an_integer(client):
    upload = {"file": ("q.png", b"\x89PNG", "image/png")}
    for k in ("true", "1.5", "1.0", " 3", "+3", "1_0", "3x"):
        assert_error(client.post("/search/image", files=upload, data={"k": k}, headers=AUTH), 422, "k")


def test_vectors_the_schema_allows_are_searched(client):
    # Any finite, non-zero vector of embed_dim numbers is valid; a tiny or a huge one must not be
    # refused because its squared norm under- or overflows.
    for scale in (5e-324, 1e-200, 1e200, 1.7e308):
        vector = [scale] + [0.0] * (DIM - 1)
        r = client.post("/search", json={"vector": vector, "k": 1}, headers=AUTH)
        assert r.status_code == 200, (scale, r.text)
    for bad in ([True] * DIM, ["1"] * DIM):
        assert_error(client.post("/search", json={"vector": bad}, headers=AUTH), 422)


ERROR_CODES = {"400", "401", "404", "413", "422"}


def test_openapi_documents_the_errors_every_route_really_returns(client):
    doc = client.get("/openapi.json", headers=AUTH).json()
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas  # FastAPI's default 422 body, which this API never sends
    assert set(schemas["ErrorBody"]["required"]) == {"error", "detail"}
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            want = {"401", "500"} | ({"400", "413", "422"} if method == "post" else set())
            if path.startswith("/items/"):
                want |= {"404"}
            if path != "/health":
                assert op["security"] == [{"bearer": []}], (method, path)
            else:
                want -= {"401"}
            assert want <= codes, (method, path, want - codes)
            for code in codes & (ERROR_CODES | {"500"}):
                ref = op["responses"][code]["content"]["application/json"]["schema"]["$ref"]
                assert ref == "#/components/schemas/ErrorBody", (method, path, code)
    search = schemas["SearchRequest"]["properties"]["k"]
    assert (search["type"], search["minimum"], search["maximum"]) == ("integer", 1, 100)
    png = doc["paths"]["/items/{item_id}/thumbnail"]["get"]["responses"]["200"]["content"]
    assert list(png) == ["image/png"]


# ------------------------------------------------------------------------------------- schemathesis


def _pngs() -> list[bytes]:
    from test_serve_api import _png

    return [_png((40 * i, 255 - 40 * i, 90), size=4 + 4 * i) for i in range(4)]


@pytest.fixture(scope="module")
def api_schema(real_index):
    """The served OpenAPI of an app over a small world index, with the token. The schema's own image
    formats get real images: that garbage bytes answer 400 is what the unit tests above check."""
    import base64

    schemathesis = pytest.importorskip("schemathesis")  # a test extra; the tests above need none
    from hypothesis import strategies as st

    pngs = _pngs()
    b64 = [base64.b64encode(p).decode() for p in pngs]
    schemathesis.openapi.format("base64-image", st.sampled_from(b64 + ["data:image/png;base64," + b64[0]]))
    schemathesis.openapi.format("image-file", st.sampled_from(pngs))
    app = create_app(real_index, token=TOKEN)
    return schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH)


EXAMPLES = 50  # per operation and mode: at most 7 operations x 2 modes x 50 = 700 requests


@pytest.mark.slow
def test_schemathesis_finds_no_5xx_and_no_schema_violation(api_schema):
    """Every operation, positive and negative data, all of schemathesis' default checks: no 5xx,
    status codes, content types, bodies and headers as documented, valid data accepted, invalid data
    rejected, the token not ignored. (Driven through `as_strategy` because `schema.parametrize()`
    with a fixture-built schema fails under pytest 9 in schemathesis 4.32.)"""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import negative_data_rejection
    from schemathesis.generation.feedback import NO_FEEDBACK

    failures, ran, untokened = [], [], []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            # No feedback: schemathesis would plant strings taken from the schema's own text into
            # every string field, whatever its format, and an image field would get "schemas".
            @given(case=operation.as_strategy(generation_mode=mode, feedback=NO_FEEDBACK))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                derandomize=True,  # the same cases every run
                database=None,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate],
            )
            def check(case):
                ran.append(operation.label)  # noqa: B023 (called within this iteration)
                # A negative case may leave the token out (the bearer scheme is required): sent as
                # generated it must be refused; sent again with our token, whatever else it breaks
                # may or may not remain, so that send is checked for everything but "refused".
                if mode == GenerationMode.NEGATIVE and "Authorization" not in (case.headers or {}):  # noqa: B023
                    untokened.append(operation.label)  # noqa: B023
                    case.call_and_validate()
                    case.call_and_validate(headers=AUTH, excluded_checks=[negative_data_rejection])
                else:
                    case.call_and_validate(headers=AUTH)

            try:
                check()
            except Unsatisfiable:  # no input to break: GET /health, /metrics take none
                assert mode == GenerationMode.NEGATIVE, operation.label
            except (Exception, BaseExceptionGroup) as err:  # collect all: every operation's failures
                failures.append(f"{operation.label} [{mode.value}]: {err}")
    print(f"schemathesis: {len(ran)} cases, {len(set(ran))} operations, {len(untokened)} without the token")
    assert len(set(ran)) == 7
    assert not failures, "\n\n".join(failures)


def test_blank_means_the_same_to_the_schema_and_to_the_app(client):
    doc = client.get("/openapi.json", headers=AUTH).json()
    pattern = doc["components"]["schemas"]["SearchRequest"]["properties"]["text"]["anyOf"][0]["pattern"]
    for text in ("\x1c", "\u3000 \t", "\x85", "a", " \x1fb"):
        r = client.post("/search", json={"text": text}, headers=AUTH)
        assert (r.status_code == 200) == bool(re.search(pattern, text)) == bool(text.strip()), (text, r.text)
