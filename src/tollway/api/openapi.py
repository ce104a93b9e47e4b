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


ERROR_CODES = (400, 401, 402, 403, 404, 409, 410, 413, 429, 502, 503, 504)
ERRORS = {str(code): {"$ref": "#/components/responses/Error"} for code in ERROR_CODES}
#: The metered routes also pass an upstream's own non-2xx answer through unchanged (LLM
#: routes: its 4xx; data APIs: its 4xx and 5xx), marked ``X-Tollway-Upstream-Error: true``.
GATEWAY_ERRORS = {**{str(code): {"$ref": "#/components/responses/GatewayError"}
                     for code in ERROR_CODES},
                  "4XX": {"$ref": "#/components/responses/GatewayError"}}
API_ERRORS = {**GATEWAY_ERRORS, "5XX": {"$ref": "#/components/responses/GatewayError"}}


def _op(summary: str, response: dict[str, Any], *, security: str | None = "apiKey",
        params: Sequence[str] = (), body: dict[str, Any] | None = None,
        status: str = "200", errors: dict[str, Any] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary,
                          "responses": {status: response, **(errors or ERRORS)}}
    if security:
        op["security"] = [{security: []}]
    if params:
        op["parameters"] = [{"$ref": f"#/components/parameters/{p}"} for p in params]
    if body is not None:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": body}}}
    return op


def _statement(description: str = "OK") -> dict[str, Any]:
    """A statement in the three formats ``format=`` selects."""
    return {"description": description, "content": {
        "application/json": {"schema": _ref("Statement")},
        "text/csv": {"schema": {"type": "string"}},
        "text/html": {"schema": {"type": "string"}}}}


def _metered(description: str, *, stream: bool) -> dict[str, Any]:
    """A metered LLM answer: JSON, or with ``"stream": true`` server-sent events."""
    content: dict[str, Any] = {"application/json": {"schema": OBJECT}}
    if stream:  # events of chat.completion.chunk objects, a usage chunk, then [DONE]
        content["text/event-stream"] = {"schema": {}}
    return {"description": description, "content": content}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


def _path(name: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema or {"type": "string"}}


def html_pages(summary: str, methods: Sequence[str] = ("get",), *,
               security: str | None = None) -> dict[str, Any]:
    """A server-rendered page (web console): HTML, forms posted with a CSRF token."""
    return {method: {"summary": summary, "tags": ["pages"], "responses": {
        "200" if method == "get" else "303": {
            "description": "the page" if method == "get" else "redirect after the form",
            "content": {"text/html": {"schema": {"type": "string"}}}}},
        **({"security": [{security: []}]} if security else {})} for method in methods}


def sign_in_page(summary: str) -> dict[str, Any]:
    """A sign-in form: a refusal re-renders it (401), and so does the throttle (429)."""
    page = html_pages(summary, ("get", "post"))
    html = {"text/html": {"schema": {"type": "string"}}}
    page["post"]["responses"].update({
        "401": {"description": "wrong credentials: the form again", "content": html},
        "429": {"description": "too many failed sign-ins from this login or address: the "
                "form again, refused without checking the password",
                "headers": {"Retry-After": {"description": "seconds to wait",
                                            "schema": {"type": "integer"}}},
                "content": html}})
    return page


LOG_FILTERS = ["start", "end", "model", "endpoint", "product", "key", "group", "type",
               "billing_type", "review"]
USD_IN = {"type": "string", "pattern": r"^\d+(\.\d{1,9})?$"}
COUNT = {"type": ["integer", "null"], "minimum": 1}
#: A key's own limits (create, update and view): null = none of its own.
KEY_LIMITS = {"rpm": COUNT, "tpm": COUNT, "concurrency": COUNT,
              "daily_cap_usd": {"oneOf": [USD_IN, {"type": "null"}]},
              "weekly_cap_usd": {"oneOf": [USD_IN, {"type": "null"}]},
              "monthly_cap_usd": {"oneOf": [USD_IN, {"type": "null"}]},
              "allowed_ips": {"type": ["array", "null"], "items": {"type": "string"},
                              "description": "CIDR networks, IPv4 or IPv6"}}
