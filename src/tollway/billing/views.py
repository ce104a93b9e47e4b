"""JSON shapes of accounts, keys, balances and ledger results, shared by the API and the CLI
(``--json``), so the two can never disagree. Money is a 9-decimal string."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from tollway.billing.keys import parse_networks
from tollway.errors import InvalidRequest
from tollway.ledger.ledger import Adjustment, Topup
from tollway.money import MoneyFormatError, format_usd, parse_signed_usd, parse_usd
from tollway.store.accounts import Account, ApiKeyRecord, KeyLimits

#: A key's own limits as the API and the CLI name them: rate limits (integers), spend caps
#: (USD strings) and the IP allowlist (CIDR list).
RATE_FIELDS = ("rpm", "tpm", "concurrency")
CAP_FIELDS = {"daily_cap_usd": "daily_cap_nano", "weekly_cap_usd": "weekly_cap_nano",
              "monthly_cap_usd": "monthly_cap_nano"}
LIMIT_FIELDS = (*RATE_FIELDS, *CAP_FIELDS, "allowed_ips")


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


def parse_key_limits(values: Mapping[str, Any], base: KeyLimits | None = None) -> KeyLimits:
    """The limits named in ``values`` (see :data:`LIMIT_FIELDS`) replace those of ``base``;
    a null clears one. Integers may come as digit strings (the CLI), IPs as a comma list."""
    changes: dict[str, Any] = {}
    for name in RATE_FIELDS:
        if name in values:
            value = values[name]
            if isinstance(value, str) and value.strip().isdigit():
                value = int(value)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise InvalidRequest(f"{name} must be a positive integer, got {value!r}")
            changes[name] = value
    for name, column in CAP_FIELDS.items():
        if name in values:
            changes[column] = (None if values[name] is None
                               else parse_amount(values[name], what=name))
    if "allowed_ips" in values:
        ips = values["allowed_ips"]
        if isinstance(ips, str):
            ips = ips.split(",")
        if ips is not None and (not isinstance(ips, list)
                                or not all(isinstance(i, str) for i in ips)):
            raise InvalidRequest("allowed_ips must be a list of CIDR networks")
        changes["allowed_ips"] = None if ips is None else parse_networks(ips)
    return dataclasses.replace(base or KeyLimits(), **changes)


def limits_view(limits: KeyLimits) -> dict[str, Any]:
    return {**{name: getattr(limits, name) for name in RATE_FIELDS},
            **{name: None if getattr(limits, column) is None
               else format_usd(getattr(limits, column)) for name, column in CAP_FIELDS.items()},
            "allowed_ips": None if limits.allowed_ips is None else list(limits.allowed_ips)}


def account_view(account: Account) -> dict[str, Any]:
    return {"id": account.id, "name": account.name, "group": account.group,
            "tier": account.tier, **balance_view(account),
            "created_at": iso(account.created_at_ms),
            "email": account.email, "console_login": account.has_password,
            "disabled_at": iso(account.disabled_at_ms)}


def balance_view(account: Account) -> dict[str, Any]:
    promotional = max(min(account.promo_nano, account.available_nano), 0)
    return {"balance_usd": format_usd(account.balance_nano),
            "held_usd": format_usd(account.held_nano),
            "available_usd": format_usd(account.available_nano),
            # the available balance in two parts: promotional credit (spent first) and paid
            "paid_usd": format_usd(account.available_nano - promotional),
            "promotional_usd": format_usd(promotional),
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
        "created_at": iso(key.created_at_ms), **limits_view(key.limits),
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
