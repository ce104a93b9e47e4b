"""The operator's pages: accounts (create, group, top up, adjust, disable), the catalog (prices,
price history, apply a file after a preview), groups and ratios, and usage and revenue.

Every page requires an operator session (``require_operator``) and every form is a POST with
the session's CSRF token. Money moves through the same billing functions as the admin API and
the CLI (``billing.credits``); each top-up or adjustment form carries a one-time ``nonce``
that becomes the ledger's idempotency key, so a form submitted twice credits once. A request
that fails shows the error on the form, never a stack trace.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.engine import Connection
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from tollway.billing import catalog_changes, credits, logins
from tollway.billing.marketplace import item_unit
from tollway.billing.reports import summary_view
from tollway.billing.views import account_view, entry_view, parse_amount, parse_signed_amount
from tollway.clock import now_ms
from tollway.errors import CatalogError, InvalidRequest, NotFound, TollwayError
from tollway.pricing.catalog import Catalog, parse_catalog
from tollway.pricing.display import price_lines
from tollway.runtime.context import Context
from tollway.runtime.http import form_data
from tollway.store import accounts as store
from tollway.store import reports as report_store
from tollway.store.catalog import group_ratios
from tollway.store.reports import DAY_MS
from tollway.web.pages import render
from tollway.web.session import check_csrf, require_operator

MAX_CATALOG_BYTES = 2_000_000
ACTIONS = ("group", "topup", "adjust", "disable", "enable")
NOTICES = {
    "created": "Account created.",
    "group": "Group changed: the account's next requests use its ratio.",
    "topup": "Top-up credited.",
    "adjust": "Adjustment posted.",
    "disable": "Account disabled: its keys and console sign-in are refused.",
    "enable": "Account enabled.",
}


def _ctx(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


def _text(form: Any, name: str, limit: int = 1000) -> str:
    value = form.get(name)
    return value.strip()[:limit] if isinstance(value, str) else ""


def _nonce() -> str:
    """A one-time form id: the idempotency key of the money movement the form asks for."""
    return secrets.token_urlsafe(16)


async def home(request: Request) -> Response:
    await require_operator(request)
    return RedirectResponse("/admin/accounts", status_code=303)


# --------------------------------------------------------------------------- accounts


async def accounts_page(request: Request) -> Response:
    await require_operator(request)
    if request.method == "GET":
        return await _accounts(request)
    form = await form_data(request)
    await check_csrf(request, form)
    fields = {k: _text(form, k, 320) for k in ("name", "group", "email")}
    password = form.get("password")
    password = password if isinstance(password, str) and password else None
    try:
        password_hash = None if password is None else logins.hash_password(password)
        account = await _ctx(request).write(lambda conn: logins.create_account(
            conn, fields["name"], fields["group"] or "default", email=fields["email"] or None,
            password_hash=password_hash))
    except TollwayError as exc:
        return await _accounts(request, error=exc.message, fields=fields, status=400)
    return RedirectResponse(f"/admin/accounts/{account.id}?done=created", status_code=303)


async def _accounts(request: Request, *, error: str | None = None,
                    fields: dict[str, str] | None = None, status: int = 200) -> Response:
    def load(conn: Connection) -> tuple[list[Any], list[str]]:
        return store.list_accounts(conn), sorted(group_ratios(conn))

    accounts, groups = await _ctx(request).read(load)
    return await render(request, "operator/accounts.html", {
        "accounts": [_account(a) for a in accounts], "groups": groups, "error": error,
        "fields": fields or {"name": "", "group": "default", "email": ""}}, status=status)


def _account(account: store.Account) -> dict[str, Any]:
    return {**account_view(account), "email": account.email,
            "disabled": account.disabled_at_ms is not None,
            "has_password": account.has_password}


async def account_page(request: Request) -> Response:
    await require_operator(request)
    done = request.query_params.get("done", "")
    return await _account_page(request, request.path_params["account_id"],
                               notice=NOTICES.get(done))


async def _account_page(request: Request, account_id: int, *, notice: str | None = None,
                        errors: dict[str, str] | None = None,
                        values: dict[str, str] | None = None, status: int = 200) -> Response:
    def load(conn: Connection) -> tuple[store.Account, list[Any], list[str], int]:
        account = store.get_account(conn, account_id)
        entries = store.recent_entries(conn, account_id, limit=20)
        keys = len(store.list_keys(conn, account_id))
        return account, entries, sorted(group_ratios(conn)), keys

    account, entries, groups, keys = await _ctx(request).read(load)
    return await render(request, "operator/account.html", {
        "account": _account(account), "entries": [entry_view(e) for e in entries],
        "groups": groups, "keys": keys, "notice": notice, "errors": errors or {},
        "values": values or {}, "topup_nonce": _nonce(), "adjust_nonce": _nonce()},
        status=status)


async def account_action(request: Request) -> Response:
    """``POST /admin/accounts/{id}/{action}``: group, topup, adjust, disable, enable."""
    await require_operator(request)
    account_id: int = request.path_params["account_id"]
    action: str = request.path_params["action"]
    if action not in ACTIONS:
        raise NotFound(f"no account form {action!r}")
    form = await form_data(request)
    await check_csrf(request, form)
    ctx = _ctx(request)
    values = {k: _text(form, k) for k in ("group", "amount_usd", "note")}
    try:
        if action == "group":
            await ctx.write(lambda conn: store.set_group(conn, account_id, values["group"]))
        elif action in ("topup", "adjust"):
            await _credit(ctx, account_id, action, form, values)
        elif action == "disable":
            await ctx.write(lambda conn: logins.disable_account(conn, account_id))
        else:
            await ctx.write(lambda conn: logins.enable_account(conn, account_id))
    except TollwayError as exc:
        if exc.status == 404:
            raise
        return await _account_page(request, account_id, errors={action: exc.message},
                                   values={f"{action}_{k}": v for k, v in values.items()},
                                   status=exc.status)
    if action in ("group", "disable", "enable"):
        _forget_keys(request)
    return RedirectResponse(f"/admin/accounts/{account_id}?done={action}", status_code=303)


def _forget_keys(request: Request) -> None:
    """This process stops trusting cached keys at once (other processes after
    ``key_cache_seconds``), so a disabled account or a new group applies now."""
    gateway = getattr(request.app.state, "gateway", None)
    if gateway is not None:
        gateway.forget_keys()


async def _credit(ctx: Context, account_id: int, action: str, form: Any,
                  values: dict[str, str]) -> None:
    nonce = _text(form, "nonce", 200)
    if len(nonce) < 16:
        raise InvalidRequest("the form has no submission id; reload the page and try again")
    if action == "topup":
        amount = parse_amount(values["amount_usd"])
    else:
        amount = parse_signed_amount(values["amount_usd"])
        if not values["note"]:
            raise InvalidRequest("a note is required: say why the balance is adjusted")
    kind = "topup" if action == "topup" else "adjustment"
    await ctx.write(lambda conn: credits.credit(
        conn, account_id, amount, kind=kind, idempotency_key=f"console-{action}-{nonce}",
        note=values["note"] or None, at_ms=ctx.clock()), account_id=account_id)


# --------------------------------------------------------------------------- catalog


async def catalog_page(request: Request) -> Response:
    await require_operator(request)
    return await _catalog_page(request)


async def _catalog_page(request: Request, *, error: list[str] | None = None,
                        text: str = "", status: int = 200) -> Response:
    at = now_ms()
    items = await _ctx(request).read(lambda conn: catalog_changes.priced_items(conn, now_ms=at))
    return await render(request, "operator/catalog.html", {
        "items": [_priced(p, at) for p in items], "problems": error, "text": text},
        status=status)


def _priced(priced: catalog_changes.PricedItem, at: int) -> dict[str, Any]:
    item = priced.item
    per = item_unit(item)
    return {
        "id": item.id, "billing_type": item.billing_type, "provider": item.provider,
        "spec": item.spec, "version": item.version.id, "endpoint": item.spec.is_endpoint,
        "unit": "per token" if item.billing_type == "token" else f"per {per}",
        "price_display": price_lines(item.version.price, per=per),
        "overrides": _overrides(item.version.group_ratios),
        "history": [{"id": v.id, "effective_from": _iso(v.effective_from_ms),
                     "price_display": price_lines(v.price, per=per),
                     "overrides": _overrides(v.group_ratios),
                     "state": ("in effect" if v.id == item.version.id
                               else "scheduled" if v.effective_from_ms > at else "earlier")}
                    for v in reversed(priced.history)]}


def _overrides(ratios: Any) -> str:
    return ", ".join(f"{g} ×{r}" for g, r in sorted(ratios.items()))


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


async def _posted_catalog(request: Request) -> tuple[str, str]:
    """The posted catalog text and its name (the form is CSRF-checked, and closed after, so
    an uploaded file's temporary file is too)."""
    form = await form_data(request)
    try:
        await check_csrf(request, form)
        return await _catalog_text(form)
    finally:
        await form.close()


async def _catalog_text(form: Any) -> tuple[str, str]:
    """The catalog file from the upload (if one was chosen) or the textarea, and its name."""
    upload = form.get("file")
    if isinstance(upload, UploadFile) and upload.filename:
        raw = await upload.read(MAX_CATALOG_BYTES + 1)
        source = upload.filename
    else:
        raw = (form.get("catalog") or "").encode() if isinstance(form.get("catalog"),
                                                                 str) else b""
        source = "the catalog text"
    if len(raw) > MAX_CATALOG_BYTES:
        raise CatalogError([f"{source}: larger than {MAX_CATALOG_BYTES} bytes"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CatalogError([f"{source}: not UTF-8 text"]) from None
    if not text.strip():
        raise CatalogError([f"{source}: empty; paste a catalog or choose a file"])
    return text.replace("\r\n", "\n"), source


async def _with_posted_catalog(
        request: Request, use: Callable[[str, str, Catalog], Awaitable[Response]]) -> Response:
    """Read and parse the posted catalog and ``use`` it; a :class:`CatalogError` (the
    loader's, or the apply's refusal) shows the catalog page again with its problems."""
    await require_operator(request)
    text = ""
    try:
        text, source = await _posted_catalog(request)
        return await use(text, source, parse_catalog(text, source=source))
    except CatalogError as exc:
        return await _catalog_page(request, error=exc.problems, text=text, status=400)


async def catalog_preview(request: Request) -> Response:
    async def show(text: str, source: str, catalog: Catalog) -> Response:
        at = now_ms()
        # on the writer: the preview runs the apply in a savepoint and rolls it back
        preview = await _ctx(request).write(
            lambda conn: catalog_changes.preview(conn, catalog, now_ms=at))
        return await render(request, "operator/catalog_preview.html", {
            "diff": preview.diff, "problems": preview.problems, "text": text,
            "source": source,
            "new_versions": [] if preview.report is None else [
                (item, _iso(ms)) for item, ms in preview.report.new_versions],
            "scheduled": [(k, _iso(int(v.timestamp() * 1000)))
                          for k, v in preview.diff.scheduled.items()],
            "counts": (len(catalog.models), len(catalog.endpoints), len(catalog.groups))})

    return await _with_posted_catalog(request, show)


async def catalog_apply(request: Request) -> Response:
    async def apply(text: str, source: str, catalog: Catalog) -> Response:
        report = await _ctx(request).write(
            lambda conn: catalog_changes.apply(conn, catalog, now_ms=now_ms()))
        gateway = getattr(request.app.state, "gateway", None)
        if gateway is not None:
            await gateway.refresh()  # sell at the new prices now, not at the next refresh
        return await render(request, "operator/catalog_applied.html", {
            "report": report, "source": source,
            "new_versions": [(item, _iso(ms)) for item, ms in report.new_versions]})

    return await _with_posted_catalog(request, apply)


# --------------------------------------------------------------------------- groups, usage


async def groups_page(request: Request) -> Response:
    await require_operator(request)

    def load(conn: Connection) -> dict[str, Any]:
        ratios = group_ratios(conn)
        members: dict[str, int] = dict.fromkeys(ratios, 0)
        for account in store.list_accounts(conn):
            members[account.group] = members.get(account.group, 0) + 1
        overrides = [(p.item.id, _overrides(p.item.version.group_ratios))
                     for p in catalog_changes.priced_items(conn, now_ms=now_ms())
                     if p.item.version.group_ratios]
        return {"groups": [(name, str(ratios[name]), members.get(name, 0))
                           for name in sorted(ratios)], "overrides": overrides}

    return await render(request, "operator/groups.html", await _ctx(request).read(load))


def _day(value: str | None, default: datetime) -> datetime:
    if not value:
        return default
    try:
        return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise InvalidRequest(f"dates are YYYY-MM-DD, got {value!r}") from None


async def usage_page(request: Request) -> Response:
    """Usage and revenue of every account for a period of whole UTC days, by account and by
    product, from the hourly rollups (the admin summary API's query)."""
    await require_operator(request)
    today = datetime.now(tz=UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    q = request.query_params
    error = None
    try:
        first = _day(q.get("start"), today - timedelta(days=29))
        last = _day(q.get("end"), today)
        if last < first:
            raise InvalidRequest("the end date is before the start date")
    except InvalidRequest as exc:
        error, first, last = exc.message, today - timedelta(days=29), today
    start_ms = int(first.timestamp() * 1000)
    end_ms = int(last.timestamp() * 1000) + DAY_MS

    def load(conn: Connection) -> dict[str, Any]:
        names = {a.id: a.name for a in store.list_accounts(conn)}
        views = {}
        for by in ("account", "product"):
            rows, totals = report_store.summary(conn, account_id=None, start_ms=start_ms,
                                                end_ms=end_ms, group_by=[by])
            views[by] = summary_view(rows, totals, start_ms=start_ms, end_ms=end_ms)
        for row in views["account"]["data"]:
            row["name"] = names.get(row["account_id"], f"#{row['account_id']}")
        return views

    views = await _ctx(request).read(load)
    return await render(request, "operator/usage.html", {
        "by_account": views["account"], "by_product": views["product"],
        "start": first.strftime("%Y-%m-%d"), "end": last.strftime("%Y-%m-%d"),
        "error": error}, status=400 if error else 200)


operator_routes: list[BaseRoute] = [
    Route("/admin", home, methods=["GET"]),
    Route("/admin/accounts", accounts_page, methods=["GET", "POST"]),
    Route("/admin/accounts/{account_id:int}", account_page, methods=["GET"]),
    Route("/admin/accounts/{account_id:int}/{action}", account_action, methods=["POST"]),
    Route("/admin/catalog", catalog_page, methods=["GET"]),
    Route("/admin/catalog/preview", catalog_preview, methods=["POST"]),
    Route("/admin/catalog/apply", catalog_apply, methods=["POST"]),
    Route("/admin/groups", groups_page, methods=["GET"]),
    Route("/admin/usage", usage_page, methods=["GET"]),
]
