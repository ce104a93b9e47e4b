"""End-to-end fixtures: a real ``tollway serve`` process and headless Chromium.

``server`` starts ``tollway serve`` on 127.0.0.1 with a free port, a fresh SQLite database
and the sandbox catalog (examples/catalog.yaml), and returns its base URL and admin token.
``browser`` launches Debian's Chromium (/usr/bin/chromium) through Playwright; Playwright
never downloads a browser. Without Chromium the tests skip locally and FAIL under CI.
``shot`` saves a full-page screenshot to var/screenshots/ (the test run's artifacts).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2e_support import CHROMIUM, CHROMIUM_ARGS, ROOT, SCREENSHOTS, Server, free_port


def _tollway(*args: str, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "tollway.cli", *args], env=env, check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A running server with the sandbox catalog, a fresh SQLite database, no accounts."""
    data = tmp_path_factory.mktemp("e2e")
    database_url = f"sqlite:///{data / 'tollway.db'}"
    token = "twadm-e2e-" + os.urandom(8).hex()
    env = {**os.environ, "TOLLWAY_DATABASE_URL": database_url, "TOLLWAY_ADMIN_TOKEN": token,
           "TOLLWAY_DATA_DIR": str(data), "TOLLWAY_KEY_CACHE_SECONDS": "0",
           "TOLLWAY_CATALOG_REFRESH_SECONDS": "1"}
    _tollway("db", "upgrade", env=env)
    port = free_port()
    log = (data / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tollway.cli", "serve", "--host", "127.0.0.1", "--port",
         str(port), "--catalog", str(ROOT / "examples" / "catalog.yaml")],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):  # until it answers (not a timing assertion: a start-up wait)
            if proc.poll() is not None:
                raise RuntimeError("tollway serve exited:\n" + (data / "server.log").read_text())
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError("tollway serve did not start:\n"
                               + (data / "server.log").read_text())
        yield Server(base, token, database_url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Chromium (Debian's), driven by Playwright's sync API. Module-scoped: while
    Playwright's sync API is open, its event loop runs on this thread, and the rest of the
    suite's ``asyncio.run`` would refuse to start."""
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                      headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def shot() -> object:
    """``shot(page, "name")`` saves var/screenshots/name.png and returns its path."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def save(page: object, name: str) -> Path:
        path = SCREENSHOTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
        return path

    return save
