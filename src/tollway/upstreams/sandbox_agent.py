"""What the sandbox decides before it answers, the same way for every protocol: call a tool
(which one, with arguments generated from its JSON schema) or answer text (plain, a JSON
object, or an instance of the requested JSON schema).

The decision an agent loop needs to end:

- ``tool_choice`` ``none`` never calls a tool; a named tool is always that tool;
  ``required`` / ``any`` always calls one — the first tool not yet called in the conversation,
  else the first tool.
- ``auto`` (or no choice) calls the first tool while the conversation's last turn is the
  user's; once the last turn carries a tool's result, the model answers in text
  ("Tool result: …"), so a tool runner stops after one round.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tollway.upstreams.sandbox_schema import instance


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    schema: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] | Any

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments)


def choose(tools: list[Tool], mode: str, forced: str | None, after_result: bool,
           called: set[str], *, text: str) -> ToolCall | None:
    """The tool to call, with its arguments, or None to answer in text. ``mode`` is
    ``auto``, ``none``, ``required`` (Anthropic's ``any``) or ``tool`` (``forced`` names it)."""
    if not tools or mode == "none":
        return None
    tool: Tool | None = None
    if mode == "tool" and forced is not None:
        tool = next((t for t in tools if t.name == forced), None)
    elif mode == "required":
        tool = next((t for t in tools if t.name not in called), tools[0])
    elif not after_result:
        tool = tools[0]
    if tool is None:
        return None
    return ToolCall(tool.name, instance(tool.schema or {"type": "object"}, text))


def structured(fmt: Any, said: str) -> str | None:
    """The text of a structured answer, or None for plain text. ``fmt`` is OpenAI's
    ``response_format`` / Responses' ``text.format`` (``json_schema`` carries its schema at
    ``json_schema.schema`` in chat, at ``schema`` in Responses) or Anthropic's
    ``output_format``."""
    if not isinstance(fmt, dict):
        return None
    kind = fmt.get("type")
    if kind == "json_object":
        return json.dumps({"answer": "You said: " + said})
    if kind == "json_schema":
        inner = fmt.get("json_schema")
        schema = inner.get("schema") if isinstance(inner, dict) else fmt.get("schema")
        return json.dumps(instance(schema if isinstance(schema, dict) else {"type": "object"},
                                   said))
    return None


def tool_result_text(result: Any) -> str:
    """A tool result's content as text (a string, or a list of text parts)."""
    if isinstance(result, str):
        return result
    if isinstance(result, list):
        return " ".join(str(p.get("text", "")) for p in result if isinstance(p, dict))
    return json.dumps(result)
