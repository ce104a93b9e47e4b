"""Real ``tollway serve`` processes for the reliability tests, a mixed load against them, and
the check that the books match what the clients saw.

- :class:`Server` — one ``tollway serve`` in its own process group (so a SIGKILL takes its
  workers with it, and the fixture that made it always cleans it up).
- :func:`catalog_text` — the sandbox catalog (examples/catalog.yaml) plus models and data APIs
  on a fake OpenAI-compatible upstream, some of which fail by design.
- :func:`run_load` — mixed LLM (streaming and not) and per-call requests spread over several
  servers, recording what each client saw: status, request id, the cost it was told.
- :func:`check_books` — every response the client saw succeed has exactly one usage record with
  the cost the client was told, every one it saw fail has no charge, no balance is negative,
  and the ledger verifies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import sqlalchemy as sa
import yaml

from fakes import DATA_KEY, DATA_KEY_ENV, UPSTREAM_KEY, UPSTREAM_KEY_ENV, DataReply, FakeUpstream
from tollway import clock
from tollway.billing.keys import create_key
from tollway.ledger import ledger
from tollway.ledger.verify import verify
from tollway.money import parse_usd
from tollway.store.accounts import create_account
from tollway.store.db import Database
from tollway.store.tables import accounts, holds, usage_records

ROOT = Path(__file__).resolve().parent.parent
TOLLWAY = Path(sys.executable).parent / "tollway"
ADMIN_TOKEN = "adm-reliability"
USD = 1_000_000_000
#: What the fake upstream's default script costs on gpt-test: 20 prompt tokens × $0.15 +
#: 5 completion tokens × $0.60, per 1M tokens = $0.000006.
FAKE_CHAT_COST = 6_000
LOOKUP_COST = 2_000_000  # $0.002 per call


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(database_url: str, data_dir: Path, **settings: str) -> dict[str, str]:
    """A clean environment for ``tollway`` commands: no TOLLWAY_* from outside, the operator's
    upstream credentials, and ``settings`` as TOLLWAY_<NAME> variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
    env.update({"TOLLWAY_DATABASE_URL": database_url, "TOLLWAY_ADMIN_TOKEN": ADMIN_TOKEN,
                "TOLLWAY_DATA_DIR": str(data_dir), DATA_KEY_ENV: DATA_KEY,
                UPSTREAM_KEY_ENV: UPSTREAM_KEY, "TOLLWAY_KEY_CACHE_SECONDS": "5"})
    env.update({"TOLLWAY_" + name.upper(): value for name, value in settings.items()})
    return env


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(TOLLWAY), *args], env=env, capture_output=True, text=True,
                          timeout=180)