OBJECT = {"type": "object", "additionalProperties": True}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Tollway", "version": "0.1.0",
             "description": "API marketplace gateway with exact usage-based billing. Money is "
                            "a decimal string with 9 decimal places (USD). Gateway responses "
                            "carry X-RateLimit-{Limit,Remaining,Reset}-{Requests,Tokens} "
                            "(reset as whole seconds, e.g. '12s') for the key's limits; a 429 "
                            "(rate_limited, quota_exceeded) carries Retry-After in seconds when "
                            "the limit resets by itself."},
    "paths": {
        "/healthz": {"get": _op("Liveness and database check", _json(OBJECT), security=None)},
        "/openapi.json": {"get": _op("This document", _json(OBJECT), security=None)},
        "/metrics": {"get": _op(
            "Every worker's counters, merged, in Prometheus text format (admin or metrics token)",
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
                                             _statement(),
                                             params=["month", "format_statement"])},
        "/v1/billing/notifications": {"get": _op(
            "Notification events, newest first, with every delivery attempt",
            _json(_ref("NotificationPage")), params=["limit", "cursor"])},
        "/v1/billing/notifications/settings": {
            "get": _op("Low-balance threshold, webhook URL and secret, email",
                       _json(_ref("NotificationSettings"))),
            "put": _op("Change notification settings (null clears a field)",
                       _json(_ref("NotificationSettings")), body=_ref("NotificationChanges"))},
        "/v1/billing/notifications/settings/rotate-secret": {"post": _op(
            "Replace the webhook signing secret", _json(_ref("NotificationSettings")))},
        "/v1/billing/redeem": {"post": _op(
            "Redeem a code: its amount is topped up once (404 unknown_code, 409 "
            "code_redeemed, 410 code_expired / code_revoked)", _json(_ref("Redemption")),
            body=_ref("Redeem"), status="201")},
        "/v1/chat/completions": {"post": _op(
            "OpenAI-compatible chat completions (streaming included), metered",
            _metered("The upstream's answer; X-Tollway-Cost-USD carries the cost (a stream: "
                     "its final comment)", stream=True),
            body=_ref("ChatRequest"), errors=GATEWAY_ERRORS)},
        "/v1/completions": {"post": _op("OpenAI-compatible completions, metered",
                                        _metered("The upstream's answer", stream=True),
                                        body=OBJECT, errors=GATEWAY_ERRORS)},
        "/v1/embeddings": {"post": _op("OpenAI-compatible embeddings, metered", _json(OBJECT),
                                       body=OBJECT, errors=GATEWAY_ERRORS)},
        "/v1/messages": {"post": _op(
            "Anthropic-compatible messages (streaming included), metered with Anthropic's "
            "usage semantics; takes x-api-key or Bearer; errors in Anthropic's shape "
            "(type: error) with Tollway's code and request_id",
            _metered("The upstream's answer; X-Tollway-Cost-USD carries the cost (a stream: "
                     "its final comment)", stream=True),
            security="anthropicKey", body=_ref("MessagesRequest"), errors=GATEWAY_ERRORS)},
        "/v1/responses": {"post": _op(
            "OpenAI Responses API (streaming included), metered from response.completed",
            _metered("The upstream's answer; X-Tollway-Cost-USD carries the cost (a stream: "
                     "its final comment)", stream=True),
            body=_ref("ResponsesRequest"), errors=GATEWAY_ERRORS)},
        "/v1/images/generations": {"post": _op(
            "Image generation: per_call image models, charged per image returned "
            "(n × the size's price × ratio)",
            _json(OBJECT, "The upstream's answer; X-Tollway-Cost-USD carries the cost"),
            body=_ref("ImagesRequest"), errors=GATEWAY_ERRORS)},
        "/v1/messages/count_tokens": {"post": _op(
            "Anthropic's token counter, answered locally and free (never forwarded, held or "
            "charged): {input_tokens}; errors in Anthropic's shape",
            _json({"type": "object", "required": ["input_tokens"],
                   "properties": {"input_tokens": {"type": "integer"}}}),
            security="anthropicKey", body={"type": "object", "required": ["model", "messages"],
                                           "properties": {"model": {"type": "string"},
                                                          "messages": {"type": "array"}}})},
        "/v1/models": {"get": _op(
            "Models this key may use (Anthropic's list shape when the request carries "
            "anthropic-version)", _json(OBJECT))},
        "/v1/models/{model_id}": {"get": _op(
            "One model this key may use, in OpenAI's shape ({id, object: model, created, "
            "owned_by}), or Anthropic's ({type: model, id, display_name, created_at}) when the "
            "request carries anthropic-version", _json(OBJECT), params=["model_id"])},
        "/apis/v1/{path}": {method: _op(
            "A catalog data API: charged per successful (2xx) call",
            {"description": "The upstream's answer, unchanged"}, params=["api_path"],
            errors=API_ERRORS)
            for method in ("get", "post", "put", "patch", "delete")},
        "/admin/v1/accounts": {
            "get": _op("All accounts", _json(OBJECT), security="adminToken"),
            "post": _op("Create an account", _json(_ref("Account")), security="adminToken",
                        body=_ref("NewAccount"), status="201")},
        "/admin/v1/accounts/{account}": {"get": _op("One account", _json(_ref("Account")),
                                                    security="adminToken", params=["account"])},
        "/admin/v1/accounts/{account}/disable": {"post": _op(
            "Disable an account: its keys answer 403 account_disabled, its console sign-in "
            "is refused, its sessions end", _json(_ref("Account")), security="adminToken",
            params=["account"])},
        "/admin/v1/accounts/{account}/enable": {"post": _op(
            "Enable a disabled account again", _json(_ref("Account")), security="adminToken",
            params=["account"])},
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
        "/admin/v1/accounts/{account}/tier": {"put": _op(
            "Put an account in a rate-limit tier (null: the default tier)",
            _json(_ref("Account")), security="adminToken", params=["account"],
            body={"type": "object", "required": ["tier"],
                  "properties": {"tier": {"type": ["string", "null"]}}})},
        "/admin/v1/keys/{key_id}": {"patch": _op(
            "Change a key's limits or pin its price group (given fields replace, null "
            "clears)", _json(_ref("Key")), security="adminToken", params=["key_id"],
            body={"type": "object", "properties": {
                **KEY_LIMITS, "group": {"type": ["string", "null"]}},
                "additionalProperties": False})},
        "/admin/v1/keys/{key_id}/revoke": {"post": _op("Revoke a key", _json(_ref("Key")),
                                                       security="adminToken",
                                                       params=["key_id"])},
        "/admin/v1/channels": {"get": _op(
            "Every upstream channel with this worker's circuit state (closed, open, half_open, "
            "disabled), recent error rate and latency", _json(OBJECT), security="adminToken")},
        "/admin/v1/channels/{channel_id}": {"put": _op(
            "Disable or enable a channel (stored; every worker within the catalog refresh)",
            _json(OBJECT), security="adminToken", params=["channel_id"],
            body={"type": "object", "required": ["enabled"],
                  "properties": {"enabled": {"type": "boolean"}},
                  "additionalProperties": False})},
        "/admin/v1/margin": {"get": _op(
            "Revenue, upstream cost and margin by model, channel or day; records whose "
            "upstream-reported cost disagrees", _json(OBJECT), security="adminToken",
            params=["margin_from", "margin_to", "margin_group_by"])},
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
            "One account's monthly statement", _statement(),
            security="adminToken", params=["account", "month", "format_statement"])},
        "/admin/v1/accounts/{account}/notifications": {"get": _op(
            "An account's notification events and delivery attempts",
            _json(_ref("NotificationPage")), security="adminToken",
            params=["account", "limit", "cursor"])},
        "/admin/v1/accounts/{account}/notifications/settings": {
            "get": _op("An account's notification settings",
                       _json(_ref("NotificationSettings")), security="adminToken",
                       params=["account"]),
            "put": _op("Change an account's notification settings",
                       _json(_ref("NotificationSettings")), security="adminToken",
                       params=["account"], body=_ref("NotificationChanges"))},
        "/admin/v1/accounts/{account}/notifications/settings/rotate-secret": {"post": _op(
            "Replace an account's webhook secret", _json(_ref("NotificationSettings")),
            security="adminToken", params=["account"])},
        "/admin/v1/accounts/{account}/grants": {
            "post": _op("Grant promotional credit (spent first; expires_at optional); "
                        "Idempotency-Key makes a retry grant once",
                        _json(OBJECT), security="adminToken", params=["account"], status="201",
                        body={"type": "object", "required": ["amount_usd", "reason"],
                              "properties": {"amount_usd": USD_IN,
                                             "reason": {"type": "string"},
                                             "expires_at": {"type": "string",
                                                            "format": "date-time"}}}),
            "get": _op("The account's grants with what each has left", _json(OBJECT),
                       security="adminToken", params=["account"])},
        "/admin/v1/codes": {
            "get": _op("Redemption codes, newest first (?status=unused|redeemed|expired|"
                       "revoked)", _json(OBJECT), security="adminToken",
                       params=["limit", "cursor"]),
            "post": _op("Mint redemption codes (returned once)", _json(OBJECT),
                        security="adminToken", body=_ref("NewCodes"), status="201")},
        "/admin/v1/codes/{code_id}/revoke": {"post": _op(
            "Revoke an unused code", _json(OBJECT), security="adminToken",
            params=["code_id"])},
    },
    "components": {
        "securitySchemes": {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "A Tollway API key"},
            "anthropicKey": {"type": "apiKey", "in": "header", "name": "x-api-key",
                             "description": "A Tollway API key (Bearer works too)"},
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
            "review": _query("review", {"enum": ["true", "false"]},
                             "true: only records whose usage was capped or estimated "
                             "(usage_source capped or estimated), for an operator to check"),
            "limit": _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000},
                            "page size (default 50)"),
            "cursor": _query("cursor", {"type": "string"}, "next_cursor of the previous page"),
            "group_by": _query("group_by", {"type": "string"},
                               "comma-separated: model, endpoint, product, key, day, hour, "
                               "billing_type, account (revenue by account: operators). model "
                               "keeps every model (token-priced and image models), endpoint "
                               "the data APIs, product (or both) everything"),
            "month": {"name": "month", "in": "query", "required": True,
                      "schema": {"type": "string", "pattern": r"^\d{4}-\d{2}$"}},
            "format_export": _query("format", {"enum": ["csv", "jsonl"]}, "default csv"),
            "format_statement": _query("format", {"enum": ["json", "csv", "html"]},
                                       "default json"),
            "account_query": _query("account", {"type": "string"}, "account id or name"),
            "account": _path("account"),
            "request_id": _path("request_id"),
            "key_id": _path("key_id", {"type": "integer", "minimum": 1}),
            "code_id": _path("code_id", {"type": "integer", "minimum": 1}),
            "order_id": _path("order_id", {"type": "integer", "minimum": 1}),
            "channel_id": _path("channel_id", {"type": "string"}),
            "margin_from": _query("from", {"type": "string", "format": "date-time"},
                                  "default: 30 days before to"),
            "margin_to": _query("to", {"type": "string", "format": "date-time"},
                                "default: now"),
            "margin_group_by": _query("group_by", {"enum": ["model", "channel", "day"]},
                                      "default model"),
            "api_path": _path("path"),
            "model_id": _path("model_id"),
            "idempotency_key": {"name": "Idempotency-Key", "in": "header", "required": False,
                                "schema": {"type": "string", "maxLength": 200}},
        },
        "responses": {
            "Error": _json(_ref("Error"), "An error"),
            "GatewayError": {
                "description": "Tollway's error (schema Error), or the upstream's own answer "
                               "passed through unchanged, uncharged, with header "
                               "X-Tollway-Upstream-Error: true",
                "headers": {"X-Tollway-Upstream-Error": {"schema": {"enum": ["true"]}}},
                "content": {"application/json": {"schema": {"anyOf": [_ref("Error"),
                                                                      OBJECT]}},
                            "*/*": {"schema": {}}}}},
        "schemas": {
            "Usd": {"type": "string", "pattern": r"^-?\d+\.\d{9}$",
                    "description": "USD, exactly 9 decimal places"},
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["type", "code", "message", "request_id"],
                "properties": {"type": {"type": "string"}, "code": {"type": "string"},
                               "message": {"type": "string"},
                               "param": {"type": ["string", "null"]},
                               "request_id": {"type": ["string", "null"]}}}}},
            "Balance": {"type": "object", "properties": {
                "balance_usd": USD, "held_usd": USD, "available_usd": USD, "used_usd": USD,
                "paid_usd": USD, "promotional_usd": USD,
                "requests": {"type": "integer"}}},
            "Account": {"type": "object", "properties": {
                "id": {"type": "integer"}, "name": {"type": "string"},
                "group": {"type": "string"}, "tier": {"type": ["string", "null"]},
                "balance_usd": USD, "held_usd": USD,
                "available_usd": USD, "used_usd": USD, "requests": {"type": "integer"},
                "email": {"type": ["string", "null"]}, "console_login": {"type": "boolean"},
                "disabled_at": {"type": ["string", "null"], "format": "date-time"}}},
            "NewAccount": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string"}, "group": {"type": "string"},
                "email": {"type": "string", "description": "console sign-in (optional)"},
                "password": {"type": "string", "minLength": 8,
                             "description": "initial console password (optional)"}}},
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
                "expires_at": {"type": "string", "format": "date-time"}, **KEY_LIMITS}},
            "Key": {"type": "object", "properties": {
                "id": {"type": "integer"}, "account_id": {"type": "integer"},
                "prefix": {"type": "string"}, "key": {"type": "string"},
                "quota_usd": {"oneOf": [USD, {"type": "null"}]}, "used_usd": USD,
                "held_usd": USD, "rpm": COUNT, "tpm": COUNT, "concurrency": COUNT,
                "daily_cap_usd": {"oneOf": [USD, {"type": "null"}]},
                "weekly_cap_usd": {"oneOf": [USD, {"type": "null"}]},
                "monthly_cap_usd": {"oneOf": [USD, {"type": "null"}]},
                "allowed_ips": KEY_LIMITS["allowed_ips"]}},
            "Marketplace": {"type": "object", "properties": {"data": {"type": "array", "items": {
                "type": "object", "properties": {
                    "id": {"type": "string"}, "billing_type": {"enum": ["token", "per_call"]},
                    "price": {"type": "object", "properties": {
                        "per_size": {"type": "object", "additionalProperties": {
                            "type": "object", "properties": {"per_call_usd": USD}}}},
                        "additionalProperties": {"oneOf": [USD, {"type": "null"}]}},
                    "routes": {"type": "array", "items": {"type": "string"},
                               "description": "models: the gateway routes serving it"},
                    "providers": {"type": "object", "additionalProperties": {
                        "type": "string"}}}}}}},
            "ChatRequest": {"type": "object", "required": ["model"], "properties": {
                "model": {"type": "string"}, "messages": {"type": "array"},
                "stream": {"type": "boolean"}, "max_tokens": {"type": "integer"}}},
            "MessagesRequest": {"type": "object", "required": ["model", "max_tokens",
                                                                "messages"], "properties": {
                "model": {"type": "string"}, "messages": {"type": "array"},
                "max_tokens": {"type": "integer"}, "stream": {"type": "boolean"}}},
            "ResponsesRequest": {"type": "object", "required": ["model"], "properties": {
                "model": {"type": "string"}, "input": {}, "stream": {"type": "boolean"},
                "max_output_tokens": {"type": "integer"},
                "previous_response_id": {
                    "type": "string", "description": "a Response this account created through "
                    "Tollway (another account's: 404 unknown_response); the hold covers its "
                    "remembered input + output tokens"}}},
            "ImagesRequest": {"type": "object", "required": ["model", "prompt"], "properties": {
                "model": {"type": "string"}, "prompt": {"type": "string"},
                "n": {"type": "integer", "minimum": 1, "maximum": 128},
                "size": {"type": "string"},
                "quality": {"type": "string", "description": "priced by the model's "
                            "per_quality when it has one (none named: held at the dearest)"},
                "stream": {"type": "boolean", "enum": [False],
                           "description": "images are billed from a whole answer: no stream"}}},
            "UsageRecord": {"type": "object", "properties": {
                "request_id": {"type": "string"}, "type": {"type": "string"},
                "product": {"type": ["string", "null"]}, "cost_usd": USD, "credit_usd": USD,
                "unit_prices_usd": {"type": "object", "additionalProperties": {
                    "oneOf": [USD, {"type": "null"}]}},
                "tool_calls": {"type": "object", "description": "server-side tool calls: "
                               "{tool: {calls, price_per_call_usd}}",
                               "additionalProperties": {"type": "object"}},
                "pricing": {"type": ["object", "null"]}}},
            "UsagePage": {"type": "object", "properties": {
                "data": {"type": "array", "items": _ref("UsageRecord")},
                "next_cursor": {"type": ["string", "null"]}, "has_more": {"type": "boolean"}}},
            "Summary": {"type": "object", "properties": {
                "totals": {"type": "object", "properties": {"cost_usd": USD}},
                "data": {"type": "array", "items": {"type": "object", "properties": {
                    "cost_usd": USD}}}}},
            "NotificationSettings": {"type": "object", "properties": {
                "account_id": {"type": "integer"},
                "low_balance_threshold_usd": {"oneOf": [USD, {"type": "null"}]},
                "webhook_url": {"type": ["string", "null"]},
                "webhook_secret": {"type": ["string", "null"]},
                "email": {"type": ["string", "null"]}}},
            "NotificationChanges": {"type": "object", "additionalProperties": False,
                                    "properties": {
                "low_balance_threshold_usd": {"oneOf": [
                    {"type": "string", "pattern": r"^\d+(\.\d{1,9})?$"}, {"type": "null"}]},
                "webhook_url": {"type": ["string", "null"], "format": "uri"},
                "email": {"type": ["string", "null"], "format": "email"}}},
            "NotificationPage": {"type": "object", "properties": {
                "data": {"type": "array", "items": {"type": "object", "properties": {
                    "id": {"type": "string"}, "type": {"enum": ["balance.low",
                                                                "balance.topup",
                                                                "payment.reversed"]},
                    "body": {"type": "string"},
                    "deliveries": {"type": "array", "items": OBJECT}}}},
                "next_cursor": {"type": ["string", "null"]}, "has_more": {"type": "boolean"}}},
            "Redeem": {"type": "object", "required": ["code"],
                       "properties": {"code": {"type": "string"}}},
            "Redemption": {"type": "object", "properties": {
                "code_id": {"type": "integer"}, "amount_usd": USD, "available_usd": USD,
                "entry_id": {"type": "integer"}, "grant_id": {"type": "integer"},
                "promotional": {"type": "boolean"},
                "credit_expires_at": {"type": ["string", "null"], "format": "date-time"}}},
            "NewCodes": {"type": "object", "required": ["amount_usd"], "properties": {
                "amount_usd": {"type": "string", "pattern": r"^\d+(\.\d{1,9})?$"},
                "count": {"type": "integer", "minimum": 1, "maximum": 10000},
                "expires_at": {"type": "string", "format": "date-time"},
                "credit_expires_days": {"type": "integer", "minimum": 1, "maximum": 3650},
                "note": {"type": "string"}}},
            "Statement": {"type": "object", "properties": {
                "opening_balance_usd": USD, "opening_paid_usd": USD,
                "opening_promotional_usd": USD, "topups_usd": USD, "adjustments_usd": USD,
                "grants_added_usd": USD, "grants_spent_usd": USD, "grants_expired_usd": USD,
                "charges_usd": USD, "written_off_usd": USD, "closing_balance_usd": USD,
                "closing_paid_usd": USD, "closing_promotional_usd": USD,
                "reconciliation": {"type": "string"},
                "promotional_reconciliation": {"type": "string"}}},
        },
    },
}

