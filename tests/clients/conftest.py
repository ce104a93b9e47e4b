"""A real ``tollway serve`` process on the sandbox catalog (examples/catalog.yaml), on SQLite
and on PostgreSQL, for client libraries to call as their users would; and a meter that sees
every HTTP answer a library got (through the library's own HTTP client's event hooks), so a
test can say how many requests were made and what Tollway reported they cost."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from fakes import USD, Tollway, fresh_database

ROOT = Path(__file__).resolve().parents[2]
CATALOG = ROOT / "examples" / "catalog.yaml"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Tollway]:
    """``tollway serve`` on a fresh database of each kind, with the sandbox catalog."""
    with fresh_database(request) as db:
        data = tmp_path_factory.mktemp("clients")
        env = {**os.environ, "TOLLWAY_DATABASE_URL": db.url, "TOLLWAY_DATA_DIR": str(data),
               "TOLLWAY_ADMIN_TOKEN": "twadm-clients", "TOLLWAY_KEY_CACHE_SECONDS": "0"}
        port = _free_port()
        log_path = data / "server.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tollway.cli", "serve", "--host", "127.0.0.1",
                 "--port", str(port), "--catalog", str(CATALOG)],
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            base = f"http://127.0.0.1:{port}"
            try:
                for _ in range(600):  # a start-up wait, not a timing assertion
                    if proc.poll() is not None:
                        raise RuntimeError("tollway serve exited:\n" + log_path.read_text())
                    try:
                        if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(0.1)
                else:
                    raise RuntimeError("tollway serve did not start:\n" + log_path.read_text())
                yield Tollway(db, SimpleNamespace(url=base))  # type: ignore[arg-type]
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


class Meter:
    """Every answer a client library received: (method, path, status), and the cost Tollway
    reported for it (``X-Tollway-Cost-USD``)."""

    def __init__(self) -> None:
        self.answers: list[tuple[str, str, int]] = []
        self.costs: list[Decimal] = []
        self.clients: list[Any] = []

    def see(self, response: Any) -> None:
        self.answers.append((response.request.method, response.request.url.path,
                             response.status_code))
        cost = response.headers.get("x-tollway-cost-usd")
        if cost is not None:
            self.costs.append(Decimal(cost))

    async def asee(self, response: Any) -> None:
        self.see(response)

    @property
    def cost_nano(self) -> int:
        return int(sum(self.costs, Decimal(0)) * USD)

    def sync_client(self) -> Any:
        """The HTTP client the ``openai`` and ``anthropic`` packages take (``httpx2``)."""
        import httpx2

        client = httpx2.Client(event_hooks={"response": [self.see]}, timeout=20)
        self.clients.append(client)
        return client

    def async_client(self) -> Any:
        import httpx2

        return httpx2.AsyncClient(event_hooks={"response": [self.asee]}, timeout=20)

    def close(self) -> None:
        for client in self.clients:
            client.close()


@pytest.fixture
def meter() -> Iterator[Meter]:
    """A meter for one test; the HTTP clients it made are closed after it."""
    seen = Meter()
    yield seen
    seen.close()
