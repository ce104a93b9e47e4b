"""``X-Forwarded-For`` through the real server (``tollway serve``, uvicorn): believed only from
``TOLLWAY_TRUSTED_PROXIES``. uvicorn's own default trusted 127.0.0.1 and rewrote the client
address before Tollway saw it, so a local process, or a local proxy passing the header on as
the client sent it, could pick the address a key's IP allowlist is checked against."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cluster import Server, prepare, server_env, servers
from tollway import clock
from tollway.billing.keys import create_key
from tollway.store.accounts import KeyLimits, create_account
from tollway.store.db import Database

ROOT = Path(__file__).resolve().parent.parent.parent
OFFICE = "203.0.113.9"


def models(server: Server, key: str, forwarded: str) -> int:
    request = urllib.request.Request(server.url + "/v1/models", headers={
        "Authorization": f"Bearer {key}", "X-Forwarded-For": forwarded})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.mark.parametrize(("trusted", "expected"), [
    ("", 403),  # nobody's header is believed: the client is the peer, 127.0.0.1
    ("127.0.0.1", 200),  # the local proxy's is: the client is the address it names
])
def test_forwarded_for_counts_only_from_trusted_proxies(tmp_path: Path, trusted: str,
                                                        expected: int) -> None:
    url = f"sqlite:///{tmp_path / 'tollway.db'}"
    env = server_env(url, tmp_path / "data", trusted_proxies=trusted)
    prepare(env, tmp_path, (ROOT / "examples" / "catalog.yaml").read_text())
    db = Database(url)
    with db.write() as conn:
        account = create_account(conn, "office", "default", at_ms=clock.now_ms()).id
        key = create_key(conn, account, at_ms=clock.now_ms(),
                         limits=KeyLimits(allowed_ips=("203.0.113.0/24",))).secret
    db.dispose()
    with servers() as made:
        server = Server(env, tmp_path / "server.log", workers=1)
        made.append(server)
        server.start()
        assert models(server, key, OFFICE) == expected
        # an address outside the list is refused either way
        assert models(server, key, "198.51.100.1") == 403
