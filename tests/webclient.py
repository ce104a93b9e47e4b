"""Helpers for driving the web console through Starlette's TestClient: read the CSRF token
from a page, sign in as a customer or the operator, post a form."""

from __future__ import annotations

import re
import warnings
from typing import Any

with warnings.catch_warnings():
    # starlette 1.x prefers httpx2 for its test client; httpx works the same
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

__all__ = ["TestClient", "csrf", "login", "operator_login", "post_form"]

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf(client: TestClient, path: str = "/login") -> str:
    """The CSRF token the page at ``path`` puts in its forms."""
    response = client.get(path)
    assert response.status_code == 200, (path, response.status_code, response.text[:500])
    found = _CSRF.search(response.text)
    assert found, f"no CSRF token on {path}"
    return found.group(1)


def login(client: TestClient, name: str, password: str) -> Any:
    """Sign in as a customer (forgetting any earlier session of this client)."""
    client.cookies.clear()
    token = csrf(client)
    return client.post("/login", data={"csrf_token": token, "login": name,
                                       "password": password}, follow_redirects=False)


def operator_login(client: TestClient, admin_token: str) -> Any:
    client.cookies.clear()
    token = csrf(client, "/admin/login")
    return client.post("/admin/login", data={"csrf_token": token, "token": admin_token},
                       follow_redirects=False)


def post_form(client: TestClient, path: str, data: dict[str, Any], *,
              page: str | None = None) -> Any:
    """POST a form with the CSRF token of ``page`` (default: the path itself)."""
    token = csrf(client, page or path)
    return client.post(path, data={"csrf_token": token, **data}, follow_redirects=False)
