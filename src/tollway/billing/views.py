"""JSON shapes of accounts, keys, balances and ledger results, shared by the API and the CLI
(``--json``), so the two can never disagree. Money is a 9-decimal string."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tollway.errors import InvalidRequest
from tollway.ledger.ledger import Adjustment, Topup
from tollway.money import MoneyFormatError, format_usd, parse_signed_usd, parse_usd
from tollway.store.accounts import Account, ApiKeyRecord


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


def parse_iso_ms(value: str, *, what: str) -> int:
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"{what} must be an ISO 8601 time, got {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def parse_amount(value: object, *, what: str = "amount_usd") -> int:
    """A positive USD amount as typed by a person (decimal string) into nano-USD."""
    try:
        return parse_usd(value, what=what, allow_zero=False)
    except MoneyFormatError as exc:
        raise InvalidRequest(str(exc)) from None


def parse_signed_amount(value: object, *, what: str = "amount_usd") -> int:
    """A non-zero signed USD amount (an adjustment) into nano-USD."""
    try:
        return parse_signed_usd(value, what=what)
    except MoneyFormatError as exc:
        raise InvalidRequest(str(exc)) from None


def account_view(account: Account) -> dict[str, Any]:
    return {"id": account.id, "name": account.name, "group": account.group,
            **balance_view(account), "created_at": iso(account.created_at_ms),
            "email": account.email, "console_login": account.has_password,
            "disabled_at": iso(account.disabled_at_ms)}


def balance_view(account: Account) -> dict[str, Any]:
    return {"balance_usd": format_usd(account.balance_nano),
            "held_usd": format_usd(account.held_nano),
            "available_usd": format_usd(account.available_nano),
            "used_usd": format_usd(account.used_nano),
            "requests": account.requests}


def key_view(key: ApiKeyRecord, *, secret: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": key.id, "account_id": key.account_id, "prefix": key.prefix, "name": key.name,
        "group": key.group, "effective_group": key.group or key.account_group,
        "models": list(key.models) if key.models is not None else None,
        "quota_usd": None if key.quota_nano is None else format_usd(key.quota_nano),
        "used_usd": format_usd(key.used_nano), "held_usd": format_usd(key.held_nano),
        "expires_at": iso(key.expires_at_ms), "revoked_at": iso(key.revoked_at_ms),
        "created_at": iso(key.created_at_ms),
    }
    if secret is not None:
        body["key"] = secret
    return body


def credit_view(result: Topup | Adjustment) -> dict[str, Any]:
    return {"entry_id": result.entry_id, "account_id": result.account_id,
            "amount_usd": format_usd(result.amount_nano),
            "available_usd": format_usd(result.balance_nano)}


def entry_view(row: Any) -> dict[str, Any]:
    return {"id": row.id, "kind": row.kind, "amount_usd": format_usd(row.amount_nano),
            "hold_id": row.hold_id, "note": row.note, "created_at": iso(row.created_at_ms)}
