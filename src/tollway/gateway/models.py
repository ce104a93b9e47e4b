"""``GET /v1/models`` and ``GET /v1/models/{model_id}``: the models the calling key may use,
in OpenAI's shapes — or in Anthropic's when the request carries ``anthropic-version`` (what
the ``anthropic`` package sends), so ``client.models.retrieve`` works with either library."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from starlette.types import Receive, Scope, Send

from tollway.errors import TollwayError, UnknownModel
from tollway.gateway.asgi import header, send_bytes, send_error
from tollway.gateway.state import Gateway
from tollway.runtime.observe import ERROR_CODE, REQUEST_ID, error_json
from tollway.store.catalog import Item


def _openai(item: Item) -> dict[str, Any]:
    body: dict[str, Any] = {"id": item.id, "object": "model",
                            "created": item.version.effective_from_ms // 1000,
                            "owned_by": item.provider}
    if item.billing_type == "token":  # its limits, beside OpenAI's fields
        body["context_window"] = item.spec.input_bound
        body["max_output_tokens"] = item.spec.max_output_tokens
    return body


def _anthropic(item: Item) -> dict[str, Any]:
    created = datetime.fromtimestamp(item.version.effective_from_ms / 1000, UTC)
    return {"type": "model", "id": item.id,
            "display_name": str(item.spec.name or item.id),
            "created_at": created.isoformat().replace("+00:00", "Z"), "lifecycle": "active",
            "max_tokens": item.spec.max_output_tokens,
            "max_input_tokens": item.spec.input_bound if item.billing_type == "token" else None}


def _anthropic_error(scope: Scope, exc: TollwayError) -> bytes:
    scope[ERROR_CODE] = exc.code
    return error_json("/v1/messages", scope.get(REQUEST_ID), exc.status, exc.type, exc.code,
                      exc.message, exc.param)


class ModelsRoute:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw: Gateway = scope["app"].state.gateway
        anthropic = header(scope, b"anthropic-version") is not None
        model_id = scope.get("path_params", {}).get("model_id")
        try:
            key = await gw.authenticate(scope)
            allowed = set(key.models) if key.models is not None else None
            items = [item for item in gw.catalog.models.values()
                     if allowed is None or item.id in allowed]
            item = None
            if model_id is not None:
                item = next((i for i in items if i.id == model_id), None)
                if item is None:
                    raise UnknownModel(f"unknown model {model_id!r}: GET /v1/models lists the "
                                       "models this key may use")
        except TollwayError as exc:
            await send_error(scope, send, exc,
                             render=_anthropic_error if anthropic else _openai_error)
            return
        body: dict[str, Any]
        if model_id is not None and item is not None:
            body = _anthropic(item) if anthropic else _openai(item)
        elif anthropic:
            data = [_anthropic(i) for i in items]
            body = {"data": data, "has_more": False,
                    "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None}
        else:
            body = {"object": "list", "data": [_openai(i) for i in items]}
        await send_bytes(send, 200, json.dumps(body).encode())


def _openai_error(scope: Scope, exc: TollwayError) -> bytes:
    scope[ERROR_CODE] = exc.code
    return error_json(scope["path"], scope.get(REQUEST_ID), exc.status, exc.type, exc.code,
                      exc.message, exc.param)
