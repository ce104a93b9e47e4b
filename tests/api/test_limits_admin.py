"""Operating limits: key limits and account tiers through the CLI and the admin API, on
SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from tollway.app import create_app
from tollway.cli import main

CATALOG = Path(__file__).resolve().parents[2] / "examples" / "catalog.yaml"
TIERS = """
tiers:
  free: {rpm: 60, tpm: 60000, concurrency: 5}
  starter: {rpm: 600, tpm: 600000, concurrency: 20}
tier_upgrades: {starter: "20"}
"""
ADMIN = {"Authorization": "Bearer adm-test"}


def cli(capsys: pytest.CaptureFixture[str], db_url: str, *args: str) -> tuple[int, Any, str]:
    code = main([*args, "--json", "--database-url", db_url])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else None, err


@pytest.fixture
def catalog(db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    path = tmp_path / "catalog.yaml"
    path.write_text(CATALOG.read_text() + TIERS)
    assert cli(capsys, db_url, "catalog", "apply", str(path))[0] == 0
    return db_url


def test_cli_creates_and_updates_key_limits_and_sets_tiers(
        catalog: str, capsys: pytest.CaptureFixture[str]) -> None:
    db_url = catalog
    assert cli(capsys, db_url, "accounts", "create", "acme")[0] == 0
    code, key, err = cli(capsys, db_url, "keys", "create", "acme", "--rpm", "30", "--tpm",
                         "1000", "--concurrency", "2", "--daily-cap", "1.5", "--weekly-cap",
                         "5", "--monthly-cap", "12.25", "--ips", "10.0.0.0/8, 2001:db8::1")
    assert (code, err) == (0, "")
    assert {k: key[k] for k in ("rpm", "tpm", "concurrency", "daily_cap_usd", "weekly_cap_usd",
                                "monthly_cap_usd", "allowed_ips")} == {
        "rpm": 30, "tpm": 1000, "concurrency": 2, "daily_cap_usd": "1.500000000",
        "weekly_cap_usd": "5.000000000", "monthly_cap_usd": "12.250000000",
        "allowed_ips": ["10.0.0.0/8", "2001:db8::1/128"]}
    code, updated, _ = cli(capsys, db_url, "keys", "update", str(key["id"]), "--rpm", "none",
                           "--ips", "none", "--daily-cap", "2")
    assert code == 0
    assert (updated["rpm"], updated["allowed_ips"], updated["daily_cap_usd"],
            updated["tpm"]) == (None, None, "2.000000000", 1000)
    # a key may only lower its tier's limits
    code, _, err = cli(capsys, db_url, "keys", "create", "acme", "--rpm", "61")
    assert code == 1 and "rpm 61 is above the 60 of the account's tier 'free'" in err
    code, _, err = cli(capsys, db_url, "keys", "create", "acme", "--ips", "10.0.0.300/8")
    assert code == 1 and "'10.0.0.300/8' is not an IP network" in err
    code, account, _ = cli(capsys, db_url, "accounts", "set-tier", "acme", "starter")
    assert (code, account["tier"]) == (0, "starter")
    assert cli(capsys, db_url, "keys", "create", "acme", "--rpm", "600")[0] == 0
    code, _, err = cli(capsys, db_url, "accounts", "set-tier", "acme", "gold")
    assert code == 1 and "unknown tier 'gold' (tiers: free, starter)" in err
    # the operator may move an account down
    assert cli(capsys, db_url, "accounts", "set-tier", "acme", "free")[1]["tier"] == "free"
    # a top-up past the threshold moves it up
    assert cli(capsys, db_url, "topup", "acme", "20")[0] == 0
    assert cli(capsys, db_url, "balance", "acme")[1]["tier"] == "starter"


def test_admin_api_key_limits_and_tiers(catalog: str) -> None:
    with TestClient(create_app(database_url=catalog, admin_token="adm-test")) as client:
        account = client.post("/admin/v1/accounts", json={"name": "acme"}, headers=ADMIN).json()
        assert account["tier"] is None
        created = client.post(f"/admin/v1/accounts/{account['id']}/keys", headers=ADMIN,
                              json={"rpm": 10, "daily_cap_usd": "0.5",
                                    "allowed_ips": ["192.0.2.0/24"]})
        assert created.status_code == 201, created.text
        key = created.json()
        assert (key["rpm"], key["daily_cap_usd"], key["allowed_ips"]) == (
            10, "0.500000000", ["192.0.2.0/24"])
        patched = client.patch(f"/admin/v1/keys/{key['id']}", headers=ADMIN,
                               json={"daily_cap_usd": None, "concurrency": 3})
        assert patched.status_code == 200, patched.text
        assert (patched.json()["rpm"], patched.json()["daily_cap_usd"],
                patched.json()["concurrency"]) == (10, None, 3)
        refused = client.patch(f"/admin/v1/keys/{key['id']}", headers=ADMIN,
                               json={"burst": 3})
        assert refused.status_code == 400 and "unknown fields burst" in refused.text
        refused = client.patch(f"/admin/v1/keys/{key['id']}", headers=ADMIN,
                               json={"concurrency": 6})
        assert refused.status_code == 400 and "concurrency 6 is above the 5" in refused.text
        tiered = client.put(f"/admin/v1/accounts/{account['id']}/tier", headers=ADMIN,
                            json={"tier": "starter"})
        assert (tiered.status_code, tiered.json()["tier"]) == (200, "starter")
        assert client.put(f"/admin/v1/accounts/{account['id']}/tier", headers=ADMIN,
                          json={"tier": "gold"}).status_code == 400
