"""Schemathesis over ``/openapi.json``: every customer and admin operation, fuzzed against the
gateway under uvicorn on the sandbox catalog, on SQLite and PostgreSQL, with valid credentials
(a real account with balance and its key; the admin token) so requests get past
authentication.

Both valid requests (positive) and requests that break the document (negative) are
generated. Checks for every one: no 5xx; the status is one the document declares; the body
matches the declared schema and content type; every error is exactly
``{"error": {"type", "code", "message", "param", "request_id"}}`` with the ``X-Request-Id``
header's id (Anthropic's shape on /v1/messages);
and, once fuzzing is over, the ledger verifies and no hold is left open.

Some cases are steered to things that exist (a catalog model or API path, the fuzzing
account, one of its records, a spare key), so requests get past "not found" too.

``make test`` runs a few derandomized examples per operation; ``make stress`` (marker
``stress``) runs ``TOLLWAY_STRESS_EXAMPLES`` (default 300) random ones per operation and, with
``TOLLWAY_FUZZ_REPORT=FILE``, appends one JSON line per operation and backend (requests,
statuses, seconds) for ``scripts/fuzz-summary``.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fake_stripe import FakeStripe, stripe_env
from fakes import (
    ADMIN_TOKEN,
    GATEWAY_ENV,
    IGNORE_TOKENIZER_WARNING,
    Serving,
    Tollway,
)
from tollway.api.openapi import SPEC

pytestmark = pytest.mark.filterwarnings(IGNORE_TOKENIZER_WARNING)

CATALOG = Path(__file__).resolve().parents[2] / "examples" / "catalog.yaml"
FAST_EXAMPLES = 8
STRESS_EXAMPLES = int(os.environ.get("TOLLWAY_STRESS_EXAMPLES", "300"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]

SCHEMA = schemathesis.openapi.from_dict(SPEC)
#: Revoking runs last: it may revoke the fuzzing key (a valid outcome, but every later
#: customer request would then only see 401).
#: The JSON API only: the web console's HTML pages (tag ``pages``: forms posted with a CSRF
#: token, answered with redirects) are not fuzzed yet (see SECURITY.md).
OPERATIONS = sorted((op for op in (result.ok() for result in SCHEMA.get_all_operations())
                     if "pages" not in (op.definition.raw.get("tags") or [])),
                    key=lambda op: ("revoke" in op.path, op.path, op.method))
LABELS = [op.label for op in OPERATIONS]
#: Generated model ids and API paths rarely name a catalog item; a drawn number steers some
#: cases to the sandbox catalog's, so requests reach the upstream and get billed too.
MODELS = {"/v1/chat/completions": ["sandbox-chat", "sandbox-reasoner", "sandbox-claude"],
          "/v1/completions": ["sandbox-chat", "sandbox-reasoner", "sandbox-claude"],
          "/v1/embeddings": ["sandbox-embed", "sandbox-embed", "sandbox-chat"],
          "/v1/messages": ["sandbox-claude", "sandbox-claude", "sandbox-chat"],
          "/v1/responses": ["sandbox-chat", "sandbox-reasoner", "sandbox-claude"],
          "/v1/images/generations": ["sandbox-image", "sandbox-image", "sandbox-chat"]}
API_PATHS = ["search/web", "finance/quote/AAPL", "scholar/search"]


@dataclass(frozen=True)
class Targets:
    """Real things for path parameters to name: the fuzzing account (by id and by name), one
    of its usage records, and a spare key of it (revoking that one leaves the fuzzing key
    alone)."""

    accounts: tuple[str, str]
    request_id: str
    spare_key_id: int
    #: an unused redemption code (redeeming it is a valid outcome) and its id
    code: str
    code_id: int


def steer(case: schemathesis.Case, choice: int, targets: Targets) -> None:
    """Point some cases at the sandbox catalog and at things that exist."""
    if not choice:
        return
    if case.operation.path in MODELS:
        if isinstance(case.body, dict):
            case.body["model"] = MODELS[case.operation.path][choice - 1]
        return
    if case.operation.path == "/v1/billing/redeem" and isinstance(case.body, dict):
        case.body["code"] = targets.code
        return
    params = case.path_parameters
    if params is None:
        return
    if "path" in params:
        params["path"] = API_PATHS[choice - 1]
    if "account" in params and choice < 3:
        params["account"] = targets.accounts[choice - 1]
    if "request_id" in params:
        params["request_id"] = targets.request_id
    if "key_id" in params:
        params["key_id"] = targets.spare_key_id
    if "code_id" in params:
        params["code_id"] = targets.code_id


@pytest.fixture(scope="module")
def serving(stripe_fake: FakeStripe) -> Serving:
    # the sandbox catalog; a 64 KiB body limit (fuzzed bodies stay well within it)
    # and card top-ups against the fake Checkout API (webhooks: fuzzed bodies are unsigned)
    return Serving(catalog=CATALOG.read_text(), env={
        name: value for name, value in GATEWAY_ENV.items() if not name.startswith("TOLLWAY_TEST_")
    } | stripe_env(stripe_fake))


def check_error_shape(response: Any) -> None:
    """The one error shape, with the request id of the response header (unless the body is
    an upstream's own answer, passed through and marked so)."""
    if response.status_code < 400:
        return
    if response.headers.get("x-tollway-upstream-error") == ["true"]:
        assert response.request.url.split("/")[3] in ("v1", "apis"), response.request.url
        return
    body = response.json()
    if "/v1/messages" in response.request.url.split("?")[0]:
        # Anthropic's shape (its client library raises its own types), Tollway's code and id
        assert body["type"] == "error" and [body["request_id"]] == response.headers[
            "x-request-id"], body
        body = {"error": {"param": None, **body["error"]}}
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"type", "code", "message", "param", "request_id"}, error
    assert all(isinstance(error[k], str) and error[k] for k in error if k != "param"), error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert [error["request_id"]] == response.headers["x-request-id"], error


