"""The ``tollway`` command, driven in-process on SQLite and PostgreSQL, plus one run of the
real installed script (exit codes and stderr as a shell sees them).

Every bad input must give one clear line on stderr, exit 1 and leave the database exactly as
it was; the tests snapshot the database before and after to prove the last part.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tollway.cli import main
from tollway.store.db import Database
from tollway.store.migrate import head_revision

ROOT = Path(__file__).resolve().parents[2]
CATALOG = ROOT / "examples" / "catalog.yaml"
ITEMS = {"sandbox-chat", "sandbox-reasoner", "sandbox-embed", "sandbox-claude", "sandbox-image",
         "web-search", "stock-quote",
         "scholar-search"}


# --------------------------------------------------------------------------- helpers


def run(capsys: pytest.CaptureFixture[str], db_url: str, *args: str) -> tuple[int, str, str]:
    """``tollway ARGS --database-url URL`` in-process: (exit code, stdout, stderr)."""
    code = main([*args, "--database-url", db_url])
    out, err = capsys.readouterr()
    return code, out, err


def ok(capsys: pytest.CaptureFixture[str], db_url: str, *args: str) -> Any:
    """Run a command with ``--json`` that must succeed; its parsed output."""
    code, out, err = run(capsys, db_url, *args, "--json")
    assert (code, err) == (0, ""), (args, out, err)
    return json.loads(out)


def sql(db_url: str, statement: str, **params: Any) -> list[Any]:
    db = Database(db_url)
    try:
        with db.write() as conn:
            result = conn.execute(sa.text(statement), params)
            return list(result) if result.returns_rows else []
    finally:
        db.dispose()


def snapshot(db_url: str) -> dict[str, Any]:
    """Everything a bad command could have written."""
    db = Database(db_url)
    try:
        with db.read() as conn:
            state: dict[str, Any] = {}
            for table in ("accounts", "api_keys", "entries", "postings", "holds", "groups",
                          "catalog_items", "price_versions", "providers"):
                rows = conn.execute(sa.text(f"SELECT * FROM {table}")).all()
                state[table] = sorted(tuple(str(v) for v in row) for row in rows)
            return state
    finally:
        db.dispose()


def one_line_error(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tollway: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def seeded(db_url: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """The demo catalog, account ``alice`` with 5 USD and one key."""
    ok(capsys, db_url, "catalog", "apply", str(CATALOG))
    account = ok(capsys, db_url, "accounts", "create", "alice")
    ok(capsys, db_url, "topup", "alice", "5")
    key = ok(capsys, db_url, "keys", "create", "alice")
    return {"account": account, "key": key}


# --------------------------------------------------------------------------- db upgrade


def test_db_upgrade_is_idempotent(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    for _ in range(2):
        code, out, err = run(capsys, db_url, "db", "upgrade")
        assert (code, err) == (0, "")
        assert out.startswith("database is up to date (revision ")
    assert ok(capsys, db_url, "db", "upgrade") == {"revision": head_revision(),
                                                  "previous": head_revision()}
    # a database that lost its revision is treated as not migrated
    sql(db_url, "DROP TABLE alembic_version")
    code, _, err = run(capsys, db_url, "catalog", "show")
    assert code == 1 and "run `tollway db upgrade` first" in one_line_error(err)


def test_db_upgrade_creates_then_keeps_a_new_sqlite_database(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'tollway.db'}"
    assert ok(capsys, url, "db", "upgrade") == {"revision": head_revision(), "previous": None}
    code, out, _ = run(capsys, url, "db", "upgrade")
    assert code == 0 and "up to date" in out
    ok(capsys, url, "accounts", "create", "works-now")


def test_unmigrated_database_says_to_run_db_upgrade(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    for args in (["catalog", "show"], ["accounts", "create", "bob"], ["topup", "bob", "1"],
                 ["ledger", "verify"], ["catalog", "apply", str(CATALOG)]):
        code, out, err = run(capsys, url, *args)
        line = one_line_error(err)
        assert code == 1 and out == ""
        assert "not up to date" in line and "run `tollway db upgrade` first" in line


# --------------------------------------------------------------------------- catalog


def test_catalog_apply_then_show(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, db_url, "catalog", "show")
    assert code == 0 and "the catalog is empty: run `tollway catalog apply FILE`" in out

    code, out, err = run(capsys, db_url, "catalog", "apply", str(CATALOG))
    assert (code, err) == (0, "")
    assert "5 models, 3 endpoints, 2 groups" in out
    assert out.count("new price version:") == 8

    code, out, err = run(capsys, db_url, "catalog", "show")
    assert (code, err) == (0, "")
    lines = [line.strip() for line in out.splitlines()]
    assert "groups: default ×1, vip ×0.8" in lines
    for expected in ("$0.150000 / 1M input tokens", "$0.600000 / 1M output tokens",
                     "$0.075000 / 1M cached input tokens", "group overrides: vip ×0.7",
                     "$3.125000 / 1M cache-write tokens", "$0.020000 / 1M input tokens",
                     "$0.002000 / per call", "$0.000500 / per call", "$0.020000 / per call",
                     "$6.000000 / 1M cache-write (1h) tokens", "$0.040000 / per image",
                     "$0.080000 / per image (1792x1024)"):
        assert expected in lines, (expected, out)
    rows = {line.split()[0]: line.split()[1:] for line in lines
            if line.split() and line.split()[0] in ITEMS}
    assert rows.keys() == ITEMS
    assert rows["sandbox-chat"][:2] == ["token", "sandbox"]
    assert rows["web-search"] == ["per_call", "sandbox", "GET", "/apis/v1/search/web"]
    assert rows["scholar-search"] == ["per_call", "sandbox", "POST", "/apis/v1/scholar/search"]
    # each price sits under its own item
    chat = lines.index(next(line for line in lines if line.startswith("sandbox-chat ")))
    assert lines[chat + 1] == "$0.150000 / 1M input tokens"
    web = lines.index(next(line for line in lines if line.startswith("web-search ")))
    assert lines[web + 1] == "$0.002000 / per call"

    shown = ok(capsys, db_url, "catalog", "show")
    assert shown["groups"] == {"default": "1", "vip": "0.8"}
    assert {item["id"]: item["billing_type"] for item in shown["data"]} == {
        "sandbox-chat": "token", "sandbox-reasoner": "token", "sandbox-embed": "token",
        "sandbox-claude": "token", "sandbox-image": "per_call",
        "web-search": "per_call", "stock-quote": "per_call", "scholar-search": "per_call"}

    again = ok(capsys, db_url, "catalog", "apply", str(CATALOG))
    assert again["new_versions"] == [] and sorted(again["unchanged"]) == sorted(ITEMS)


def test_malformed_catalog_names_file_item_and_field_and_writes_nothing(
        db_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        seeded: dict[str, Any]) -> None:
    bad = tmp_path / "bad-catalog.yaml"
    bad.write_text("""\
