"""``GET /openapi.json``: the public surface, written down once. Money is always a string of
9 decimal places (schema ``Usd``); a test checks that every route of the application is here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

USD = {"$ref": "#/components/schemas/Usd"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERRORS = {str(code): {"$ref": "#/components/responses/Error"}
          for code in (400, 401, 402, 403, 404, 409, 413, 429, 502, 503, 504)}


def _op(summary: str, response: dict[str, Any], *, security: str | None = "apiKey",
        params: Sequence[str] = (), body: dict[str, Any] | None = None,
        status: str = "200") -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {status: response, **ERRORS}}
    if security:
        op["security"] = [{security: []}]
    if params:
        op["parameters"] = [{"$ref": f"#/components/parameters/{p}"} for p in params]
    if body is not None:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": body}}}
    return op


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


def _path(name: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema or {"type": "string"}}


LOG_FILTERS = ["start", "end", "model", "endpoint", "product", "key", "group", "type",
               "billing_type"]
OBJECT = {"type": "object", "additionalProperties": True}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Tollway", "version": "0.1.0",
             "description": "API marketplace gateway with exact usage-based billing. Money is "
                            "a decimal string with 9 decimal places (USD)."},
    "paths": {
        "/healthz": {"get": _op("Liveness and database check", _json(OBJECT), security=None)},
        "/openapi.json": {"get": _op("This document", _json(OBJECT), security=None)},
        "/metrics": {"get": _op(
            "This worker's counters in Prometheus text format (admin or metrics token)",
            {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}},
            security="adminToken")},
        "/v1/marketplace": {"get": _op("Every listing with billing type and prices per group",
                                       _json(_ref("Marketplace")), security=None)},
        "/v1/billing/balance": {"get": _op("The key's account balance", _json(_ref("Balance")))},
        "/v1/billing/usage": {"get": _op("Usage log, newest first, keyset-paginated",
                                         _json(_ref("UsagePage")),
                                         params=[*LOG_FILTERS, "limit", "cursor"])},
        "/v1/billing/usage/export": {"get": _op(
            "The filtered log as CSV or JSON Lines, streamed",
            {"description": "OK", "content": {"text/csv": {"schema": {"type": "string"}},
                                              "application/x-ndjson": {"schema": {
                                                  "type": "string"}}}},
            params=[*LOG_FILTERS, "format_export"])},
        "/v1/billing/usage/{request_id}": {"get": _op(
            "One usage record with its pricing explanation", _json(_ref("UsageRecord")),
            params=["request_id"])},
        "/v1/billing/summary": {"get": _op("Totals and groups from hourly rollups",
                                           _json(_ref("Summary")),
                                           params=["start", "end", "group_by"])},
        "/v1/billing/statement": {"get": _op("A month's statement (json, csv or html)",
                                             _json(_ref("Statement")),
                                             params=["month", "format_statement"])},
        "/v1/chat/completions": {"post": _op(
            "OpenAI-compatible chat completions (streaming included), metered",
            _json(OBJECT, "The upstream's answer; X-Tollway-Cost-USD carries the cost"),
            body=_ref("ChatRequest"))},
        "/v1/completions": {"post": _op("OpenAI-compatible completions, metered", _json(OBJECT),
                                        body=OBJECT)},
        "/v1/embeddings": {"post": _op("OpenAI-compatible embeddings, metered", _json(OBJECT),
                                       body=OBJECT)},
        "/v1/models": {"get": _op("Models this key may use", _json(OBJECT))},
        "/apis/v1/{path}": {method: _op(
            "A catalog data API: charged per successful (2xx) call",
            {"description": "The upstream's answer, unchanged"}, params=["api_path"])
            for method in ("get", "post", "put", "patch", "delete")},
        "/admin/v1/accounts": {
            "get": _op("All accounts", _json(OBJECT), security="adminToken"),
            "post": _op("Create an account", _json(_ref("Account")), security="adminToken",
                        body=_ref("NewAccount"), status="201")},
        "/admin/v1/accounts/{account}": {"get": _op("One account", _json(_ref("Account")),
                                                    security="adminToken", params=["account"])},
        "/admin/v1/accounts/{account}/topups": {"post": _op(
            "Credit an account (Idempotency-Key header)", _json(_ref("Credit")),
            security="adminToken", params=["account", "idempotency_key"],
            body=_ref("Amount"), status="201")},
        "/admin/v1/accounts/{account}/adjustments": {"post": _op(
            "Correct an account (signed amount, note required)", _json(_ref("Credit")),
            security="adminToken", params=["account", "idempotency_key"],
            body=_ref("Adjustment"), status="201")},
        "/admin/v1/accounts/{account}/keys": {
            "get": _op("An account's keys", _json(OBJECT), security="adminToken",
                       params=["account"]),
            "post": _op("Create a key (the secret is returned once)", _json(_ref("Key")),
                        security="adminToken", params=["account"], body=_ref("NewKey"),
                        status="201")},
        "/admin/v1/keys/{key_id}/revoke": {"post": _op("Revoke a key", _json(_ref("Key")),
                                                       security="adminToken",
                                                       params=["key_id"])},
        "/admin/v1/ledger/verify": {"get": _op("Recompute balances from postings",
                                               _json(OBJECT), security="adminToken")},
        "/admin/v1/usage": {"get": _op("Any account's usage log (?account=)",
                                       _json(_ref("UsagePage")), security="adminToken",
                                       params=[*LOG_FILTERS, "account_query", "limit",
                                               "cursor"])},
        "/admin/v1/usage/export": {"get": _op("Export any account's log",
                                              {"description": "CSV or JSON Lines"},
                                              security="adminToken",
                                              params=[*LOG_FILTERS, "account_query",
                                                      "format_export"])},
        "/admin/v1/usage/{request_id}": {"get": _op("One usage record",
                                                    _json(_ref("UsageRecord")),
                                                    security="adminToken",
                                                    params=["request_id"])},
        "/admin/v1/summary": {"get": _op("Summary over all accounts (or ?account=)",
                                         _json(_ref("Summary")), security="adminToken",
                                         params=["start", "end", "group_by",
                                                 "account_query"])},
        "/admin/v1/accounts/{account}/summary": {"get": _op(
            "One account's summary", _json(_ref("Summary")), security="adminToken",
            params=["account", "start", "end", "group_by"])},
        "/admin/v1/accounts/{account}/statement": {"get": _op(
            "One account's monthly statement", _json(_ref("Statement")),
            security="adminToken", params=["account", "month", "format_statement"])},
    },
    "components": {
        "securitySchemes": {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "A Tollway API key"},
            "adminToken": {"type": "http", "scheme": "bearer",
                           "description": "The operator's admin token"}},
        "parameters": {
            "start": _query("start", {"type": "string", "format": "date-time"}, "inclusive"),
            "end": _query("end", {"type": "string", "format": "date-time"}, "exclusive"),
            "model": _query("model", {"type": "string"}, "a model id"),
            "endpoint": _query("endpoint", {"type": "string"}, "an endpoint id"),
            "product": _query("product", {"type": "string"}, "a model or endpoint id"),
            "key": _query("key", {"type": "integer", "minimum": 1}, "an API key id"),
            "group": _query("group", {"type": "string"}, "a price group"),
            "type": _query("type", {"enum": ["consume", "error", "topup", "adjustment",
                                             "refund", "system"]}, "record type"),
            "billing_type": _query("billing_type", {"enum": ["token", "per_call"]}, ""),
            "limit": _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000},
                            "page size (default 50)"),
            "cursor": _query("cursor", {"type": "string"}, "next_cursor of the previous page"),
            "group_by": _query("group_by", {"type": "string"},
                               "comma-separated: model, endpoint, product, key, day, hour, "
                               "billing_type"),
            "month": {"name": "month", "in": "query", "required": True,
                      "schema": {"type": "string", "pattern": r"^\d{4}-\d{2}$"}},
            "format_export": _query("format", {"enum": ["csv", "jsonl"]}, "default csv"),
            "format_statement": _query("format", {"enum": ["json", "csv", "html"]},
                                       "default json"),
            "account_query": _query("account", {"type": "string"}, "account id or name"),
            "account": _path("account"),
            "request_id": _path("request_id"),
            "key_id": _path("key_id", {"type": "integer", "minimum": 1}),
            "api_path": _path("path"),
            "idempotency_key": {"name": "Idempotency-Key", "in": "header", "required": False,
                                "schema": {"type": "string", "maxLength": 200}},
        },
        "responses": {"Error": _json(_ref("Error"), "An error")},
        "schemas": {
            "Usd": {"type": "string", "pattern": r"^-?\d+\.\d{9}$",
                    "description": "USD, exactly 9 decimal places"},
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["type", "code", "message", "request_id"],
                "properties": {"type": {"type": "string"}, "code": {"type": "string"},
                               "message": {"type": "string"},
                               "request_id": {"type": ["string", "null"]}}}}},
            "Balance": {"type": "object", "properties": {
                "balance_usd": USD, "held_usd": USD, "available_usd": USD, "used_usd": USD,
                "requests": {"type": "integer"}}},
            "Account": {"type": "object", "properties": {
                "id": {"type": "integer"}, "name": {"type": "string"},
                "group": {"type": "string"}, "balance_usd": USD, "held_usd": USD,
                "available_usd": USD, "used_usd": USD, "requests": {"type": "integer"}}},
            "NewAccount": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string"}, "group": {"type": "string"}}},
            "Amount": {"type": "object", "required": ["amount_usd"], "properties": {
                "amount_usd": {"type": "string", "pattern": r"^\d+(\.\d{1,9})?$"},
                "note": {"type": "string"}}},
            "Adjustment": {"type": "object", "required": ["amount_usd", "note"], "properties": {
                "amount_usd": {"type": "string", "pattern": r"^-?\d+(\.\d{1,9})?$"},
                "note": {"type": "string"}}},
            "Credit": {"type": "object", "properties": {
                "entry_id": {"type": "integer"}, "account_id": {"type": "integer"},
                "amount_usd": USD, "available_usd": USD}},
            "NewKey": {"type": "object", "properties": {
                "name": {"type": "string"}, "group": {"type": "string"},
                "models": {"type": "array", "items": {"type": "string"}},
                "quota_usd": {"type": "string", "pattern": r"^\d+(\.\d{1,9})?$"},
                "expires_at": {"type": "string", "format": "date-time"}}},
            "Key": {"type": "object", "properties": {
                "id": {"type": "integer"}, "account_id": {"type": "integer"},
                "prefix": {"type": "string"}, "key": {"type": "string"},
                "quota_usd": {"oneOf": [USD, {"type": "null"}]}, "used_usd": USD,
                "held_usd": USD}},
            "Marketplace": {"type": "object", "properties": {"data": {"type": "array", "items": {
                "type": "object", "properties": {
                    "id": {"type": "string"}, "billing_type": {"enum": ["token", "per_call"]},
                    "price": {"type": "object", "additionalProperties": {
                        "oneOf": [USD, {"type": "null"}]}}}}}}},
            "ChatRequest": {"type": "object", "required": ["model"], "properties": {
                "model": {"type": "string"}, "messages": {"type": "array"},
                "stream": {"type": "boolean"}, "max_tokens": {"type": "integer"}}},
            "UsageRecord": {"type": "object", "properties": {
                "request_id": {"type": "string"}, "type": {"type": "string"},
                "product": {"type": ["string", "null"]}, "cost_usd": USD, "credit_usd": USD,
                "unit_prices_usd": {"type": "object", "additionalProperties": {
                    "oneOf": [USD, {"type": "null"}]}},
                "pricing": {"type": ["object", "null"]}}},
            "UsagePage": {"type": "object", "properties": {
                "data": {"type": "array", "items": _ref("UsageRecord")},
                "next_cursor": {"type": ["string", "null"]}, "has_more": {"type": "boolean"}}},
            "Summary": {"type": "object", "properties": {
                "totals": {"type": "object", "properties": {"cost_usd": USD}},
                "data": {"type": "array", "items": {"type": "object", "properties": {
                    "cost_usd": USD}}}}},
            "Statement": {"type": "object", "properties": {
                "opening_balance_usd": USD, "topups_usd": USD, "adjustments_usd": USD,
                "charges_usd": USD, "written_off_usd": USD, "closing_balance_usd": USD}},
        },
    },
}
