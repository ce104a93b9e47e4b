"""The built-in ``sandbox`` provider: a deterministic simulated LLM and a few data APIs, with
no network, so every billing type can be tried and tested on a bare machine.

The LLM echoes the last user message ("You said: …") with real token counts, honours
``max_tokens`` / ``max_completion_tokens`` (finish_reason ``length``), streams, calls the first
tool when tools are offered, and reports OpenAI-style usage. A model whose upstream name
contains ``reason`` also reports reasoning tokens (included in completion tokens, as OpenAI
does). Prompts of 1,024 tokens or more report half of them as cached, as a provider's prompt
cache would on a repeat. Anthropic Messages, Responses and images are in
:mod:`.sandbox_protocols`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from tollway import tokens
from tollway.upstreams import sandbox_agent, sandbox_protocols
from tollway.upstreams.base import BufferedResponse, UpstreamRequest

REASONING_TOKENS = 16
CACHE_MIN_PROMPT = 1024


def _json(status: int, body: Any) -> BufferedResponse:
    return BufferedResponse(status, json.dumps(body).encode())


def _error(status: int, message: str) -> BufferedResponse:
    return _json(status, {"error": {"message": message, "type": "invalid_request_error",
                                    "param": None, "code": None}})


class SandboxUpstream:
    async def send(self, request: UpstreamRequest) -> BufferedResponse:
        answer = _LLM_PATHS.get(request.path)
        if answer is None:
            return _data_api(request)
        try:
            payload = json.loads(request.body)
        except ValueError:
            return _error(400, "the body is not JSON")
        if not isinstance(payload, dict):
            return _error(400, "the body must be a JSON object")
        return answer(payload)

    async def close(self) -> None:
        return None


# --------------------------------------------------------------------------- LLM


def _last_user_text(payload: dict[str, Any]) -> str:
    if isinstance(payload.get("prompt"), str):
        return str(payload["prompt"])
    for message in reversed(payload.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "[image]") if isinstance(p, dict) else ""
                                for p in content)
    return ""


def _chat_tools(payload: dict[str, Any]) -> tuple[list[sandbox_agent.Tool], str, str | None,
                                                  bool, set[str]]:
    """The arguments of :func:`sandbox_agent.choose` for a chat request (text aside)."""
    tools = [sandbox_agent.Tool(str(f.get("name", "tool")), f.get("parameters") or {})
             for t in payload.get("tools") or []
             if isinstance(t, dict) and isinstance(f := t.get("function"), dict)]
    choice = payload.get("tool_choice")
    mode, forced = "auto", None
    if choice in ("none", "auto", "required"):
        mode = str(choice)
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        mode, forced = "tool", str(choice["function"].get("name"))
    messages = [m for m in payload.get("messages") or [] if isinstance(m, dict)]
    after = bool(messages) and messages[-1].get("role") in ("tool", "function")
    called = {str((c.get("function") or {}).get("name")) for m in messages
              if m.get("role") == "assistant" for c in m.get("tool_calls") or []
              if isinstance(c, dict)}
    return tools, mode, forced, after, called


def _plain_answer(payload: dict[str, Any], said: str) -> str:
    """"You said: …", or after a tool's result, "Tool result: …"."""
    messages = [m for m in payload.get("messages") or [] if isinstance(m, dict)]
    if messages and messages[-1].get("role") in ("tool", "function"):
        return "Tool result: " + sandbox_agent.tool_result_text(messages[-1].get("content"))
    return "You said: " + said


def _limit(payload: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = payload.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return max(value, 0)
    return None


def _complete(payload: dict[str, Any], *, chat: bool) -> BufferedResponse:
    model = str(payload.get("model", "sandbox"))
    limit = _limit(payload)
    reasoning = REASONING_TOKENS if "reason" in model else 0
    if limit is not None:
        reasoning = min(reasoning, limit // 2)
    budget = None if limit is None else limit - reasoning
    encoding = tokens._encoding()
    said = _last_user_text(payload)
    call = sandbox_agent.choose(*_chat_tools(payload), text=said[:200]) if chat else None
    tool_call = None
    if call is not None:
        arguments = call.arguments_json
        tool_call = {"id": "call_" + hashlib.sha256(arguments.encode()).hexdigest()[:12],
                     "type": "function", "function": {"name": call.name, "arguments": arguments}}
        text = ""
        visible = tokens.count(call.name) + tokens.count(arguments)
        finish = "tool_calls"
    else:
        text = (sandbox_agent.structured(payload.get("response_format"), said) if chat
                else None) or _plain_answer(payload, said)
        ids = encoding.encode_ordinary(text)
        finish = "stop"
        if budget is not None and len(ids) > budget:
            ids, finish = ids[:budget], "length"
        text = encoding.decode(ids) if ids else ""
        visible = len(ids)
    prompt = tokens.count_prompt(payload)
    cached = prompt // 2 if prompt >= CACHE_MIN_PROMPT else 0
    usage = {"prompt_tokens": prompt, "completion_tokens": visible + reasoning,
             "total_tokens": prompt + visible + reasoning,
             "prompt_tokens_details": {"cached_tokens": cached},
             "completion_tokens_details": {"reasoning_tokens": reasoning}}
    rid = "sbx-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]
    created = int(time.time())
    if payload.get("stream"):
        options = payload.get("stream_options") or {}
        include = isinstance(options, dict) and options.get("include_usage") is True
        chunks = _stream(rid, created, model, chat, text, tool_call, finish, usage, include)
        return BufferedResponse(200, chunks, "text/event-stream")
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": text or None,
                                   "refusal": None}
        if tool_call:
            message["tool_calls"] = [tool_call]
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish,
                                  "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return _json(200, {"id": rid, "object": obj, "created": created, "model": model,
                       "choices": [choice], "usage": usage})


