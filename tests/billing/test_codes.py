"""Redemption codes: minted in batches (CSV), stored hashed, redeemed exactly once under
concurrency (50 real concurrent connections; 50 concurrent HTTP requests), with clear errors
for unknown, used, expired and revoked codes, and the credit in the log and statement."""

from __future__ import annotations

import csv
import hashlib
import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from test_notifications import ENV

from fakes import USD, Serving, Tollway
from tollway import cli, clock
from tollway.billing import codes
from tollway.billing import notifications as notify
from tollway.errors import CodeExpired, CodeRedeemed, CodeRevoked, UnknownCode
from tollway.ledger.verify import verify
from tollway.store import accounts as account_store
from tollway.store.db import Database
from tollway.store.tables import promo_grants, redemption_codes

CATALOG = Path(__file__).resolve().parents[2] / "examples" / "catalog.yaml"
ADMIN = {"Authorization": "Bearer test-admin-token"}


def _accounts(db: Database, n: int, prefix: str = "r") -> list[int]:
    with db.write() as conn:
        return [account_store.create_account(conn, f"{prefix}{i}", "default", at_ms=1).id
                for i in range(n)]


def _available(db: Database, account_id: int) -> int:
    with db.read() as conn:
        return account_store.get_account(conn, account_id).available_nano


def test_a_code_redeemed_concurrently_50_times_credits_once(db_url: str) -> None:
    db = Database(db_url)
    accounts = _accounts(db, 5)
    with db.write() as conn:
        [new] = codes.mint(conn, 5 * USD, at_ms=clock.now_ms())
    # 50 threads, each on its own connection (NullPool), released together
    racers = Database(db_url, null_pool=True)
    start = threading.Barrier(50)

    def redeem(i: int) -> Any:
        start.wait()
        try:
            return racers.run_write(lambda conn: codes.redeem(
                conn, accounts[i % 5], new.code, clock.now_ms()))
        except CodeRedeemed as exc:
            return exc

    with ThreadPoolExecutor(50) as pool:
        outcomes = list(pool.map(redeem, range(50)))
    won = [o for o in outcomes if isinstance(o, codes.Redemption)]
    assert len(won) == 1
    assert sum(isinstance(o, CodeRedeemed) for o in outcomes) == 49
    winner = won[0].account_id
    assert [_available(db, a) for a in accounts] == [5 * USD if a == winner else 0
                                                    for a in accounts]
    assert won[0].amount_nano == won[0].available_nano == 5 * USD
    with db.read() as conn:
        assert verify(conn) == []
        row = conn.execute(sa.select(redemption_codes)).one()
        [grant] = conn.execute(sa.select(promo_grants)).all()
        promo = account_store.get_account(conn, winner).promo_nano
    assert (row.redeemed_by, row.entry_id) == (winner, won[0].entry_id)
    assert (grant.account_id, grant.amount_nano, grant.entry_id, promo) == (
        winner, 5 * USD, won[0].entry_id, 5 * USD)
    assert cli.main(["--database-url", db_url, "ledger", "verify"]) == 0
    racers.dispose()
    db.dispose()


def test_codes_are_random_hashed_and_forgiving_to_type(db: Database) -> None:
    with db.write() as conn:
        minted = codes.mint(conn, USD, count=200, at_ms=clock.now_ms())
    assert len({c.code for c in minted}) == 200
    for c in minted:
        assert len(c.code) == 22 and c.code.startswith("TW-")
        assert all(ch in codes.ALPHABET for ch in c.code[3:].replace("-", ""))
    with db.read() as conn:
        rows = conn.execute(sa.select(redemption_codes)).all()
        dump = "\n".join(str(tuple(r)) for r in rows)
    for c in minted:  # a copy of the database holds no code
        canonical = c.code[3:].replace("-", "")
        assert canonical not in dump and c.code not in dump
        assert hashlib.sha256(canonical.encode()).hexdigest() in dump
    [account] = _accounts(db, 1)
    typed = minted[0].code.lower().replace("-", " ").replace("0", "o").replace("1", "l")
    with db.write() as conn:
        assert codes.redeem(conn, account, typed, clock.now_ms()).amount_nano == USD
        assert codes.redeem(conn, account, minted[1].code[3:], clock.now_ms()).amount_nano \
            == USD


def test_unknown_expired_and_revoked_codes(db: Database) -> None:
    [account] = _accounts(db, 1)
    now = clock.now_ms()
    with db.write() as conn:
        expiring, revoked = codes.mint(conn, USD, count=2, at_ms=now, expires_at_ms=now + 1000)
        codes.revoke(conn, revoked.id, at_ms=now)
    with db.write() as conn:
        for junk in ("", "TW-AAAA", "TW-UUUU-UUUU-UUUU-UUUU", "not a code at all"):
            with pytest.raises(UnknownCode):
                codes.redeem(conn, account, junk, now)
        with pytest.raises(UnknownCode):
            codes.redeem(conn, account, codes.generate(), now)  # well-formed, never minted
        with pytest.raises(CodeExpired, match="expired"):
            codes.redeem(conn, account, expiring.code, now + 1000)
        with pytest.raises(CodeRevoked):
            codes.redeem(conn, account, revoked.code, now)
        assert codes.redeem(conn, account, expiring.code, now + 999).amount_nano == USD
        with pytest.raises(CodeRedeemed):
            codes.redeem(conn, account, expiring.code, now + 999)
    assert _available(db, account) == USD