class Server:
    """``tollway serve --workers N`` on a free port, in its own process group."""

    def __init__(self, env: dict[str, str], log: Path, *, workers: int = 2,
                 port: int | None = None) -> None:
        self.env = env
        self.log = log
        self.workers = workers
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(TOLLWAY), "serve", "--workers", str(self.workers), "--port", str(self.port)],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 120) -> None:
        """Healthy a few times in a row, so that every worker had time to come up."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        healthy = 0
        while healthy < 2 * self.workers:
            if self.proc.poll() is not None:
                raise AssertionError(f"tollway serve exited {self.proc.returncode}:\n"
                                     f"{self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("tollway serve did not become healthy:\n"
                                     f"{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=5) as response:
                    healthy += response.status == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                healthy = 0
                time.sleep(0.1)

    def pids(self) -> list[int]:
        """The supervisor and its workers (a single-worker server is one process)."""
        assert self.proc is not None
        found = [self.proc.pid]
        with contextlib.suppress(OSError):
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    with contextlib.suppress(OSError):
                        stat = Path(f"/proc/{entry}/stat").read_text()
                        if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                            found.append(int(entry))
        return found

    def kill(self) -> None:
        """SIGKILL the whole process group: no shutdown code runs, as in a crash."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None

    def stop(self) -> None:
        """A graceful stop (SIGINT), then SIGKILL if it lingers."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


@contextlib.contextmanager
def servers() -> Iterator[list[Server]]:
    """A list the test fills with servers; every one is killed at the end, whatever happens."""
    made: list[Server] = []
    try:
        yield made
    finally:
        for server in made:
            server.kill()


# --------------------------------------------------------------------------- the catalog


def catalog_text(fake: FakeUpstream, slow: FakeUpstream | None = None) -> str:
    """examples/catalog.yaml plus ``gpt-test`` on the fake upstream, ``broken-model`` whose
    upstream answers 500, the ``lookup`` data API and ``broken-api`` (500 as well); with
    ``slow``, ``slow-model`` on that (slowly streaming) fake."""
    catalog = yaml.safe_load((ROOT / "examples" / "catalog.yaml").read_text())
    catalog["providers"].update({
        "fakeai": {"kind": "openai", "base_url": f"{fake.base}/v1",
                   "api_key_env": UPSTREAM_KEY_ENV},
        "brokenai": {"kind": "openai", "base_url": f"{fake.base}/broken/v1",
                     "api_key_env": UPSTREAM_KEY_ENV},
        "data": {"kind": "http", "base_url": f"{fake.base}/data",
                 "auth": {"header": "X-API-Key"}, "api_key_env": DATA_KEY_ENV},
    })
    catalog["models"] += [
        {"id": "gpt-test", "provider": "fakeai", "price": {"input": "0.15", "output": "0.60"},
         "max_output_tokens": 1000},
        {"id": "broken-model", "provider": "brokenai",
         "price": {"input": "0.15", "output": "0.60"}, "max_output_tokens": 1000},
    ]
    if slow is not None:
        catalog["providers"]["slowai"] = {"kind": "openai", "base_url": f"{slow.base}/v1",
                                          "api_key_env": UPSTREAM_KEY_ENV}
        catalog["models"].append({"id": "slow-model", "provider": "slowai",
                                  "price": {"input": "0.15", "output": "0.60"},
                                  "max_output_tokens": 1000})
    catalog["endpoints"] += [
        {"id": "lookup", "provider": "data", "method": "GET", "path": "/lookup/{id}",
         "upstream_path": "/items/{id}", "price": {"per_call": "0.002"}},
        {"id": "broken-api", "provider": "data", "method": "GET", "path": "/broken",
         "upstream_path": "/broken", "price": {"per_call": "0.002"}},
    ]
    fake.data_replies["/broken/v1/chat/completions"] = DataReply(
        status=500, body=b'{"error": {"message": "scripted outage"}}')
    fake.data_replies["/data/broken"] = DataReply(status=500, body=b'{"error": "outage"}')
    return yaml.safe_dump(catalog)


def prepare(env: dict[str, str], tmp: Path, catalog: str) -> None:
    """Migrate the database and apply the catalog through the CLI, as an operator would."""
    upgraded = cli(env, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    path = tmp / "catalog.yaml"
    path.write_text(catalog)
    applied = cli(env, "catalog", "apply", str(path))
    assert applied.returncode == 0, applied.stderr


def customers(db: Database, count: int, usd: int, *, poor: int = 1) -> list[tuple[int, str]]:
    """``count`` accounts with ``usd`` of credit each and ``poor`` more with $0.001 (enough
    for no data-API call: they get 402), each with a key: [(account id, key)]."""
    made = []
    with db.write() as conn:
        for i in range(count + poor):
            credit = usd * USD if i < count else USD // 1000
            account = create_account(conn, f"c{i}-{time.monotonic_ns()}", "default",
                                     at_ms=clock.now_ms()).id
            ledger.topup(conn, account, credit, idempotency_key=f"seed-{account}",
                         at_ms=clock.now_ms())
            made.append((account, create_key(conn, account, at_ms=clock.now_ms(),
                                             name="load").secret))
    return made


# --------------------------------------------------------------------------- the load


@dataclass
class Outcome:
    """What one client saw."""

    kind: str
    status: int  # 0: no response (connection refused or cut before the headers)
    request_id: str | None = None
    cost_nano: int | None = None  # the cost the client was told; None if none
    code: str | None = None  # the error code, for errors in the one shape
    complete: bool = False  # a whole successful response, with its cost


def request_for(kind: str, i: int) -> tuple[str, str, dict[str, Any] | None]:
    """(method, path, JSON body) of the ``kind`` request number ``i``."""
    messages = [{"role": "user", "content": f"request {i}"}]
    if kind == "chat":
        return "POST", "/v1/chat/completions", {"model": "gpt-test", "messages": messages}
    if kind == "stream":
        return "POST", "/v1/chat/completions", {
            "model": "gpt-test", "messages": messages, "stream": True,
            "stream_options": {"include_usage": True}}
    if kind == "stream-quiet":  # no include_usage: the cost comes in the final SSE comment
        return "POST", "/v1/chat/completions", {"model": "gpt-test", "messages": messages,
                                                "stream": True}
    if kind == "slow-stream":
        return "POST", "/v1/chat/completions", {
            "model": "slow-model", "messages": messages, "stream": True,
            "stream_options": {"include_usage": True}}
    if kind == "sandbox-chat":
        return "POST", "/v1/chat/completions", {"model": "sandbox-chat", "messages": messages}
    if kind == "messages-stream":  # Anthropic's protocol, streamed, on the sandbox
        return "POST", "/v1/messages", {"model": "sandbox-claude", "messages": messages,
                                        "max_tokens": 64, "stream": True}
    if kind == "sandbox-search":
        return "GET", f"/apis/v1/search/web?q=item-{i}", None
    if kind == "lookup":
        return "GET", f"/apis/v1/lookup/item-{i}", None
    if kind == "broken-model":
        return "POST", "/v1/chat/completions", {"model": "broken-model", "messages": messages}
    if kind == "broken-api":
        return "GET", "/apis/v1/broken", None
    if kind == "poor":
        return "GET", f"/apis/v1/lookup/poor-{i}", None
    raise ValueError(kind)


def stream_cost(body: bytes) -> tuple[int | None, str | None]:
    """The cost in a stream's final ``: tollway cost_usd=`` comment (and, when there is a usage
    chunk, checked equal to its ``tollway.cost_usd``), or the code of an error event."""
    cost = usage_cost = code = None
    lines = body.replace(b"\r\n", b"\n").split(b"\n")  # Anthropic's events: event: + data:
    for line in (line.strip() for line in lines):
        if line.startswith(b": tollway cost_usd="):
            cost = parse_usd(line.split(b"=", 1)[1].decode())
        elif line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
            with contextlib.suppress(ValueError):
                obj = json.loads(line[5:])
                if isinstance(obj, dict) and "tollway" in obj:
                    usage_cost = parse_usd(obj["tollway"]["cost_usd"])
                if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
                    code = obj["error"]["code"]
    if cost is not None and usage_cost is not None:
        assert cost == usage_cost, body
    return cost, code


async def one_request(session: aiohttp.ClientSession, url: str, key: str, kind: str,
                      i: int) -> Outcome:
    method, path, body = request_for(kind, i)
    outcome = Outcome(kind, 0)
    try:
        async with session.request(method, url + path, json=body,
                                   headers={"Authorization": f"Bearer {key}"}) as response:
            outcome.status = response.status
            outcome.request_id = response.headers.get("x-request-id")
            raw = await response.read()
            if response.status != 200:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    outcome.code = json.loads(raw)["error"]["code"]
            elif response.headers.get("content-type", "").startswith("text/event-stream"):
                outcome.cost_nano, outcome.code = stream_cost(raw)
                ended = raw.rstrip().endswith(b"data: [DONE]") or (
                    path == "/v1/messages" and b"event: message_stop" in raw)
                outcome.complete = outcome.cost_nano is not None and ended
            else:
                header = response.headers.get("x-tollway-cost-usd")
                outcome.cost_nano = parse_usd(header) if header else None
                outcome.complete = outcome.cost_nano is not None
    except (TimeoutError, aiohttp.ClientError, ConnectionError):
        pass  # the server died or went away: the client saw nothing complete
    return outcome


@dataclass
class Plan:
    """``total`` requests of mixed kinds (weights), ``concurrency`` at a time, spread
    round-robin over the servers that are up; poor requests use the poor account's key."""

    total: int
    concurrency: int
    weights: dict[str, int] = field(default_factory=lambda: {
        "chat": 4, "stream": 4, "stream-quiet": 1, "lookup": 3, "sandbox-chat": 2,
        "messages-stream": 2,
        "sandbox-search": 2, "broken-model": 1, "broken-api": 1, "poor": 1})
    seed: int = 7