def make_targets(tw: Tollway, account: int, key: str) -> Targets:
    response = tw.http().post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                              json={"model": "sandbox-chat", "max_tokens": 5,
                                    "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200, response.text
    name = tw.http().get(f"/admin/v1/accounts/{account}", headers={
        "Authorization": f"Bearer {ADMIN_TOKEN}"}).json()["name"]
    spare = tw.key_record(tw.key(account, name="spare"))
    (code,) = tw.http().post("/admin/v1/codes", json={"amount_usd": "1"}, headers={
        "Authorization": f"Bearer {ADMIN_TOKEN}"}).json()["data"]
    tw.close_clients()
    return Targets((str(account), name), response.headers["x-request-id"], spare.id,
                   code["code"], code["id"])


def fuzz(tw: Tollway, label: str, examples: int, *, long: bool = False) -> None:
    account = tw.account("fuzz", usd="100")
    key = tw.key(account)
    targets = make_targets(tw, account, key)
    op = next(op for op in OPERATIONS if op.label == label)
    token = ADMIN_TOKEN if op.path.startswith("/admin/") else key
    headers = {"Authorization": f"Bearer {token}"}
    statuses: Counter[int] = Counter()
    started = time.monotonic()

    @settings(max_examples=examples, derandomize=not long, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(case=st.one_of(op.as_strategy(GenerationMode.POSITIVE),
                          op.as_strategy(GenerationMode.NEGATIVE)),
           choice=st.integers(0, 3))
    def run(case: schemathesis.Case, choice: int) -> None:
        steer(case, choice, targets)
        response = case.call(base_url=tw.url, headers=headers, timeout=30)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=CHECKS)
        check_error_shape(response)

    run()
    assert tw.open_holds() == 0
    assert tw.verify() == []
    report = os.environ.get("TOLLWAY_FUZZ_REPORT")
    if report:
        with open(report, "a") as out:
            out.write(json.dumps({
                "backend": tw.db.dialect, "operation": label, "examples": examples,
                "requests": sum(statuses.values()),
                "statuses": {str(k): v for k, v in sorted(statuses.items())},
                "seconds": round(time.monotonic() - started, 1)}) + "\n")


@pytest.mark.parametrize("label", LABELS)
def test_every_operation_conforms_to_the_document(served: Tollway, label: str) -> None:
    fuzz(served, label, FAST_EXAMPLES)


@pytest.mark.stress
@pytest.mark.parametrize("label", LABELS)
def test_every_operation_conforms_to_the_document_long(served: Tollway, label: str) -> None:
    fuzz(served, label, STRESS_EXAMPLES, long=True)


def test_a_stream_flag_that_is_not_a_boolean_is_a_400(served: Tollway) -> None:
    """Regression (found by this fuzzing): ``"stream": 88`` was read as "not a stream" by the
    gateway and as "a stream" by the upstream, whose event stream then failed as a 502."""
    account = served.account("stream-flag")
    key = served.key(account)
    hi = [{"role": "user", "content": "hi"}]
    bodies = {"/v1/chat/completions": {"model": "sandbox-chat", "messages": hi},
              "/v1/completions": {"model": "sandbox-chat", "prompt": "hi"},
              "/v1/embeddings": {"model": "sandbox-embed", "input": "hi"},
              "/v1/messages": {"model": "sandbox-claude", "max_tokens": 5, "messages": hi},
              "/v1/responses": {"model": "sandbox-chat", "input": "hi"},
              "/v1/images/generations": {"model": "sandbox-image", "prompt": "hi"}}
    # count_tokens is free and never streams
    assert set(bodies) == {path for path, item in SPEC["paths"].items()
                           if "post" in item and path.startswith("/v1/")
                           and not path.startswith("/v1/billing/")} - {
                               "/v1/messages/count_tokens"}
    for path, body in bodies.items():
        for value in (88, "yes", 1, [], None, False):
            response = served.http().post(path, headers={"Authorization": f"Bearer {key}"},
                                          json={**body, "stream": value})
            if value is None or value is False:
                assert response.status_code == 200, (path, response.text)
            else:
                assert response.status_code == 400, (path, value, response.text)
                error = response.json()["error"]
                assert (error["code"], error["message"]) == ("invalid_request",
                                                             "stream must be true or false")
    # images are billed from a whole answer: a stream is refused before any hold
    response = served.http().post("/v1/images/generations", json={
        **bodies["/v1/images/generations"], "stream": True},
        headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 400, response.text
    assert served.open_holds() == 0
    assert served.verify() == []
    served.close_clients()


def test_nul_characters_in_bodies_are_a_400(served: Tollway) -> None:
    """Regression (found by the long run on PostgreSQL): an account name holding NUL was a 500
    (PostgreSQL refuses NUL in text); every JSON body with one is now refused up front."""
    account = served.account("nul")
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    http = served.http()
    for path, body in (("/admin/v1/accounts", {"name": "\u009e\u007f\u0000\u00aa"}),
                       ("/admin/v1/accounts", {"name": "ok", "group": "a\u0000"}),
                       (f"/admin/v1/accounts/{account}/keys", {"name": "\u0000"}),
                       (f"/admin/v1/accounts/{account}/keys", {"models": ["x\u0000"]}),
                       (f"/admin/v1/accounts/{account}/topups",
                        {"amount_usd": "1", "note": "\u0000"}),
                       (f"/admin/v1/accounts/{account}/adjustments",
                        {"amount_usd": "1", "note": "x", "\u0000": 1})):
        response = http.post(path, json=body, headers=admin)
        assert response.status_code == 400, (path, body, response.text)
        assert response.json()["error"]["message"] == (
            "strings in the request body must not contain NUL characters")
    for path in ("/admin/v1/accounts/a%00b", "/admin/v1/usage/req%00",
                 "/admin/v1/usage?account=a%00"):
        assert http.get(path, headers=admin).status_code == 404, path
    assert served.verify() == []
    served.close_clients()


def test_an_absurd_output_bound_is_lowered_not_a_500(served: Tollway) -> None:
    """Regression (found by fuzzing /v1/messages): ``"max_tokens": 10**30`` made a hold larger
    than any ledger column (an OverflowError, a 500). The hold is capped, and lowered to what
    the balance affords like any other (``X-Tollway-Max-Tokens``)."""
    account = served.account("huge-bound")
    key = served.key(account)
    hi = [{"role": "user", "content": "hi"}]
    for path, body in (("/v1/messages", {"model": "sandbox-claude", "messages": hi,
                                         "max_tokens": 10**30}),
                       ("/v1/chat/completions", {"model": "sandbox-chat", "messages": hi,
                                                 "max_tokens": 10**30}),
                       ("/v1/responses", {"model": "sandbox-chat", "input": "hi",
                                          "max_output_tokens": 10**30})):
        response = served.http().post(path, json=body,
                                      headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200, (path, response.text)
        assert 1 <= int(response.headers["x-tollway-max-tokens"]) < 10**30, path
    assert served.open_holds() == 0
    assert served.verify() == []
    served.close_clients()


def test_an_id_beyond_any_column_is_unknown_not_a_500(served: Tollway) -> None:
    """Regression (found by fuzzing): revoking code 10^24 was an OverflowError on SQLite."""
    http = served.http()
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for code_id in (10**24, 2**63, 0):
        response = http.post(f"/admin/v1/codes/{code_id}/revoke", headers=admin)
        assert response.status_code == 404, (code_id, response.text)
        assert response.json()["error"]["code"] == "unknown_code"
    served.close_clients()
