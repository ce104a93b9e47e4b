"""The OpenAPI document describes every route the application serves, with money as strings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from starlette.routing import Mount, Route

from tollway.api.openapi import SPEC
from tollway.app import create_app
from tollway.store.db import Database
from tollway.store.migrate import upgrade


def _routes() -> set[tuple[str, str]]:
    app = create_app(database_url="sqlite://", admin_token="x")
    found: set[tuple[str, str]] = set()

    def walk(routes: list[Any], prefix: str) -> None:
        for route in routes:
            if isinstance(route, Mount):
                walk(route.routes, prefix + route.path)
            elif isinstance(route, Route):
                path = re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", prefix + route.path)
                for method in route.methods or ():
                    if method != "HEAD":
                        found.add((path, method.lower()))
    walk(app.routes, "")
    return found


def test_every_route_is_documented_and_nothing_else() -> None:
    documented = {(path, method) for path, ops in SPEC["paths"].items() for method in ops}
    assert _routes() == documented


def _money_fields(node: Any, where: str = "") -> list[tuple[str, Any]]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key.endswith("_usd"):
                found.append((f"{where}.{key}", value))
            found += _money_fields(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _money_fields(value, f"{where}[{i}]")
    return found


def test_the_document_is_served(tmp_path: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    url = f"sqlite:///{tmp_path / 't.db'}"
    db = Database(url)
    upgrade(db)
    db.dispose()
    with TestClient(create_app(database_url=url, admin_token="x")) as client:
        response = client.get("/openapi.json")
    assert response.status_code == 200 and response.json() == SPEC


def test_money_fields_are_decimal_strings() -> None:
    usd = SPEC["components"]["schemas"]["Usd"]
    assert usd["type"] == "string" and re.fullmatch(usd["pattern"], "12.500000000")
    assert not re.fullmatch(usd["pattern"], "12.5")
    fields = _money_fields(SPEC["components"]["schemas"])
    assert len(fields) > 20
    for where, schema in fields:
        if schema.get("type") == "object":  # a map of prices: each value must be money
            schema = schema["additionalProperties"]
        options = schema.get("oneOf", [schema])
        for option in options:
            assert option == {"$ref": "#/components/schemas/Usd"} or option.get("type") in (
                "string", "null"), where