async def run_load(urls: list[str] | Any, keys: list[str], poor_key: str, plan: Plan,
                   timeout_s: float = 120, stop: threading.Event | None = None,
                   outcomes: list[Outcome] | None = None) -> list[Outcome]:
    """Run the plan (until ``stop`` is set, if given), appending to ``outcomes`` as it goes;
    ``urls`` is a list, or a callable returning the servers up right now."""
    rng = random.Random(plan.seed)
    names, weights = list(plan.weights), list(plan.weights.values())
    outcomes = [] if outcomes is None else outcomes
    counter = iter(range(plan.total))
    connector = aiohttp.TCPConnector(limit=plan.concurrency, force_close=False)
    async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        async def worker() -> None:
            while True:
                if stop is not None and stop.is_set():
                    return
                i = next(counter, None)
                if i is None:
                    return
                live = urls() if callable(urls) else urls
                url = live[i % len(live)]
                kind = rng.choices(names, weights)[0]
                key = poor_key if kind == "poor" else keys[i % len(keys)]
                outcome = await one_request(session, url, key, kind, i)
                outcomes.append(outcome)
                if outcome.status == 0:
                    await asyncio.sleep(0.05)  # the server is down: do not spin

        await asyncio.gather(*(worker() for _ in range(plan.concurrency)))
    return outcomes


