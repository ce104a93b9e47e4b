"""Query-string parsing and the usage download that both HTTP surfaces share: the JSON API
(a customer's key or the admin token) and the console (a signed-in session). ``Scope`` decides
which account a request may see; the handlers never take it from the query."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from tollway.billing.reports import export_csv, export_jsonl
from tollway.billing.views import parse_iso_ms
from tollway.errors import InvalidRequest
from tollway.runtime.context import Context
from tollway.store import reports as store
from tollway.store.reports import LOG_TYPES, LogFilter

#: Resolves the account a request may see: its key's account, or (operators) any or all.
Scope = Callable[[Request, Context], Awaitable[int | None]]



def query_int(request: Request, name: str, *, default: int | None = None, low: int = 1,
              high: int = 2**63 - 1) -> int | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return default
    if not (value.isascii() and value.isdigit()) or not low <= int(value) <= high:
        raise InvalidRequest(f"{name} must be a whole number from {low} to {high}")
    return int(value)


def query_time(request: Request, name: str) -> int | None:
    value = request.query_params.get(name)
    return None if not value else parse_iso_ms(value, what=name)


def log_filter(request: Request, account_id: int | None) -> LogFilter:
    q = request.query_params
    products = {q.get(n) for n in ("model", "endpoint", "product")} - {None, ""}
    if len(products) > 1:
        raise InvalidRequest("give one of model, endpoint or product")
    kind = q.get("type") or None
    if kind is not None and kind not in LOG_TYPES:
        raise InvalidRequest(f"type must be one of {', '.join(LOG_TYPES)}")
    billing_type = q.get("billing_type") or None
    if billing_type is not None and billing_type not in ("token", "per_call"):
        raise InvalidRequest("billing_type must be token or per_call")
    review = q.get("review") or "false"
    if review not in ("true", "false"):
        raise InvalidRequest("review must be true or false")
    return LogFilter(account_id=account_id, start_ms=query_time(request, "start"),
                     end_ms=query_time(request, "end"),
                     product=products.pop() if products else None,
                     key_id=query_int(request, "key"), group=q.get("group") or None, type=kind,
                     billing_type=billing_type, review=review == "true")


def usage_export(scope: Scope) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        ctx: Context = request.app.state.ctx
        account_id = await scope(request, ctx)
        where = log_filter(request, account_id)
        fmt = request.query_params.get("format", "csv")
        if fmt not in ("csv", "jsonl"):
            raise InvalidRequest("format must be csv or jsonl")

        def body() -> Iterator[bytes]:  # runs in a worker thread, one keyset chunk at a time
            with ctx.db.read() as conn:
                rows = store.iter_usage(conn, where)
                yield from (export_csv(rows) if fmt == "csv" else export_jsonl(rows))

        media = "text/csv" if fmt == "csv" else "application/x-ndjson"
        return StreamingResponse(body(), media_type=media, headers={
            "content-disposition": f'attachment; filename="usage.{fmt}"'})
    return endpoint
