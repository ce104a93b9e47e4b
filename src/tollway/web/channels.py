"""The operator's channel page (``/admin/channels``): every upstream channel with this
worker's circuit state, recent error rate and latency, a disable/enable button (stored, the
same as ``PUT /admin/v1/channels/{id}``), and the last 30 days' margin per channel."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from tollway.billing.margin import margin_report
from tollway.errors import NotFound
from tollway.runtime.context import Context
from tollway.runtime.http import form_data
from tollway.store.channels import set_enabled
from tollway.store.reports import DAY_MS
from tollway.web.pages import render
from tollway.web.session import check_csrf, require_operator


async def channels_page(request: Request) -> Response:
    await require_operator(request)
    ctx: Context = request.app.state.ctx
    now = ctx.clock()

    def load(conn: Connection) -> dict[str, Any]:
        return margin_report(conn, start_ms=now - 30 * DAY_MS, end_ms=now + 1,
                             group_by="channel")

    margin = await ctx.read(load)
    return await render(request, "operator/channels.html", {
        "channels": ctx.channels.views(now), "margin": margin,
        "done": request.query_params.get("done")})


async def channel_toggle(request: Request) -> Response:
    """``POST /admin/channels/toggle``: ``id`` and ``enabled`` (``true``/``false``)."""
    await require_operator(request)
    form = await form_data(request)
    await check_csrf(request, form)
    ctx: Context = request.app.state.ctx
    channel_id = str(form.get("id") or "")
    enabled = form.get("enabled") == "true"
    channel = ctx.channels.channels.get(channel_id)
    if channel is None:
        raise NotFound(f"no channel {channel_id!r}")
    at = ctx.clock()
    await ctx.write(lambda conn: set_enabled(conn, channel_id, enabled, at_ms=at))
    channel.disabled = not enabled
    return RedirectResponse(f"/admin/channels?done={'enabled' if enabled else 'disabled'}",
                            status_code=303)


channel_routes: list[BaseRoute] = [
    Route("/admin/channels", channels_page, methods=["GET"]),
    Route("/admin/channels/toggle", channel_toggle, methods=["POST"]),
]
