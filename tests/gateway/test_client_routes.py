"""What client libraries need beyond the metered routes, on the sandbox catalog, on SQLite
and PostgreSQL: Anthropic's free token counter, one model by id (OpenAI's or Anthropic's
shape), ``request-id``, Anthropic's error shape for every refusal on /v1/messages, CORS when
configured, JSON 404s that point at a missing ``/v1``, and 400s naming a missing field —
none of them charged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import pytest

from fakes import (
    GATEWAY_ENV,
    IGNORE_TOKENIZER_WARNING,
    USD,
    Tollway,
    fresh_database,
    running_tollway,
)
from tollway import tokens

pytestmark = pytest.mark.filterwarnings(IGNORE_TOKENIZER_WARNING)

CATALOG = Path(__file__).resolve().parents[2] / "examples" / "catalog.yaml"
ORIGIN = "https://app.example.com"
HELLO = [{"role": "user", "content": "hello sandbox"}]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(request: pytest.FixtureRequest) -> Iterator[Tollway]:
    env = {**GATEWAY_ENV, "TOLLWAY_CORS_ORIGINS": ORIGIN}
    with fresh_database(request) as db, running_tollway(db, CATALOG.read_text(),
                                                        env=env) as tollway:
        yield tollway


def claude(tw: Tollway, key: str) -> anthropic.Anthropic:
    client = anthropic.Anthropic(base_url=tw.url, api_key=key, max_retries=0, timeout=20)
    tw._clients.append(client)
    return client


def test_count_tokens_is_local_free_and_matches_the_billed_input(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    client = claude(tw, key)
    counted = client.messages.with_raw_response.count_tokens(model="sandbox-claude",
                                                             messages=HELLO)
    # "hello sandbox" is 2 tokens, plus 3 per message and 3 for the reply
    assert counted.parse().input_tokens == tokens.count("hello sandbox") + 3 + 3 == 8
    assert counted.headers["request-id"] == counted.headers["x-request-id"]
    assert tw.records() == [] and tw.available(account) == 10 * USD  # never charged
    message = client.messages.create(model="sandbox-claude", max_tokens=50, messages=HELLO)
    usage = message.usage
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) + (
        usage.cache_creation_input_tokens or 0) == 8


def test_count_tokens_refusals_are_in_anthropics_shape(tw: Tollway) -> None:
    key = tw.key(tw.account(), models=["sandbox-chat"])
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        claude(tw, key).messages.count_tokens(model="sandbox-claude", messages=HELLO)
    assert denied.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError):
        claude(tw, key).messages.count_tokens(model="no-such-model", messages=HELLO)
    with pytest.raises(anthropic.AuthenticationError):
        claude(tw, "tw-wrong").messages.count_tokens(model="sandbox-claude", messages=HELLO)
    response = tw.http().post("/v1/messages/count_tokens", json={"model": "sandbox-claude"},
                              headers={"x-api-key": key})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["message"] == "messages is required"


def test_one_model_by_id_in_either_shape(tw: Tollway) -> None:
    key = tw.key(tw.account(), models=["sandbox-chat", "sandbox-claude"])
    model = tw.client(key).models.retrieve("sandbox-chat")
    assert (model.id, model.object, model.owned_by) == ("sandbox-chat", "model", "sandbox")
    claude_model = claude(tw, key).models.retrieve("sandbox-claude")
    assert (claude_model.type, claude_model.id) == ("model", "sandbox-claude")
    assert claude_model.display_name == "sandbox-claude"
    listed = claude(tw, key).models.list()
    assert [m.id for m in listed.data] == ["sandbox-chat", "sandbox-claude"]
    # a model the key may not use is not there at all
    response = tw.http().get("/v1/models/sandbox-reasoner",
                             headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_model"
    with pytest.raises(anthropic.NotFoundError):
        claude(tw, key).models.retrieve("sandbox-reasoner")


def test_every_refusal_on_messages_is_anthropic_shaped_with_request_id(tw: Tollway) -> None:
    key = tw.key(tw.account())
    http = tw.http()
    big = {"model": "sandbox-claude", "max_tokens": 5,
           "messages": [{"role": "user", "content": "x" * 70_000}]}
    cases = [
        (http.post("/v1/messages", json=big, headers={"x-api-key": key}), 413,
         "request_too_large"),
        (http.get("/v1/messages", headers={"x-api-key": key}), 405, "invalid_request_error"),
        (http.post("/v1/messages", json={"model": "sandbox-claude", "max_tokens": 5},
                   headers={"x-api-key": key}), 400, "invalid_request_error"),
        (http.post("/v1/messages", json={"max_tokens": 5, "messages": HELLO},
                   headers={"x-api-key": "tw-nope"}), 401, "authentication_error"),
    ]
    for response, status, type_ in cases:
        assert response.status_code == status, response.text
        body = response.json()
        assert body["type"] == "error" and body["error"]["type"] == type_, body
        assert body["request_id"] == response.headers["request-id"] == response.headers[
            "x-request-id"]
    assert tw.records() == []


def test_missing_required_fields_are_400_naming_the_field_and_never_billed(
        tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    http = tw.http()
    auth = {"Authorization": f"Bearer {key}"}
    for path, body, field in [
            ("/v1/chat/completions", {"model": "sandbox-chat"}, "messages"),
            ("/v1/completions", {"model": "sandbox-chat"}, "prompt"),
            ("/v1/embeddings", {"model": "sandbox-embed"}, "input"),
            ("/v1/responses", {"model": "sandbox-chat"}, "input"),
            ("/v1/images/generations", {"model": "sandbox-image"}, "prompt"),
            ("/v1/chat/completions", {"messages": HELLO}, "model")]:
        response = http.post(path, json=body, headers=auth)
        assert response.status_code == 400, (path, response.text)
        error = response.json()["error"]
        assert (error["code"], error["param"], error["message"]) == (
            "invalid_request", field, f"{field} is required"), path
    assert tw.records() == [] and tw.available(account) == 10 * USD


def test_unknown_paths_answer_json_with_a_hint_when_v1_is_missing(tw: Tollway) -> None:
    http = tw.http()
    response = http.post("/chat/completions", json={})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "not_found"
    assert error["message"] == (f"no route POST /chat/completions: did you mean "
                                f"/v1/chat/completions? Set your client's base URL to "
                                f"{tw.url}/v1")
    response = http.get("/v1/no-such-thing")
    assert response.status_code == 404 and response.json()["error"]["message"] == (
        "no route GET /v1/no-such-thing: the routes are listed at /openapi.json")
    assert http.get("/no-such-page").headers["content-type"].startswith("text/html")


def test_cors_when_configured(tw: Tollway) -> None:
    key = tw.key(tw.account())
    http = tw.http()
    preflight = http.options("/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    answer = http.post("/v1/chat/completions", headers={
        "Origin": ORIGIN, "Authorization": f"Bearer {key}"},
        json={"model": "sandbox-chat", "messages": HELLO})
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    assert "x-tollway-cost-usd" in answer.headers["access-control-expose-headers"]
    other = http.options("/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    refused = http.get("/v1/models", headers={"Origin": ORIGIN})  # a 401 is readable too
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ORIGIN


def test_cors_is_off_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.testclient import TestClient

    from tollway.app import create_app
    from tollway.store.db import Database
    from tollway.store.migrate import upgrade

    monkeypatch.delenv("TOLLWAY_CORS_ORIGINS", raising=False)
    url = f"sqlite:///{tmp_path / 't.db'}"
    db = Database(url)
    upgrade(db)
    db.dispose()
    with TestClient(create_app(database_url=url, admin_token="x")) as client:
        response = client.options("/v1/chat/completions", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in response.headers
