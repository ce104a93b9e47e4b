"""No overdraft through the real server: ``tollway serve --workers 2`` (two processes, each
with its own writer and caches, sharing one database), 300 concurrent per-call requests at a
price that lets exactly 100 succeed — on SQLite and on PostgreSQL.

Exactly 100 requests are forwarded and charged, the other 200 get 402 without reaching the
upstream, the balance ends at exactly 0 and ``tollway ledger verify`` passes.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest
import sqlalchemy as sa

from fakes import DATA_KEY, DATA_KEY_ENV, USD, FakeUpstream
from tollway import clock
from tollway.billing.keys import create_key
from tollway.ledger import ledger
from tollway.store.accounts import create_account, get_account
from tollway.store.db import Database
from tollway.store.tables import usage_records

TOLLWAY = Path(sys.executable).parent / "tollway"
REQUESTS = 300
AFFORDABLE = 100
IN_FLIGHT = 100  # the client's connection limit: plenty of overlap, no socket exhaustion


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cli:
    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = env
        self.cwd = cwd

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(TOLLWAY), *args], env=self.env, cwd=self.cwd,
                              capture_output=True, text=True, timeout=120)


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    healthy = 0
    while healthy < 4:  # a few in a row, so that both workers had time to come up
        if proc.poll() is not None:
            raise AssertionError(f"tollway serve exited {proc.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"tollway serve did not become healthy:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
                healthy += response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            healthy = 0
            time.sleep(0.1)


async def fire(url: str, key: str) -> collections.Counter[tuple[int, str]]:
    outcomes: collections.Counter[tuple[int, str]] = collections.Counter()
    connector = aiohttp.TCPConnector(limit=IN_FLIGHT)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def one(i: int) -> None:
            async with session.get(f"{url}/apis/v1/lookup/item-{i}",
                                   headers={"Authorization": f"Bearer {key}"}) as response:
                body = await response.json(content_type=None)
                code = body["error"]["code"] if response.status != 200 else (
                    response.headers["x-tollway-cost-usd"])
                outcomes[(response.status, code)] += 1

        await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    return outcomes


def test_two_workers_300_concurrent_calls_exactly_100_charged(
        db_url: str, tmp_path: Path, upstream: FakeUpstream) -> None:
    if not TOLLWAY.exists():
        pytest.skip(f"{TOLLWAY} is not installed (pip install -e .)")
    upstream.reset()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
    env.update({"TOLLWAY_DATABASE_URL": db_url, "TOLLWAY_ADMIN_TOKEN": "adm-concurrency",
                "TOLLWAY_DATA_DIR": str(tmp_path / "data"), DATA_KEY_ENV: DATA_KEY})
    cli = Cli(env, tmp_path)
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(f"""
providers:
  data: {{kind: http, base_url: "{upstream.base}/data", auth: {{header: X-API-Key}},
          api_key_env: {DATA_KEY_ENV}}}
groups:
  default: {{ratio: "1"}}
endpoints:
  - id: lookup
    provider: data
    method: GET
    path: /lookup/{{id}}
    upstream_path: /items/{{id}}
    price: {{per_call: "0.01"}}
""")
    assert cli.run("db", "upgrade").returncode == 0
    applied = cli.run("catalog", "apply", str(catalog))
    assert applied.returncode == 0, applied.stderr
    db = Database(db_url)
    with db.write() as conn:
        buyer = create_account(conn, "buyer", "default", at_ms=clock.now_ms()).id
        ledger.topup(conn, buyer, USD, idempotency_key="seed",
                     at_ms=clock.now_ms())  # 1 USD / 0.01 = 100 calls
        key = create_key(conn, buyer, at_ms=clock.now_ms(), name="load").secret

    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(TOLLWAY), "serve", "--workers", "2", "--port", str(port)],
                                env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, log)
        outcomes = asyncio.run(fire(url, key))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    assert outcomes == {(200, "0.010000000"): AFFORDABLE,
                        (402, "insufficient_balance"): REQUESTS - AFFORDABLE}, (
        outcomes, log.read_text()[-3000:])
    forwarded = upstream.data_requests()
    assert len(forwarded) == AFFORDABLE
    assert len({r.path for r in forwarded}) == AFFORDABLE  # 100 different requests, once each
    with db.read() as conn:
        account = get_account(conn, buyer)
        charges = conn.execute(sa.select(usage_records.c.type, usage_records.c.cost_nano)
                               .where(usage_records.c.type.in_(("consume", "error")))
                               .order_by(usage_records.c.id)).all()
    db.dispose()
    assert (account.available_nano, account.held_nano, account.used_nano,
            account.requests) == (0, 0, USD, AFFORDABLE)
    assert [tuple(c) for c in charges] == [("consume", 10_000_000)] * AFFORDABLE
    verified = cli.run("ledger", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    served = log.read_text()
    assert served.count("Application startup complete") == 2, served  # two workers served
    assert "Traceback" not in served
