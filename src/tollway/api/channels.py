"""Operator routes for upstream channels and the margin they leave:

- ``GET /admin/v1/channels`` — every channel with this worker's circuit state, recent error
  rate and latency;
- ``PUT /admin/v1/channels/{id}`` ``{"enabled": false}`` — disable or enable a channel: stored,
  and picked up by every worker and instance at its next catalog refresh (this one at once);
- ``GET /admin/v1/margin?from=&to=&group_by=model|channel|day`` — revenue, upstream cost and
  margin, and the records whose upstream-reported cost disagrees with the computed one.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tollway.billing.margin import margin_report
from tollway.billing.views import parse_iso_ms
from tollway.errors import InvalidRequest, NotFound
from tollway.runtime.context import Context
from tollway.runtime.http import json_body
from tollway.store.channels import set_enabled
from tollway.store.reports import DAY_MS


async def list_channels(request: Request, ctx: Context) -> Response:
    return JSONResponse({"object": "list", "data": ctx.channels.views(ctx.clock())})


async def put_channel(request: Request, ctx: Context) -> Response:
    channel_id = request.path_params["channel_id"]
    body = await json_body(request)
    enabled = body.get("enabled")
    if not isinstance(enabled, bool):
        raise InvalidRequest("enabled must be true or false")
    channel = ctx.channels.channels.get(channel_id)
    if channel is None:
        raise NotFound(f"no channel {channel_id!r}: GET /admin/v1/channels lists them")
    at = ctx.clock()
    await ctx.write(lambda conn: set_enabled(conn, channel_id, enabled, at_ms=at))
    channel.disabled = not enabled
    return JSONResponse(channel.view(at))


async def margin(request: Request, ctx: Context) -> Response:
    params = request.query_params
    end = parse_iso_ms(params["to"], what="to") if params.get("to") else ctx.clock()
    start = (parse_iso_ms(params["from"], what="from") if params.get("from")
             else end - 30 * DAY_MS)
    group_by = params.get("group_by") or "model"
    return JSONResponse(await ctx.read(lambda conn: margin_report(
        conn, start_ms=start, end_ms=end, group_by=group_by)))