providers:
  sandbox: {kind: sandbox}
groups:
  default: {ratio: "1"}
  vip: {ratio: "0.8"}
models:
  - id: cheap-model
    provider: sandbox
    price: {input: "-0.15", output: "0.60"}
  - id: lost-model
    provider: nowhere
    price: {input: "0.15", output: "0.60"}
  - id: twice
    provider: sandbox
    price: {input: "0.15", output: "0.60"}
endpoints:
  - id: twice
    provider: sandbox
    path: /twice
    price: {per_call: "0.01"}
""")
    before = snapshot(db_url)
    code, out, err = run(capsys, db_url, "catalog", "apply", str(bad))
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert lines[0] == "tollway: error: invalid catalog:"
    problems = [line.strip() for line in lines[1:]]
    assert len(problems) == 3, err
    assert (f"{bad}: models[cheap-model].price.input: price must not be negative, got "
            "'-0.15'") in problems
    assert any(p.startswith(f"{bad}: models[lost-model].provider: unknown provider 'nowhere'")
               for p in problems), problems
    assert any(p.startswith(f"{bad}: endpoints[twice].id: duplicate id") for p in problems)
    assert "Traceback" not in err
    assert snapshot(db_url) == before

    code, out, _ = run(capsys, db_url, "catalog", "apply", str(bad), "--json")
    error = json.loads(out)["error"]
    assert code == 1 and error["code"] == "invalid_catalog"
    assert f"{bad}: models[cheap-model].price.input" in error["message"]

    missing = tmp_path / "missing.yaml"
    code, _, err = run(capsys, db_url, "catalog", "apply", str(missing))
    assert code == 1 and f"{missing}: cannot read file" in err
    assert snapshot(db_url) == before


# --------------------------------------------------------------------------- accounts, keys


def test_accounts_create_json(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    ok(capsys, db_url, "catalog", "apply", str(CATALOG))
    alice = ok(capsys, db_url, "accounts", "create", "alice")
    assert isinstance(alice["id"], int)
    assert (alice["name"], alice["group"]) == ("alice", "default")
    assert alice["available_usd"] == "0.000000000"
    bob = ok(capsys, db_url, "accounts", "create", "bob", "--group", "vip")
    assert (bob["name"], bob["group"]) == ("bob", "vip") and bob["id"] != alice["id"]
    listed = ok(capsys, db_url, "accounts", "list")
    assert [(a["id"], a["name"], a["group"]) for a in listed] == [
        (alice["id"], "alice", "default"), (bob["id"], "bob", "vip")]

    code, out, err = run(capsys, db_url, "accounts", "create", "carol")
    assert code == 0 and out.startswith("created account ") and "carol, group default" in out


def test_keys_create_json_shows_the_secret_once_and_stores_its_hash(
        db_url: str, capsys: pytest.CaptureFixture[str], seeded: dict[str, Any]) -> None:
    account, key = seeded["account"], seeded["key"]
    assert {"id", "key", "prefix", "account_id"} <= key.keys()
    assert key["account_id"] == account["id"]
    assert key["prefix"].startswith("tw-") and key["key"].startswith(key["prefix"])
    assert len(key["key"]) > len(key["prefix"]) + 20
    ((stored_hash,),) = sql(db_url, "SELECT key_hash FROM api_keys WHERE id = :id",
                            id=key["id"])
    assert stored_hash == hashlib.sha256(key["key"].encode()).hexdigest()
    assert key["key"] not in json.dumps(snapshot(db_url))

    by_id = ok(capsys, db_url, "keys", "create", str(account["id"]), "--name", "ci",
               "--group", "vip", "--models", "sandbox-chat,web-search", "--quota", "1.5",
               "--expires", "2099-01-01T00:00:00Z")
    assert (by_id["account_id"], by_id["name"], by_id["effective_group"]) == (
        account["id"], "ci", "vip")
    assert by_id["models"] == ["sandbox-chat", "web-search"]
    assert by_id["quota_usd"] == "1.500000000"
    assert by_id["expires_at"] == "2099-01-01T00:00:00Z"

    listed = ok(capsys, db_url, "keys", "list", "alice")
    assert [k["id"] for k in listed] == [key["id"], by_id["id"]]
    assert all("key" not in k for k in listed)

    code, out, _ = run(capsys, db_url, "keys", "create", "alice")
    assert code == 0 and "store it now: it is not shown again." in out

    revoked = ok(capsys, db_url, "keys", "revoke", str(key["id"]))
    assert revoked["id"] == key["id"] and revoked["revoked_at"] is not None
    assert "key" not in revoked
    again = ok(capsys, db_url, "keys", "revoke", str(key["id"]))
    assert again["revoked_at"] == revoked["revoked_at"]  # the first revocation time stays
    assert [k["revoked_at"] is not None for k in ok(capsys, db_url, "keys", "list", "alice")
            ] == [True, False, False]




# --------------------------------------------------------------------------- top-ups


def test_topup_prints_the_new_available_balance(db_url: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    ok(capsys, db_url, "accounts", "create", "alice")
    result = ok(capsys, db_url, "topup", "alice", "12.5")
    assert result["available_usd"] == "12.500000000"
    assert result["amount_usd"] == "12.500000000"
    result = ok(capsys, db_url, "topup", "alice", "0.000000001", "--note", "one nano")
    assert result["available_usd"] == "12.500000001"
    code, out, _ = run(capsys, db_url, "topup", "alice", "0.499999999")
    assert code == 0 and out.strip().endswith("now has 13.000000000 USD available")
    balance = ok(capsys, db_url, "balance", "alice")
    assert (balance["balance_usd"], balance["available_usd"], balance["held_usd"]) == (
        "13.000000000", "13.000000000", "0.000000000")
    assert sql(db_url, "SELECT available_nano FROM accounts WHERE name = 'alice'") == [
        (13_000_000_000,)]


def test_topup_with_the_same_idempotency_key_credits_once(
        db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    ok(capsys, db_url, "accounts", "create", "alice")
    first = ok(capsys, db_url, "topup", "alice", "2.5", "--idempotency-key", "invoice-17")
    second = ok(capsys, db_url, "topup", "alice", "2.5", "--idempotency-key", "invoice-17")
    assert first == second and first["available_usd"] == "2.500000000"
    assert ok(capsys, db_url, "balance", "alice")["available_usd"] == "2.500000000"
    assert sql(db_url, "SELECT count(*) FROM entries WHERE kind = 'topup'") == [(1,)]

    before = snapshot(db_url)
    code, _, err = run(capsys, db_url, "topup", "alice", "3", "--idempotency-key", "invoice-17")
    assert code == 1 and "'invoice-17' was already used" in one_line_error(err)
    assert snapshot(db_url) == before
    # without a key every top-up is its own
    ok(capsys, db_url, "topup", "alice", "1")
    ok(capsys, db_url, "topup", "alice", "1")
    assert ok(capsys, db_url, "balance", "alice")["available_usd"] == "4.500000000"


BAD_INPUT = [
    (["topup", "alice", "-1"], "AMOUNT_USD must not be negative, got '-1'"),
    (["topup", "alice", "-0.5"], "must not be negative"),
    (["topup", "alice", "0"], "AMOUNT_USD must be greater than zero"),
    (["topup", "alice", "abc"], "AMOUNT_USD 'abc' is not a number"),
    (["topup", "alice", "1,5"], "is not a number"),
    (["topup", "alice", "NaN"], "is not a finite number"),
    (["topup", "alice", "0.0000000001"], "'0.0000000001' has more than 9 decimal places"),
    (["topup", "alice", "99999999999"], "is too large"),
    (["topup", "bob", "1"], "no account named 'bob'"),
    (["topup", "424242", "1"], "no account with id 424242"),
    (["topup", "99999999999999999999", "1"], "no account with id 99999999999999999999"),
    (["topup", "²", "1"], "no account named '²'"),
    (["accounts", "create", "carol", "--group", "gold"], "unknown group 'gold' (known: default"),
    (["accounts", "create", "alice"], "an account named 'alice' already exists"),
    (["accounts", "create", "12345"], "is reserved"),
    (["keys", "create", "bob"], "no account named 'bob'"),
    (["keys", "create", "alice", "--models", "sandbox-chat,nope"],
     "unknown catalog ids in the model allowlist: nope"),
    (["keys", "create", "alice", "--group", "gold"], "unknown group 'gold'"),
    (["keys", "create", "alice", "--quota", "-2"], "--quota must not be negative"),
    (["keys", "create", "alice", "--expires", "next week"], "--expires must be an ISO 8601"),
    (["keys", "revoke", "424242"], "no API key with id 424242"),
    (["keys", "revoke", "99999999999999999999"], "no API key with id 99999999999999999999"),
    (["balance", "bob"], "no account named 'bob'"),
    (["adjust", "alice", "-6", "--note", "too much"], "cannot debit 6.000000000 USD"),
]


def test_bad_input_is_one_line_exit_1_and_writes_nothing(
        db_url: str, capsys: pytest.CaptureFixture[str], seeded: dict[str, Any]) -> None:
    before = snapshot(db_url)
    failures = []
    for args, message in BAD_INPUT:  # one database for all cases: each must leave it as it was
        code, out, err = run(capsys, db_url, *args)
        lines = err.splitlines()
        if not (code == 1 and out == "" and len(lines) == 1
                and lines[0].startswith("tollway: error: ") and message in lines[0]):
            failures.append((args, code, out, err))
        elif snapshot(db_url) != before:
            failures.append((args, "wrote to the database"))
    assert not failures, failures

    # with --json: an error object on stdout, the line on stderr
    code, out, err = run(capsys, db_url, "--json", "topup", "alice", "-1")
    assert code == 1
    assert json.loads(out) == {"error": {"code": "invalid_request", "message":
                                         "AMOUNT_USD must not be negative, got '-1'"}}
    assert "must not be negative" in one_line_error(err)
    code, out, _ = run(capsys, db_url, "topup", "nobody", "1", "--json")
    assert code == 1 and json.loads(out)["error"]["code"] == "unknown_account"
    assert snapshot(db_url) == before


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["topup", "alice"], ["frobnicate"], [], ["keys", "revoke", "abc"]):
        with pytest.raises(SystemExit) as exited:
            main(args)
        assert exited.value.code == 2
        assert "usage: tollway" in capsys.readouterr().err


# --------------------------------------------------------------------------- --json placement


def test_json_flag_before_or_after_the_subcommand(db_url: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--json", "accounts", "create", "first", "--database-url", db_url]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["accounts", "create", "second", "--json", "--database-url", db_url]) == 0
    second = json.loads(capsys.readouterr().out)
    assert (first["name"], second["name"]) == ("first", "second")
    # --database-url before the subcommand too
    assert main(["--database-url", db_url, "--json", "topup", "first", "1.25"]) == 0
    assert json.loads(capsys.readouterr().out)["available_usd"] == "1.250000000"
    assert main(["--database-url", db_url, "topup", "second", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["available_usd"] == "2.000000000"
    # and without --json: text, not JSON
    assert main(["--database-url", db_url, "balance", "first"]) == 0
    assert capsys.readouterr().out.startswith("account ")


# --------------------------------------------------------------------------- ledger verify


def test_ledger_verify_passes_then_names_the_violation(
        db_url: str, capsys: pytest.CaptureFixture[str], seeded: dict[str, Any]) -> None:
    code, out, err = run(capsys, db_url, "ledger", "verify")
    assert (code, err) == (0, "") and out.startswith("ledger verified")
    assert ok(capsys, db_url, "ledger", "verify") == {"ok": True, "problems": []}

    account_id = seeded["account"]["id"]
    sql(db_url, "UPDATE accounts SET available_nano = available_nano + 1 WHERE id = :id",
        id=account_id)
    code, out, err = run(capsys, db_url, "ledger", "verify")
    assert code == 1 and out == ""
    assert err.startswith("tollway: error: ledger verification FAILED:")
    assert (f"account {account_id} (alice): stored balance 5.000000001 USD (available "
            "5.000000001 + held 0.000000000) but its postings sum to 5.000000000 USD") in err

    code, out, _ = run(capsys, db_url, "ledger", "verify", "--json")
    error = json.loads(out)["error"]
    assert code == 1 and error["code"] == "ledger_invalid"
    assert f"account {account_id} (alice)" in error["message"]

    sql(db_url, "UPDATE postings SET amount_nano = amount_nano + 7 "
        "WHERE id = (SELECT min(id) FROM postings)")
    code, _, err = run(capsys, db_url, "ledger", "verify")
    assert code == 1
    assert "postings sum to 0.000000007 USD, not zero" in err
    assert "entry " in err and ": postings sum to 0.000000007 USD" in err




# --------------------------------------------------------------------------- the real script


def test_installed_script_exit_codes_and_stderr(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "tollway"
    if not script.exists():
        pytest.skip(f"{script} is not installed (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
    env["TOLLWAY_DATABASE_URL"] = f"sqlite:///{tmp_path / 'cli.db'}"

    def start(*args: str, url: str | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen([str(script), *args], cwd=tmp_path, text=True,
                                env={**env, "TOLLWAY_DATABASE_URL": url} if url else env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
        out, err = proc.communicate(timeout=60)
        return proc.returncode, out, err

    # independent commands run side by side: each process costs a second of imports
    fresh = start("accounts", "create", "alice", url=f"sqlite:///{tmp_path / 'fresh.db'}")
    code, out, err = finish(start("db", "upgrade"))
    assert code == 0, err
    assert out.startswith("database upgraded from empty to revision ")

    code, out, err = finish(fresh)
    assert code == 1 and out == ""
    assert err.endswith("run `tollway db upgrade` first\n") and len(err.splitlines()) == 1

    code, out, err = finish(start("--json", "accounts", "create", "alice"))
    assert code == 0, err
    assert json.loads(out)["name"] == "alice"

    negative = start("topup", "alice", "-5")
    good = start("topup", "alice", "2.5", "--json")
    code, out, err = finish(negative)
    assert code == 1 and out == ""
    assert err == "tollway: error: AMOUNT_USD must not be negative, got '-5'\n"
    code, out, err = finish(good)
    assert (code, err) == (0, "")
    assert json.loads(out)["available_usd"] == "2.500000000"


def test_channels_list_disable_enable_test_and_margin(
        db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    ok(capsys, db_url, "catalog", "apply", str(CATALOG))
    listed = ok(capsys, db_url, "channels", "list")["data"]
    chat = [c for c in listed if c.get("model") == "sandbox-chat"]
    assert chat == [
        {"id": "sandbox-chat/sandbox", "model": "sandbox-chat", "provider": "sandbox",
         "priority": 0, "weight": 1, "enabled": True},
        {"id": "sandbox-chat/sandbox-backup", "model": "sandbox-chat",
         "provider": "sandbox-backup", "priority": 1, "weight": 1, "enabled": True}]
    assert ok(capsys, db_url, "channels", "disable", "sandbox-chat/sandbox") == {
        "id": "sandbox-chat/sandbox", "enabled": False}
    listed = ok(capsys, db_url, "channels", "list")["data"]
    assert [c["enabled"] for c in listed if c["id"] == "sandbox-chat/sandbox"] == [False]
    ok(capsys, db_url, "channels", "enable", "sandbox-chat/sandbox")
    listed = ok(capsys, db_url, "channels", "list")["data"]
    assert all(c["enabled"] for c in listed)
    code, _, err = run(capsys, db_url, "channels", "disable", "nope/none")
    assert code == 1 and "no channel 'nope/none'" in err
    tested = ok(capsys, db_url, "channels", "test", "web-search/sandbox")["data"]
    assert [(t["id"], t["ok"]) for t in tested] == [("web-search/sandbox", True)]
    report = ok(capsys, db_url, "margin", "--group-by", "channel")
    assert report["total"]["requests"] == 0 and report["group_by"] == "channel"


def test_the_cli_imports_no_metrics_before_serve_chooses_their_directory() -> None:
    """`tollway serve` sets prometheus_client's multiprocess directory before the app (and so
    the metrics) is imported; a command module that imports the gateway at the top would
    import them first and every `tollway serve` would exit 1."""
    assert loaded_by("tollway.cli", ("prometheus_client", "tollway.metrics")) == []


def test_a_worker_loads_the_payment_libraries_only_when_payments_are_used() -> None:
    """stripe (~12 MiB) and fpdf2 with Pillow (~20 MiB) are per-worker memory that a gateway
    without card payments never needs: importing the app loads neither (issue 12's memory
    target is per worker)."""
    assert loaded_by("tollway.app", ("stripe", "fpdf", "PIL")) == []


def loaded_by(module: str, packages: tuple[str, ...]) -> list[str]:
    """The modules of ``packages`` that importing ``module`` loads, in a fresh interpreter."""
    code = (f"import sys, {module}\n"
            f"print('\\n'.join(sorted({{m for m in sys.modules for p in {packages!r} "
            f"if m == p or m.startswith(p + '.')}})))")
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True)
    return probe.stdout.split()
