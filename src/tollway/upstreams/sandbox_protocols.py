"""The sandbox's other protocols: Anthropic Messages (with prompt-cache usage), OpenAI
Responses and image generation — deterministic, offline, so ``make serve`` demonstrates every
route and every token kind.

Messages: the reply echoes the last user message as chat does. Usage follows Anthropic's
semantics (``input_tokens`` EXCLUDES cache tokens): a prompt of 1,024 tokens or more reports
half of it as a cache read; content blocks marked ``cache_control`` report their tokens as
cache writes (1-hour for ``{"ttl": "1h"}``, else 5-minute), split in ``cache_creation``.
Responses: usage in OpenAI Responses semantics (``input_tokens`` includes cached tokens,
``output_tokens`` includes reasoning). Images: ``n`` deterministic placeholder images.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from tollway import tokens
from tollway.upstreams import sandbox_agent
from tollway.upstreams.base import BufferedResponse

REASONING_TOKENS = 16
CACHE_MIN_PROMPT = 1024
#: A 1×1 transparent PNG: what every sandbox image is.
PIXEL = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")).decode()


def _json(status: int, body: Any) -> BufferedResponse:
    return BufferedResponse(status, json.dumps(body).encode())


def _last_user_text(messages: Any) -> str:
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(str(p.get("text", "[image]")) for p in content
                                if isinstance(p, dict) and p.get("type") in (
                                    "text", "input_text", "image", "input_image"))
    return ""


def _reply(text: str, limit: int | None) -> tuple[str, int, bool]:
    """(the reply, its tokens, whether it was cut at ``limit``)."""
    encoding = tokens._encoding()
    ids = encoding.encode_ordinary(text)
    cut = limit is not None and len(ids) > limit
    if cut:
        ids = ids[:limit]
    return (encoding.decode(ids) if ids else ""), len(ids), cut


def _pieces(text: str) -> list[str]:
    return re.findall(r"\S+\s*|\s+", text)


def _sse(name: str, body: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(body)}\n\n".encode()


async def _events(events: list[bytes]) -> AsyncIterator[bytes]:
    for event in events:
        yield event


def _rid(prefix: str, payload: dict[str, Any]) -> str:
    return prefix + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- messages

#: What ``message_delta`` repeats of the usage (cumulative, as Anthropic sends it).
_DELTA_USAGE = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                "output_tokens", "server_tool_use")


def _tool_results(message: Any) -> list[dict[str, Any]]:
    content = message.get("content") if isinstance(message, dict) else None
    return [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"] \
        if isinstance(content, list) else []


def _anthropic_tools(payload: dict[str, Any]) -> tuple[list[sandbox_agent.Tool], str,
                                                       str | None, bool, set[str]]:
    """The arguments of :func:`sandbox_agent.choose` for a Messages request: client tools
    (server tools such as ``web_search`` have no schema and are never called)."""
    tools = [sandbox_agent.Tool(str(t.get("name", "tool")), t.get("input_schema") or {})
             for t in payload.get("tools") or []
             if isinstance(t, dict) and isinstance(t.get("input_schema"), dict)]
    choice = payload.get("tool_choice")
    mode, forced = "auto", None
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind in ("none", "auto"):
            mode = str(kind)
        elif kind == "any":
            mode = "required"
        elif kind == "tool":
            mode, forced = "tool", str(choice.get("name"))
    messages = [m for m in payload.get("messages") or [] if isinstance(m, dict)]
    after = bool(messages) and bool(_tool_results(messages[-1]))
    called = {str(b.get("name")) for m in messages if m.get("role") == "assistant"
              and isinstance(m.get("content"), list) for b in m["content"]
              if isinstance(b, dict) and b.get("type") == "tool_use"}
    return tools, mode, forced, after, called


def _anthropic_answer(payload: dict[str, Any], said: str) -> str:
    messages = [m for m in payload.get("messages") or [] if isinstance(m, dict)]
    results = _tool_results(messages[-1]) if messages else []
    if results:
        return "Tool result: " + sandbox_agent.tool_result_text(results[-1].get("content"))
    return "You said: " + said



def _cache_writes(payload: dict[str, Any]) -> tuple[int, int]:
    """(5-minute, 1-hour) cache-write tokens: the blocks marked ``cache_control``."""
    writes = [0, 0]
    blocks: list[Any] = []
    if isinstance(payload.get("system"), list):
        blocks += payload["system"]
    for message in payload.get("messages") or []:
        if isinstance(message, dict) and isinstance(message.get("content"), list):
            blocks += message["content"]
    for block in blocks:
        if isinstance(block, dict) and isinstance(block.get("cache_control"), dict):
            size = tokens.count(str(block.get("text") or json.dumps(block)))
            writes[block["cache_control"].get("ttl") == "1h"] += size
    return writes[0], writes[1]


def messages(payload: dict[str, Any]) -> BufferedResponse:
    model = str(payload.get("model", "sandbox"))
    limit = payload.get("max_tokens")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        return _json(400, {"type": "error", "error": {"type": "invalid_request_error",
                                                      "message": "max_tokens is required"}})
    prompt = tokens.count_prompt(payload)
    read = prompt // 2 if prompt >= CACHE_MIN_PROMPT else 0
    write_5m, write_1h = _cache_writes(payload)
    write_1h = min(write_1h, prompt - read)
    write_5m = min(write_5m, prompt - read - write_1h)
    said = _last_user_text(payload.get("messages"))
    call = sandbox_agent.choose(*_anthropic_tools(payload), text=said[:200])
    blocks: list[dict[str, Any]]
    if call is not None:
        blocks = [{"type": "tool_use", "id": "toolu_" + _rid("", {"a": call.arguments})[:12],
                   "name": call.name, "input": call.arguments}]
        output, stop = tokens.count(call.arguments_json), "tool_use"
    else:
        output_format = payload.get("output_format")
        config = payload.get("output_config")
        if isinstance(config, dict) and output_format is None:
            output_format = config.get("format")
        answer = sandbox_agent.structured(output_format, said) or _anthropic_answer(payload,
                                                                                   said)
        text, output, cut = _reply(answer, limit)
        blocks = [{"type": "text", "text": text, "citations": None}]
        stop = "max_tokens" if cut else "end_turn"
    usage = {"input_tokens": prompt - read - write_5m - write_1h,
             "cache_creation_input_tokens": write_5m + write_1h,
             "cache_read_input_tokens": read,
             "cache_creation": {"ephemeral_5m_input_tokens": write_5m,
                                "ephemeral_1h_input_tokens": write_1h},
             "output_tokens": output, "server_tool_use": None, "service_tier": "standard"}
    rid = _rid("msg_sbx", payload)
    if not payload.get("stream"):
        return _json(200, {"id": rid, "type": "message", "role": "assistant", "model": model,
                           "content": blocks, "stop_reason": stop, "stop_sequence": None,
                           "usage": usage})
    start: dict[str, Any] = {
        "id": rid, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {**usage, "output_tokens": 1}}
    events = [_sse("message_start", {"type": "message_start", "message": start})]
    block = blocks[0]
    if block["type"] == "text":
        events.append(_sse("content_block_start", {"type": "content_block_start", "index": 0,
                                                   "content_block": {"type": "text", "text": "",
                                                                     "citations": None}}))
        events.append(_sse("ping", {"type": "ping"}))
        events += [_sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                "delta": {"type": "text_delta", "text": piece}})
                   for piece in _pieces(block["text"])]
    else:
        events.append(_sse("content_block_start", {"type": "content_block_start", "index": 0,
                                                   "content_block": {**block, "input": {}}}))
        events.append(_sse("content_block_delta", {
            "type": "content_block_delta", "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}}))
    events.append(_sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
    events.append(_sse("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": stop, "stop_sequence": None},
                                         "usage": {k: usage[k] for k in _DELTA_USAGE}}))
    events.append(_sse("message_stop", {"type": "message_stop"}))
    return BufferedResponse(200, _events(events), "text/event-stream")


# --------------------------------------------------------------------------- responses


def _responses_tools(payload: dict[str, Any]) -> tuple[list[sandbox_agent.Tool], str,
                                                       str | None, bool, set[str]]:
    """The arguments of :func:`sandbox_agent.choose` for a Responses request: function tools
    (hosted tools have no schema and are never called)."""
    tools = [sandbox_agent.Tool(str(t.get("name", "tool")), t.get("parameters") or {})
             for t in payload.get("tools") or []
             if isinstance(t, dict) and t.get("type") == "function"]
    choice = payload.get("tool_choice")
    mode, forced = "auto", None
    if choice in ("none", "auto", "required"):
        mode = str(choice)
    elif isinstance(choice, dict) and choice.get("type") == "function":
        mode, forced = "tool", str(choice.get("name"))
    raw = payload.get("input")
    items = [i for i in raw if isinstance(i, dict)] if isinstance(raw, list) else []
    after = bool(items) and items[-1].get("type") == "function_call_output"
    called = {str(i.get("name")) for i in items if i.get("type") == "function_call"}
    return tools, mode, forced, after, called


def responses(payload: dict[str, Any]) -> BufferedResponse:
    model = str(payload.get("model", "sandbox"))
    limit = payload.get("max_output_tokens")
    limit = limit if isinstance(limit, int) and not isinstance(limit, bool) else None
    reasoning = REASONING_TOKENS if "reason" in model else 0
    if limit is not None:
        reasoning = min(reasoning, limit // 2)
    raw = payload.get("input")
    said = raw if isinstance(raw, str) else _last_user_text(raw)
    rid = _rid("resp_sbx", payload)
    call = sandbox_agent.choose(*_responses_tools(payload), text=said[:200])
    text_param = payload.get("text")
    fmt = text_param.get("format") if isinstance(text_param, dict) else None
    item: dict[str, Any]
    cut = False
    if call is not None:
        arguments = call.arguments_json
        item = {"type": "function_call", "id": "fc_" + rid[len("resp_"):],
                "call_id": "call_" + _rid("", {"a": call.arguments})[:12], "name": call.name,
                "arguments": arguments, "status": "completed"}
        visible = tokens.count(call.name) + tokens.count(arguments)
        text = ""
    else:
        items = [i for i in raw if isinstance(i, dict)] if isinstance(raw, list) else []
        if items and items[-1].get("type") == "function_call_output":
            answer = "Tool result: " + sandbox_agent.tool_result_text(items[-1].get("output"))
        else:
            answer = sandbox_agent.structured(fmt, said) or "You said: " + said
        text, visible, cut = _reply(answer, None if limit is None else limit - reasoning)
        item = {"type": "message", "id": "msg_" + rid[len("resp_"):], "status": "completed",
                "role": "assistant", "content": [{"type": "output_text", "text": text,
                                                  "annotations": [], "logprobs": []}]}
    prompt = tokens.count_prompt(payload)
    cached = prompt // 2 if prompt >= CACHE_MIN_PROMPT else 0
    usage = {"input_tokens": prompt,
             "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
             "output_tokens": visible + reasoning,
             "output_tokens_details": {"reasoning_tokens": reasoning},
             "total_tokens": prompt + visible + reasoning}
    created = int(time.time())
    done = {"id": rid, "object": "response", "created_at": created,
            "status": "incomplete" if cut else "completed", "completed_at": created,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "instructions": payload.get("instructions"), "max_output_tokens": limit,
            "model": model, "output": [item], "parallel_tool_calls": True,
            "previous_response_id": payload.get("previous_response_id"),
            "metadata": payload.get("metadata") or {}, "temperature": 1.0, "top_p": 1.0,
            "text": {"format": fmt if isinstance(fmt, dict) else {"type": "text"}},
            "tool_choice": payload.get("tool_choice") or "auto",
            "tools": [{"strict": True, **t} if isinstance(t, dict) and t.get("type") == "function"
                      else t for t in payload.get("tools") or []],
            "truncation": "disabled", "usage": usage}
    if not payload.get("stream"):
        return _json(200, done)
    sequence = itertools.count()

    def event(kind: str, **body: Any) -> bytes:
        return _sse(kind, {"type": kind, "sequence_number": next(sequence), **body})

    started = {k: v for k, v in done.items() if k != "usage"}  # usage comes at the end
    started.update(status="in_progress", completed_at=None, output=[], incomplete_details=None)
    events = [event("response.created", response=started),
              event("response.in_progress", response=started)]
    if item["type"] == "function_call":
        events += [
            event("response.output_item.added", output_index=0,
                  item={**item, "arguments": "", "status": "in_progress"}),
            event("response.function_call_arguments.delta", item_id=item["id"], output_index=0,
                  delta=item["arguments"]),
            event("response.function_call_arguments.done", item_id=item["id"], output_index=0,
                  name=item["name"], arguments=item["arguments"])]
    else:
        where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        events += [event("response.output_item.added", output_index=0,
                         item={**item, "status": "in_progress", "content": []}),
                   event("response.content_part.added", **where,
                         part={"type": "output_text", "text": "", "annotations": [],
                               "logprobs": []})]
        events += [event("response.output_text.delta", **where, delta=piece, logprobs=[])
                   for piece in _pieces(text)]
        events += [event("response.output_text.done", **where, text=text, logprobs=[]),
                   event("response.content_part.done", **where, part=item["content"][0])]
    events += [event("response.output_item.done", output_index=0, item=item),
               event("response.incomplete" if cut else "response.completed", response=done)]
    return BufferedResponse(200, _events(events), "text/event-stream")


# --------------------------------------------------------------------------- images


def images(payload: dict[str, Any]) -> BufferedResponse:
    n = payload.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10:
        return _json(400, {"error": {"message": "n must be from 1 to 10",
                                     "type": "invalid_request_error", "param": "n",
                                     "code": None}})
    prompt = str(payload.get("prompt", ""))
    if payload.get("response_format") == "b64_json":
        data = [{"b64_json": PIXEL, "revised_prompt": prompt} for _ in range(n)]
    else:
        digest = _rid("", payload)
        data = [{"url": f"https://sandbox.invalid/images/{digest}-{i}.png",
                 "revised_prompt": prompt} for i in range(n)]
    return _json(200, {"created": int(time.time()), "data": data})
