"""Every body Tollway itself produces (the sandbox's answers and stream events, errors, model
lists, token counts) validates against the official descriptions: OpenAI's OpenAPI 3.1
document (``tests/specs/openai-openapi.json.gz``, a copy of the vendored
``shared/specs/openai-openapi.json``) with an OpenAPI 3.1 validator, and Anthropic's shapes
with the ``anthropic`` package's own types. Upstream bodies pass through untouched and are
not checked here. Shapes do not depend on storage: SQLite only."""

from __future__ import annotations

import functools
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic.types as claude_types
import pytest
from openapi_schema_validator import OAS31Validator
from pydantic import TypeAdapter

from fakes import IGNORE_TOKENIZER_WARNING, Tollway, fresh_database, running_tollway

pytestmark = pytest.mark.filterwarnings(IGNORE_TOKENIZER_WARNING)

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "tests" / "specs" / "openai-openapi.json.gz"
CATALOG = ROOT / "examples" / "catalog.yaml"
HELLO = [{"role": "user", "content": "hello sandbox"}]
CITY = {"type": "object", "properties": {"name": {"type": "string"},
                                         "size": {"type": "integer", "minimum": 3}},
        "required": ["name", "size"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": CITY}}]


def _nullable(node: Any) -> Any:
    """The document still marks some fields with OpenAPI 3.0's ``nullable: true`` (a stream
    chunk's ``finish_reason`` and ``logprobs``, which OpenAI sends as null), which a 3.1
    validator ignores: read it as 3.0 meant it, "this schema or null"."""
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable(v) for k, v in node.items()}
    if node.pop("nullable", False) is True:
        return {"anyOf": [node, {"type": "null"}]}
    return node


@functools.cache
def _components() -> dict[str, Any]:
    with gzip.open(SPEC, "rt") as handle:
        return dict(_nullable(json.load(handle)["components"]))


def check(body: Any, name: str) -> None:
    schema = {"$ref": f"#/components/schemas/{name}", "components": _components()}
    errors = sorted(OAS31Validator(schema).iter_errors(body), key=str)
    assert not errors, f"{name}: {errors[0].message} at {list(errors[0].absolute_path)}"


def events(response: Any) -> list[dict[str, Any]]:
    out = []
    for line in response.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[len("data: "):]))
    return out


@pytest.fixture(scope="module", params=["sqlite"])
def served(request: pytest.FixtureRequest) -> Iterator[Tollway]:
    with fresh_database(request) as db, running_tollway(db, CATALOG.read_text()) as tollway:
        yield tollway


def test_openai_shapes(tw: Tollway) -> None:
    key = tw.key(tw.account())
    http = tw.http()
    auth = {"Authorization": f"Bearer {key}"}

    def post(path: str, body: dict[str, Any]) -> Any:
        response = http.post(path, json=body, headers=auth)
        assert response.status_code == 200, response.text
        return response

    chat = {"model": "sandbox-chat", "messages": HELLO}
    for extra in ({}, {"tools": TOOLS}, {"tools": TOOLS, "tool_choice": "none"},
                  {"response_format": {"type": "json_schema", "json_schema": {
                      "name": "city", "schema": CITY, "strict": True}}},
                  {"response_format": {"type": "json_object"}}, {"max_tokens": 2}):
        check(post("/v1/chat/completions", {**chat, **extra}).json(),
              "CreateChatCompletionResponse")
        streamed = post("/v1/chat/completions", {**chat, **extra, "stream": True,
                                                 "stream_options": {"include_usage": True}})
        for chunk in events(streamed):
            check(chunk, "CreateChatCompletionStreamResponse")
    check(post("/v1/completions", {"model": "sandbox-chat", "prompt": "hi"}).json(),
          "CreateCompletionResponse")
    for chunk in events(post("/v1/completions", {"model": "sandbox-chat", "prompt": "hi",
                                                 "stream": True})):
        # the document has no stream shape for completions: its response shape, whose
        # finish_reason is null until the last chunk (as OpenAI streams it)
        check({**chunk, "choices": [{**c, "finish_reason": c["finish_reason"] or "stop"}
                                    for c in chunk["choices"]]}, "CreateCompletionResponse")
    check(post("/v1/embeddings", {"model": "sandbox-embed", "input": "hi"}).json(),
          "CreateEmbeddingResponse")
    check(post("/v1/images/generations", {"model": "sandbox-image", "prompt": "a cat"}).json(),
          "ImagesResponse")
    for extra in ({}, {"tools": [{"type": "function", "name": "lookup", "parameters": CITY}]},
                  {"text": {"format": {"type": "json_schema", "name": "city",
                                       "schema": CITY, "strict": True}}},
                  {"max_output_tokens": 2}):
        body = {"model": "sandbox-chat", "input": "hello sandbox", **extra}
        check(post("/v1/responses", body).json(), "Response")
        for event in events(post("/v1/responses", {**body, "stream": True})):
            check(event, "ResponseStreamEvent")
    models = http.get("/v1/models", headers=auth)
    check(models.json(), "ListModelsResponse")
    check(http.get("/v1/models/sandbox-chat", headers=auth).json(), "Model")
    for response in (http.get("/v1/models/nope", headers=auth),
                     http.post("/v1/chat/completions", json={"model": "sandbox-chat"},
                               headers=auth),
                     http.post("/v1/chat/completions", json=chat),
                     http.post("/chat/completions", json=chat)):
        assert response.status_code >= 400
        check(response.json(), "ErrorResponse")


def test_anthropic_shapes(tw: Tollway) -> None:
    key = tw.key(tw.account())
    http = tw.http()
    auth = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    body = {"model": "sandbox-claude", "max_tokens": 100, "messages": HELLO}
    tools = [{"name": "lookup", "input_schema": CITY}]
    stream_event: TypeAdapter[Any] = TypeAdapter(claude_types.RawMessageStreamEvent)
    for extra in ({}, {"tools": tools}, {"max_tokens": 2}):
        answer = http.post("/v1/messages", json={**body, **extra}, headers=auth)
        message = claude_types.Message.model_validate(answer.json(), strict=False)
        assert message.usage.input_tokens > 0
        streamed = http.post("/v1/messages", json={**body, **extra, "stream": True},
                             headers=auth)
        parsed = [stream_event.validate_python(e) for e in events(streamed)
                  if e["type"] != "ping"]  # ping: a keep-alive the types leave out
        start, delta = parsed[0], [e for e in parsed if e.type == "message_delta"][0]
        assert start.message.usage.input_tokens == delta.usage.input_tokens  # complete
        assert delta.usage.output_tokens == message.usage.output_tokens
    counted = http.post("/v1/messages/count_tokens",
                        json={"model": "sandbox-claude", "messages": HELLO}, headers=auth)
    claude_types.MessageTokensCount.model_validate(counted.json())
    claude_types.ModelInfo.model_validate(
        http.get("/v1/models/sandbox-claude", headers=auth).json())
    for response in (http.post("/v1/messages", json={"model": "sandbox-claude"},
                               headers=auth),
                     http.post("/v1/messages", json=body),
                     http.post("/v1/messages/count_tokens", json={"model": "x",
                                                                  "messages": HELLO},
                               headers=auth)):
        assert response.status_code >= 400
        claude_types.ErrorResponse.model_validate(response.json())