async def _stream(rid: str, created: int, model: str, chat: bool, text: str,
                  tool_call: dict[str, Any] | None, finish: str, usage: dict[str, Any],
                  include_usage: bool) -> AsyncIterator[bytes]:
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        body = {"id": rid, "object": obj, "created": created, "model": model,
                "choices": choices, **extra}
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    def delta(content: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        if chat:
            return {"index": 0, "delta": content, "finish_reason": reason, "logprobs": None}
        return {"index": 0, "text": content.get("content", ""), "finish_reason": reason,
                "logprobs": None}

    if chat:
        yield event([delta({"role": "assistant", "content": ""})])
    if tool_call:
        yield event([delta({"tool_calls": [{"index": 0, **tool_call}]})])
    for piece in re.findall(r"\S+\s*|\s+", text):
        yield event([delta({"content": piece})])
    yield event([delta({}, finish)])
    if include_usage:
        yield event([], usage=usage)
    yield b"data: [DONE]\n\n"


def _embeddings(payload: dict[str, Any]) -> BufferedResponse:
    raw = payload.get("input")
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list) or not inputs:
        return _error(400, "input must be a string or a list of strings")
    data = []
    total = 0
    for index, item in enumerate(inputs):
        text = item if isinstance(item, str) else json.dumps(item)
        total += tokens.count(text)
        digest = hashlib.sha256(text.encode()).digest()
        vector = [round((b - 128) / 128, 6) for b in digest[:8]]
        data.append({"object": "embedding", "index": index, "embedding": vector})
    return _json(200, {"object": "list", "data": data, "model": payload.get("model"),
                       "usage": {"prompt_tokens": total, "total_tokens": total}})


_LLM_PATHS: dict[str, Callable[[dict[str, Any]], BufferedResponse]] = {
    "/chat/completions": lambda payload: _complete(payload, chat=True),
    "/completions": lambda payload: _complete(payload, chat=False),
    "/embeddings": _embeddings,
    "/messages": sandbox_protocols.messages,
    "/responses": sandbox_protocols.responses,
    "/images/generations": sandbox_protocols.images,
}


# --------------------------------------------------------------------------- data APIs


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


def _data_api(request: UpstreamRequest) -> BufferedResponse:
    query = dict(request.query)
    if request.path == "/search/web" and request.method == "GET":
        q = query.get("q", "").strip()
        if not q:
            return _error(400, "missing query parameter q")
        return _json(200, {"query": q, "results": [
            {"title": f"{q.title()} — result {i}", "url": f"https://example.com/{_seed(q) + i}",
             "snippet": f"Simulated result {i} for '{q}'."} for i in range(1, 4)]})
    if match := re.fullmatch(r"/finance/quote/([A-Za-z.]{1,10})", request.path):
        symbol = match.group(1).upper()
        cents = 1000 + _seed(symbol) % 90000
        return _json(200, {"symbol": symbol, "price": f"{cents // 100}.{cents % 100:02d}",
                           "currency": "USD"})
    if request.path.startswith("/finance/quote/"):
        return _error(404, "unknown symbol")
    if request.path == "/scholar/search" and request.method == "POST":
        try:
            body = json.loads(request.body or b"{}")
        except ValueError:
            return _error(400, "the body is not JSON")
        q = str(body.get("query", "")).strip() if isinstance(body, dict) else ""
        if not q:
            return _error(400, "missing field query")
        return _json(200, {"query": q, "papers": [
            {"title": f"On {q} ({i})", "year": 2000 + _seed(q + str(i)) % 26,
             "citations": _seed(q) % (100 * i)} for i in range(1, 3)]})
    return _error(404, f"the sandbox has no API at {request.method} {request.path}")