#: The customer web console and its sign-in pages (``web/auth.py``, ``web/console.py``).
SPEC["paths"].update({
    "/login": sign_in_page("Customer sign-in: email or account name and password"),
    "/logout": html_pages("Sign out (customer)", ("post",), security="session"),
    "/signup": html_pages("Self-service sign-up (TOLLWAY_SIGNUP_ENABLED)", ("get", "post")),
    "/admin/login": sign_in_page("Operator sign-in with the admin token"),
    "/admin/logout": html_pages("Sign out (operator)", ("post",), security="session"),
    "/console": html_pages("Overview: balance, usage this period, charts",
                           security="session"),
    "/console/keys": html_pages("API keys: list and create", ("get", "post"),
                                security="session"),
    "/console/keys/{key_id}/revoke": html_pages("Revoke one of the account's keys", ("post",),
                                                security="session"),
    "/console/usage": html_pages("Usage log with filters, paging and pricing explanations",
                                 security="session"),
    "/console/usage/export": html_pages("The filtered usage log as CSV", security="session"),
    "/console/statements": html_pages("Monthly statements, printable", security="session"),
    "/console/redeem": html_pages("Redeem a code (the overview's form): the code's amount is "
                                  "credited once", ("post",), security="session"),
    "/console/notifications": html_pages("Notification settings (low-balance threshold, "
                                         "webhook, email) and recent deliveries with attempts",
                                         ("get", "post"), security="session"),
})
SPEC["components"]["securitySchemes"]["session"] = {
    "type": "apiKey", "in": "cookie", "name": "tollway_session",
    "description": "web console session (sign in at /login or /admin/login)"}

