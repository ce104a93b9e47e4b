"""The web console's HTML pages, fuzzed (issue 15), on SQLite and PostgreSQL.

Routes come from the router (every page path, GET and form methods); the fields of each form
and the query parameters of each page come from the forms the pages themselves render (plus
the filter names the pages read), so a new page or field is fuzzed without a test change.
Hypothesis generates values: plausible ones (ids of the caller's and of another account, the
catalog's groups, months, amounts) and hostile ones (any text, NUL, huge numbers). For every
request:

- never a 5xx;
- signed in as a customer, no answer ever shows another account's data (the other account's
  name, email, key names and webhook URL are distinctive markers);
- a form posted without this browser's CSRF token, or with another one, is refused with 403
  and changes nothing in the database.

``TOLLWAY_FUZZ_PAGES_EXAMPLES`` (default 120 per backend) sets the run's length.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_security import every_route

from fakes import apply_catalog_text, fresh_database
from tollway import clock
from tollway.app import create_app
from tollway.billing import credits, logins
from tollway.billing import keys as key_ops
from tollway.billing import notifications as notify
from tollway.runtime.paths import is_page_path
from tollway.store.db import Database
from webclient import TestClient, csrf, login, operator_login

ADMIN_TOKEN = "adm-fuzz-pages"
PASSWORD = "fuzz pages pass 1"
MARKER = "zq7marker"  # in everything of the other account: never shown to alice
EXAMPLES = int(os.environ.get("TOLLWAY_FUZZ_PAGES_EXAMPLES", "120"))
CATALOG = Path(__file__).parents[2] / "examples" / "catalog.yaml"
#: query parameters pages read that no form of theirs names (links, pagination)
LINK_PARAMS = ("cursor", "limit", "month", "format", "next", "saved", "account", "account_id",
               "key", "start", "end", "group", "type", "model", "endpoint", "product")
_CONVERTER = re.compile(r"\{([^}:]+)(?::([a-z]+))?\}")


class _Forms(HTMLParser):
    """(action, method, field names) of every form in a page."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, str, set[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form":
            self.forms.append((a.get("action") or "", (a.get("method") or "get").upper(),
                               set()))
        elif tag in ("input", "select", "textarea") and self.forms and a.get("name"):
            self.forms[-1][2].add(a["name"] or "")


@dataclass
class World:
    db: Database
    app: Any
    customer: TestClient
    operator: TestClient
    alice: int
    bob: int
    alice_key: int
    bob_key: int
    routes: list[tuple[str, str]]
    fields: dict[str, set[str]]  # route template → form field or query names


