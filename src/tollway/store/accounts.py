"""Accounts and API keys: rows in, rows out. Money columns change only in the ledger."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tollway.errors import InvalidRequest, UnknownAccount, UnknownApiKey
from tollway.store.tables import accounts, api_keys, catalog_items, entries, groups, wallet_days

#: Ids are signed 64-bit integers; a larger number names nothing (and SQLite cannot bind it).
_MAX_ID = 2**63 - 1


def _is_id(ref: str | int) -> bool:
    """Whether a reference is an id: an int, or ASCII digits (``"²".isdigit()`` is true)."""
    return isinstance(ref, int) or (ref.isascii() and ref.isdigit())


@dataclass(frozen=True, slots=True)
class Account:
    id: int
    name: str
    group: str
    available_nano: int
    held_nano: int
    used_nano: int
    requests: int
    created_at_ms: int
    tier: str | None = None
    email: str | None = None
    disabled_at_ms: int | None = None
    has_password: bool = False
    promo_nano: int = 0  # the promotional part of the balance (billing/grants.py)

    @property
    def balance_nano(self) -> int:
        return self.available_nano + self.held_nano


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """A key's own limits (None = none of its own): rate limits that may only lower its
    account tier's, spend caps per calendar period, and the IP networks it may be used from."""

    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    daily_cap_nano: int | None = None
    weekly_cap_nano: int | None = None
    monthly_cap_nano: int | None = None
    allowed_ips: tuple[str, ...] | None = None  # CIDR networks

    def columns(self) -> dict[str, Any]:
        return {"rpm": self.rpm, "tpm": self.tpm, "concurrency": self.concurrency,
                "daily_cap_nano": self.daily_cap_nano, "weekly_cap_nano": self.weekly_cap_nano,
                "monthly_cap_nano": self.monthly_cap_nano,
                "allowed_ips": None if self.allowed_ips is None
                else json.dumps(list(self.allowed_ips))}


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    id: int
    account_id: int
    prefix: str
    name: str | None
    group: str | None  # pinned group; None = the account's group
    models: tuple[str, ...] | None  # None = every model
    quota_nano: int | None
    used_nano: int
    held_nano: int
    expires_at_ms: int | None
    revoked_at_ms: int | None
    created_at_ms: int
    account_group: str
    limits: KeyLimits = KeyLimits()
    account_tier: str | None = None  # None = the catalog's default tier
    account_disabled_at_ms: int | None = None


def _account(row: sa.Row[tuple[object, ...]]) -> Account:
    return Account(row.id, row.name, row.group_name, row.available_nano, row.held_nano,
                   row.used_nano, row.requests, row.created_at_ms, row.tier, row.email,
                   row.disabled_at_ms, row.password_hash is not None, row.promo_nano)


def create_account(conn: Connection, name: str, group: str, *, at_ms: int,
                   email: str | None = None, password_hash: str | None = None) -> Account:
    name = name.strip()
    if not name or len(name) > 200:
        raise InvalidRequest("an account name must be 1 to 200 characters")
    if name.isdigit() or name.startswith("system:"):
        raise InvalidRequest(f"account name {name!r} is reserved (all digits, or system:)")
    require_group(conn, group)
    if conn.execute(sa.select(accounts.c.id).where(accounts.c.name == name)).first():
        raise InvalidRequest(f"an account named {name!r} already exists")
    if email is not None:
        email = _check_email(conn, email)
    account_id = conn.execute(accounts.insert().values(
        name=name, kind="customer", group_name=group, created_at_ms=at_ms, email=email,
        password_hash=password_hash,
    ).returning(accounts.c.id)).scalar_one()
    return get_account(conn, int(account_id))


def _check_email(conn: Connection, email: str, *, account_id: int | None = None) -> str:
    """An email address as stored: trimmed, lower-cased, plausible and not taken."""
    email = email.strip().lower()
    local, at, domain = email.partition("@")
    if (not at or not local or "." not in domain or len(email) > 320 or "\x00" in email
            or any(c.isspace() for c in email)):
        raise InvalidRequest(f"{email!r} is not an email address")
    taken = conn.execute(sa.select(accounts.c.id).where(accounts.c.email == email)).scalar()
    if taken is not None and taken != account_id:
        raise InvalidRequest("another account already uses this email address")
    return email