#: The public marketplace pages and the operator's pages (``web/market.py``,
#: ``web/operator.py``); every operator page needs an operator session.
SPEC["paths"].update({
    "/": html_pages("Marketplace: every model and data API with its price; ?q, billing_type, "
                    "provider, group (prices after the group's ratios)"),
    "/market/{item_id}": html_pages("One item: prices by group and copy-paste examples"),
    "/admin": html_pages("Operator home (redirects to the accounts)", security="session"),
    "/admin/accounts": html_pages("Accounts with balances; create one", ("get", "post"),
                                  security="session"),
    "/admin/accounts/{account_id}": html_pages("One account: top up, adjust, group, disable",
                                               security="session"),
    "/admin/accounts/{account_id}/{action}": html_pages(
        "Account forms: topup, adjust (a one-time nonce is the idempotency key), group, "
        "disable, enable", ("post",), security="session"),
    "/admin/catalog": html_pages("Prices in effect and price history per item",
                                 security="session"),
    "/admin/catalog/preview": html_pages("What applying a catalog file would change (writes "
                                         "nothing)", ("post",), security="session"),
    "/admin/catalog/apply": html_pages("Apply a catalog file (as `tollway catalog apply`)",
                                       ("post",), security="session"),
    "/admin/groups": html_pages("Groups, ratios and item overrides", security="session"),
    "/admin/usage": html_pages("Usage and revenue of every account, by account and product",
                               security="session"),
    "/admin/channels": html_pages("Upstream channels with this worker's circuit state; the "
                                  "last 30 days' margin per channel", security="session"),
    "/admin/channels/toggle": html_pages("Disable or enable a channel (stored)", ("post",),
                                         security="session"),
})

