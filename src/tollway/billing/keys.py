"""API keys: made once, shown once, stored as a SHA-256 hash and found by that hash.

A key is ``tw-`` followed by 43 URL-safe characters (256 random bits), so a fast hash is
enough: nobody can guess a preimage, and lookups stay a single indexed read.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from sqlalchemy.engine import Connection

from tollway.errors import (
    AccountDisabled,
    ExpiredApiKey,
    InvalidApiKey,
    InvalidRequest,
    IpNotAllowed,
    ModelNotAllowed,
    QuotaExceeded,
    RevokedApiKey,
)
from tollway.store import accounts as store
from tollway.store import usage as usage_store
from tollway.store.accounts import ApiKeyRecord, KeyLimits
from tollway.store.catalog import list_tiers

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
KEY_PREFIX = "tw-"
DISPLAY_PREFIX_LEN = 10


@dataclass(frozen=True, slots=True)
class NewKey:
    record: ApiKeyRecord
    secret: str  # the only time the secret exists outside the client


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(conn: Connection, account_id: int, *, at_ms: int, name: str | None = None,
               group: str | None = None, models: list[str] | None = None,
               quota_nano: int | None = None, expires_at_ms: int | None = None,
               limits: KeyLimits | None = None, by_customer: bool = False) -> NewKey:
    """A new key. ``by_customer`` (the console): pinning a price group is the operator's
    decision only, so a customer's key always takes its account's group."""
    if by_customer and group is not None:
        raise InvalidRequest("only the operator can pin a key to a price group; keys made "
                             "here use the account's group")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    if limits is not None:
        check_limits(conn, account_id, limits)
    record = store.insert_key(conn, account_id=account_id, prefix=secret[:DISPLAY_PREFIX_LEN],
                              key_hash=hash_key(secret), name=name, group=group, models=models,
                              quota_nano=quota_nano, expires_at_ms=expires_at_ms, at_ms=at_ms,
                              limits=limits)
    usage_store.insert_event(conn, event_id=f"key-{record.id}-created", account_id=account_id,
                             type_="system", at_ms=at_ms, key_id=record.id, key_name=name,
                             note=f"API key {record.prefix}… created")
    return NewKey(record, secret)


def set_limits(conn: Connection, key_id: int, limits: KeyLimits) -> ApiKeyRecord:
    """Replace a key's own limits (workers see it within ``key_cache_seconds``)."""
    check_limits(conn, store.get_key(conn, key_id).account_id, limits)
    return store.set_key_limits(conn, key_id, limits)


def pin_group(conn: Connection, key_id: int, group: str | None, *,
              at_ms: int) -> ApiKeyRecord:
    """The operator pins a key to a price group (None: back to the account's group)."""
    record = store.set_key_group(conn, key_id, group)
    usage_store.insert_event(
        conn, event_id=f"key-{record.id}-group-{at_ms}", account_id=record.account_id,
        type_="system", at_ms=at_ms, key_id=record.id, key_name=record.name,
        note=f"API key {record.prefix}… " + (f"pinned to group {group}" if group else
                                            "uses the account's group"))
    return record


def check_limits(conn: Connection, account_id: int, limits: KeyLimits) -> None:
    """A key's rate limits are positive and may only lower its account tier's."""
    account = store.get_account(conn, account_id)
    tiers, default = list_tiers(conn)
    by_name = {t.name: t for t in tiers}
    tier = by_name.get(account.tier or "") or by_name.get(default or "")
    for name in ("rpm", "tpm", "concurrency", "daily_cap_nano", "weekly_cap_nano",
                 "monthly_cap_nano"):
        value = getattr(limits, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise InvalidRequest(f"{name} must be a positive integer, got {value!r}")
        ceiling = getattr(tier, name, None) if tier is not None else None
        if value is not None and tier is not None and ceiling is not None and value > ceiling:
            raise InvalidRequest(f"{name} {value} is above the {ceiling} of the account's tier "
                                 f"{tier.name!r} (a key's limits may only lower its tier's)")


def parse_networks(values: Iterable[str]) -> tuple[str, ...]:
    """CIDR networks (or single addresses), IPv4 or IPv6, in their normal form."""
    out = []
    for value in values:
        text = value.strip()
        try:
            out.append(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            raise InvalidRequest(f"{text!r} is not an IP network (e.g. 203.0.113.0/24, "
                                 "2001:db8::/32 or one address)") from None
    if not out:
        raise InvalidRequest("an IP allowlist needs at least one network")
    return tuple(out)


@lru_cache(maxsize=4096)
def networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def within(address: Address, nets: Iterable[Network]) -> bool:
    return any(address.version == net.version and address in net for net in nets)


def check_ip(record: ApiKeyRecord, address: Address | None) -> None:
    """Whether the key may be used from this client address (its allowlist, if any)."""
    allowed = record.limits.allowed_ips
    if allowed is not None and (address is None or not within(address, networks(allowed))):
        raise IpNotAllowed(f"API key {record.prefix}… may not be used from {address}: the "
                           "address is not in its IP allowlist")


def revoke_key(conn: Connection, key_id: int, *, at_ms: int) -> ApiKeyRecord:
    """Revoke a key (again: nothing changes) and log it once."""
    record = store.revoke_key(conn, key_id, at_ms=at_ms)
    usage_store.insert_event(conn, event_id=f"key-{record.id}-revoked",
                             account_id=record.account_id, type_="system",
                             at_ms=record.revoked_at_ms or at_ms, key_id=record.id,
                             key_name=record.name, note=f"API key {record.prefix}… revoked")
    return record


def authenticate(conn: Connection, secret: str | None, *, now_ms: int) -> ApiKeyRecord:
    """The key for a bearer secret, or the precise reason it cannot be used."""
    if not secret:
        raise InvalidApiKey("missing API key: send 'Authorization: Bearer <key>'")
    record = store.key_by_hash(conn, hash_key(secret))
    if record is None:
        raise InvalidApiKey("invalid API key")
    check_usable(record, now_ms=now_ms)
    return record


def check_usable(record: ApiKeyRecord, *, now_ms: int) -> None:
    if record.revoked_at_ms is not None:
        raise RevokedApiKey(f"API key {record.prefix}… was revoked")
    if record.expires_at_ms is not None and record.expires_at_ms <= now_ms:
        raise ExpiredApiKey(f"API key {record.prefix}… has expired")
    if record.account_disabled_at_ms is not None:
        raise AccountDisabled(f"the account of API key {record.prefix}… is disabled")


def check_item(record: ApiKeyRecord, item_id: str) -> None:
    """Whether the key may use a catalog item (model or endpoint)."""
    if record.models is not None and item_id not in record.models:
        raise ModelNotAllowed(f"API key {record.prefix}… may not use {item_id!r}")


def check_quota(record: ApiKeyRecord) -> None:
    """A fast pre-check; the binding check is atomic with the hold (``ledger.place_hold``)."""
    if record.quota_nano is not None and record.used_nano + record.held_nano >= record.quota_nano:
        raise QuotaExceeded(f"API key {record.prefix}… has reached its spending quota")


def effective_group(record: ApiKeyRecord) -> str:
    return record.group or record.account_group