# --------------------------------------------------------------------------- the books


def wait_no_open_holds(db: Database, timeout_s: float) -> int:
    """Open holds, polled until there are none or ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        with db.read() as conn:
            count = int(conn.execute(sa.select(sa.func.count()).select_from(holds)
                                     .where(holds.c.status == "open")).scalar_one())
        if count == 0 or time.monotonic() > deadline:
            return count
        time.sleep(0.2)


def check_books(db: Database, env: dict[str, str], outcomes: list[Outcome], *,
                exact: bool) -> dict[str, int]:
    """The invariants, asserted; returns counts for the report.

    - every complete response has exactly one usage record, a ``consume`` with the cost the
      client was told, and that is the request's only charge;
    - every response the client saw fail (an error status) is charged nothing;
    - with ``exact`` (no crash), the charges are exactly the complete responses: nothing was
      charged that the client did not see;
    - no balance is negative, no hold is open, ``tollway ledger verify`` passes.
    """
    with db.read() as conn:
        rows = conn.execute(sa.select(usage_records.c.request_id, usage_records.c.type,
                                      usage_records.c.cost_nano)
                            .where(usage_records.c.type.in_(("consume", "error")))).all()
        negative = conn.execute(sa.select(sa.func.count()).select_from(accounts).where(
            sa.or_(accounts.c.available_nano < 0, accounts.c.held_nano < 0))).scalar_one()
        open_holds = conn.execute(sa.select(sa.func.count()).select_from(holds)
                                  .where(holds.c.status == "open")).scalar_one()
        problems = verify(conn)
    by_request: dict[str, list[tuple[str, int]]] = {}
    for request_id, type_, cost in rows:
        by_request.setdefault(request_id, []).append((type_, int(cost)))
    complete = [o for o in outcomes if o.complete]
    failed = [o for o in outcomes if o.status not in (0, 200)]
    for o in complete:
        assert o.request_id is not None
        assert by_request.get(o.request_id) == [("consume", o.cost_nano)], (o, by_request.get(
            o.request_id))
    for o in failed:
        # A 503 storage_unavailable may follow a COMMIT whose acknowledgement the outage cut
        # off: then the request is charged once, with its record (checked below), like a
        # request whose server was killed after settling.
        if o.request_id is None or o.code == "storage_unavailable":
            continue
        charged = sum(cost for _, cost in by_request.get(o.request_id, []))
        assert charged == 0, (o, by_request.get(o.request_id))
    charged_ids = {rid for rid, recs in by_request.items() if any(c for _, c in recs)}
    for recs in by_request.values():
        assert len(recs) == 1, recs  # one record per request, never two
    if exact:
        assert charged_ids == {o.request_id for o in complete if o.cost_nano}, (
            charged_ids ^ {o.request_id for o in complete if o.cost_nano})
    assert negative == 0
    assert open_holds == 0
    assert problems == []
    verified = cli(env, "ledger", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    return {"requests": len(outcomes), "complete": len(complete), "failed": len(failed),
            "no_response": sum(o.status == 0 for o in outcomes),
            "charged_records": len(charged_ids),
            "charged_not_seen": len(charged_ids - {o.request_id for o in complete})}


def report(name: str, figures: dict[str, Any]) -> None:
    """Append a result line for ``make stress``'s summary table (when it asked for one)."""
    path = os.environ.get("TOLLWAY_STRESS_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"test": name, **figures}) + "\n")


class BackgroundLoad:
    """:func:`run_load` in a thread of its own, until :meth:`finish` (the test meanwhile kills
    and restarts servers or the database)."""

    def __init__(self, urls: Any, keys: list[str], poor_key: str, plan: Plan) -> None:
        self.stop = threading.Event()
        self.outcomes: list[Outcome] = []
        self._error: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(run_load(urls, keys, poor_key, plan, stop=self.stop,
                                     outcomes=self.outcomes))
            except BaseException as exc:  # noqa: BLE001 - re-raised by finish()
                self._error.append(exc)

        self._thread = threading.Thread(target=run, name="load", daemon=True)
        self._thread.start()

    def seen(self) -> int:
        return len(self.outcomes)

    def finish(self) -> list[Outcome]:
        self.stop.set()
        self._thread.join(300)
        if self._error:
            raise self._error[0]
        return self.outcomes


PG_SERVER = ROOT / "scripts" / "pg-test-server"


class PgCluster:
    """A throwaway PostgreSQL cluster of the test's own (scripts/pg-test-server), so that
    stopping it under load disturbs nobody else's tests."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.url = ""

    def start(self) -> str:
        done = subprocess.run([str(PG_SERVER), "start", str(self.directory)],
                              capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            raise RuntimeError(f"pg-test-server start failed: {done.stderr}")
        self.url = done.stdout.strip()
        return self.url

    def stop(self) -> None:
        subprocess.run([str(PG_SERVER), "stop", str(self.directory)], capture_output=True,
                       timeout=180)

    def remove(self) -> None:
        """Stop it and delete its files (as root they live outside the directory)."""
        self.stop()
        pointer = self.directory / "cluster"
        if pointer.exists():
            location = Path(pointer.read_text().strip())
            if location.name.startswith("tollway-pg-") or location.parent.name.startswith(
                    "tollway-pg-"):
                subprocess.run(["rm", "-rf", "--", str(location)], timeout=60)