#: Card top-ups (``api/payments.py``): an API key, or a console session with X-CSRF-Token.
SPEC["components"]["schemas"].update({
    "CheckoutRequest": {"type": "object", "required": ["amount_usd"], "properties": {
        "amount_usd": {"type": "string", "pattern": r"^\d+(\.\d{1,2})?$",
                       "description": "within TOLLWAY_TOPUP_MIN_USD..TOLLWAY_TOPUP_MAX_USD"}}},
    "Checkout": {"type": "object", "properties": {
        "id": {"type": "string", "description": "the Checkout Session's id"},
        "url": {"type": "string", "description": "send the customer here to pay"},
        "order_id": {"type": "integer"}, "amount_usd": USD, "currency": {"type": "string"}}},
    "PaymentOrderPage": {"type": "object", "properties": {
        "data": {"type": "array", "items": {"type": "object", "properties": {
            "id": {"type": "integer"}, "status": {"enum": ["open", "paid", "expired",
                                                           "failed"]},
            "amount_usd": USD, "refunded_usd": USD, "disputed_usd": USD,
            "reversed_usd": USD, "written_off_usd": USD}}},
        "next_cursor": {"type": ["string", "null"]}, "has_more": {"type": "boolean"}}},
    "WebhookReceipt": {"type": "object", "properties": {
        "received": {"type": "boolean"}, "outcome": {"type": "string"},
        "replay": {"type": "boolean"}, "order_id": {"type": ["integer", "null"]},
        "credited_usd": USD}},
})
SPEC["paths"].update({
    "/v1/billing/checkout": {"post": _op(
        "Start a card top-up: an order row and a Stripe Checkout Session for it; send the "
        "customer to url (400 invalid_request outside the bounds or with more than 2 "
        "decimals, 503 payments_unavailable when not configured, 502 payment_provider_error)",
        _json(_ref("Checkout")), body=_ref("CheckoutRequest"), status="201")},
    "/v1/billing/payments": {"get": _op(
        "The account's card top-up orders, newest first", _json(_ref("PaymentOrderPage")),
        params=["limit", "cursor"])},
    "/v1/billing/payments/{order_id}/receipt.pdf": {"get": _op(
        "A paid order's receipt as a PDF (404 for an unpaid order or another account's)",
        {"description": "OK", "content": {"application/pdf": {"schema": {
            "type": "string", "format": "binary"}}}}, params=["order_id"])},
    "/webhooks/stripe": {"post": _op(
        "Stripe's events (signed: Stripe-Signature). checkout.session.completed / "
        "async_payment_succeeded credit the order's own amount once; "
        "payment_intent.succeeded credits an auto-recharge charge's own amount once; "
        "setup_intent.succeeded saves a card for Tollway's customer; charge.refunded and "
        "charge.dispute.created take money back (400 invalid_signature for a forged or stale "
        "signature, 400 payment_mismatch for a session that contradicts its order)",
        _json(_ref("WebhookReceipt")), security=None, body=OBJECT)},
})
#: Auto-recharge (``api/payments.py``): the customer's own, and the operator's per account.
SPEC["components"]["schemas"].update({
    "AutoRechargeRequest": {"type": "object", "required": ["enabled"], "properties": {
        "enabled": {"type": "boolean"},
        **{name: {"type": "string", "pattern": r"^\d+(\.\d{1,2})?$"}
           for name in ("threshold_usd", "target_usd", "monthly_cap_usd")}},
        "description": "amounts required on the first save, else kept; target > threshold, "
                       "target <= TOLLWAY_TOPUP_MAX_USD, target - threshold and the cap >= "
                       "TOLLWAY_TOPUP_MIN_USD"},
    "AutoRecharge": {"type": "object", "properties": {
        "enabled": {"type": "boolean"}, "threshold_usd": {"oneOf": [USD, {"type": "null"}]},
        "target_usd": {"oneOf": [USD, {"type": "null"}]},
        "monthly_cap_usd": {"oneOf": [USD, {"type": "null"}]},
        "charged_this_month_usd": USD, "left_this_month_usd": {"oneOf": [USD, {"type": "null"}]},
        "card_saved": {"type": "boolean"}, "paused": {"type": "boolean"},
        "consecutive_failures": {"type": "integer"}, "in_flight": {"type": "boolean"},
        "attempts": {"type": "array", "items": OBJECT}}},
})
SPEC["paths"].update({
    "/v1/billing/auto_recharge": {
        "get": _op("The account's auto-recharge: setting, saved card, this month's charges",
                   _json(_ref("AutoRecharge"))),
        "put": _op("Save auto-recharge (saving resumes a paused one; 400 invalid_request)",
                   _json(_ref("AutoRecharge")), body=_ref("AutoRechargeRequest"))},
    "/v1/billing/auto_recharge/card": {"post": _op(
        "Save a card for auto-recharge: a Stripe Checkout Session in setup mode; send the "
        "customer to url (the card is taken from Stripe's setup_intent.succeeded)",
        _json(_ref("Checkout")), status="201")},
    "/admin/v1/accounts/{account}/auto_recharge": {
        "get": _op("An account's auto-recharge", _json(_ref("AutoRecharge")),
                   security="adminToken", params=["account"]),
        "put": _op("Save an account's auto-recharge", _json(_ref("AutoRecharge")),
                   security="adminToken", params=["account"],
                   body=_ref("AutoRechargeRequest"))},
    "/admin/v1/auto_recharge": {"get": _op(
        "Every account's auto-recharge (failures, pauses, recent charges)", _json(OBJECT),
        security="adminToken")},
})
SPEC["paths"].update({
    "/console/billing": html_pages("Add funds by card (presets or an amount; redirects to "
                                   "Stripe Checkout) and payment history", ("get", "post"),
                                   security="session"),
    "/console/billing/auto_recharge": html_pages("Save auto-recharge (the billing page's form)",
                                                 ("post",), security="session"),
    "/console/billing/auto_recharge/card": html_pages("Save a card for auto-recharge "
                                                      "(redirects to Stripe's set-up page)",
                                                      ("post",), security="session"),
    "/console/billing/return": html_pages("Where Stripe sends the customer back: the order's "
                                          "state and the new balance", security="session"),
    "/console/billing/receipts/{order_id}": html_pages("A paid order's printable receipt",
                                                       security="session"),
    "/console/billing/receipts/{order_id}.pdf": html_pages(
        "A paid order's receipt as a PDF download", security="session"),
})
