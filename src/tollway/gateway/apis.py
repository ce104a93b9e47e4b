"""Per-call data-API routes: ``ANY /apis/v1/{path}`` matched against the catalog's endpoints.

The hold is the exact price (price × ratio); the call is charged only if the upstream answered
2xx, and the response (status, body, content type) passes through unchanged. The customer's
Tollway key and other credentials never reach the upstream; the operator's are injected by the
adapter.
"""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from tollway.billing.metering import Replay
from tollway.errors import TollwayError, UpstreamError
from tollway.gateway.asgi import read_body, send_error
from tollway.gateway.calls import begin, fail, fetch, reserve, send_replay, settle_answer
from tollway.gateway.state import Gateway
from tollway.pricing.rating import CallPrice, CallUsage, rate_calls
from tollway.upstreams.base import UpstreamRequest

PREFIX = "/apis/v1"
#: Request headers a data API may see; everything else (Authorization, cookies, forwarding
#: headers, the Idempotency-Key) stays at the gateway. Accept-Encoding stays too: the upstream
#: session negotiates and decodes compression itself, and the client gets the decoded body.
FORWARDED_HEADERS = frozenset({b"content-type", b"accept", b"accept-language",
                               b"user-agent"})


class ApiRoute:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw: Gateway = scope["app"].state.gateway
        try:
            body = await read_body(receive, gw.max_body_bytes)
            key = await gw.authenticate(scope)
            path = scope["path"][len(PREFIX):] or "/"
            endpoint, params = gw.catalog.endpoint(scope["method"], path)
            item = endpoint.item
            call = begin(gw, scope, key, item, PREFIX + path, body)
            price = item.version.price
            assert isinstance(price, CallPrice)
            cost = rate_calls(CallUsage(1), price, call.ratio).cost_nano_usd
            result = await reserve(gw, call, max(cost, 1))
        except TollwayError as exc:
            await send_error(scope, send, exc)
            return
        if isinstance(result, Replay):
            await send_replay(send, result)
            return
        assert call.hold is not None
        query = [(k, v) for k, v in _query(scope)]
        headers = {name.decode("latin-1"): value.decode("latin-1")
                   for name, value in scope["headers"] if name in FORWARDED_HEADERS}
        request = UpstreamRequest(scope["method"], endpoint.upstream_for(params), body,
                                  query=query, headers=headers)
        answer = await fetch(gw, call, send, "", lambda _channel: request)
        if answer is None:
            return
        if not answer.ok:
            refused = UpstreamError(f"the upstream answered {answer.status}")
            await fail(gw, call, send, refused, status=answer.status, body=answer.body,
                       content_type=answer.content_type.encode())
            return
        record = call.record(type_="consume", status=answer.status, usage_source="upstream",
                             calls=1)
        await settle_answer(gw, call, send, answer, cost=cost, record=record)


def _query(scope: Scope) -> list[tuple[str, str]]:
    from urllib.parse import parse_qsl

    raw = scope.get("query_string", b"").decode("latin-1")
    return parse_qsl(raw, keep_blank_values=True)
