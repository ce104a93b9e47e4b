"""API keys: made once, shown once, stored as a SHA-256 hash and found by that hash.

A key is ``tw-`` followed by 43 URL-safe characters (256 random bits), so a fast hash is
enough: nobody can guess a preimage, and lookups stay a single indexed read.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy.engine import Connection

from tollway.errors import (
    AccountDisabled,
    ExpiredApiKey,
    InvalidApiKey,
    ModelNotAllowed,
    QuotaExceeded,
    RevokedApiKey,
)
from tollway.store import accounts as store
from tollway.store import usage as usage_store
from tollway.store.accounts import ApiKeyRecord

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
               quota_nano: int | None = None, expires_at_ms: int | None = None) -> NewKey:
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    record = store.insert_key(conn, account_id=account_id, prefix=secret[:DISPLAY_PREFIX_LEN],
                              key_hash=hash_key(secret), name=name, group=group, models=models,
                              quota_nano=quota_nano, expires_at_ms=expires_at_ms, at_ms=at_ms)
    usage_store.insert_event(conn, event_id=f"key-{record.id}-created", account_id=account_id,
                             type_="system", at_ms=at_ms, key_id=record.id, key_name=name,
                             note=f"API key {record.prefix}… created")
    return NewKey(record, secret)


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
