"""The sandbox's JSON values from JSON Schemas: each validates against its schema and is the
same every time (what structured output and tool calls of a client library rely on)."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from tollway.upstreams.sandbox_agent import Tool, choose, structured
from tollway.upstreams.sandbox_schema import instance

PERSON = {  # what pydantic emits for a model with a nested model, an enum and optionals
    "$defs": {
        "Address": {"type": "object", "properties": {
            "city": {"type": "string"}, "zip": {"type": "string", "minLength": 5}},
            "required": ["city", "zip"], "additionalProperties": False},
        "Role": {"enum": ["admin", "user"], "type": "string"}},
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 18, "maximum": 130},
        "score": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "role": {"$ref": "#/$defs/Role"},
        "address": {"$ref": "#/$defs/Address"},
        "nickname": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2,
                 "uniqueItems": True},
        "kind": {"const": "person"},
        "active": {"type": "boolean"},
        "born": {"type": "string", "format": "date"},
    },
    "required": ["name", "age", "score", "role", "address", "tags", "kind", "active"],
    "additionalProperties": False,
}

SCHEMAS: list[dict[str, Any]] = [
    PERSON,
    {"type": "object", "properties": {}},
    {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"qty": {"type": "integer", "multipleOf": 5,
                                                 "minimum": 3}},
        "required": ["qty"]}}}, "required": ["items"]},
    {"type": "object", "properties": {"v": {"oneOf": [{"type": "integer"},
                                                      {"type": "string"}]},
                                      "w": {"type": ["null", "number"], "minimum": 2.5},
                                      "x": {"allOf": [{"$ref": "#/$defs/A"}]}},
     "required": ["v", "w", "x"],
     "$defs": {"A": {"type": "object", "properties": {"a": {"type": "string",
                                                            "minLength": 3}},
                     "required": ["a"]}}},
    {"$ref": "#/$defs/Node", "$defs": {"Node": {  # recursive: cut short, still valid
        "type": "object", "properties": {"child": {"anyOf": [{"$ref": "#/$defs/Node"},
                                                            {"type": "null"}]}},
        "required": ["child"]}}},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=range(len(SCHEMAS)))
def test_every_generated_instance_validates(schema: dict[str, Any]) -> None:
    value = instance(schema, "hello sandbox")
    jsonschema.validate(value, schema)
    assert instance(schema, "hello sandbox") == value  # deterministic


def test_the_values_read_as_documented() -> None:
    value = instance(PERSON, "hello sandbox")
    assert value == {
        "name": "hello sa",  # the user's text, cut to maxLength
        "age": 18, "score": 0.5, "role": "admin",
        "address": {"city": "city", "zip": "zipxx"},  # padded to minLength
        "nickname": "nickname", "tags": ["tags", "tags 2"], "kind": "person", "active": True,
        "born": "2026-01-01"}


def test_tool_choice_decides_which_tool_and_when_to_stop() -> None:
    tools = [Tool("search", {"type": "object", "properties": {"q": {"type": "string"}},
                             "required": ["q"]}),
             Tool("final_result", {"type": "object", "properties": {
                 "answer": {"type": "integer"}}, "required": ["answer"]})]
    first = choose(tools, "auto", None, False, set(), text="cats")
    assert first is not None and (first.name, first.arguments) == ("search", {"q": "cats"})
    assert choose(tools, "auto", None, True, {"search"}, text="cats") is None  # answer now
    assert choose(tools, "none", None, False, set(), text="cats") is None
    forced = choose(tools, "tool", "final_result", False, set(), text="cats")
    assert forced is not None and forced.arguments == {"answer": 1}
    # required: a tool not yet called, so an agent loop reaches its output tool
    after = choose(tools, "required", None, True, {"search"}, text="cats")
    assert after is not None and after.name == "final_result"


def test_structured_text_for_each_format() -> None:
    assert structured({"type": "json_object"}, "hi") == '{"answer": "You said: hi"}'
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert structured({"type": "json_schema", "json_schema": {"name": "x", "schema": schema,
                                                              "strict": True}}, "hi") == (
        '{"n": 1}')
    assert structured({"type": "json_schema", "name": "x", "schema": schema}, "hi") == (
        '{"n": 1}')  # Responses' text.format carries the schema beside its name
    assert structured({"type": "text"}, "hi") is None and structured(None, "hi") is None
