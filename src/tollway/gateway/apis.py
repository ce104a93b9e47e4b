"""Per-call data-API routes: ``ANY /apis/v1/{path}`` matched against the catalog's endpoints.

The hold is the exact price (price × ratio); the call is charged only if the upstream answered
2xx, and the response (status, body, content type) passes through unchanged. The customer's
Tollway key and other credentials never reach the upstream; the operator's are injected by the
adapter.
"""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from tollway.billing import metering
from tollway.billing.metering import Replay
from tollway.errors import UpstreamError
from tollway.gateway.asgi import read_body
from tollway.gateway.calls import Call, admit, begin, fail, fetch, reserve, settle_answer
from tollway.gateway.state import Endpoint, Gateway
from tollway.pricing.rating import CallUsage, Charge
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
        started = await admit(scope, send, self._prepare(gw, scope, receive))
        if started is None:
            return
        call, endpoint, params, body, charge = started
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
        await settle_answer(gw, call, send, answer, charge=charge, record=record)

    async def _prepare(self, gw: Gateway, scope: Scope, receive: Receive
                       ) -> tuple[Call, Endpoint, dict[str, str], bytes, Charge] | Replay:
        """The call, its endpoint, path parameters and body, and its charge: the hold is the
        exact price of one call, and so is the charge of a 2xx answer."""
        body = await read_body(receive, gw.max_body_bytes)
        key = await gw.authenticate(scope)
        path = scope["path"][len(PREFIX):] or "/"
        endpoint, params = gw.catalog.endpoint(scope["method"], path)
        call = begin(gw, scope, key, endpoint.item, PREFIX + path, body)
        charge = metering.rate(CallUsage(1), endpoint.item.version.price, call.ratio)
        result = await reserve(gw, call, max(charge.cost_nano_usd, 1))
        if isinstance(result, Replay):
            return result
        return call, endpoint, params, body, charge


def _query(scope: Scope) -> list[tuple[str, str]]:
    from urllib.parse import parse_qsl

    raw = scope.get("query_string", b"").decode("latin-1")
    return parse_qsl(raw, keep_blank_values=True)
