"""Every web console form (sign-in, sign-up, console and operator pages) refuses a body larger
than ``TOLLWAY_MAX_BODY_BYTES`` with 413 before parsing it, declared or chunked, and changes
nothing — the same limit as the JSON API (see tests/api/test_security.py), on SQLite and
PostgreSQL. The route list comes from the router, so a new form cannot be missed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from test_security import every_route, filled

from tollway.app import create_app
from tollway.billing import logins
from tollway.store.db import Database
from webclient import TestClient, login, operator_login

LIMIT = 4096
PASSWORD = "limits pass 1"
ADMIN = "adm-limits"


@pytest.fixture
def app(db: Database, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[object, int]]:
    monkeypatch.setenv("TOLLWAY_MAX_BODY_BYTES", str(LIMIT))
    monkeypatch.setenv("TOLLWAY_SIGNUP_ENABLED", "true")
    monkeypatch.setenv("TOLLWAY_NOTIFY_INTERVAL_SECONDS", "0")
    with db.write() as conn:
        account = logins.create_account(conn, "alice", "default", email="alice@example.com",
                                        password_hash=logins.hash_password(PASSWORD))
    yield create_app(database_url=db.url, admin_token=ADMIN), account.id


def page_forms(app: object) -> list[tuple[str, str]]:
    return [(m, p) for m, p in every_route(app) if m in ("POST", "PUT", "PATCH")
            and not p.startswith(("/v1/", "/apis/v1/", "/admin/v1/"))]


def table_rows(db: Database) -> dict[str, list[tuple[str, ...]]]:
    with db.read() as conn:
        names = ["accounts", "api_keys", "entries", "web_sessions", "redemption_codes",
                 "notification_settings", "price_versions", "catalog_items"]
        return {n: sorted(tuple(str(v) for v in row)
                          for row in conn.exec_driver_sql(f"SELECT * FROM {n}"))
                for n in names}


def test_every_form_refuses_a_body_over_the_limit(db: Database,
                                                  app: tuple[object, int]) -> None:
    application, account_id = app
    routes = page_forms(application)
    # the forms people post: sign-in/out, sign-up, the console's and the operator's
    assert {p for _, p in routes} >= {"/login", "/logout", "/signup", "/admin/login",
                                      "/console/keys", "/console/redeem",
                                      "/admin/accounts", "/admin/catalog/preview",
                                      "/admin/catalog/apply"}
    values = {"key_id": 1, "account_id": account_id, "action": "topup"}
    big = b"catalog=" + b"x" * LIMIT  # one byte of form over the limit, and more
    with TestClient(application) as customer, TestClient(application) as operator:
        assert login(customer, "alice", PASSWORD).status_code == 303
        assert operator_login(operator, ADMIN).status_code == 303
        before = table_rows(db)
        for method, template in routes:
            path = filled(template, values)
            client = operator if path.startswith("/admin/") else customer
            headers = {"content-type": "application/x-www-form-urlencoded"}
            declared = client.request(method, path, content=big, headers=headers,
                                      follow_redirects=False)
            chunked = client.request(method, path, content=iter([big[:100], big[100:]]),
                                     headers=headers, follow_redirects=False)
            for response in (declared, chunked):
                assert response.status_code == 413, (method, path, response.status_code,
                                                     response.text[:300])
        assert table_rows(db) == before


def test_a_form_within_the_limit_still_works(db: Database, app: tuple[object, int]) -> None:
    application, _ = app
    with TestClient(application) as customer:
        # a sign-in form (CSRF token, login, password) is far below 4 KiB
        assert login(customer, "alice", PASSWORD).status_code == 303
        assert customer.get("/console").status_code == 200
