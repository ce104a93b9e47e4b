"""``POST /v1/messages/count_tokens``: Anthropic's token counter (``client.messages
.count_tokens``, LangChain's ``get_num_tokens``), answered locally and free.

The count is the offline tokenizer's count of the prompt (messages, system, tools) with the
same framing the gateway's estimates use; it is what the sandbox reports as input. Nothing
is forwarded, held or charged, and no usage record is written: the key is authenticated and
its model allowlist checked, like any request for the model.
"""

from __future__ import annotations

import json

from starlette.types import Receive, Scope, Send

from tollway import tokens
from tollway.billing import keys
from tollway.errors import InvalidRequest, TollwayError
from tollway.gateway.asgi import json_object, read_body, send_bytes, send_error
from tollway.gateway.messages import MessagesRoute, anthropic_error
from tollway.gateway.state import Gateway


class CountTokensRoute:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw: Gateway = scope["app"].state.gateway
        try:
            body = await read_body(receive, gw.max_body_bytes)
            key = await gw.authenticate(scope)
            payload = json_object(body)
            if payload.get("messages") is None:
                raise InvalidRequest("messages is required", param="messages")
            item, _ = gw.catalog.model(payload.get("model"), MessagesRoute.route)
            keys.check_item(key, item.id)
            count = tokens.count_prompt(payload)
        except TollwayError as exc:
            await send_error(scope, send, exc, render=anthropic_error)
            return
        await send_bytes(send, 200, json.dumps({"input_tokens": count}).encode())
