"""Test doubles for the gateway tests.

- :class:`FakeUpstream` — one aiohttp server on 127.0.0.1 (a random free port, its own event
  loop in a background thread) that plays an OpenAI-compatible LLM API under ``/v1`` and data
  APIs under every other path. Each test scripts it (:class:`LLMScript`, :class:`DataReply`)
  and reads back what it received (:class:`Recorded`), to assert what the gateway forwarded.
- :class:`GatewayThread` — ``tollway.app:create_app`` served by uvicorn in a thread.
- :class:`Tollway` — a running gateway, its database and the fake, with helpers to make
  accounts and keys and to read balances, holds and usage records.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
import openai
import sqlalchemy as sa
import uvicorn
from aiohttp import web

from tollway import clock
from tollway.billing import keys as key_ops
from tollway.ledger import ledger
from tollway.ledger.verify import verify
from tollway.pricing.catalog import parse_catalog
from tollway.store import accounts as account_store
from tollway.store.catalog import apply_catalog
from tollway.store.db import Database, normalize_url
from tollway.store.migrate import upgrade
from tollway.store.tables import holds, usage_records

UPSTREAM_KEY_ENV = "TOLLWAY_TEST_UPSTREAM_KEY"
UPSTREAM_KEY = "sk-operator-llm-secret"
DATA_KEY_ENV = "TOLLWAY_TEST_DATA_KEY"
DATA_KEY = "operator-data-secret"
ADMIN_TOKEN = "test-admin-token"
USD = 1_000_000_000  # nano-USD per USD

#: The environment every in-process gateway of these tests runs with: a 2 s upstream read
#: timeout (the timeout test), no key cache (revocations take effect at once), a 64 KiB body
#: limit (the 413 test), and the operator's upstream credentials.
GATEWAY_ENV = {
    UPSTREAM_KEY_ENV: UPSTREAM_KEY,
    DATA_KEY_ENV: DATA_KEY,
    "TOLLWAY_KEY_CACHE_SECONDS": "0",
    "TOLLWAY_UPSTREAM_READ_TIMEOUT_SECONDS": "2",
    "TOLLWAY_MAX_BODY_BYTES": "65536",
}
MAX_BODY_BYTES = 65536

#: bpe_openai (the tokenizer the gateway loads at start-up) calls the deprecated
#: importlib.resources.open_binary; harmless, and not ours to fix.
IGNORE_TOKENIZER_WARNING = "ignore:open_binary is deprecated:DeprecationWarning"


# --------------------------------------------------------------------------- the fake upstream


@dataclass
class Recorded:
    """One request the fake received."""

    method: str
    path: str  # percent-decoded
    raw_path: str  # as sent, query string included
    query: list[tuple[str, str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class LLMScript:
    """How the fake LLM answers (every LLM request until the test changes it)."""

    content: list[str] = field(default_factory=lambda: ["Hello", " there", ",", " friend", "!"])
    prompt_tokens: int = 20
    completion_tokens: int = 5
    cached_tokens: int | None = None  # prompt_tokens_details.cached_tokens
    reasoning_tokens: int | None = None  # completion_tokens_details.reasoning_tokens
    usage: Any = None  # a raw usage object instead of the one built from the numbers above
    stream_usage: bool = True  # False: ignore stream_options.include_usage (send no usage)
    status: int = 200
    error_body: Any = None  # the JSON body of a non-200 answer
    raw_body: bytes | None = None  # a 200 answer with exactly these bytes (garbage tests)
    delay: float = 0.0  # seconds before answering at all
    chunk_delay: float = 0.0  # seconds between stream chunks
    cut_after: int | None = None  # stream: drop the connection after this many content chunks

    def usage_object(self) -> Any:
        if self.usage is not None:
            return self.usage
        usage: dict[str, Any] = {"prompt_tokens": self.prompt_tokens,
                                 "completion_tokens": self.completion_tokens,
                                 "total_tokens": self.prompt_tokens + self.completion_tokens}
        if self.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        if self.reasoning_tokens is not None:
            usage["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return usage


@dataclass
class AnthropicScript:
    """How the fake Anthropic Messages API (under ``/anthropic/v1``) answers."""

    content: list[str] = field(default_factory=lambda: ["Hello", " from", " Claude", "."])
    input_tokens: int = 20  # EXCLUDES cache reads and writes, as Anthropic reports it
    output_tokens: int = 4
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    #: cache_creation.{ephemeral_5m_input_tokens, ephemeral_1h_input_tokens}, when given
    cache_split: tuple[int, int] | None = None
    status: int = 200
    error_body: Any = None
    #: stream: drop the connection after message_start and this many text deltas
    cut_after: int | None = None
    #: stream: an ``event: error`` after the content (an overloaded upstream, say)
    error_event: bool = False
    #: ``usage.server_tool_use`` (``{"web_search_requests": 3}``), when the model ran tools
    server_tool_use: dict[str, int] | None = None

    def usage(self, *, output: int | None = None) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "output_tokens": self.output_tokens if output is None else output}
        if self.server_tool_use is not None and output is None:
            usage["server_tool_use"] = self.server_tool_use
        if self.cache_split is not None:
            usage["cache_creation"] = {"ephemeral_5m_input_tokens": self.cache_split[0],
                                       "ephemeral_1h_input_tokens": self.cache_split[1]}
        return usage


@dataclass
class ResponsesScript:
    """How the fake OpenAI Responses API (``/v1/responses``) answers."""

    content: list[str] = field(default_factory=lambda: ["Responses", " say", " hi"])
    input_tokens: int = 30  # INCLUDES cached tokens
    cached_tokens: int = 0
    output_tokens: int = 3  # INCLUDES reasoning tokens
    reasoning_tokens: int = 0
    status: int = 200
    cut_after: int | None = None  # stream: drop the connection after this many text deltas
    response_id: str = "resp_fake"
    #: output items before the message (hosted tool calls: ``{"type": "web_search_call"}``)
    tool_items: list[dict[str, Any]] = field(default_factory=list)

    def usage(self) -> dict[str, Any]:
        return {"input_tokens": self.input_tokens,
                "input_tokens_details": {"cached_tokens": self.cached_tokens},
                "output_tokens": self.output_tokens,
                "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                "total_tokens": self.input_tokens + self.output_tokens}


@dataclass
class ImagesScript:
    """How the fake image generation API (``/v1/images/generations``) answers."""

    returned: int | None = None  # images in the answer; None = as many as requested
    status: int = 200
    quality: str | None = None  # the quality the answer says it generated (gpt-image-1)


@dataclass
class DataReply:
    """What the fake data API answers on one path."""

    status: int = 200
    body: bytes = b'{"ok": true}'
    content_type: str = "application/json"
    gzip: bool = False  # compress when the request accepts gzip, as real servers do


class FakeUpstream:
    def __init__(self) -> None:
        self.llm = LLMScript()
        self.anthropic = AnthropicScript()
        self.responses = ResponsesScript()
        self.images = ImagesScript()
        self.data_replies: dict[str, DataReply] = {}
        self.requests: list[Recorded] = []
        self.aborted_streams = 0  # streams whose reader went away before the end
        self.compress_llm = False
        #: A raw handler that answers every request instead of the scripts (hostile tests).
        self.hostile: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None
        self.streamed: list[bytes] = []  # the bytes of each stream sent, in order
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> FakeUpstream:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                failure.append(exc)
                loop.close()
                ready.set()
                return
            ready.set()
            loop.run_forever()
            assert self._runner is not None
            loop.run_until_complete(self._runner.cleanup())
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-upstream", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]

    async def _serve(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(15)

    def reset(self) -> None:
        self.llm = LLMScript()
        self.anthropic = AnthropicScript()
        self.responses = ResponsesScript()
        self.images = ImagesScript()
        self.streamed = []
        self.data_replies = {}
        self.requests = []
        self.aborted_streams = 0
        self.compress_llm = False
        self.hostile = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---------------------------------------------------------------- what was received

    def llm_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.startswith(("/v1/", "/anthropic/"))]

    def data_requests(self) -> list[Recorded]:
        return [r for r in self.requests if not r.path.startswith(("/v1/", "/anthropic/"))]

    # ---------------------------------------------------------------- handlers

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Recorded(
            request.method, request.path, request.raw_path, list(request.query.items()),
            {k.lower(): v for k, v in request.headers.items()}, body))
        if self.hostile is not None:
            return await self.hostile(request)
        if request.path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            return await self._llm(request, body)
        if request.path == "/anthropic/v1/messages":
            return await self._messages(request, json.loads(body))
        if request.path == "/v1/responses":
            return await self._responses(request, json.loads(body))
        if request.path == "/v1/images/generations":
            return self._images(json.loads(body))
        return await self._data(request)

    async def _write_events(self, request: web.Request, events: list[bytes],
                            cut_at: int | None = None) -> web.StreamResponse:
        """Send ``events`` as an SSE stream (recorded in :attr:`streamed`); with ``cut_at``,
        drop the connection after that many events."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        sent = []
        try:
            for index, event in enumerate(events):
                if cut_at is not None and index == cut_at:
                    self.streamed.append(b"".join(sent))
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                await response.write(event)
                sent.append(event)
            self.streamed.append(b"".join(sent))
            await response.write_eof()
        except ConnectionError:
            self.aborted_streams += 1
        return response

    async def _messages(self, request: web.Request, payload: dict[str, Any]
                        ) -> web.StreamResponse:
        script = self.anthropic
        if script.status != 200:
            return web.json_response(script.error_body or {"type": "error", "error": {
                "type": "overloaded_error", "message": "scripted"}}, status=script.status)
        model = payload.get("model")
        if not payload.get("stream"):
            return web.json_response({
                "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": "".join(script.content)}],
                "stop_reason": "end_turn", "stop_sequence": None, "usage": script.usage()})

        def event(name: str, body: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: {json.dumps(body)}\n\n".encode()

        events = [event("message_start", {"type": "message_start", "message": {
            "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": script.usage(output=1)}}),
            event("content_block_start", {"type": "content_block_start", "index": 0,
                                          "content_block": {"type": "text", "text": ""}}),
            event("ping", {"type": "ping"})]
        cut_at = None if script.cut_after is None else len(events) + script.cut_after
        events += [event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                 "delta": {"type": "text_delta", "text": piece}})
                   for piece in script.content]
        events.append(event("content_block_stop", {"type": "content_block_stop", "index": 0}))
        if script.error_event:
            events.append(event("error", {"type": "error", "error": {
                "type": "overloaded_error", "message": "Overloaded"}}))
        events.append(event("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": script.output_tokens,
                      **({"server_tool_use": script.server_tool_use}
                         if script.server_tool_use is not None else {})}}))
        events.append(event("message_stop", {"type": "message_stop"}))
        return await self._write_events(request, events, cut_at)

    async def _responses(self, request: web.Request, payload: dict[str, Any]
                         ) -> web.StreamResponse:
        script = self.responses
        if script.status != 200:
            return web.json_response({"error": {"message": "scripted", "type": "server_error"}},
                                     status=script.status)
        text = "".join(script.content)
        message = {"type": "message", "id": "msg_fake", "status": "completed",
                   "role": "assistant",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]}
        done = {"id": script.response_id, "object": "response", "created_at": 1_700_000_000,
                "status": "completed", "model": payload.get("model"),
                "output": [*script.tool_items, message],
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                "usage": script.usage()}
        if not payload.get("stream"):
            return web.json_response(done)
        started = {**done, "status": "in_progress", "output": [], "usage": None}
        sequence = itertools.count()

        def event(name: str, **body: Any) -> bytes:
            data = {"type": name, "sequence_number": next(sequence), **body}
            return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

        events = [event("response.created", response=started),
                  event("response.in_progress", response=started),
                  event("response.output_item.added", output_index=0,
                        item={**message, "status": "in_progress", "content": []}),
                  event("response.content_part.added", item_id="msg_fake", output_index=0,
                        content_index=0, part={"type": "output_text", "text": "",
                                               "annotations": []})]
        events += [event("response.output_text.delta", item_id="msg_fake", output_index=0,
                         content_index=0, delta=piece) for piece in script.content]
        events += [event("response.output_text.done", item_id="msg_fake", output_index=0,
                         content_index=0, text=text),
                   event("response.output_item.done", output_index=0, item=message),
                   event("response.completed", response=done)]
        return await self._write_events(
            request, events, None if script.cut_after is None else 4 + script.cut_after)

    def _images(self, payload: dict[str, Any]) -> web.Response:
        script = self.images
        if script.status != 200:
            return web.json_response({"error": {"message": "scripted", "type": "server_error"}},
                                     status=script.status)
        count = (payload.get("n") or 1) if script.returned is None else script.returned
        return web.json_response({"created": 1_700_000_000, "data": [
            {"url": f"https://images.example/{i}.png"} for i in range(count)],
            **({"quality": script.quality} if script.quality else {})})

    async def _llm(self, request: web.Request, body: bytes) -> web.StreamResponse:
        script = self.llm
        if script.delay:
            await asyncio.sleep(script.delay)
        if script.status != 200:
            error = script.error_body if script.error_body is not None else {
                "error": {"message": f"scripted {script.status}", "type": "server_error"}}
            return web.json_response(error, status=script.status)
        if script.raw_body is not None:
            return web.Response(body=script.raw_body, content_type="application/json")
        payload = json.loads(body)
        model = payload.get("model")
        if request.path == "/v1/embeddings":
            return web.json_response({
                "object": "list", "model": model,
                "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25]}],
                "usage": script.usage_object()})
        if payload.get("stream"):
            return await self._stream(request, payload, script)
        text = "".join(script.content)
        if request.path == "/v1/completions":
            choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": "stop",
                                      "logprobs": None}
            obj = "text_completion"
        else:
            choice = {"index": 0, "finish_reason": "stop", "logprobs": None,
                      "message": {"role": "assistant", "content": text}}
            obj = "chat.completion"
        response = web.json_response({"id": "chatcmpl-fake", "object": obj,
                                      "created": 1_700_000_000, "model": model,
                                      "choices": [choice], "usage": script.usage_object()})
        if self.compress_llm:
            response.enable_compression()
        return response

    async def _stream(self, request: web.Request, payload: dict[str, Any],
                      script: LLMScript) -> web.StreamResponse:
        options = payload.get("stream_options") or {}
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                     "created": 1_700_000_000, "model": payload.get("model"),
                     "choices": choices, **extra}
            if include_usage and "usage" not in chunk:
                chunk["usage"] = None  # as OpenAI does on every chunk when asked for usage
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        try:
            for index, piece in enumerate(script.content):
                if script.cut_after is not None and index == script.cut_after:
                    # Drop the connection mid-stream: no usage, no [DONE], no final chunk.
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                delta = {"role": "assistant", "content": piece} if index == 0 else {
                    "content": piece}
                await response.write(event([{"index": 0, "delta": delta,
                                             "finish_reason": None}]))
                if script.chunk_delay:
                    await asyncio.sleep(script.chunk_delay)
            await response.write(event([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
            if include_usage and script.stream_usage:
                await response.write(event([], usage=script.usage_object()))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:
            self.aborted_streams += 1
        return response

    async def _data(self, request: web.Request) -> web.StreamResponse:
        reply = self.data_replies.get(request.path)
        if reply is None:
            reply = DataReply(body=json.dumps({"method": request.method, "path": request.path,
                                               "query": sorted(request.query.items())}).encode())
        response = web.Response(status=reply.status, body=reply.body,
                                headers={"Content-Type": reply.content_type})
        if reply.gzip:
            response.enable_compression()
        return response


# --------------------------------------------------------------------------- the gateway


class FakeClock:
    """The gateway's time, moved by the test (milliseconds since the epoch)."""

    def __init__(self, start_ms: int) -> None:
        self.ms = start_ms

    def __call__(self) -> int:
        return self.ms

    def advance(self, seconds: float = 0, *, ms: int = 0) -> None:
        self.ms += int(seconds * 1000) + ms


class GatewayThread:
    """``create_app(database_url=..., admin_token=...)`` under uvicorn, in a thread.

    Settings are read from the environment when the app's lifespan starts, i.e. inside
    :meth:`start`; set them before.
    """

    def __init__(self, database_url: str, admin_token: str = ADMIN_TOKEN,
                 clock: FakeClock | None = None) -> None:
        from tollway.app import create_app

        self.app = create_app(database_url=database_url, admin_token=admin_token, clock=clock)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False,
                                lifespan="on", timeout_graceful_shutdown=3)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="tollway-gateway", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the gateway did not start (see the log above)")
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start within 30 s")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        self.sock.close()


# --------------------------------------------------------------------------- catalog


def fake_catalog(fake: FakeUpstream) -> str:
    """Models on the fake OpenAI-compatible upstream and endpoints on its data API, one per
    way of injecting the operator's credential."""
    return f"""
providers:
  fakeai:
    kind: openai
    base_url: "{fake.base}/v1"
    api_key_env: {UPSTREAM_KEY_ENV}
  data:
    kind: http
    base_url: "{fake.base}/data"
    auth: {{header: X-API-Key}}
    api_key_env: {DATA_KEY_ENV}
  data-bearer:
    kind: http
    base_url: "{fake.base}/bearer"
    auth: {{header: Authorization, scheme: Bearer}}
    api_key_env: {DATA_KEY_ENV}
  data-query:
    kind: http
    base_url: "{fake.base}/query"
    auth: {{query: api_key}}
    api_key_env: {DATA_KEY_ENV}
  nowhere:
    kind: http
    base_url: "http://127.0.0.1:{closed_port()}"
  claude:
    kind: anthropic
    base_url: "{fake.base}/anthropic/v1"
    api_key_env: {UPSTREAM_KEY_ENV}
groups:
  default: {{ratio: "1"}}
  vip:     {{ratio: "0.8"}}
  half:    {{ratio: "0.5"}}
models:
  - id: gpt-test
    provider: fakeai
    upstream_model: upstream-gpt-4o-mini
    price: {{input: "0.15", output: "0.60", cache_read: "0.075"}}
    max_output_tokens: 1000
    context_window: 128000
    group_ratios: {{vip: "0.7"}}
  - id: reasoner-test
    provider: fakeai
    price: {{input: "1.10", output: "4.40", cache_read: "0.55"}}
    max_output_tokens: 2000
  - id: embed-test
    provider: fakeai
    price: {{input: "0.02", output: "0"}}
    max_output_tokens: 1
  # one model, two protocols, one price: chat completions on the OpenAI-compatible upstream,
  # messages on the Anthropic one
  - id: claude-test
    providers: {{openai: fakeai, anthropic: claude}}
    upstream_model: claude-upstream
    price: {{input: "3", output: "15", cache_read: "0.30", cache_write: "3.75",
             cache_write_1h: "6"}}
    max_output_tokens: 1000
  - id: image-test
    provider: fakeai
    upstream_model: image-upstream
    price: {{per_call: "0.04", per_size: {{"1024x1024": "0.04", "1792x1024": "0.08"}}}}
    group_ratios: {{half: "0.33333333"}}
endpoints:
  - id: twitter-user
    provider: data
    method: GET
    path: /twitter/user/{{username}}
    upstream_path: /users/{{username}}
    price: {{per_call: "0.002"}}
  - id: web-search
    provider: data-query
    method: GET
    path: /search/web
    upstream_path: /v2/search
    price: {{per_call: "0.0015"}}
    group_ratios: {{vip: "0.5"}}
  - id: papers
    provider: data-bearer
    method: POST
    path: /scholar/search
    upstream_path: /papers/search
    price: {{per_call: "0.02"}}
  - id: dead-api
    provider: nowhere
    method: GET
    path: /dead
    price: {{per_call: "0.001"}}
"""


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def apply_catalog_text(db: Database, text: str) -> None:
    with db.write() as conn:
        apply_catalog(conn, parse_catalog(text), now_ms=clock.now_ms())


# --------------------------------------------------------------------------- the whole thing


_names = itertools.count(1)


@dataclass
class Tollway:
    """A running gateway shared by the tests of a module. Each test makes its own accounts,
    and :meth:`records` shows the usage records of those accounts only."""

    db: Database
    gateway: GatewayThread
    fake: FakeUpstream | None = None
    accounts: list[int] = field(default_factory=list)
    _clients: list[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.gateway.url

    def begin_test(self) -> None:
        self.accounts = []
        if self.fake is not None:
            self.fake.reset()

    # ---------------------------------------------------------------- setup

    def account(self, name: str | None = None, *, usd: str | None = "10",
                nano: int | None = None, group: str = "default") -> int:
        """A new customer account with ``usd`` (or ``nano``) of credit."""
        name = f"{name or 'acct'}-{next(_names)}"
        amount = nano if nano is not None else (_usd(usd) if usd else 0)
        with self.db.write() as conn:
            account_id = account_store.create_account(conn, name, group,
                                                      at_ms=clock.now_ms()).id
            if amount:
                ledger.topup(conn, account_id, amount, idempotency_key=f"seed-{name}",
                             at_ms=clock.now_ms())
        self.accounts.append(account_id)
        return account_id

    def key(self, account_id: int, *, name: str = "test", group: str | None = None,
            models: list[str] | None = None, quota_nano: int | None = None,
            expires_at_ms: int | None = None,
            limits: account_store.KeyLimits | None = None) -> str:
        with self.db.write() as conn:
            return key_ops.create_key(conn, account_id, at_ms=clock.now_ms(), name=name,
                                      group=group, models=models, quota_nano=quota_nano,
                                      expires_at_ms=expires_at_ms, limits=limits).secret

    def revoke(self, secret: str) -> None:
        with self.db.write() as conn:
            record = account_store.key_by_hash(conn, key_ops.hash_key(secret))
            assert record is not None
            account_store.revoke_key(conn, record.id, at_ms=clock.now_ms())

    def key_record(self, secret: str) -> account_store.ApiKeyRecord:
        with self.db.read() as conn:
            record = account_store.key_by_hash(conn, key_ops.hash_key(secret))
        assert record is not None
        return record

    # ---------------------------------------------------------------- clients

    def client(self, key: str) -> openai.OpenAI:
        client = openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0,
                               timeout=20)
        self._clients.append(client)
        return client

    def aclient(self, key: str) -> openai.AsyncOpenAI:
        """An async client; use it as ``async with`` inside the test's own event loop."""
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0,
                                  timeout=20)

    def http(self) -> httpx.Client:
        client = httpx.Client(base_url=self.url, timeout=20)
        self._clients.append(client)
        return client

    def close_clients(self) -> None:
        for client in self._clients:
            client.close()
        self._clients = []

    # ---------------------------------------------------------------- reading the books

    def balance(self, account_id: int) -> tuple[int, int]:
        """(available, held) in nano-USD."""
        with self.db.read() as conn:
            account = account_store.get_account(conn, account_id)
        return account.available_nano, account.held_nano

    def available(self, account_id: int) -> int:
        return self.balance(account_id)[0]

    def records(self) -> list[dict[str, Any]]:
        """The request records (not top-ups or key events) of this test's accounts, oldest
        first."""
        if not self.accounts:
            return []
        with self.db.read() as conn:
            rows = conn.execute(sa.select(usage_records)
                                .where(usage_records.c.account_id.in_(self.accounts),
                                       usage_records.c.type.in_(("consume", "error")))
                                .order_by(usage_records.c.id))
            return [dict(row) for row in rows.mappings()]

    def wait_records(self, count: int, timeout: float = 10) -> list[dict[str, Any]]:
        """The usage records once there are ``count`` (a stream settles after its client
        went away, so the record may lag the response)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.records()
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.02)

    def open_holds(self) -> int:
        """Open holds in the whole database (every test leaves none behind)."""
        with self.db.read() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(holds)
                                    .where(holds.c.status == "open")).scalar_one())

    def verify(self) -> list[str]:
        with self.db.read() as conn:
            return verify(conn)


def _usd(text: str) -> int:
    from tollway.money import parse_usd

    return parse_usd(text)


@dataclass(frozen=True)
class Serving:
    """What a module's served Tollway differs in. ``catalog``: the catalog text (default: the
    fake catalog on the module's fake upstream); ``env``: the environment while it runs
    (default ``GATEWAY_ENV``); ``clock``: a clock the module moves."""

    catalog: str | None = None
    env: dict[str, str] | None = None
    clock: FakeClock | None = None


@contextlib.contextmanager
def running_tollway(db: Database, catalog: str, fake: FakeUpstream | None = None,
                    env: dict[str, str] | None = None,
                    clock: FakeClock | None = None) -> Iterator[Tollway]:
    """Apply ``catalog`` and serve the gateway on ``db``, with ``env`` (default
    :data:`GATEWAY_ENV`) set while it runs, on ``clock`` if given."""
    apply_catalog_text(db, catalog)
    with _environment(GATEWAY_ENV if env is None else env):
        gateway = GatewayThread(db.url, clock=clock)
        gateway.start()
        tollway = Tollway(db, gateway, fake)
        try:
            yield tollway
        finally:
            tollway.close_clients()
            gateway.stop()


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_databases = itertools.count(1)


@contextlib.contextmanager
def fresh_database(request: Any) -> Iterator[Database]:
    """A new migrated database of the kind ``request.param`` names ("sqlite" or
    "postgresql"), for a module-scoped fixture (conftest's ``db`` is per test; starting a
    gateway and copying a PostgreSQL database for every test would cost seconds each)."""
    if request.param == "sqlite":
        path = request.getfixturevalue("tmp_path_factory").mktemp("gateway") / "tollway.db"
        db = Database(f"sqlite:///{path}")
        upgrade(db)
        try:
            yield db
        finally:
            db.dispose()
        return
    template = request.getfixturevalue("pg_template")  # skips when PostgreSQL is absent
    name = f"tollway_gw{os.getpid()}_{next(_databases)}"
    base = os.environ["TOLLWAY_TEST_POSTGRES_URL"]
    admin = sa.create_engine(normalize_url(base), isolation_level="AUTOCOMMIT",
                             poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name} TEMPLATE {template}")
    db = Database(sa.engine.make_url(normalize_url(base)).set(database=name)
                  .render_as_string(hide_password=False))
    try:
        yield db
    finally:
        db.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


async def read_then_leave(url: str, key: str, body: dict[str, Any],
                          events: int = 2) -> list[bytes]:
    """POST a streamed request to ``url``, read ``events`` SSE events and drop the
    connection mid-stream (a client that went away); the events read."""
    got: list[bytes] = []
    async with aiohttp.ClientSession() as session:
        async with session.post(url, headers={"Authorization": f"Bearer {key}"},
                                json=body) as response:
            assert response.status == 200
            buffer = b""
            async for data in response.content.iter_any():
                buffer += data
                got = sse_events(buffer)
                if len(got) >= events:
                    response.close()  # drop the connection, mid-stream
                    break
    return got


def sse_events(raw: bytes) -> list[bytes]:
    """The ``data:`` payloads of an SSE body, in order (comments dropped)."""
    events = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = [line[5:].lstrip(b" ") for line in block.split(b"\n")
                 if line.startswith(b"data:")]
        if lines:
            events.append(b"\n".join(lines))
    return events


def error_of(response: Any) -> dict[str, Any]:
    """The error object of a gateway error response, checked for the one exact shape:
    ``{"error": {"type", "code", "message", "param", "request_id"}}`` with ``request_id``
    equal to the ``X-Request-Id`` header (``param``: a field name or null). ``response`` is an
    httpx response (openai's errors carry one)."""
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"type", "code", "message", "param", "request_id"}, error
    assert all(isinstance(error[k], str) and error[k] for k in error if k != "param"), error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["request_id"] == response.headers["x-request-id"], (error, response.headers)
    return dict(error)