def set_email(conn: Connection, account_id: int, email: str | None) -> Account:
    get_account(conn, account_id)
    if email is not None:
        email = _check_email(conn, email, account_id=account_id)
    conn.execute(accounts.update().where(accounts.c.id == account_id).values(email=email))
    return get_account(conn, account_id)


def set_password_hash(conn: Connection, account_id: int, password_hash: str | None) -> Account:
    get_account(conn, account_id)
    conn.execute(accounts.update().where(accounts.c.id == account_id)
                 .values(password_hash=password_hash))
    return get_account(conn, account_id)


def set_disabled(conn: Connection, account_id: int, *, at_ms: int | None) -> Account:
    """Disable (``at_ms``) or enable (None) an account; disabling again keeps the first time."""
    get_account(conn, account_id)
    query = accounts.update().where(accounts.c.id == account_id)
    if at_ms is not None:
        query = query.where(accounts.c.disabled_at_ms.is_(None))
    conn.execute(query.values(disabled_at_ms=at_ms))
    return get_account(conn, account_id)


def login_row(conn: Connection, login: str) -> tuple[Account, str | None] | None:
    """The customer account whose email or name is ``login``, with its password hash."""
    login = login.strip()
    if not login or "\x00" in login or len(login) > 320:
        return None
    column = accounts.c.email if "@" in login else accounts.c.name
    value = login.lower() if "@" in login else login
    row = conn.execute(sa.select(accounts).where(column == value,
                                                 accounts.c.kind == "customer")).first()
    return None if row is None else (_account(row), row.password_hash)


def require_group(conn: Connection, group: str) -> None:
    known = set(conn.execute(sa.select(groups.c.name)).scalars()) | {"default"}
    if group not in known:
        raise InvalidRequest(f"unknown group {group!r} (known: {', '.join(sorted(known))})")


def get_account(conn: Connection, account_id: int) -> Account:
    if not 0 < account_id <= _MAX_ID:
        raise UnknownAccount(f"no account with id {account_id}")
    row = conn.execute(sa.select(accounts).where(accounts.c.id == account_id,
                                                 accounts.c.kind == "customer")).first()
    if row is None:
        raise UnknownAccount(f"no account with id {account_id}")
    return _account(row)


def find_account(conn: Connection, ref: str | int) -> Account:
    """An account by id (digits) or by name."""
    if _is_id(ref):
        return get_account(conn, int(ref))
    if "\x00" in str(ref):  # no name holds NUL (and PostgreSQL refuses to compare one)
        raise UnknownAccount(f"no account named {ref!r}")
    row = conn.execute(sa.select(accounts).where(accounts.c.name == ref,
                                                 accounts.c.kind == "customer")).first()
    if row is None:
        raise UnknownAccount(f"no account named {ref!r}")
    return _account(row)


def list_accounts(conn: Connection) -> list[Account]:
    rows = conn.execute(sa.select(accounts).where(accounts.c.kind == "customer")
                        .order_by(accounts.c.id))
    return [_account(r) for r in rows]


_KEY_COLUMNS = (*api_keys.c, accounts.c.group_name.label("account_group"),
                accounts.c.tier.label("account_tier"),
                accounts.c.disabled_at_ms.label("account_disabled_at_ms"))


def _key(row: sa.Row[tuple[object, ...]]) -> ApiKeyRecord:
    models = tuple(json.loads(row.models)) if row.models is not None else None
    ips = tuple(json.loads(row.allowed_ips)) if row.allowed_ips is not None else None
    limits = KeyLimits(row.rpm, row.tpm, row.concurrency, row.daily_cap_nano,
                       row.weekly_cap_nano, row.monthly_cap_nano, ips)
    # only the operator's pin counts (a customer's, made before migration 0010, is ignored)
    group = row.group_name if row.group_pinned_by == "operator" else None
    return ApiKeyRecord(row.id, row.account_id, row.prefix, row.name, group, models,
                        row.quota_nano, row.used_nano, row.held_nano, row.expires_at_ms,
                        row.revoked_at_ms, row.created_at_ms, row.account_group, limits,
                        row.account_tier, row.account_disabled_at_ms)


