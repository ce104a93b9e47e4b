"""``POST /v1/images/generations``: image models priced ``per_call``, billed per image
returned.

The hold covers the ``n`` images asked for at the requested size's price (``per_size``), its
quality's (``per_quality``, per size or one price for every size, the higher of it and the
size's; the dearest quality when the request names none, since the upstream then chooses) or
the model's ``per_call`` price. The charge is the images the upstream actually returned
(never more than ``n``) × the price of what was asked (a request that named no quality: the
quality the answer reports, else the dearest held) × the ratio, rounded once. A failed
request is charged nothing.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from starlette.types import Receive, Scope, Send

from tollway.billing import metering
from tollway.billing.metering import Replay
from tollway.errors import InvalidRequest, UpstreamError
from tollway.gateway import jsonio
from tollway.gateway.asgi import json_object, read_body, stream_flag
from tollway.gateway.calls import (
    Call,
    admit,
    begin,
    fail,
    fetch,
    refuse_answer,
    reserve,
    settle_answer,
)
from tollway.gateway.state import Gateway
from tollway.pricing.rating import CallPrice, CallUsage
from tollway.upstreams.base import UpstreamRequest
from tollway.upstreams.channels import Channel

ROUTE = "/v1/images/generations"
MAX_IMAGES = 128


class ImagesRoute:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw: Gateway = scope["app"].state.gateway
        prepared = await admit(scope, send, self._prepare(gw, scope, receive))
        if prepared is None:
            return
        call, provider, payload, price, unit, n = prepared
        quality = payload.get("quality")
        call.size = payload.get("size")

        def build(channel: Channel) -> UpstreamRequest:
            payload["model"] = channel.upstream_model or call.item.id
            return UpstreamRequest("POST", "/images/generations", jsonio.dumps(payload),
                                   headers={"Content-Type": "application/json",
                                            "Accept": "application/json"})

        answer = await fetch(gw, call, send, "openai", build)
        if answer is None:
            return
        if not answer.ok:
            await refuse_answer(gw, call, send, answer.status, answer.body,
                                answer.content_type, passed_from=0)
            return
        returned = _images_returned(answer.body)
        if returned is None:
            await fail(gw, call, send, UpstreamError(
                "the upstream answered 2xx without a list of images"))
            return
        if quality is None and price.per_quality:  # billed by the quality the upstream chose
            chosen = _answer_quality(answer.body)
            if chosen in price.qualities:
                unit = price.for_image(payload.get("size"), chosen) or unit
        billed = min(returned, n)
        note = None
        if returned != n:
            note = f"{returned} of {n} images returned" + (
                f"; billed for the {n} requested" if returned > n else "")
        charge = metering.rate(CallUsage(billed), price, call.ratio, unit_price=unit)
        record = call.record(type_="consume", status=answer.status, usage_source="upstream",
                             calls=billed, unit_price=unit, note=note)
        await settle_answer(gw, call, send, answer, charge=charge, record=record)

    async def _prepare(self, gw: Gateway, scope: Scope, receive: Receive
                       ) -> tuple[Call, str, dict[str, Any], CallPrice, Decimal, int] | Replay:
        body = await read_body(receive, gw.max_body_bytes)
        key = await gw.authenticate(scope)
        payload = json_object(body)
        if payload.get("prompt") is None:
            raise InvalidRequest("prompt is required", param="prompt")
        item, provider = gw.catalog.model(payload.get("model"), ROUTE)
        price = item.version.price
        assert isinstance(price, CallPrice)  # the images route serves image models only
        if stream_flag(payload):  # billed per image of a whole answer: partial-image streams
            raise InvalidRequest("stream is not supported on /v1/images/generations")
        n = payload.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_IMAGES:
            raise InvalidRequest(f"n must be an integer from 1 to {MAX_IMAGES}", param="n")
        size = payload.get("size")
        if size is not None and not isinstance(size, str):
            raise InvalidRequest("size must be a string such as \"1024x1024\"")
        quality = payload.get("quality")
        if quality is not None and not isinstance(quality, str):
            raise InvalidRequest("quality must be a string such as \"high\"", param="quality")
        if price.for_size(size) is None:
            raise InvalidRequest(f"size {size!r} is not offered for {item.id}; sizes: "
                                 + ", ".join(sorted(price.per_size)), param="size")
        unit = price.for_image(size, quality)
        if unit is None:
            raise InvalidRequest(f"quality {quality!r} is not offered for {item.id}; "
                                 "qualities: " + ", ".join(price.qualities),
                                 param="quality")
        call = begin(gw, scope, key, item, ROUTE, body)
        amount = max(metering.rate(CallUsage(n), price, call.ratio,
                                   unit_price=unit).cost_nano_usd, 1)
        # an image request counts against RPM, concurrency and spend caps; it has no tokens,
        # so it counts 0 against TPM
        result = await reserve(gw, call, amount)
        if isinstance(result, Replay):
            return result
        return call, provider, payload, price, unit, n


def _answer_field(raw: bytes, name: str) -> Any:
    """A member of the upstream's JSON answer (None if the answer is not a JSON object)."""
    try:
        obj = jsonio.loads(raw)
    except ValueError:
        return None
    return obj.get(name) if isinstance(obj, dict) else None


def _answer_quality(raw: bytes) -> str | None:
    """The quality an answer says it generated (``gpt-image-1`` reports it)."""
    quality = _answer_field(raw, "quality")
    return quality if isinstance(quality, str) else None


def _images_returned(raw: bytes) -> int | None:
    data = _answer_field(raw, "data")
    return len(data) if isinstance(data, list) else None