def _template_of(path: str, routes: list[tuple[str, str]]) -> str | None:
    for _, template in routes:
        pattern = "^" + _CONVERTER.sub(lambda m: "[^/]+" if m.group(2) != "path" else ".+",
                                       template) + "$"
        if re.match(pattern, path.split("?")[0]):
            return template
    return None


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    env = {"TOLLWAY_SIGNUP_ENABLED": "true", "TOLLWAY_NOTIFY_INTERVAL_SECONDS": "0",
           "TOLLWAY_NOTIFY_ALLOW_PRIVATE_TARGETS": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with fresh_database(request) as db:
            apply_catalog_text(db, CATALOG.read_text())
            password_hash = logins.hash_password(PASSWORD)
            with db.write() as conn:
                alice = logins.create_account(conn, "alice", "default",
                                              email="alice@example.com",
                                              password_hash=password_hash).id
                bob = logins.create_account(conn, f"bob-{MARKER}", "default",
                                            email=f"{MARKER}@example.com",
                                            password_hash=password_hash).id
                now = clock.now_ms()
                alice_key = key_ops.create_key(conn, alice, at_ms=now, name="alice key")
                bob_key = key_ops.create_key(conn, bob, at_ms=now, name=f"key-{MARKER}")
                credits.topup(conn, alice, 5 * 10**9, idempotency_key="a", at_ms=now,
                              note="alice")
                credits.topup(conn, bob, 5 * 10**9, idempotency_key="b", at_ms=now,
                              note=f"n-{MARKER}")
                notify.update(conn, bob, {"webhook_url": f"https://{MARKER}.example/h",
                                          "email": f"{MARKER}@example.com"}, at_ms=now)
            app = create_app(database_url=db.url, admin_token=ADMIN_TOKEN)
            with TestClient(app) as customer, TestClient(app) as operator:
                assert login(customer, "alice", PASSWORD).status_code == 303
                assert operator_login(operator, ADMIN_TOKEN).status_code == 303
                routes = [(m, p) for m, p in every_route(app)
                          if is_page_path(p) and not p.startswith("/static")]
                world = World(db, app, customer, operator, alice, bob,
                              alice_key.record.id, bob_key.record.id, routes,
                              _discover_fields(routes, customer, operator, alice))
                yield world
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _discover_fields(routes: list[tuple[str, str]], customer: TestClient,
                     operator: TestClient, alice: int) -> dict[str, set[str]]:
    """Render every GET page (signed in, and signed out for the sign-in forms) and read its
    forms: field names per target route."""
    fields: dict[str, set[str]] = {t: set() for _, t in routes}
    anonymous = TestClient(customer.app)
    for method, template in routes:
        if method != "GET":
            continue
        path = _CONVERTER.sub(lambda m: str(alice) if m.group(2) == "int" else "gpt-4o-mini",
                              template)
        client = operator if template.startswith("/admin") else customer
        if template in ("/login", "/signup", "/admin/login"):
            client = anonymous
        page = client.get(path, follow_redirects=False)
        if "html" not in page.headers.get("content-type", ""):
            continue
        parser = _Forms()
        parser.feed(page.text)
        for action, _, names in parser.forms:
            target = _template_of(action or path, routes)
            if target is not None:
                fields[target] |= names - {"csrf_token"}
    return fields


def _text() -> st.SearchStrategy[str]:
    return st.one_of(st.text(max_size=40), st.text(alphabet="0123456789.-", max_size=30),
                     st.sampled_from(["", "0", "-1", "1.5", "10**30", "9" * 40, "vip",
                                      "default", "2025-11", "2025-13", "2026-01-01",
                                      "csv", "jsonl", "html", "\x00", "../..", "None",
                                      "topup", "adjust", "disable", "enable", "group",
                                      "https://example.com/h", "http://127.0.0.1/",
                                      "gpt-4o-mini", "' OR 1=1 --", "<script>x</script>"]))


@st.composite
def requests_(draw: st.DrawFn, w: World) -> tuple[str, str, str, dict[str, str], str]:
    """(who, method, path, form or query, csrf mode)."""
    method, template = draw(st.sampled_from(w.routes))
    ids = [w.alice, w.bob, w.alice_key, w.bob_key, 0, 10**20]

    def param(match: re.Match[str]) -> str:
        if match.group(2) == "int":
            return str(draw(st.sampled_from(ids)))
        name = match.group(1)
        if name == "action":
            # not "disable": a disabled alice would leave the rest of the run signed out
            return draw(st.sampled_from(["topup", "adjust", "enable", "group", "nope"]))
        if name == "key_id":
            return str(draw(st.one_of(st.sampled_from(ids), st.sampled_from(["x", "-1"]))))
        return draw(st.one_of(st.sampled_from(["gpt-4o-mini", "web-search", "nope"]),
                              st.text(alphabet="abc-_/%", min_size=1, max_size=10)))

    path = _CONVERTER.sub(param, template)
    names = sorted(w.fields.get(template, set()) | (set(LINK_PARAMS) if method == "GET"
                                                    else set()))
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names))
                  if names else st.just([]))
    data = {name: draw(_text()) for name in chosen}
    who = "operator" if template.startswith("/admin") and draw(st.booleans()) else "customer"
    mode = draw(st.sampled_from(["valid", "missing", "wrong"])) if method != "GET" else ""
    if method != "GET" and template in ("/logout", "/admin/logout") and mode == "valid":
        mode = "missing"  # keep the sessions: a sign-out would end the fuzzing's session
    return who, method, path, data, mode


def _rows(db: Database) -> dict[str, list[tuple[str, ...]]]:
    with db.read() as conn:
        names = ["accounts", "api_keys", "entries", "postings", "redemption_codes",
                 "notification_settings", "price_versions", "catalog_items", "groups"]
        return {n: sorted(tuple(str(v) for v in row)
                          for row in conn.exec_driver_sql(f"SELECT * FROM {n}"))
                for n in names}


def test_pages_fuzzed(world: World) -> None:
    w = world
    token = {"customer": csrf(w.customer, "/console"), "operator": csrf(w.operator, "/admin")}
    statuses: Counter[int] = Counter()
    templates = {t for _, t in w.routes}
    assert {"/console", "/console/keys", "/console/usage", "/console/statements",
            "/console/notifications", "/login", "/signup", "/admin/accounts",
            "/admin/catalog/apply", "/"} <= templates
    assert {"name", "models", "quota_usd"} <= w.fields["/console/keys"]  # read from the form
    assert {"login", "password"} <= w.fields["/login"]

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(req=requests_(w))
    def run(req: tuple[str, str, str, dict[str, str], str]) -> None:
        who, method, path, data, mode = req
        client = w.operator if who == "operator" else w.customer
        if method == "GET":
            response = client.get(path, params=data, follow_redirects=False)
        else:
            form = dict(data)
            if mode == "valid":
                form["csrf_token"] = token[who]
            elif mode == "wrong":
                form["csrf_token"] = token["operator" if who == "customer" else "customer"]
            before = _rows(w.db) if mode != "valid" else None
            response = client.request(method, path, data=form, follow_redirects=False)
            if before is not None and response.status_code not in (404, 405):
                assert response.status_code in (403, 303, 429) or (
                    response.status_code == 401 and path.startswith("/admin")), (
                    method, path, mode, response.status_code, response.text[:300])
                if response.status_code != 303:
                    assert _rows(w.db) == before, (method, path, mode)
        statuses[response.status_code] += 1
        assert response.status_code < 500, (method, path, data, response.text[:500])
        if who == "customer":
            assert MARKER not in response.text, (method, path, data)
            assert MARKER not in response.headers.get("location", "")

    run()
    assert statuses[200] > 0 and statuses[403] > 0, statuses
    # the sessions survived the fuzzing, and the books still balance
    assert w.customer.get("/console", follow_redirects=False).status_code in (200, 303)
    from tollway.ledger.verify import verify
    with w.db.read() as conn:
        assert verify(conn) == []
