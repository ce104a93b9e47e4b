"""Immediate revocation (issue 15) against a real ``tollway serve --workers 2`` whose workers
cache keys for an hour: a key revoked through the CLI or the admin API, a key past its
expiry, a disabled account and a lowered key limit bind on the very next request to any
worker — 401/403/429, not forwarded, not charged — because the hold's own guarded statements
read the key and account rows (no extra statement: see test_statement_budget.py). On SQLite
and PostgreSQL.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from cluster import (
    ADMIN_TOKEN,
    FAKE_CHAT_COST,
    Server,
    catalog_text,
    cli,
    customers,
    prepare,
    server_env,
    servers,
)
from fakes import FakeUpstream
from tollway.store.db import Database
from tollway.store.tables import accounts, api_keys

pytestmark = pytest.mark.filterwarnings("ignore:open_binary is deprecated:DeprecationWarning")
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 10}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


def _chat(http: httpx.Client, key: str) -> httpx.Response:
    return http.post("/v1/chat/completions", json=CHAT,
                     headers={"Authorization": f"Bearer {key}"})


def _available(db: Database, account: int) -> int:
    with db.read() as conn:
        return int(conn.execute(sa.select(accounts.c.available_nano)
                                .where(accounts.c.id == account)).scalar_one())


def _key_id(db: Database, account: int) -> int:
    with db.read() as conn:
        return int(conn.execute(sa.select(api_keys.c.id)
                                .where(api_keys.c.account_id == account)).scalar_one())


def test_revocation_expiry_disable_and_lowered_limits_bind_at_once(
        db_url: str, tmp_path: Path, fake: FakeUpstream) -> None:
    env = server_env(db_url, tmp_path / "data", key_cache_seconds="3600")
    prepare(env, tmp_path, catalog_text(fake))
    db = Database(db_url)
    try:
        made = customers(db, 5, usd=10, poor=0)
        with servers() as running:
            running.append(Server(env, tmp_path / "serve.log", workers=2).start())
            http = httpx.Client(base_url=running[0].url, timeout=20)
            # Every key served (and so cached) by both workers: new connections spread.
            for _ in range(6):
                for _, key in made:
                    with httpx.Client(base_url=running[0].url, timeout=20) as fresh:
                        assert _chat(fresh, key).status_code == 200

            def refused_everywhere(account: int, key: str, status: int, code: str) -> None:
                before, forwarded = _available(db, account), len(fake.llm_requests())
                for _ in range(6):  # new connections: both workers answer
                    with httpx.Client(base_url=running[0].url, timeout=20) as fresh:
                        response = _chat(fresh, key)
                    assert response.status_code == status, response.text
                    assert response.json()["error"]["code"] == code
                assert len(fake.llm_requests()) == forwarded  # not forwarded
                assert _available(db, account) == before  # not charged

            (a_cli, k_cli), (a_api, k_api), (a_exp, k_exp), (a_dis, k_dis), \
                (a_rpm, k_rpm) = made
            revoked = cli(env, "keys", "revoke", str(_key_id(db, a_cli)))
            assert revoked.returncode == 0, revoked.stderr
            refused_everywhere(a_cli, k_cli, 401, "revoked_api_key")

            answer = http.post(f"/admin/v1/keys/{_key_id(db, a_api)}/revoke",
                               headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            assert answer.status_code == 200, answer.text
            refused_everywhere(a_api, k_api, 401, "revoked_api_key")

            with db.write() as conn:  # expiry reached (as time passing would)
                conn.execute(api_keys.update().where(api_keys.c.account_id == a_exp)
                             .values(expires_at_ms=int(time.time() * 1000) - 1))
            refused_everywhere(a_exp, k_exp, 401, "expired_api_key")

            disabled = cli(env, "accounts", "disable", str(a_dis))
            assert disabled.returncode == 0, disabled.stderr
            refused_everywhere(a_dis, k_dis, 403, "account_disabled")

            # A spend cap set below one request's hold (the rpm/tpm/concurrency columns of
            # the key row bind the same way; a minute boundary would make rpm flaky here).
            lowered = cli(env, "keys", "update", str(_key_id(db, a_rpm)),
                          "--daily-cap", "0.000001")
            assert lowered.returncode == 0, lowered.stderr
            refused_everywhere(a_rpm, k_rpm, 429, "quota_exceeded")
            http.close()
            running[0].stop()
        assert "Traceback" not in (tmp_path / "serve.log").read_text()
        with db.read() as conn:
            spent = [int(v) for v in conn.execute(
                sa.select(accounts.c.used_nano)
                .where(accounts.c.id.in_([a for a, _ in made]))).scalars()]
        assert spent == [6 * FAKE_CHAT_COST] * 5  # only the warm-up was charged
    finally:
        db.dispose()
