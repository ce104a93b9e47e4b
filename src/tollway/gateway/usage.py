"""Reading usage from upstream answers, checked before anything is billed from it.

OpenAI semantics: ``prompt_tokens`` includes ``prompt_tokens_details.cached_tokens``;
``completion_tokens`` includes ``completion_tokens_details.reasoning_tokens``. Cache writes,
which OpenAI does not report, are read from ``prompt_tokens_details.cache_write_tokens`` where an
OpenAI-compatible upstream provides them. Usage that cannot be real (not integers, negative,
cached more than prompt) is refused, and the caller estimates instead; usage far beyond what was
asked for is capped at the request's bound and flagged: its record says
``usage_source = "capped"`` (the operator lists them with ``GET /admin/v1/usage?review=true``).

Anthropic and Responses usage are read here and converted explicitly to the rating inputs by
:meth:`TokenUsage.from_anthropic` / :meth:`TokenUsage.from_responses`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from tollway.pricing.rating import InvalidUsage, TokenUsage


@dataclass(frozen=True, slots=True)
class MeteredUsage:
    usage: TokenUsage
    reasoning_tokens: int
    source: str  # upstream | estimated | capped
    note: str | None = None  # why it was estimated or capped


def _int(value: Any, name: str) -> int:
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidUsage(f"{name} is not an integer: {value!r}")
    if value < 0:
        raise InvalidUsage(f"{name} is negative: {value}")
    return value


def parse_openai_usage(raw: Any) -> tuple[TokenUsage, int]:
    """(usage, reasoning tokens) from an OpenAI ``usage`` object; raises InvalidUsage."""
    if not isinstance(raw, dict):
        raise InvalidUsage("no usage object")
    prompt_details = raw.get("prompt_tokens_details") or {}
    completion_details = raw.get("completion_tokens_details") or {}
    if not isinstance(prompt_details, dict) or not isinstance(completion_details, dict):
        raise InvalidUsage("usage details are not objects")
    if "prompt_tokens" not in raw:
        raise InvalidUsage("usage has no prompt_tokens")
    usage = TokenUsage(
        prompt_tokens=_int(raw.get("prompt_tokens"), "prompt_tokens"),
        completion_tokens=_int(raw.get("completion_tokens"), "completion_tokens"),
        cached_tokens=_int(prompt_details.get("cached_tokens"), "cached_tokens"),
        cache_write_tokens=_int(prompt_details.get("cache_write_tokens"), "cache_write_tokens"),
    )
    reasoning = _int(completion_details.get("reasoning_tokens"), "reasoning_tokens")
    return usage, min(reasoning, usage.completion_tokens)


def _details(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise InvalidUsage(f"usage {name} is not an object")
    return value


def parse_anthropic_usage(raw: Any) -> TokenUsage:
    """Rating inputs from an Anthropic Messages ``usage`` object (a whole message's, or the
    merge of a stream's ``message_start`` and ``message_delta`` usages); raises
    InvalidUsage."""
    if not isinstance(raw, dict) or "input_tokens" not in raw:
        raise InvalidUsage("no usage object with input_tokens")
    creation = _details(raw, "cache_creation")
    split = {name: _int(creation[name], name) for name in
             ("ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens") if name in creation}
    return TokenUsage.from_anthropic(
        input_tokens=_int(raw.get("input_tokens"), "input_tokens"),
        output_tokens=_int(raw.get("output_tokens"), "output_tokens"),
        cache_read_input_tokens=_int(raw.get("cache_read_input_tokens"),
                                     "cache_read_input_tokens"),
        cache_creation_input_tokens=_int(raw.get("cache_creation_input_tokens"),
                                         "cache_creation_input_tokens"),
        **split).with_tools(_anthropic_tools(raw))


#: Anthropic's ``usage.server_tool_use`` counters → the catalog's tool names
#: (``price.tool_calls``).
ANTHROPIC_TOOLS = {"web_search_requests": "web_search", "web_fetch_requests": "web_fetch",
                   "code_execution_requests": "code_execution"}
#: OpenAI Responses output items of hosted tools (each one call) → the catalog's tool names.
RESPONSES_TOOLS = {"web_search_call": "web_search", "file_search_call": "file_search",
                   "code_interpreter_call": "code_interpreter",
                   "image_generation_call": "image_generation", "computer_call": "computer_use",
                   "mcp_call": "mcp"}
#: Where :func:`parse_responses_usage` finds the hosted tool calls Tollway counted in the
#: answer's ``output`` (put beside the upstream's usage by the Responses route).
TOOL_CALLS_KEY = "tollway_tool_calls"


def _anthropic_tools(raw: dict[str, Any]) -> dict[str, int]:
    used = _details(raw, "server_tool_use")
    return {tool: _int(used.get(counter), counter) for counter, tool in ANTHROPIC_TOOLS.items()
            if used.get(counter)}


def responses_tool_calls(output: Any) -> dict[str, int]:
    """The hosted tool calls in a Response's ``output`` (one per item), by tool."""
    calls: dict[str, int] = {}
    for item in output if isinstance(output, list) else ():
        tool = RESPONSES_TOOLS.get(str(item.get("type"))) if isinstance(item, dict) else None
        if tool is not None:
            calls[tool] = calls.get(tool, 0) + 1
    return calls


def parse_responses_usage(raw: Any) -> tuple[TokenUsage, int]:
    """(usage, reasoning tokens) from an OpenAI Responses ``usage`` object; raises
    InvalidUsage."""
    if not isinstance(raw, dict) or "input_tokens" not in raw:
        raise InvalidUsage("no usage object with input_tokens")
    usage = TokenUsage.from_responses(
        input_tokens=_int(raw.get("input_tokens"), "input_tokens"),
        output_tokens=_int(raw.get("output_tokens"), "output_tokens"),
        cached_tokens=_int(_details(raw, "input_tokens_details").get("cached_tokens"),
                           "cached_tokens")).with_tools(_details(raw, TOOL_CALLS_KEY))
    reasoning = _int(_details(raw, "output_tokens_details").get("reasoning_tokens"),
                     "reasoning_tokens")
    return usage, min(reasoning, usage.completion_tokens)


def bounded(usage: TokenUsage, reasoning: int, *, prompt_bound: int,
            completion_bound: int | None) -> MeteredUsage:
    """Cap counts beyond the request's bounds (and say so); within them, bill as reported."""
    notes = []
    prompt = usage.prompt_tokens
    if prompt > prompt_bound:
        notes.append(f"prompt_tokens {prompt} capped at {prompt_bound}")
        prompt = prompt_bound
    completion = usage.completion_tokens
    if completion_bound is not None and completion > completion_bound:
        notes.append(f"completion_tokens {completion} capped at {completion_bound}")
        completion = completion_bound
    if not notes:
        return MeteredUsage(usage, reasoning, "upstream")
    cached = min(usage.cached_tokens, prompt)
    write = min(usage.cache_write_tokens, prompt - cached)
    write_1h = min(usage.cache_write_1h_tokens, prompt - cached - write)
    capped = replace(usage, prompt_tokens=prompt, completion_tokens=completion,
                     cached_tokens=cached, cache_write_tokens=write,
                     cache_write_1h_tokens=write_1h)
    return MeteredUsage(capped, min(reasoning, completion), "capped",
                        "usage capped for review: " + "; ".join(notes))