def test_batch_creation_prints_csv_and_every_code_redeems(
        db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--database-url", db_url, "codes", "create", "--amount", "5",
                     "--count", "25", "--expires", "2099-01-01T00:00:00Z",
                     "--note", "spring promo"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 25
    assert {(r["amount_usd"], r["expires_at"], r["note"]) for r in rows} == {
        ("5.000000000", "2099-01-01T00:00:00Z", "spring promo")}
    db = Database(db_url)
    [account] = _accounts(db, 1)
    for r in rows:
        assert cli.main(["--database-url", db_url, "--json", "codes", "redeem", str(account),
                         r["code"]]) == 0
    capsys.readouterr()
    assert _available(db, account) == 125 * USD
    assert cli.main(["--database-url", db_url, "codes", "redeem", str(account),
                     rows[0]["code"]]) == 1
    assert "already redeemed" in capsys.readouterr().err
    assert cli.main(["--database-url", db_url, "--json", "codes", "list",
                     "--status", "redeemed"]) == 0
    assert cli.main(["--database-url", db_url, "ledger", "verify"]) == 0
    db.dispose()


# --------------------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def serving() -> Serving:
    return Serving(catalog=CATALOG.read_text(), env=ENV)


def test_fifty_concurrent_http_redemptions_credit_once(tw: Tollway) -> None:
    accounts = [tw.account(usd=None) for _ in range(5)]
    keys = [tw.key(a) for a in accounts]
    http = tw.http()
    minted = http.post("/admin/v1/codes", headers=ADMIN,
                       json={"amount_usd": "7.25", "count": 1, "note": "race"})
    assert minted.status_code == 201, minted.text
    [code] = minted.json()["data"]
    with tw.db.write() as conn:  # settings with no channel: events are still logged
        for a in accounts:
            notify.update(conn, a, {"email": None}, at_ms=clock.now_ms())
    start = threading.Barrier(50)

    def redeem(i: int) -> httpx.Response:
        with httpx.Client(base_url=tw.url, timeout=30) as client:
            start.wait()
            return client.post("/v1/billing/redeem", json={"code": code["code"]},
                               headers={"Authorization": f"Bearer {keys[i % 5]}"})

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(redeem, range(50)))
    assert sorted(r.status_code for r in answers) == [201] + [409] * 49
    assert {r.json()["error"]["code"] for r in answers if r.status_code == 409} == {
        "code_redeemed"}
    [won] = [r.json() for r in answers if r.status_code == 201]
    assert (won["amount_usd"], won["available_usd"]) == ("7.250000000", "7.250000000")
    winner = won["account_id"]
    assert [tw.available(a) for a in accounts] == [7_250_000_000 if a == winner else 0
                                                  for a in accounts]
    auth = {"Authorization": f"Bearer {keys[accounts.index(winner)]}"}
    # the credit is a promotional grant (spent before paid money), named by the code's end
    [record] = http.get("/v1/billing/usage", params={"type": "adjustment"},
                        headers=auth).json()["data"]
    assert record["credit_usd"] == "7.250000000"
    assert record["note"] == f"promotional credit: redemption code …{code['code'][-4:]}"
    balance = http.get("/v1/billing/balance", headers=auth).json()
    assert (balance["paid_usd"], balance["promotional_usd"]) == ("0.000000000", "7.250000000")
    [event] = http.get("/v1/billing/notifications", headers=auth).json()["data"]
    assert event["type"] == "balance.topup"
    assert '"source":"redemption"' in event["body"] and '"promotional":true' in event["body"]
    assert tw.verify() == []


def test_http_errors_for_codes(tw: Tollway) -> None:
    key = tw.key(tw.account(usd=None))
    auth = {"Authorization": f"Bearer {key}"}
    http = tw.http()

    def error(r: httpx.Response, status: int, code: str) -> None:
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == code

    error(http.post("/v1/billing/redeem", json={"code": "TW-0000-0000-0000-0000"},
                    headers=auth), 404, "unknown_code")
    error(http.post("/v1/billing/redeem", json={}, headers=auth), 400, "invalid_request")
    error(http.post("/v1/billing/redeem", json={"code": "x"}), 401, "invalid_api_key")
    error(http.post("/admin/v1/codes", headers=ADMIN, json={"amount_usd": "5", "count": 0}),
          400, "invalid_request")
    error(http.post("/admin/v1/codes", headers=ADMIN, json={"amount_usd": "5",
                                                            "expires_at": "2001-01-01"}),
          400, "invalid_request")
    two = http.post("/admin/v1/codes", headers=ADMIN,
                    json={"amount_usd": "1", "count": 2,
                          "expires_at": "2099-01-01T00:00:00Z"}).json()["data"]
    with tw.db.write() as conn:  # let the first one expire
        conn.execute(redemption_codes.update().where(redemption_codes.c.id == two[0]["id"])
                     .values(expires_at_ms=clock.now_ms() - 1))
    error(http.post("/v1/billing/redeem", json={"code": two[0]["code"]}, headers=auth),
          410, "code_expired")
    revoked = http.post(f"/admin/v1/codes/{two[1]['id']}/revoke", headers=ADMIN)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    error(http.post("/v1/billing/redeem", json={"code": two[1]["code"]}, headers=auth),
          410, "code_revoked")
    error(http.post(f"/admin/v1/codes/{two[1]['id']}/revoke", headers=ADMIN), 400,
          "invalid_request")
    listed = http.get("/admin/v1/codes", headers=ADMIN, params={"status": "revoked"}).json()
    assert two[1]["id"] in [c["id"] for c in listed["data"]]
    assert all(two[1]["code"] not in str(c) for c in listed["data"])
