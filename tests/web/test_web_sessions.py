"""Console sign-in and sessions, on SQLite and PostgreSQL: customers by email or account name
and password, the operator by the admin token; wrong passwords, disabled accounts, forged or
missing CSRF tokens, expired and signed-out sessions are all refused. Session ids are kept
only as hashes; cookies are HttpOnly, SameSite=Lax, and Secure on https."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from fakes import fresh_database
from tollway.app import create_app
from tollway.billing import logins
from tollway.clock import now_ms
from tollway.errors import InvalidRequest
from tollway.money import format_usd
from tollway.store import accounts as account_store
from tollway.store.db import Database
from tollway.store.tables import promo_grants, signin_failures, web_sessions
from webclient import TestClient, csrf, login, operator_login, post_form

ADMIN_TOKEN = "adm-sessions"
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def console(request: pytest.FixtureRequest) -> Iterator[tuple[Database, TestClient]]:
    with fresh_database(request) as db:
        with db.write() as conn:
            for name in ("alice", "bob"):
                logins.create_account(conn, name, "default", email=f"{name}@Example.com",
                                      password_hash=logins.hash_password(PASSWORD))
            logins.create_account(conn, "nologin", "default")
        with TestClient(create_app(database_url=db.url, admin_token=ADMIN_TOKEN)) as client:
            yield db, client


@pytest.fixture
def client(console: tuple[Database, TestClient]) -> Iterator[TestClient]:
    db, client = console
    client.cookies.clear()
    with db.write() as conn:  # the TestClient has no IP address: every test's wrong sign-ins
        conn.execute(signin_failures.delete())  # count together (tests/test_web_signin_...)
    yield client
    client.cookies.clear()


def account_id(db: Database, name: str) -> int:
    with db.read() as conn:
        return account_store.find_account(conn, name).id


# ----------------------------------------------------------------------------- passwords


def test_password_hashes_are_salted_scrypt_and_verify_exactly() -> None:
    first, second = logins.hash_password(PASSWORD), logins.hash_password(PASSWORD)
    assert first != second and first.startswith("scrypt$16384$8$1$")
    assert logins.verify_password(PASSWORD, first) and logins.verify_password(PASSWORD, second)
    assert not logins.verify_password(PASSWORD + " ", first)
    assert not logins.verify_password(PASSWORD, None)
    assert not logins.verify_password(PASSWORD, "md5$whatever")
    assert not logins.verify_password(PASSWORD, "scrypt$garbage")
    with pytest.raises(InvalidRequest):
        logins.hash_password("short")


# ----------------------------------------------------------------------------- sign-in


def test_pages_need_a_session_and_redirect_to_sign_in(client: TestClient) -> None:
    for path in ("/console", "/console/keys", "/console/usage", "/console/statements",
                 "/console/usage/export"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303, path
        assert response.headers["location"] == f"/login?next={path}"


@pytest.mark.parametrize("name", ["alice", "alice@example.com", " ALICE@example.COM "])
def test_a_customer_signs_in_by_name_or_email_and_out_again(
        console: tuple[Database, TestClient], client: TestClient, name: str) -> None:
    db, _ = console
    response = login(client, name, PASSWORD)
    assert response.status_code == 303 and response.headers["location"] == "/console"
    cookie = response.headers["set-cookie"]
    assert "tollway_session=" in cookie and "HttpOnly" in cookie
    assert "SameSite=lax" in cookie and "Secure" not in cookie  # plain http here
    value = client.cookies["tollway_session"]
    assert len(value) >= 43  # 256 random bits, URL-safe base64
    with db.read() as conn:
        stored = conn.execute(sa.select(web_sessions)).all()
    assert value not in {row.id_hash for row in stored}  # only the hash is kept
    assert hashlib.sha256(value.encode()).hexdigest() in {row.id_hash for row in stored}

    page = client.get("/console")
    assert page.status_code == 200 and "alice" in page.text
    logout = post_form(client, "/logout", {}, page="/console")
    assert logout.status_code == 303 and logout.headers["location"] == "/login"
    client.cookies.set("tollway_session", value)  # a copy of the old cookie is worthless
    assert client.get("/console", follow_redirects=False).status_code == 303
    with db.read() as conn:
        hashes = set(conn.execute(sa.select(web_sessions.c.id_hash)).scalars())
    assert hashlib.sha256(value.encode()).hexdigest() not in hashes


@pytest.mark.parametrize(("name", "password"), [
    ("alice", PASSWORD + "!"), ("alice", ""), ("nobody", PASSWORD), ("nologin", PASSWORD),
    ("101", PASSWORD), ("alice\x00", PASSWORD), ("", "")])
def test_wrong_logins_are_refused_alike(client: TestClient, name: str, password: str) -> None:
    response = login(client, name, password)
    assert response.status_code == 401
    assert "do not match an active account" in response.text
    assert "tollway_session" not in client.cookies
    assert client.get("/console", follow_redirects=False).status_code == 303


def test_forms_without_this_browsers_csrf_token_are_refused(
        console: tuple[Database, TestClient], client: TestClient) -> None:
    db, _ = console
    csrf(client)  # the anonymous CSRF cookie is set
    for data in ({}, {"csrf_token": ""}, {"csrf_token": "forged"}):
        response = client.post("/login", data={**data, "login": "alice", "password": PASSWORD},
                               follow_redirects=False)
        assert response.status_code == 403, data
        assert "tollway_session" not in client.cookies
    assert login(client, "alice", PASSWORD).status_code == 303
    anonymous = client.cookies.get("tollway_csrf")
    for path, data in (("/console/keys", {"name": "sneaky"}), ("/logout", {})):
        for token in (None, "forged", anonymous):
            form = data if token is None else {**data, "csrf_token": token}
            response = client.post(path, data=form, follow_redirects=False)
            assert response.status_code == 403, (path, token)
            assert "text/html" in response.headers["content-type"]
    with db.read() as conn:
        assert account_store.list_keys(conn, account_id(db, "alice")) == []
    assert client.get("/console").status_code == 200  # still signed in


def test_a_disabled_account_cannot_sign_in_and_its_sessions_end(
        console: tuple[Database, TestClient], client: TestClient) -> None:
    db, _ = console
    bob = account_id(db, "bob")
    assert login(client, "bob", PASSWORD).status_code == 303
    with db.write() as conn:
        logins.disable_account(conn, bob)
    assert client.get("/console", follow_redirects=False).status_code == 303
    assert login(client, "bob", PASSWORD).status_code == 401
    with db.write() as conn:
        logins.enable_account(conn, bob)
    assert login(client, "bob", PASSWORD).status_code == 303


def test_a_disabled_accounts_keys_are_refused(
        console: tuple[Database, TestClient], client: TestClient) -> None:
    db, _ = console
    bob = account_id(db, "bob")
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    created = client.post(f"/admin/v1/accounts/{bob}/keys", headers=admin, json={"name": "k"})
    key = {"Authorization": f"Bearer {created.json()['key']}"}
    assert client.get("/v1/billing/balance", headers=key).status_code == 200
    disabled = client.post(f"/admin/v1/accounts/{bob}/disable", headers=admin)
    assert disabled.status_code == 200 and disabled.json()["disabled_at"] is not None
    for path in ("/v1/billing/balance", "/v1/billing/usage", "/v1/models"):
        response = client.get(path, headers=key)
        assert response.status_code == 403, path
        assert response.json()["error"]["code"] == "account_disabled"
    enabled = client.post(f"/admin/v1/accounts/{bob}/enable", headers=admin)
    assert enabled.json()["disabled_at"] is None
    assert client.get("/v1/billing/balance", headers=key).status_code == 200


def test_an_expired_session_is_refused(console: tuple[Database, TestClient],
                                       client: TestClient) -> None:
    db, _ = console
    assert login(client, "alice", PASSWORD).status_code == 303
    digest = hashlib.sha256(client.cookies["tollway_session"].encode()).hexdigest()
    with db.read() as conn:
        expires = conn.execute(sa.select(web_sessions.c.expires_at_ms).where(
            web_sessions.c.id_hash == digest)).scalar_one()
    assert 12 * 3_600_000 - 60_000 < expires - now_ms() <= 12 * 3_600_000  # session_hours
    with db.write() as conn:
        conn.execute(web_sessions.update().where(web_sessions.c.id_hash == digest)
                     .values(expires_at_ms=now_ms() - 1))
    response = client.get("/console", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"].startswith("/login")


def test_a_new_password_ends_the_accounts_sessions(
        console: tuple[Database, TestClient], client: TestClient) -> None:
    db, _ = console
    assert login(client, "alice", PASSWORD).status_code == 303
    with db.write() as conn:
        logins.set_password_hash(conn, account_id(db, "alice"), logins.hash_password("n3w pass"))
    assert client.get("/console", follow_redirects=False).status_code == 303
    assert login(client, "alice", PASSWORD).status_code == 401
    assert login(client, "alice", "n3w pass").status_code == 303
    with db.write() as conn:
        logins.set_password_hash(conn, account_id(db, "alice"), logins.hash_password(PASSWORD))


def test_redirect_targets_stay_on_this_site(client: TestClient) -> None:
    for target, expected in (("/console/usage", "/console/usage"),
                             ("https://evil.example/", "/console"),
                             ("//evil.example/", "/console"), ("/\\evil.example", "/console")):
        client.cookies.clear()
        token = csrf(client)
        response = client.post("/login", data={"csrf_token": token, "login": "alice",
                                               "password": PASSWORD, "next": target},
                               follow_redirects=False)
        assert response.headers["location"] == expected, target


def test_the_operator_signs_in_with_the_admin_token_only(client: TestClient) -> None:
    assert operator_login(client, "wrong").status_code == 401
    assert operator_login(client, "").status_code == 401
    response = operator_login(client, ADMIN_TOKEN)
    assert response.status_code == 303 and response.headers["location"] == "/admin"
    # an operator session is not a customer's: the console has no account to show
    assert client.get("/console", follow_redirects=False).status_code == 303
    out = post_form(client, "/admin/logout", {}, page="/admin/login")
    assert out.status_code == 303 and out.headers["location"] == "/admin/login"


def test_secure_cookies_on_https(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("https") / "t.db"
    db = Database(f"sqlite:///{path}")
    from tollway.store.migrate import upgrade
    upgrade(db)
    with db.write() as conn:
        logins.create_account(conn, "eve", "default", password_hash=logins.hash_password(PASSWORD))
    db.dispose()
    app = create_app(database_url=f"sqlite:///{path}", admin_token=ADMIN_TOKEN)
    with TestClient(app, base_url="https://testserver") as client:
        response = login(client, "eve", PASSWORD)
        assert response.status_code == 303
        assert "Secure" in response.headers["set-cookie"]


# ----------------------------------------------------------------------------- sign-up


def test_sign_up_is_off_unless_enabled(client: TestClient) -> None:
    assert client.get("/signup").status_code == 404
    assert client.post("/signup", data={"name": "x"}).status_code == 404


def test_sign_up_credits_once_even_when_submitted_twice(
        console: tuple[Database, TestClient], client: TestClient,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The sign-up credit is a promotional grant ("sign-up credit", valid 30 days here)."""
    db, _ = console
    monkeypatch.setenv("TOLLWAY_SIGNUP_ENABLED", "true")
    monkeypatch.setenv("TOLLWAY_SIGNUP_CREDIT_USD", "1.25")
    monkeypatch.setenv("TOLLWAY_SIGNUP_CREDIT_DAYS", "30")
    token = csrf(client, "/signup")
    form = {"csrf_token": token, "name": "newco", "email": "ops@newco.example",
            "password": "s1gn up pass"}
    first = client.post("/signup", data=form, follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"] == "/console"
    client.cookies.delete("tollway_session")
    second = client.post("/signup", data=form, follow_redirects=False)  # double submit
    assert second.status_code == 303
    with db.read() as conn:
        account = account_store.find_account(conn, "newco")
    assert account.available_nano == account.promo_nano == 1_250_000_000
    assert format_usd(account.balance_nano) == "1.250000000"
    with db.read() as conn:
        [grant] = conn.execute(sa.select(promo_grants).where(
            promo_grants.c.account_id == account.id)).all()
    assert (grant.amount_nano, grant.reason) == (1_250_000_000, "sign-up credit")
    assert grant.expires_at_ms == grant.created_at_ms + 30 * 86_400_000
    page = client.get("/console")
    assert "newco" in page.text and "1.250000000" in page.text
    assert 'data-testid="promotional">1.250000000<' in page.text
    assert 'data-testid="paid">0.000000000<' in page.text
    # the name is taken now: another person gets an error, not the account
    client.cookies.clear()
    token = csrf(client, "/signup")
    third = client.post("/signup", data={**form, "csrf_token": token, "password": "other pass"})
    assert third.status_code == 400 and "already" in third.text


# ----------------------------------------------------------------------------- CLI


def test_the_cli_sets_console_logins_from_stdin_only(
        db_url: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import json

    from tollway.cli import main

    def run(*args: str, stdin: str = "") -> dict[str, object]:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        code = main([*args, "--database-url", db_url, "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        result: dict[str, object] = json.loads(out)
        return result

    made = run("accounts", "create", "dana", "--email", "Dana@Example.com",
               "--password-stdin", stdin="first password\n")
    assert (made["email"], made["console_login"], made["disabled_at"]) == (
        "dana@example.com", True, None)
    assert run("accounts", "create", "erin")["console_login"] is False
    db = Database(db_url)
    try:
        with db.read() as conn:
            assert logins.authenticate(conn, "dana@example.com", "first password") is not None
            assert logins.authenticate(conn, "dana", "first password\n") is None
        run("accounts", "set-password", "erin", "--email", "erin@example.com",
            stdin="erin's password\r\n")
        with db.read() as conn:
            assert logins.authenticate(conn, "erin@example.com", "erin's password") is not None
        assert run("accounts", "disable", "erin")["disabled_at"] is not None
        with db.read() as conn:
            assert logins.authenticate(conn, "erin", "erin's password") is None
        assert run("accounts", "enable", "erin")["disabled_at"] is None
    finally:
        db.dispose()
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["accounts", "set-password", "erin", "--database-url", db_url]) == 1
    assert "8 to 1024 characters" in capsys.readouterr().err


# ----------------------------------------------------------------------------- migration


def test_migration_0003_matches_the_tables_and_downgrades(db: Database) -> None:
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from tollway.store.migrate import alembic_config, current_revision, head_revision, upgrade
    from tollway.store.tables import metadata

    def drift() -> list[object]:
        with db.read() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), metadata)
        return [d for d in diffs if any(name in repr(d) for name in (
            "web_sessions", "'email'", "password_hash", "disabled_at_ms", "uq_accounts_email"))]

    head = head_revision()
    assert current_revision(db) == head
    assert drift() == []
    with db.write() as conn:  # data that references accounts must not block the downgrade
        conn.exec_driver_sql("INSERT INTO accounts (id, name, kind, group_name, created_at_ms) "
                             "VALUES (901, 'holder', 'customer', 'default', 1)")
        conn.exec_driver_sql("INSERT INTO web_sessions (id_hash, account_id, operator, "
                             "csrf_token, created_at_ms, expires_at_ms) VALUES "
                             "('h', 901, false, 'c', 1, 2)")
        conn.exec_driver_sql("INSERT INTO api_keys (id, account_id, prefix, key_hash, name, "
                             "created_at_ms) VALUES (901, 901, 'tw_x', 'x', 'k', 1)")
    config = alembic_config()
    with db.write() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0002")
    assert current_revision(db) == "0002"
    with db.read() as conn:
        names = {c["name"] for c in sa.inspect(conn).get_columns("accounts")}
        assert "email" not in names and not sa.inspect(conn).has_table("web_sessions")
    upgrade(db)
    assert current_revision(db) == head and drift() == []