def insert_key(conn: Connection, *, account_id: int, prefix: str, key_hash: str,
               name: str | None, group: str | None, models: list[str] | None,
               quota_nano: int | None, expires_at_ms: int | None, at_ms: int,
               limits: KeyLimits | None = None) -> ApiKeyRecord:
    get_account(conn, account_id)
    if group is not None:
        require_group(conn, group)
    if models is not None:
        known = set(conn.execute(sa.select(catalog_items.c.id)
                                 .where(catalog_items.c.id.in_(models))).scalars())
        if unknown := sorted(set(models) - known):
            raise InvalidRequest(f"unknown catalog ids in the model allowlist: "
                                 f"{', '.join(unknown)}")
    key_id = conn.execute(api_keys.insert().values(
        account_id=account_id, prefix=prefix, key_hash=key_hash, name=name, group_name=group,
        group_pinned_by=None if group is None else "operator",
        models=json.dumps(models) if models is not None else None, quota_nano=quota_nano,
        expires_at_ms=expires_at_ms, created_at_ms=at_ms, **(limits or KeyLimits()).columns(),
    ).returning(api_keys.c.id)).scalar_one()
    return get_key(conn, int(key_id))


def set_key_group(conn: Connection, key_id: int, group: str | None) -> ApiKeyRecord:
    """Pin a key to a price group as the operator (None: the account's group again)."""
    get_key(conn, key_id)
    if group is not None:
        require_group(conn, group)
    conn.execute(api_keys.update().where(api_keys.c.id == key_id).values(
        group_name=group, group_pinned_by=None if group is None else "operator"))
    return get_key(conn, key_id)


def _key_query() -> sa.Select[tuple[object, ...]]:
    return sa.select(*_KEY_COLUMNS).join(accounts, accounts.c.id == api_keys.c.account_id)


def get_key(conn: Connection, key_id: int) -> ApiKeyRecord:
    if not 0 < key_id <= _MAX_ID:
        raise UnknownApiKey(f"no API key with id {key_id}")
    row = conn.execute(_key_query().where(api_keys.c.id == key_id)).first()
    if row is None:
        raise UnknownApiKey(f"no API key with id {key_id}")
    return _key(row)


def key_by_hash(conn: Connection, key_hash: str) -> ApiKeyRecord | None:
    row = conn.execute(_key_query().where(api_keys.c.key_hash == key_hash)).first()
    return None if row is None else _key(row)


def list_keys(conn: Connection, account_id: int) -> list[ApiKeyRecord]:
    rows = conn.execute(_key_query().where(api_keys.c.account_id == account_id)
                        .order_by(api_keys.c.id))
    return [_key(r) for r in rows]


def revoke_key(conn: Connection, key_id: int, *, at_ms: int) -> ApiKeyRecord:
    """Revoke a key; revoking it again keeps the first revocation time."""
    get_key(conn, key_id)  # unknown (or out of range) ids fail before the UPDATE
    conn.execute(api_keys.update().where(api_keys.c.id == key_id,
                                         api_keys.c.revoked_at_ms.is_(None))
                 .values(revoked_at_ms=at_ms))
    return get_key(conn, key_id)


def set_key_limits(conn: Connection, key_id: int, limits: KeyLimits) -> ApiKeyRecord:
    get_key(conn, key_id)
    conn.execute(api_keys.update().where(api_keys.c.id == key_id).values(**limits.columns()))
    return get_key(conn, key_id)


def set_tier(conn: Connection, account_id: int, tier: str | None) -> Account:
    """Set (or with None, clear) an account's tier; the caller checks the name."""
    get_account(conn, account_id)
    conn.execute(accounts.update().where(accounts.c.id == account_id).values(tier=tier))
    return get_account(conn, account_id)


def cumulative_topups(conn: Connection, account_id: int) -> int:
    """Everything ever topped up to the account (from its daily wallet rows)."""
    return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(wallet_days.c.topups_nano), 0))
                            .where(wallet_days.c.account_id == account_id)).scalar_one())


def recent_entries(conn: Connection, account_id: int, *, limit: int) -> list[sa.Row[Any]]:
    """The account's ledger entries, newest first."""
    return list(conn.execute(sa.select(entries).where(entries.c.account_id == account_id)
                             .order_by(entries.c.id.desc()).limit(limit)))


def set_group(conn: Connection, account_id: int, group: str) -> Account:
    """Move an account to another (known) group: its next requests are priced with that
    group's ratio (keys pinned to a group keep their own)."""
    get_account(conn, account_id)
    require_group(conn, group)
    conn.execute(accounts.update().where(accounts.c.id == account_id).values(group_name=group))
    return get_account(conn, account_id)
