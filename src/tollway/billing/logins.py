"""Console logins: passwords hashed with scrypt, sign-in by email or account name, disabling.

A stored hash reads ``scrypt$N$r$p$salt$hash`` (salt and hash in URL-safe base64), so the
cost parameters can be raised later without invalidating existing passwords. Verification
compares in constant time, and an unknown login costs the same scrypt run as a wrong
password, so response times do not tell which logins exist.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from sqlalchemy.engine import Connection

from tollway import clock
from tollway.errors import InvalidRequest
from tollway.store import accounts as store
from tollway.store import sessions as session_store
from tollway.store.accounts import Account

#: scrypt cost: 2**14 x 8 x 1 needs 16 MiB and about 50 ms per hash on one core.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MIN_PASSWORD, MAX_PASSWORD = 8, 1024


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32,
                          maxmem=256 * n * r * p)


def hash_password(password: str) -> str:
    check_password_rules(password)
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str | None) -> bool:
    """Whether ``password`` matches ``stored``; None (no password set) never matches."""
    if stored is None or len(password) > MAX_PASSWORD:
        _scrypt(password[:MAX_PASSWORD], b"\0" * 16, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        return False
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        actual = _scrypt(password, _unb64(salt), int(n), int(r), int(p))
    except ValueError:
        return False
    return hmac.compare_digest(actual, _unb64(digest))


def check_password_rules(password: str) -> None:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise InvalidRequest(f"a password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    if "\x00" in password:
        raise InvalidRequest("a password must not contain NUL characters")


def create_account(conn: Connection, name: str, group: str, *, email: str | None = None,
                   password_hash: str | None = None) -> Account:
    """An account, with a console login when a password hash (``hash_password``, computed
    before the write transaction: scrypt is slow on purpose) is given."""
    return store.create_account(conn, name, group, at_ms=clock.now_ms(), email=email,
                                password_hash=password_hash)


def set_password_hash(conn: Connection, account_id: int, password_hash: str) -> Account:
    """Set a new password (``hash_password``) and sign the account out everywhere."""
    account = store.set_password_hash(conn, account_id, password_hash)
    session_store.delete_account_sessions(conn, account_id)
    return account


def authenticate(conn: Connection, login: str, password: str) -> Account | None:
    """The account for an email-or-name and password, or None for any refusal (unknown login,
    wrong password, no password set, disabled account): the sign-in page says the same thing
    for all of them."""
    found = store.login_row(conn, login)
    if found is None:
        verify_password(password, None)
        return None
    account, stored = found
    if not verify_password(password, stored) or account.disabled_at_ms is not None:
        return None
    return account


def disable_account(conn: Connection, account_id: int) -> Account:
    """Refuse the account's keys and its console sign-in, and end its sessions. Its money and
    records stay; a gateway worker may trust a cached key for ``key_cache_seconds`` more."""
    account = store.set_disabled(conn, account_id, at_ms=clock.now_ms())
    session_store.delete_account_sessions(conn, account_id)
    return account


def enable_account(conn: Connection, account_id: int) -> Account:
    return store.set_disabled(conn, account_id, at_ms=None)
