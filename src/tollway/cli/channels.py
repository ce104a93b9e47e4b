"""``tollway channels list|disable|enable|test`` and ``tollway margin``.

The circuit state is per serving process (``GET /admin/v1/channels`` on a server shows its
own); the CLI shows what is stored: every channel of the applied catalog and whether the
operator disabled it. ``disable``/``enable`` are stored and reach every worker and instance
within ``TOLLWAY_CATALOG_REFRESH_SECONDS``. ``test`` sends each channel a free request.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING, Any

from tollway import clock, settings
from tollway.billing.margin import margin_report
from tollway.billing.views import parse_iso_ms
from tollway.cli.common import Commands, Output, open_db
from tollway.errors import NotFound
from tollway.store.channels import set_enabled
from tollway.store.reports import DAY_MS
from tollway.upstreams.channels import Board
from tollway.upstreams.health import check
from tollway.upstreams.http import Timeouts
from tollway.upstreams.registry import Registry

if TYPE_CHECKING:
    from tollway.gateway.state import CatalogSnapshot


def _board(args: argparse.Namespace) -> tuple[Board, CatalogSnapshot]:
    # imported here, not at the top: the gateway imports the metrics, and `tollway serve`
    # must choose prometheus_client's multiprocess directory before anything imports them
    from tollway.gateway.state import configure_board, load_snapshot

    db = open_db(args)
    with db.read() as conn:
        snapshot = load_snapshot(conn)
    board = Board()
    configure_board(board, snapshot)
    return board, snapshot


def cmd_channels_list(args: argparse.Namespace) -> Output:
    board, _ = _board(args)
    rows = [{k: v for k, v in view.items() if k in (
        "id", "model", "endpoint", "provider", "priority", "weight", "enabled")}
        for view in board.views(clock.now_ms())]
    width = max((len(r["id"]) for r in rows), default=10)
    lines = [f"{r['id']:<{width}}  priority {r['priority']}  weight {r['weight']:<3}  "
             f"{'enabled' if r['enabled'] else 'DISABLED'}" for r in rows]
    return Output({"object": "list", "data": rows}, "\n".join(lines) or "no channels")


def _set(args: argparse.Namespace, enabled: bool) -> Output:
    board, _ = _board(args)
    if args.id not in board.channels:
        raise NotFound(f"no channel {args.id!r}: `tollway channels list` lists them")
    db = open_db(args)
    with db.write() as conn:
        set_enabled(conn, args.id, enabled, at_ms=clock.now_ms())
    word = "enabled" if enabled else "disabled"
    return Output({"id": args.id, "enabled": enabled},
                  f"{args.id} {word} (every worker picks it up within "
                  f"{settings.get('catalog_refresh_seconds')} s)")


def cmd_channels_disable(args: argparse.Namespace) -> Output:
    return _set(args, False)


def cmd_channels_enable(args: argparse.Namespace) -> Output:
    return _set(args, True)


def cmd_channels_test(args: argparse.Namespace) -> Output:
    board, snapshot = _board(args)
    channels = [c for c in board.channels.values() if args.id in (None, c.id)]
    if args.id is not None and not channels:
        raise NotFound(f"no channel {args.id!r}: `tollway channels list` lists them")

    async def run() -> list[Any]:
        registry = Registry(timeouts=Timeouts(
            connect_s=float(settings.get("upstream_connect_timeout_seconds")),
            read_s=float(settings.get("upstream_read_timeout_seconds"))),
            max_body_bytes=int(settings.get("max_upstream_body_bytes")))
        try:
            registry.configure(snapshot.providers)
            return list(await asyncio.gather(*(
                check(registry, c, *snapshot.providers[c.provider]) for c in channels)))
        finally:
            await registry.close()

    results = sorted(asyncio.run(run()), key=lambda h: h.channel)
    data = [{"id": h.channel, "ok": h.ok, "status": h.status, "latency_ms": h.latency_ms,
             "detail": h.detail} for h in results]
    lines = [f"{h.channel}  {'ok' if h.ok else 'skipped' if h.ok is None else 'FAILED'}  "
             f"{h.latency_ms} ms  {h.detail}" for h in results]
    return Output({"object": "list", "data": data}, "\n".join(lines) or "no channels")


def cmd_margin(args: argparse.Namespace) -> Output:
    end = parse_iso_ms(args.to, what="--to") if args.to else clock.now_ms()
    start = parse_iso_ms(args.start, what="--from") if args.start else end - 30 * DAY_MS
    db = open_db(args)
    with db.read() as conn:
        report = margin_report(conn, start_ms=start, end_ms=end, group_by=args.group_by)
    lines = [(f"{'':<24}  {'requests':>8}  {'revenue':>14}  {'upstream cost':>14}  "
             f"{'margin':>14}  {'no cost':>7}  {'flagged':>7}")]
    for line in [*report["data"], {args.group_by: "total", **report["total"]}]:
        lines.append(f"{str(line[args.group_by]):<24}  {line['requests']:>8}  "
                     f"{line['revenue_usd']:>14}  {line['upstream_cost_usd']:>14}  "
                     f"{line['margin_usd']:>14}  {line['requests_without_cost']:>7}  "
                     f"{line['mismatched_records']:>7}")
    return Output(report, "\n".join(lines))


def register(c: Commands) -> None:
    chn = c.group("channels", "upstream channels: list, disable, enable, health-check")
    c.add(chn, "list", cmd_channels_list, "every channel of the catalog, enabled or disabled")
    for name, handler, text in (
            ("disable", cmd_channels_disable, "take a channel out of service (every worker)"),
            ("enable", cmd_channels_enable, "put a disabled channel back into service")):
        p = c.add(chn, name, handler, text)
        p.add_argument("id", metavar="ID", help="ITEM/PROVIDER or ITEM/PROVIDER#N")
    p = c.add(chn, "test", cmd_channels_test, "send each channel (or ID) a free request "
            "(GET /models or the provider's health_path), never a paid one")
    p.add_argument("id", metavar="ID", nargs="?")
    p = c.add(c.sub, "margin", cmd_margin, "revenue, upstream cost and margin (channels with a "
            "cost), and records whose upstream-reported cost disagrees")
    p.add_argument("--from", dest="start", metavar="ISO", help="default: 30 days before --to")
    p.add_argument("--to", metavar="ISO", help="default: now")
    p.add_argument("--group-by", default="model", choices=["model", "channel", "day"])
