"""Deterministic JSON values from a JSON Schema, so the sandbox answers structured output and
tool calls the way software expects a model to: an instance that validates against the
schema the client sent (types, ``enum``, ``const``, ``required``, nested objects, arrays,
``$ref`` / ``$defs``, ``anyOf`` / ``oneOf`` / ``allOf``, simple bounds and formats).

The same schema and text always give the same value: the first free-text string is the
``text`` given (the last user message, cut to ``maxLength``), every other string is its
property's name; numbers sit at their lower bound (or 1), arrays hold ``minItems`` items (at
least one), optional properties are all present unless ``additionalProperties`` rules
nothing out. What the generator cannot satisfy (a ``pattern``) is answered as best it can:
the sandbox is a demonstration, not a solver.
"""

from __future__ import annotations

from typing import Any

#: How deep nested schemas (recursive ``$ref`` included) are followed before the value is
#: cut short with the simplest allowed one.
MAX_DEPTH = 12
_FORMATS = {"date-time": "2026-01-01T00:00:00Z", "date": "2026-01-01", "time": "00:00:00",
            "email": "sandbox@example.com", "uri": "https://example.com/sandbox",
            "url": "https://example.com/sandbox", "uuid": "00000000-0000-4000-8000-000000000000",
            "ipv4": "192.0.2.1", "ipv6": "2001:db8::1", "hostname": "example.com",
            "duration": "P1D"}


def instance(schema: Any, text: str = "") -> Any:
    """A value valid for ``schema``; ``text`` fills the first free-text string."""
    return _Generator(schema if isinstance(schema, dict) else {}, text).value(schema, "value", 0)


class _Generator:
    def __init__(self, root: dict[str, Any], text: str) -> None:
        self.root = root
        self.text = text
        self.text_used = False

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        seen = 0
        while isinstance(schema.get("$ref"), str) and seen < MAX_DEPTH:
            target: Any = self.root
            ref = schema["$ref"]
            if not ref.startswith("#"):
                return {}
            for part in ref.lstrip("#").strip("/").split("/"):
                if not part:
                    continue
                part = part.replace("~1", "/").replace("~0", "~")
                target = target.get(part) if isinstance(target, dict) else None
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**target, **rest} if isinstance(target, dict) else rest
            seen += 1
        return schema

    def value(self, schema: Any, name: str, depth: int) -> Any:
        if schema is True or not isinstance(schema, dict):
            return self.string({}, name)
        schema = self.resolve(schema)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][0]
        if isinstance(schema.get("allOf"), list):
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                if isinstance(part, dict):
                    part = self.resolve(part)
                    for key, val in part.items():
                        if key in ("properties",) and isinstance(val, dict):
                            merged["properties"] = {**merged.get("properties", {}), **val}
                        elif key == "required" and isinstance(val, list):
                            merged["required"] = [*merged.get("required", []), *val]
                        else:
                            merged.setdefault(key, val)
            return self.value(merged, name, depth)
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                chosen = self.pick(options, depth)
                rest = {k: v for k, v in schema.items() if k != key}
                return self.value({**rest, **self.resolve(chosen)} if isinstance(chosen, dict)
                                  else chosen, name, depth)
        kind = schema.get("type")
        if isinstance(kind, list):
            kinds = [k for k in kind if k != "null"] or ["null"]
            kind = kinds[0]
        if kind is None:
            if "properties" in schema or "required" in schema:
                kind = "object"
            elif "items" in schema or "prefixItems" in schema:
                kind = "array"
            else:
                kind = "string"
        if kind == "object":
            return self.obj(schema, depth)
        if kind == "array":
            return self.array(schema, name, depth)
        if kind == "integer":
            return self.number(schema, integer=True)
        if kind == "number":
            return self.number(schema, integer=False)
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        return self.string(schema, name)

    def pick(self, options: list[Any], depth: int) -> Any:
        """The first option that is not ``null`` (and, deep down, the simplest one)."""
        usable = [o for o in options
                  if not (isinstance(o, dict) and self.resolve(o).get("type") == "null")]
        if depth >= MAX_DEPTH:
            nulls = [o for o in options if o not in usable]
            if nulls:
                return nulls[0]
        return (usable or options)[0]

    def obj(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = [r for r in schema.get("required") or [] if isinstance(r, str)]
        names = list(properties) if depth < MAX_DEPTH else required
        names += [r for r in required if r not in names]
        out: dict[str, Any] = {}
        for prop in names:
            out[prop] = self.value(properties.get(prop, {}), prop, depth + 1)
        return out

    def array(self, schema: dict[str, Any], name: str, depth: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        prefix = prefix if isinstance(prefix, list) else []
        low = schema.get("minItems")
        count = low if isinstance(low, int) and low > 0 else (0 if depth >= MAX_DEPTH else 1)
        high = schema.get("maxItems")
        if isinstance(high, int):
            count = min(count, high)
        count = max(count, len(prefix)) if prefix else count
        items = schema.get("items")
        out = [self.value(prefix[i] if i < len(prefix) else items, name, depth + 1)
               for i in range(count)]
        if schema.get("uniqueItems") and len(out) > 1:
            out = [v if i == 0 else _distinct(v, i) for i, v in enumerate(out)]
        return out

    def number(self, schema: dict[str, Any], *, integer: bool) -> int | float:
        low, high = _bound(schema.get("minimum")), _bound(schema.get("maximum"))
        x_low, x_high = schema.get("exclusiveMinimum"), _bound(schema.get("exclusiveMaximum"))
        step = 1.0 if integer else 0.5
        value = 1.0 if low is None else low
        if (x_low_bound := _bound(x_low)) is not None:
            value = x_low_bound + step
        elif x_low is True and low is not None:  # draft 4's boolean form
            value = low + step
        if high is not None and value > high:
            value = high
        if x_high is not None and value >= x_high:
            value = x_high - step
        multiple = _bound(schema.get("multipleOf"))
        if multiple is not None and multiple > 0 and value % multiple:
            value = (value // multiple + 1) * multiple
        if integer or value == int(value):
            return int(value)
        return value

    def string(self, schema: dict[str, Any], name: str) -> str:
        fmt = schema.get("format")
        if isinstance(fmt, str) and fmt in _FORMATS:
            return _FORMATS[fmt]
        if not self.text_used and self.text and "pattern" not in schema:
            self.text_used = True
            value = self.text
        else:
            value = name
        low, high = schema.get("minLength"), schema.get("maxLength")
        if isinstance(high, int) and high >= 0:
            value = value[:high]
        if isinstance(low, int) and len(value) < low:
            value = value + "x" * (low - len(value))
        return value


def _num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _bound(value: Any) -> float | None:
    return float(value) if _num(value) else None


def _distinct(value: Any, index: int) -> Any:
    if isinstance(value, str):
        return f"{value} {index + 1}"
    if _num(value):
        return value + index
    return value
