"""``GET /v1/models``: the models the calling key may use, in OpenAI's list shape."""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from tollway.errors import TollwayError
from tollway.gateway import jsonio
from tollway.gateway.asgi import send_bytes, send_error
from tollway.gateway.state import Gateway


class ModelsRoute:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw: Gateway = scope["app"].state.gateway
        try:
            key = await gw.authenticate(scope)
        except TollwayError as exc:
            await send_error(scope, send, exc)
            return
        allowed = set(key.models) if key.models is not None else None
        data = [{"id": item.id, "object": "model", "created": item.version.effective_from_ms
                 // 1000, "owned_by": item.provider}
                for item in gw.catalog.models.values()
                if allowed is None or item.id in allowed]
        await send_bytes(send, 200, jsonio.dumps({"object": "list", "data": data}))
