"""Gateway benchmark: what billing costs on the request path, against a bare hop, same run.

    python bench/gateway.py [--requests N] [--concurrency 1,8,32] [--rounds 3]
                            [--modes nonstream,stream] [--postgres URL] [--litellm [PYTHON]]
                            [--limits] [--layout proxy|servers|none] [--profile DIR] [--json]

Every piece is its own process on this machine, all on 127.0.0.1:

* **upstream** - a fake OpenAI-compatible server (aiohttp.web on uvloop) answering
  ``POST /v1/chat/completions`` at once: a fixed small JSON body with ``usage``, or with
  ``stream: true`` 20 SSE chunks, a usage chunk (when ``stream_options.include_usage``) and
  ``[DONE]``, no sleeps.
* **targets**, each a server in front of that upstream:
  ``direct`` (the upstream itself), ``passthrough`` (``bench/passthrough.py``: one Starlette route
  on uvicorn+uvloop+httptools, one shared aiohttp session, no auth, no parsing),
  ``tollway-sqlite`` (``tollway serve``, 1 worker, billing on, a fresh SQLite database: db
  upgrade, catalog apply, an account topped up, a key), ``tollway-pg`` (the same on a fresh
  database created on ``--postgres URL`` / ``TOLLWAY_BENCH_POSTGRES_URL`` and dropped after) and
  ``litellm`` (``--litellm``: LiteLLM's proxy, 1 worker, no database, master key only).
* **load generator** - an aiohttp client (uvloop) in its own process, closed loop: C workers
  send the fixed number of requests N back to back. Non-streaming: latency to the whole body.
  Streaming: time to the first body chunk (TTFC) and to the end of the stream (``[DONE]``).

``--limits`` adds, for each Tollway backend, a second Tollway (``tollway-sqlite+limits``,
``tollway-pg+limits``; its own fresh database) whose catalog has a rate-limit tier and whose key
has every limit on - RPM, TPM and concurrency, daily, weekly and monthly spend caps, an IP
allowlist - all far above what the run uses, so nothing is refused but every check runs: the
"limiter cost" lines compare its throughput with the same backend without limits, same round
(then the median of the per-round ratios).

Rounds are interleaved: for each round, for each (mode, concurrency), every target runs once,
target order rotated by one each round; figures are medians over rounds. "added p50" is the
target's p50 minus the direct p50 measured in the same round (then the median); "x pt" is the
target's throughput divided by the pass-through's in the same round (then the median).
"CPU ms/req" is the target process's utime+stime (``/proc/<pid>/stat``, all threads) over the
requests it served; for PostgreSQL the server's own processes are shown separately ("db CPU").
"cap" is pass-through CPU/req / (target CPU/req + db CPU/req): the throughput ratio the CPU
costs imply for a proxy alone on its CPU, far less sensitive than "x pt" to other load on the
machine, which is measured too ("other processes used N CPUs"). "RSS" is the process's peak
resident set (VmHWM).

Layouts (``--layout``; ``taskset``): ``proxy`` (default) gives the proxy under test - and its
PostgreSQL server, if local - CPU 0 alone and puts the load generator and the fake upstream on
CPU 1, so a proxy's throughput is the proxy's own; ``servers`` puts proxy, upstream and database
on CPU 0 and only the client on CPU 1; ``none`` pins nothing. The client side's CPU use is
reported so a saturated load generator is visible.

After the runs, every Tollway database is checked: usage records of type ``consume`` must equal
the successful requests sent to that server (warm-ups and profiling runs included), no
``error`` records, and ``tollway ledger verify`` must pass. ``--profile DIR`` also profiles
each Tollway, after the rounds, during one extra non-streaming and one streaming run at the
highest concurrency and prints where the time goes: with cProfile (default; a second
``tollway serve`` on the same database, event-loop and writer threads profiled, exact call
counts) or with py-spy (``--profile-tool py-spy``; samples the measured server,
``pip install py-spy``). Exit status 1 if a check fails.

The targets run whatever ``tollway`` package this interpreter imports. The working tree is
shared; to benchmark a fixed commit, run against a snapshot of it::

    git archive HEAD src | tar -x -C /tmp/snap && PYTHONPATH=/tmp/snap/src python bench/gateway.py

The source digest is printed, and a warning if it changed during the run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hostinfo import cpu_model, git_commit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
MODEL = "bench-chat"
UPSTREAM_MODEL = "fake-model"
PROMPT = "Say hello to the benchmark in exactly ten short words, please."
MAX_TOKENS = 64
STREAM_CHUNKS = 20

# --------------------------------------------------------------------------- fake upstream


def _upstream_bodies() -> tuple[bytes, list[bytes], bytes]:
    created = 1_760_000_000
    whole = json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": created,
        "model": UPSTREAM_MODEL,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant",
                                 "content": "Hello benchmark, here are ten short words for you."}}],
        "usage": {"prompt_tokens": 21, "completion_tokens": 12, "total_tokens": 33,
                  "prompt_tokens_details": {"cached_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0}},
    }).encode()
    chunks = []
    for i in range(STREAM_CHUNKS):
        delta: dict[str, Any] = {"content": f"tok{i} "}
        if i == 0:
            delta["role"] = "assistant"
        chunks.append(b"data: " + json.dumps({
            "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": created,
            "model": UPSTREAM_MODEL,
            "choices": [{"index": 0, "delta": delta,
                         "finish_reason": "stop" if i == STREAM_CHUNKS - 1 else None}],
        }).encode() + b"\n\n")
    usage = b"data: " + json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": created,
        "model": UPSTREAM_MODEL, "choices": [],
        "usage": {"prompt_tokens": 21, "completion_tokens": STREAM_CHUNKS,
                  "total_tokens": 21 + STREAM_CHUNKS},
    }).encode() + b"\n\n"
    return whole, chunks, usage


def run_upstream(port: int) -> None:
    import uvloop
    from aiohttp import web

    whole, chunks, usage_chunk = _upstream_bodies()

    async def chat(request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        if not payload.get("stream"):
            return web.Response(body=whole, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        for chunk in chunks:
            await response.write(chunk)
        if (payload.get("stream_options") or {}).get("include_usage"):
            await response.write(usage_chunk)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/healthz", health)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None,
                loop=uvloop.new_event_loop())


# --------------------------------------------------------------------------- load generator


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


class LoadClient:
    """Runs in the client process: commands on stdin, one JSON line answer each."""

    def __init__(self) -> None:
        import aiohttp

        self.aiohttp = aiohttp
        self.session: Any = None

    async def open(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """A fresh session with ``concurrency`` warm connections (untimed requests)."""
        aiohttp = self.aiohttp
        self.url = cmd["url"]
        self.headers = cmd["headers"]
        self.body = cmd["body"].encode()
        self.stream = cmd["stream"]
        self.concurrency = cmd["concurrency"]
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.concurrency, limit_per_host=0),
            auto_decompress=False, skip_auto_headers=("User-Agent",),
            timeout=aiohttp.ClientTimeout(total=120))
        results = await asyncio.gather(*(self._one() for _ in range(cmd["warm"])))
        return self._summarise(results, 0.0, 0.0)

    async def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        n = cmd["requests"]
        results: list[tuple[bool, float, float | None, bool, str | None]] = []
        remaining = [n]

        async def worker() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                results.append(await self._one())

        cpu0 = time.process_time()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        wall = time.perf_counter() - t0
        return self._summarise(results, wall, time.process_time() - cpu0)

    async def close(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if self.session is not None:
            await self.session.close()
            self.session = None
        return {}

    def _next(self) -> tuple[str, dict[str, str]]:
        """Where the next request goes and with which headers (``bench/cluster.py`` rotates
        them over instances and keys)."""
        return self.url, self.headers

    async def _one(self) -> tuple[bool, float, float | None, bool, str | None]:
        """(ok, latency s, time to first chunk s, billed marker seen, error)."""
        url, headers = self._next()
        t0 = time.perf_counter()
        first = None
        try:
            async with self.session.post(url, data=self.body, headers=headers) as r:
                if self.stream:
                    tail = b""
                    async for chunk in r.content.iter_any():
                        if first is None:
                            first = time.perf_counter() - t0
                        tail = (tail + chunk)[-400:]
                    ok = r.status == 200 and tail.endswith(b"data: [DONE]\n\n")
                    billed = b"tollway cost_usd=" in tail
                    error = None if ok else f"status {r.status}, tail {tail[-120:]!r}"
                else:
                    data = await r.read()
                    ok = r.status == 200 and b'"choices"' in data
                    billed = "x-tollway-cost-usd" in r.headers
                    error = None if ok else f"status {r.status}: {data[:200]!r}"
        except Exception as exc:  # noqa: BLE001 - counted and reported
            return False, time.perf_counter() - t0, None, False, f"{type(exc).__name__}: {exc}"
        return ok, time.perf_counter() - t0, first, billed, error

    @staticmethod
    def _summarise(results: list[tuple[bool, float, float | None, bool, str | None]],
                   wall: float, cpu: float) -> dict[str, Any]:
        lat = sorted(r[1] for r in results if r[0])
        ttfc = sorted(r[2] for r in results if r[0] and r[2] is not None)
        errors = [r[4] for r in results if not r[0]]
        ok = len(lat)
        return {
            "sent": len(results), "ok": ok, "billed": sum(1 for r in results if r[0] and r[3]),
            "errors": len(errors), "error_samples": sorted(set(e or "" for e in errors))[:3],
            "seconds": wall, "client_cpu_s": cpu, "rps": ok / wall if wall else 0.0,
            "p50_ms": _pct(lat, 0.50) * 1e3, "p99_ms": _pct(lat, 0.99) * 1e3,
            "ttfc_p50_ms": _pct(ttfc, 0.50) * 1e3 if ttfc else None,
            "ttfc_p99_ms": _pct(ttfc, 0.99) * 1e3 if ttfc else None,
        }


def run_client(factory: type[LoadClient] = LoadClient) -> None:
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    client = factory()
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            out = loop.run_until_complete(getattr(client, cmd["op"])(cmd))
        except Exception as exc:  # noqa: BLE001 - reported to the orchestrator
            out = {"fatal": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int, field_name: str = "VmHWM") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def system_busy_seconds() -> float:
    """CPU time the whole machine spent busy (all CPUs; idle and iowait excluded)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:
            out.append(int(entry))
    return out


def tree_cpu_seconds(root: int) -> float:
    total = 0.0
    for pid in [root, *children_of(root)]:
        try:
            total += cpu_seconds(pid)
        except (OSError, ValueError):
            pass
    return total


class Proc:
    """A server process we started (stdout/stderr to a log file)."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, *, cpu: int | None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        prefix = ["taskset", "-c", str(cpu)] if cpu is not None else []
        self.popen = subprocess.Popen(prefix + argv, stdout=self.log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                                      cwd=str(ROOT))
        self.pid = self.popen.pid  # taskset execs: the same pid is the server

    def wait_http(self, url: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n"
                                   + self.tail())
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status < 500:
                        return
            except urllib.error.HTTPError as exc:
                if exc.code < 500:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not answer {url} within {timeout:.0f}s:\n"
                           + self.tail())

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)  # uvicorn/aiohttp: graceful shutdown
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.log.close()


class Client:
    """The load generator process."""

    def __init__(self, cpu: int | None, script: Path | None = None) -> None:
        prefix = ["taskset", "-c", str(cpu)] if cpu is not None else []
        script = script or Path(__file__).resolve()
        self.popen = subprocess.Popen(prefix + [sys.executable, str(script), "--role", "client"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      cwd=str(ROOT))

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.popen.stdin and self.popen.stdout
        self.popen.stdin.write(json.dumps(cmd) + "\n")
        self.popen.stdin.flush()
        line = self.popen.stdout.readline()
        if not line:
            raise RuntimeError("the load generator died")
        out: dict[str, Any] = json.loads(line)
        if "fatal" in out:
            raise RuntimeError(f"load generator: {out['fatal']}")
        return out

    def stop(self) -> None:
        if self.popen.stdin:
            self.popen.stdin.close()
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    url: str  # the chat completions URL
    headers: dict[str, str]
    proc: Proc | None  # None for direct (the upstream is measured separately)
    kind: str = "other"  # direct | passthrough | tollway | litellm
    db_url: str | None = None
    db_root_pid: int | None = None  # a local PostgreSQL postmaster, for its CPU
    served_ok: int = 0  # successful requests sent, warm-ups and profiling included
    billed: int = 0
    check: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    peak_rss_mib: float | None = None
    requests: int | None = None  # overrides --requests (LiteLLM is ~50x slower)
    died: str | None = None
    src: str | None = None  # --baseline-src: the tree its commands import tollway from


def _tollway_cli() -> list[str]:
    script = Path(sys.executable).with_name("tollway")
    return [str(script)] if script.exists() else [sys.executable, "-m", "tollway.cli"]


def _run(argv: list[str], **kw: Any) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, cwd=str(ROOT), **kw)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout}\n"
                           f"{done.stderr}")
    return str(done.stdout)


#: Limits far above what a run sends: every check runs, none refuses.
LIMITS_TIERS = """
tiers:
  bench: {rpm: 1000000000, tpm: 1000000000000, concurrency: 1000000}
"""
LIMITS_KEY_FLAGS = ["--daily-cap", "1000000", "--weekly-cap", "1000000", "--monthly-cap",
                    "1000000", "--ips", "127.0.0.0/8,::1"]


#: ``--channels N``: the bench model is sold through N channels (providers fake, fake2, ...,
#: all on the fake upstream, equal weights at priority 0), so selection runs on every request.
CHANNELS = 1


def _catalog(upstream_base: str, limits: bool = False) -> str:
    extra = "".join(
        f"""  fake{n}: {{kind: openai, base_url: "{upstream_base}/v1", """
        f"""api_key_env: TOLLWAY_BENCH_UPSTREAM_KEY}}\n""" for n in range(2, CHANNELS + 1))
    route = ("    provider: fake\n" if CHANNELS == 1 else "    channels: [" + ", ".join(
        ["{provider: fake}"] + [f"{{provider: fake{n}}}" for n in range(2, CHANNELS + 1)])
        + "]\n")
    return (LIMITS_TIERS if limits else "") + f"""# written by bench/gateway.py
providers:
  fake: {{kind: openai, base_url: "{upstream_base}/v1", api_key_env: TOLLWAY_BENCH_UPSTREAM_KEY}}
{extra}groups:
  default: {{ratio: "1"}}
models:
  - id: {MODEL}
{route}    upstream_model: {UPSTREAM_MODEL}
    price: {{input: "0.15", output: "0.60", cache_read: "0.075"}}
    max_output_tokens: 4096
"""


def start_tollway(name: str, db_url: str, upstream_base: str, work: Path, cpu: int | None,
                  log: Any, limits: bool = False, src: str | None = None) -> Target:
    """Fresh database (upgrade, catalog, account, top-up, key), then ``tollway serve``; with
    ``limits``, a tier and a key with every limit (none of which the run reaches); with
    ``src``, every command of this target imports tollway from that source tree
    (``--baseline-src``)."""
    cli = _tollway_cli()
    data_dir = work / name
    data_dir.mkdir(parents=True, exist_ok=True)
    catalog = data_dir / "catalog.yaml"
    catalog.write_text(_catalog(upstream_base, limits))
    own = {"TOLLWAY_DATA_DIR": str(data_dir), "TOLLWAY_BENCH_UPSTREAM_KEY": "sk-fake-upstream",
           **({"PYTHONPATH": src} if src else {})}
    env = {**os.environ, **own}
    common = ["--database-url", db_url]
    _run(cli + ["db", "upgrade", *common], env=env)
    _run(cli + ["catalog", "apply", str(catalog), *common], env=env)
    _run(cli + ["accounts", "create", "bench", *common], env=env)
    _run(cli + ["topup", "bench", "1000000", "--idempotency-key", "bench-fund", *common],
         env=env)
    key = json.loads(_run(cli + ["keys", "create", "bench", "--name", "bench", "--json",
                                 *(LIMITS_KEY_FLAGS if limits else []), *common],
                          env=env))["key"]
    port = free_port()
    proc = Proc(name, cli + ["serve", "--host", "127.0.0.1", "--port", str(port), *common],
                work, cpu=cpu, env=own)
    proc.wait_http(f"http://127.0.0.1:{port}/healthz")
    log(f"[setup] {name}: tollway serve on :{port} (pid {proc.pid}), {db_url}")
    return Target(name, f"http://127.0.0.1:{port}/v1/chat/completions",
                  {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                  proc, kind="tollway", db_url=db_url, src=src)


class PostgresDatabase:
    """A fresh database on a PostgreSQL server, dropped by :meth:`drop`."""

    def __init__(self, url: str, suffix: str = "") -> None:
        import sqlalchemy as sa

        from tollway.store.db import normalize_url

        self.sa = sa
        self.server_url = sa.engine.make_url(normalize_url(url))
        self.admin = sa.create_engine(self.server_url, isolation_level="AUTOCOMMIT",
                                      poolclass=sa.pool.NullPool)
        self.name = f"tollway_gwbench_{os.getpid()}{suffix}"
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
            conn.exec_driver_sql(f"CREATE DATABASE {self.name}")
            self.version = conn.exec_driver_sql("SHOW server_version").scalar_one()
            self.settings = {k: conn.exec_driver_sql(f"SHOW {k}").scalar_one()
                             for k in ("fsync", "synchronous_commit")}
            backend = int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
        self.url = str(self.server_url.set(database=self.name)
                       .render_as_string(hide_password=False))
        self.postmaster: int | None = None
        try:  # a local server: its postmaster is our backend's parent
            with open(f"/proc/{backend}/stat") as f:
                text = f.read()
            self.postmaster = int(text[text.rindex(")") + 2:].split()[1])
        except (OSError, ValueError):
            pass

    def pin(self, cpu: int) -> bool:
        """Put the postmaster and its processes on ``cpu`` (new backends inherit it)."""
        if self.postmaster is None:
            return False
        ok = True
        for pid in [self.postmaster, *children_of(self.postmaster)]:
            done = subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(pid)],
                                  capture_output=True)
            ok = ok and done.returncode == 0
        return ok

    def drop(self) -> None:
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
        self.admin.dispose()


def litellm_python(arg: str) -> str | None:
    """The interpreter to run LiteLLM with, if it has ``litellm.proxy``."""
    candidates = [arg] if arg else []
    candidates += [os.environ.get("TOLLWAY_BENCH_LITELLM_PYTHON", ""), sys.executable,
                   str(ROOT / "var" / "litellm-venv" / "bin" / "python")]
    for py in candidates:
        if py and Path(py).exists() and subprocess.run(
                [py, "-c", "import litellm.proxy.proxy_server"], capture_output=True,
                env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
                timeout=120).returncode == 0:
            return py
    return None


def start_litellm(py: str, upstream_base: str, work: Path, cpu: int | None, log: Any) -> Target:
    master = "sk-bench-" + secrets.token_hex(16)
    config = work / "litellm.yaml"
    config.write_text(f"""model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{UPSTREAM_MODEL}
      api_base: {upstream_base}/v1
      api_key: sk-fake-upstream
general_settings:
  master_key: os.environ/LITELLM_MASTER_KEY
litellm_settings:
  telemetry: false
""")
    port = free_port()
    bindir = Path(py).parent
    litellm_cmd = bindir / "litellm"
    argv = ([str(litellm_cmd)] if litellm_cmd.exists() else [py, "-m", "litellm"])
    argv += ["--config", str(config), "--host", "127.0.0.1", "--port", str(port),
             "--num_workers", "1"]
    proc = Proc("litellm", argv, work, cpu=cpu,
                env={"LITELLM_MASTER_KEY": master, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                     "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False",
                     "PATH": f"{bindir}:{os.environ.get('PATH', '')}"})
    proc.wait_http(f"http://127.0.0.1:{port}/health/liveliness", timeout=180)
    version = subprocess.run([py, "-c", ("import importlib.metadata as m;"
                              "print(m.version('litellm'))")], capture_output=True,
                             text=True).stdout.strip()
    log(f"[setup] litellm {version}: proxy on :{port} (pid {proc.pid})")
    target = Target("litellm", f"http://127.0.0.1:{port}/v1/chat/completions",
                    {"Authorization": f"Bearer {master}", "Content-Type": "application/json"},
                    proc, kind="litellm")
    target.notes.append(f"LiteLLM {version}, 1 worker, no database, master key only")
    return target


def requests_for(target: Target, default: int) -> int:
    return target.requests or default


# --------------------------------------------------------------------------- checks


def check_tollway(target: Target) -> dict[str, Any]:
    """usage records of type consume == successful requests; no error records; verify."""
    import sqlalchemy as sa

    from tollway.store.db import Database
    from tollway.store.tables import usage_records

    assert target.db_url
    db = Database(target.db_url)
    try:
        with db.read() as conn:
            rows: dict[str, int] = {
                str(kind): int(n) for kind, n in conn.execute(
                    sa.select(usage_records.c.type, sa.func.count())
                    .group_by(usage_records.c.type)).all()}
            estimated = conn.execute(sa.select(sa.func.count()).select_from(usage_records)
                                     .where(usage_records.c.usage_source != "upstream")
                                     ).scalar_one()
    finally:
        db.dispose()
    # verified by the code that wrote it (a baseline's schema is its own)
    verify = subprocess.run(_tollway_cli() + ["ledger", "verify", "--database-url",
                                              target.db_url], capture_output=True, text=True,
                            cwd=str(ROOT), env={**os.environ, **(
                                {"PYTHONPATH": target.src} if target.src else {})})
    consume = int(rows.get("consume", 0))
    errors = int(rows.get("error", 0))
    ok = (consume == target.served_ok and errors == 0 and verify.returncode == 0
          and target.billed == target.served_ok)
    return {"ok": ok, "successful_requests": target.served_ok, "consume_records": consume,
            "error_records": errors, "non_upstream_usage_records": int(estimated),
            "responses_with_cost": target.billed, "ledger_verify_ok": verify.returncode == 0,
            "ledger_verify": (verify.stdout + verify.stderr).strip()[-500:]}


# --------------------------------------------------------------------------- profiling


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "/src/", "lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "lib/python3.":
                path = "stdlib:" + path.split("/", 1)[-1]
            break
    return f"{m.group('func')} ({path})"


def summarise_profile(raw_path: Path, top: int) -> dict[str, Any]:
    """Self and inclusive sample counts per function from py-spy's collapsed stacks."""
    self_counts: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        thread = frames[0]
        frames = [_short(f) for f in frames[1:]] or [thread]
        total += count
        threads[re.sub(r"\s*\(?0x[0-9a-f]+\)?", "", thread).strip() or thread] += count
        self_counts[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    pct = (lambda c: 100.0 * c / total) if total else (lambda c: 0.0)
    return {"samples": total,
            "threads": [(t, pct(c)) for t, c in threads.most_common(6)],
            "self": [(f, pct(c)) for f, c in self_counts.most_common(top)],
            "inclusive": [(f, pct(c)) for f, c in incl.most_common(top * 3)]}


def run_profiled_tollway(argv: list[str]) -> int:
    """``tollway`` with cProfile on the event-loop thread and on the writer thread; the
    profiles are written when the server stops (``TOLLWAY_BENCH_PROFILE_OUT``.{loop,writer})."""
    import cProfile

    import uvicorn.server

    from tollway.cli import main as tollway_main

    out = os.environ["TOLLWAY_BENCH_PROFILE_OUT"]
    serve = uvicorn.server.Server.serve

    async def profiled_serve(self: Any, sockets: Any = None) -> None:
        # imported here, not above: the store imports the metrics, which must see the
        # multiprocess directory ``tollway serve`` chooses before it starts uvicorn
        from tollway.store.writer import Writer
        writer_run = Writer._run

        def profiled_writer(writer: Any) -> None:
            prof = cProfile.Profile()
            prof.enable()
            try:
                writer_run(writer)
            finally:
                prof.disable()
                prof.dump_stats(out + ".writer")

        Writer._run = profiled_writer  # type: ignore[method-assign]
        prof = cProfile.Profile()
        prof.enable()
        try:
            await serve(self, sockets)
        finally:
            prof.disable()
            prof.dump_stats(out + ".loop")

    uvicorn.server.Server.serve = profiled_serve  # type: ignore[method-assign]
    return tollway_main(argv)


_TOLLWAY_FRAMES = ("/tollway/", "starlette/", "uvicorn/", "aiohttp/client", "asyncio/futures",
                   "json/", "decimal", "sqlalchemy/engine", "sqlite3", "psycopg")


def summarise_cprofile(path: Path, requests: int, top: int) -> dict[str, Any]:
    """Self time (top functions) and cumulative time of the gateway's own functions, in
    microseconds per request and in % of the thread's profiled time."""
    import pstats

    stats = pstats.Stats(str(path))
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = []
    for (fn, line, name), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        label = f"{name} ({'/'.join(Path(fn).parts[-2:])}:{line})" if fn != "~" else name
        rows.append((tt, ct, nc, label, fn))
    per = 1e6 / max(1, requests)
    self_rows = sorted(rows, reverse=True)[:top]
    cum_rows = sorted((r for r in rows if "/tollway/" in r[4]), key=lambda r: -r[1])[:top]
    return {"seconds": total, "us_per_request": total * per,
            "self": [(label, tt * per, 100 * tt / total, nc) for tt, _ct, nc, label, _ in
                     self_rows],
            "cumulative": [(label, ct * per, 100 * ct / total, nc) for _tt, ct, nc, label, _
                           in cum_rows]}


def profile_target(target: Target, client: Client, args: argparse.Namespace, out_dir: Path,
                   modes: list[str], concurrency: int, layout: Layout, work: Path,
                   log: Any) -> list[dict[str, Any]]:
    """Profile Tollway under load: cProfile (a second ``tollway serve`` on the same database,
    run through :func:`run_profiled_tollway`) or py-spy (sampling the measured server)."""
    assert target.proc and target.db_url
    results = []
    if args.profile_tool == "py-spy":
        spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        if spy is None:
            return [{"error": "py-spy not found (pip install py-spy)"}]
        for mode in modes:
            raw = out_dir / f"{target.name}-{mode}-c{concurrency}.pyspy.txt"
            opened = client.call(op="open", url=target.url, headers=target.headers,
                                 body=request_body(mode == "stream"), stream=mode == "stream",
                                 concurrency=concurrency, warm=concurrency)
            target.served_ok += opened["ok"]
            target.billed += opened["billed"]
            # --gil: only the thread holding the GIL is sampled (Python CPU work).
            spy_proc = subprocess.Popen([spy, "record", "--pid", str(target.proc.pid), "--rate",
                                         "250", "--gil", "--threads", "--format", "raw", "-o",
                                         str(raw)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
            time.sleep(1.5)  # let py-spy attach
            res = client.call(op="run", requests=args.profile_requests)
            client.call(op="close")
            target.served_ok += res["ok"]
            target.billed += res["billed"]
            spy_proc.send_signal(signal.SIGINT)
            try:
                spy_proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy_proc.kill()
            if not raw.exists():
                results.append({"mode": mode, "error": "py-spy wrote nothing"})
                continue
            summary = summarise_profile(raw, args.profile_top)
            summary.update({"tool": "py-spy", "mode": mode, "concurrency": concurrency,
                            "file": str(raw), "rps_while_profiled": res["rps"]})
            results.append(summary)
            log(f"[profile] {target.name} {mode} C={concurrency}: py-spy -> {raw}")
        return results

    if target.proc.popen.poll() is None:
        target.proc.stop()  # the profiled server takes over the database
    for mode in modes:
        base = out_dir / f"{target.name}-{mode}-c{concurrency}.cprofile"
        port = free_port()
        data_dir = work / target.name
        proc = Proc(f"{target.name}-profiled-{mode}",
                    [sys.executable, str(Path(__file__).resolve()), "--role", "tollway-cprofile",
                     "serve", "--host", "127.0.0.1", "--port", str(port), "--database-url",
                     target.db_url], work, cpu=layout.proxy,
                    env={"TOLLWAY_DATA_DIR": str(data_dir),
                         "TOLLWAY_BENCH_UPSTREAM_KEY": "sk-fake-upstream",
                         "TOLLWAY_BENCH_PROFILE_OUT": str(base)})
        try:
            proc.wait_http(f"http://127.0.0.1:{port}/healthz")
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            stream = mode == "stream"
            # Warm up unprofiled code paths too: the profile covers the whole server life.
            warm = client.call(op="open", url=url, headers=target.headers,
                               body=request_body(stream), stream=stream,
                               concurrency=concurrency, warm=concurrency)
            cpu0 = cpu_seconds(proc.pid)
            res = client.call(op="run", requests=args.profile_requests)
            cpu = cpu_seconds(proc.pid) - cpu0
            client.call(op="close")
        finally:
            proc.stop()
        served = warm["ok"] + res["ok"]
        target.served_ok += served
        target.billed += warm["billed"] + res["billed"]
        prof_summary: dict[str, Any] = {
            "tool": "cprofile", "mode": mode, "concurrency": concurrency, "requests": served,
            "rps_while_profiled": res["rps"],
            "cpu_ms_per_req_while_profiled": 1e3 * cpu / max(1, res["sent"])}
        for thread in ("loop", "writer"):
            path = Path(f"{base}.{thread}")
            if path.exists():
                prof_summary[thread] = summarise_cprofile(path, served, args.profile_top)
                prof_summary[thread]["file"] = str(path)
        results.append(prof_summary)
        log(f"[profile] {target.name} {mode} C={concurrency}: cProfile -> {base}.{{loop,writer}}")
    return results


# --------------------------------------------------------------------------- the run


def request_body(stream: bool) -> str:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
                            "max_tokens": MAX_TOKENS}
    if stream:  # every target's upstream sees the same request: usage chunk included
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body)


@dataclass
class Layout:
    name: str
    proxy: int | None
    upstream: int | None
    client: int | None
    database: int | None

    def describe(self) -> str:
        if self.name == "none":
            return "no pinning: every process floats over both CPUs"
        return (f"taskset: proxy under test on CPU {self.proxy}"
                + (" (with a local PostgreSQL server, when there is one)"
                   if self.database == self.proxy else "")
                + f"; fake upstream on CPU {self.upstream}; load generator on CPU {self.client}")


def make_layout(name: str) -> Layout:
    cpus = sorted(os.sched_getaffinity(0))
    if name == "none" or len(cpus) < 2 or not shutil.which("taskset"):
        return Layout("none", None, None, None, None)
    a, b = cpus[0], cpus[1]
    if name == "servers":
        return Layout(name, a, a, b, a)
    return Layout("proxy", a, b, b, a)


def ours_cpu_seconds(pids: list[int], db_roots: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except (OSError, ValueError):
            pass
    return total + sum(tree_cpu_seconds(root) for root in db_roots)


def measure(target: Target, upstream: Proc, client: Client, mode: str, concurrency: int,
            requests: int, warm: int, everyone: tuple[list[int], list[int]] = ([], [])
            ) -> dict[str, Any]:
    stream = mode == "stream"
    opened = client.call(op="open", url=target.url, headers=target.headers,
                         body=request_body(stream), stream=stream, concurrency=concurrency,
                         warm=max(warm, concurrency))
    pid = target.proc.pid if target.proc else None
    up0 = cpu_seconds(upstream.pid)
    px0 = cpu_seconds(pid) if pid else None
    db0 = tree_cpu_seconds(target.db_root_pid) if target.db_root_pid else None
    sys0, ours0 = system_busy_seconds(), ours_cpu_seconds(*everyone)
    res = client.call(op="run", requests=requests)
    sys1, ours1 = system_busy_seconds(), ours_cpu_seconds(*everyone)
    up1 = cpu_seconds(upstream.pid)
    px1 = cpu_seconds(pid) if pid else None
    db1 = tree_cpu_seconds(target.db_root_pid) if target.db_root_pid else None
    client.call(op="close")
    target.served_ok += opened["ok"] + res["ok"]
    target.billed += opened["billed"] + res["billed"]
    sent = max(1, res["sent"])
    res["warm_errors"] = opened["errors"]
    res["upstream_cpu_ms_per_req"] = 1e3 * (up1 - up0) / sent
    res["proxy_cpu_ms_per_req"] = (None if px0 is None or px1 is None
                                   else 1e3 * (px1 - px0) / sent)
    res["proxy_cpu_util"] = (None if px0 is None or px1 is None
                             else (px1 - px0) / res["seconds"])
    res["db_cpu_ms_per_req"] = None if db0 is None or db1 is None else 1e3 * (db1 - db0) / sent
    res["client_cpu_util"] = res["client_cpu_s"] / res["seconds"] if res["seconds"] else None
    res["upstream_cpu_util"] = (up1 - up0) / res["seconds"] if res["seconds"] else None
    # CPU used on this machine by processes that are not part of the benchmark (other users'
    # jobs), in cores: the noise this measurement ran under.
    res["foreign_cores"] = (max(0.0, (sys1 - sys0) - (ours1 - ours0)) / res["seconds"]
                            if everyone[0] and res["seconds"] else None)
    if pid:
        res["rss_mib"] = rss_mib(pid, "VmRSS")
    return res


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and v == v]
    return statistics.median(vals) if vals else None


def summarise(runs: dict[tuple[str, str, int], list[dict[str, Any]]], targets: list[Target],
              modes: list[str], concs: list[int], rounds: int) -> list[dict[str, Any]]:
    rows = []
    for mode in modes:
        for c in concs:
            for t in targets:
                rs = runs.get((t.name, mode, c), [])
                if not rs:
                    continue
                direct = runs.get(("direct", mode, c))
                pt = runs.get(("passthrough", mode, c))
                row: dict[str, Any] = {
                    "target": t.name, "mode": mode, "concurrency": c,
                    "rps": _median([r["rps"] for r in rs]),
                    "rps_rounds": [r["rps"] for r in rs],
                    "p50_ms": _median([r["p50_ms"] for r in rs]),
                    "p99_ms": _median([r["p99_ms"] for r in rs]),
                    "ttfc_p50_ms": _median([r["ttfc_p50_ms"] for r in rs]),
                    "ttfc_p99_ms": _median([r["ttfc_p99_ms"] for r in rs]),
                    "proxy_cpu_ms_per_req": _median([r["proxy_cpu_ms_per_req"] for r in rs]),
                    "proxy_cpu_util": _median([r["proxy_cpu_util"] for r in rs]),
                    "db_cpu_ms_per_req": _median([r["db_cpu_ms_per_req"] for r in rs]),
                    "upstream_cpu_ms_per_req": _median([r["upstream_cpu_ms_per_req"]
                                                        for r in rs]),
                    "client_cpu_util": _median([r["client_cpu_util"] for r in rs]),
                    "upstream_cpu_util": _median([r["upstream_cpu_util"] for r in rs]),
                    "foreign_cores": _median([r["foreign_cores"] for r in rs]),
                    "foreign_cores_max": max((r["foreign_cores"] or 0.0) for r in rs),
                    "errors": sum(r["errors"] + r["warm_errors"] for r in rs),
                    "error_samples": sorted({e for r in rs for e in r["error_samples"]})[:3],
                    "peak_rss_mib": t.peak_rss_mib,
                }
                if direct and t.name != "direct":
                    row["added_p50_ms"] = _median([r["p50_ms"] - d["p50_ms"]
                                                   for r, d in zip(rs, direct, strict=False)])
                    row["added_ttfc_p50_ms"] = _median(
                        [r["ttfc_p50_ms"] - d["ttfc_p50_ms"]
                         for r, d in zip(rs, direct, strict=False)
                         if r["ttfc_p50_ms"] is not None and d["ttfc_p50_ms"] is not None])
                if pt:
                    row["x_passthrough"] = _median([r["rps"] / p["rps"] for r, p in
                                                    zip(rs, pt, strict=False) if p["rps"]])
                    row["x_passthrough_rounds"] = [r["rps"] / p["rps"] for r, p in
                                                   zip(rs, pt, strict=False) if p["rps"]]
                    # Capacity ratio: with the proxy alone on its CPU, its throughput at
                    # saturation is 1 / (CPU per request); this ratio of CPU costs (its
                    # database server's included) is far less sensitive to other load.
                    row["x_passthrough_cpu"] = _median([
                        p["proxy_cpu_ms_per_req"] / (r["proxy_cpu_ms_per_req"]
                                                     + (r["db_cpu_ms_per_req"] or 0.0))
                        for r, p in zip(rs, pt, strict=False)
                        if r["proxy_cpu_ms_per_req"] and p["proxy_cpu_ms_per_req"]])
                rows.append(row)
    return rows


def verdicts(rows: list[dict[str, Any]], concs: list[int]) -> list[dict[str, Any]]:
    out = []
    top = max(concs)
    for row in rows:
        if not row["target"].startswith("tollway"):
            continue
        if row["concurrency"] == top and row.get("x_passthrough") is not None:
            v = row["x_passthrough"]
            cap = row.get("x_passthrough_cpu")
            noisy = (row.get("foreign_cores") or 0.0) > 0.25
            out.append({"target": row["target"], "mode": row["mode"],
                        "what": f"throughput at C={top} >= 0.75 x pass-through",
                        "value": f"{v:.2f} x" + (f" (CPU capacity ratio {cap:.2f} x)"
                                                 if cap is not None else "")
                        + (f" [other processes used {row['foreign_cores']:.2f} CPUs meanwhile: "
                           "the measured ratio is unreliable, read the capacity ratio]"
                           if noisy else ""),
                        "ok": v >= 0.75 and (cap is None or not noisy or cap >= 0.75)})
        if row["concurrency"] == 1 and row.get("added_p50_ms") is not None:
            v = row["added_p50_ms"]
            what = "added p50 at C=1 < 2 ms" + (" (to [DONE])" if row["mode"] == "stream"
                                                else "")
            out.append({"target": row["target"], "mode": row["mode"], "what": what,
                        "value": f"{v:+.2f} ms", "ok": v < 2.0})
            if row["mode"] == "stream" and row.get("added_ttfc_p50_ms") is not None:
                v = row["added_ttfc_p50_ms"]
                out.append({"target": row["target"], "mode": row["mode"],
                            "what": "added time to first chunk p50 at C=1 < 2 ms",
                            "value": f"{v:+.2f} ms", "ok": v < 2.0})
    return out


def machine() -> dict[str, Any]:
    import aiohttp
    import starlette
    import uvicorn
    import uvloop

    model, commit = cpu_model(), git_commit()
    return {"nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "source_digest": source_digest(), "tollway_source": str(tollway_source()),
            "cpu_model": model, "python": platform.python_version(),
            "uvicorn": uvicorn.__version__, "starlette": starlette.__version__,
            "aiohttp": aiohttp.__version__, "uvloop": getattr(uvloop, "__version__", "?"),
            "platform": platform.platform(), "commit": commit,
            "loadavg_at_start": os.getloadavg(),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def source_digest(src: str | None = None) -> str:
    """A digest of Tollway's source files (``src``: of the package in that source tree): the
    working tree is shared, and an edit landing mid-run would mean the targets started at
    different times ran different code."""
    import hashlib

    package = tollway_source() if src is None else Path(src) / "tollway"
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(str(path.relative_to(package)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def tollway_source() -> Path:
    """Where the benchmarked ``tollway`` package is imported from (PYTHONPATH can point at a
    snapshot, e.g. ``git archive HEAD src | tar -x -C /tmp/snap``, instead of the working
    tree)."""
    import tollway

    return Path(tollway.__file__).resolve().parent


def _f(value: float | None, fmt: str, dash: str = "-") -> str:
    return dash if value is None else format(value, fmt)


def limiter_costs(runs: dict[tuple[str, str, int], list[dict[str, Any]]],
                  targets: list[Target], modes: list[str], concs: list[int]
                  ) -> list[dict[str, Any]]:
    """Each ``X+limits`` target against ``X``: throughput ratio per round, then the median."""
    out = []
    names = {t.name for t in targets}
    for t in targets:
        base = t.name.removesuffix("+limits")
        if base == t.name or base not in names:
            continue
        for mode in modes:
            for c in concs:
                on, off = runs.get((t.name, mode, c), []), runs.get((base, mode, c), [])
                ratios = [a["rps"] / b["rps"] for a, b in zip(on, off, strict=False)
                          if b["rps"]]
                cpu = [a["proxy_cpu_ms_per_req"] / b["proxy_cpu_ms_per_req"]
                       for a, b in zip(on, off, strict=False)
                       if a["proxy_cpu_ms_per_req"] and b["proxy_cpu_ms_per_req"]]
                ratio = _median(ratios)
                out.append({"target": base, "mode": mode, "concurrency": c,
                            "rps_on": _median([r["rps"] for r in on]),
                            "rps_off": _median([r["rps"] for r in off]),
                            "ratio": ratio, "ratio_rounds": ratios,
                            "cpu_per_req_ratio": _median(cpu),
                            "ok": ratio is not None and ratio >= 0.9})
    return out


def render(results: dict[str, Any]) -> str:
    m, p = results["machine"], results["params"]
    lines = [
        (f"Tollway gateway benchmark ({m['date']}; tollway imported from "
         f"{m['tollway_source']}, source digest {m['source_digest']}; working tree at "
         f"{m['commit']})"),
        (f"machine: {m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}, uvicorn "
         f"{m['uvicorn']}, starlette {m['starlette']}, aiohttp {m['aiohttp']}, uvloop "
         f"{m['uvloop']}; load average at start {m['loadavg_at_start'][0]:.2f}"),
        (f"{p['requests']} requests per measurement (+ warm-up), concurrency "
         f"{','.join(map(str, p['concurrency']))}, {p['rounds']} interleaved rounds, medians; "
         f"layout: {p['layout']}"),
    ]
    if results.get("source_digest_at_end", m["source_digest"]) != m["source_digest"]:
        lines.append(f"WARNING: the tollway source changed during the run (digest "
                     f"{results['source_digest_at_end']} at the end): targets started at "
                     "different times may have run different code")
    lines += [f"{t}: {n}" for t, n in results["target_notes"].items()]
    header = (f"{'target':<21} {'mode':<9} {'C':>3} {'req/s':>8} {'x pt':>5} {'cap':>5} "
              f"{'p50 ms':>7} "
              f"{'p99 ms':>7} {'+p50 vs direct':>14} {'TTFC p50':>8} {'+TTFC':>6} "
              f"{'CPU ms/req':>10} {'db CPU':>6} {'RSS MiB':>7}")
    lines += ["", header, "-" * len(header)]
    last = None
    for r in results["rows"]:
        if last is not None and (r["mode"], r["concurrency"]) != last:
            lines.append("")
        last = (r["mode"], r["concurrency"])
        lines.append(
            f"{r['target']:<21} {r['mode']:<9} {r['concurrency']:>3} {_f(r['rps'], ',.0f'):>8} "
            f"{_f(r.get('x_passthrough'), '.2f'):>5} {_f(r.get('x_passthrough_cpu'), '.2f'):>5} "
            f"{_f(r['p50_ms'], '.2f'):>7} "
            f"{_f(r['p99_ms'], '.2f'):>7} {_f(r.get('added_p50_ms'), '+.2f'):>14} "
            f"{_f(r['ttfc_p50_ms'], '.2f'):>8} {_f(r.get('added_ttfc_p50_ms'), '+.2f'):>6} "
            f"{_f(r['proxy_cpu_ms_per_req'], '.3f'):>10} {_f(r['db_cpu_ms_per_req'], '.3f'):>6} "
            f"{_f(r['peak_rss_mib'], '.0f'):>7}"
            + (f"  ERRORS {r['errors']}: {r['error_samples']}" if r["errors"] else ""))
    lines.append("(x pt = req/s / pass-through req/s, same round; cap = pass-through CPU/req / "
                 "(target CPU/req + db CPU/req): the throughput ratio the CPU costs imply for a "
                 "proxy alone on its CPU. Stream rows: p50/p99 = time to [DONE]; TTFC = time to "
                 "the first body chunk. direct has no proxy process)")
    for name, why in results.get("deaths", {}).items():
        lines.append(f"{name} DIED: {why}")
    sat = [r for r in results["rows"] if (r["client_cpu_util"] or 0) > 0.85]
    if sat:
        lines.append("client near saturation (>85% of a core) in: " + ", ".join(
            f"{r['target']}/{r['mode']}/C={r['concurrency']} ({r['client_cpu_util']:.0%})"
            for r in sat))
    side = [r for r in results["rows"] if p["layout_name"] == "proxy"
            and (r["client_cpu_util"] or 0) + (r["upstream_cpu_util"] or 0) > 0.9]
    if side:
        lines.append("client+upstream CPU near a full core in: " + ", ".join(
            f"{r['target']}/{r['mode']}/C={r['concurrency']} "
            f"({(r['client_cpu_util'] or 0) + (r['upstream_cpu_util'] or 0):.0%})" for r in side))
    foreign = [r["foreign_cores"] for r in results["rows"] if r["foreign_cores"] is not None]
    if foreign:
        busiest = max(results["rows"], key=lambda r: r["foreign_cores_max"])
        lines.append(f"other processes on this machine used a median "
                     f"{statistics.median(foreign):.2f} CPUs during the measurements (max "
                     f"{busiest['foreign_cores_max']:.2f}, in "
                     f"{busiest['target']}/{busiest['mode']}/C={busiest['concurrency']})")
    lines.append("")
    for row in results.get("limiter", []):
        lines.append(
            f"limiter cost {row['target']} {row['mode']} C={row['concurrency']}: limits on "
            f"{_f(row['rps_on'], ',.0f')}/s vs off {_f(row['rps_off'], ',.0f')}/s: ratio "
            f"{_f(row['ratio'], '.3f')} (rounds "
            f"{', '.join(f'{x:.3f}' for x in row['ratio_rounds'])}); CPU/req on/off "
            f"{_f(row['cpu_per_req_ratio'], '.3f')}: under 10% slower "
            f"{'MET' if row['ok'] else 'NOT MET'}")
    for v in results["verdicts"]:
        lines.append(f"target {v['target']} {v['mode']}: {v['what']}: {v['value']} "
                     f"{'MET' if v['ok'] else 'NOT MET'}")
    for name, c in results["checks"].items():
        lines.append(
            f"check {name}: {'OK' if c['ok'] else 'FAIL'} (successful requests "
            f"{c['successful_requests']}, consume records {c['consume_records']}, error records "
            f"{c['error_records']}, responses with a cost {c['responses_with_cost']}, "
            f"estimated usage {c['non_upstream_usage_records']}, ledger verify "
            f"{'passed' if c['ledger_verify_ok'] else 'FAILED: ' + c['ledger_verify']})")
    for name, profiles in results.get("profiles", {}).items():
        for prof in profiles:
            if "error" in prof:
                lines.append(f"profile {name}: {prof['error']}")
                continue
            lines += render_profile(name, prof, int(p.get("profile_top", 20)))
    return "\n".join(lines)


def render_profile(name: str, prof: dict[str, Any], top: int) -> list[str]:
    lines = [""]
    if prof["tool"] == "py-spy":
        lines += [(f"profile {name} {prof['mode']} C={prof['concurrency']}: {prof['samples']} "
                   f"py-spy --gil samples (Python work holding the GIL), "
                   f"{prof['rps_while_profiled']:,.0f} req/s while sampled; {prof['file']}"),
                  "  threads: " + ", ".join(f"{t} {v:.0f}%" for t, v in prof["threads"]),
                  "  self time (leaf frames):"]
        lines += [f"    {v:5.1f}%  {f}" for f, v in prof["self"]]
        lines.append("  inclusive (gateway and libraries):")
        lines += [f"    {v:5.1f}%  {f}" for f, v in prof["inclusive"]
                  if any(k in f for k in _TOLLWAY_FRAMES)][:top + 10]
        return lines
    lines.append(f"profile {name} {prof['mode']} C={prof['concurrency']} (cProfile, "
                 f"{prof['requests']} requests, {prof['rps_while_profiled']:,.0f} req/s and "
                 f"{prof['cpu_ms_per_req_while_profiled']:.2f} CPU ms/req under the profiler; "
                 "us/req = time in the function per request, waits included: GIL, "
                 "fsync in commit, the writer's idle queue.get):")
    for thread in ("loop", "writer"):
        if thread not in prof:
            continue
        t = prof[thread]
        lines.append(f"  {thread} thread: {t['us_per_request']:,.0f} us/req profiled "
                     f"({t['file']})")
        lines.append(f"    {'self us/req':>11} {'%':>5} {'calls':>7}  function")
        lines += [f"    {us:>11.1f} {pct:>5.1f} {nc:>7}  {label}"
                  for label, us, pct, nc in t["self"]]
        lines.append(f"    {'cum us/req':>11} {'%':>5} {'calls':>7}  function (tollway)")
        lines += [f"    {us:>11.1f} {pct:>5.1f} {nc:>7}  {label}"
                  for label, us, pct, nc in t["cumulative"]]
    return lines


def args_top(results: dict[str, Any]) -> int:
    return int(results["params"].get("profile_top", 20)) + 10


def routing_bench(n: int) -> dict[str, Any]:
    """CPU per request of the channel routing, in process (no network, no database): the
    old path (``registry.get(provider).send``) against ``gateway.failover.send`` with a model
    sold through two channels, each over an adapter that answers at once."""
    import asyncio
    import random
    from types import SimpleNamespace

    from tollway.gateway import failover
    from tollway.gateway.watchdog import Watchdog
    from tollway.pricing.catalog import ChannelSpec, ItemSpec
    from tollway.upstreams.base import BufferedResponse, UpstreamRequest
    from tollway.upstreams.channels import Board

    answer = BufferedResponse(200, b"{}")

    class Instant:
        async def send(self, request: UpstreamRequest) -> BufferedResponse:
            return answer

    adapters = {"a": Instant(), "b": Instant()}
    registry = SimpleNamespace(get=adapters.__getitem__)
    board = Board(rng=random.Random(1))
    board.configure([("m", ItemSpec(upstream_model="m", channels=(
        ChannelSpec("a", weight=3), ChannelSpec("b", weight=1))), "a")],
        {"a": ("openai", {}), "b": ("openai", {})})
    gw = SimpleNamespace(board=board, registry=registry, clock=lambda: 0, watchdog=Watchdog(),
                         read_timeout_s=600.0, headers_timeout_s=30.0)
    request = UpstreamRequest("POST", "/chat/completions", b"{}")

    async def direct() -> float:
        start = time.process_time()
        for _ in range(n):
            await registry.get("a").send(request)
        return time.process_time() - start

    async def routed() -> float:
        start = time.process_time()
        for _ in range(n):
            call = SimpleNamespace(item=SimpleNamespace(id="m"), channel=None, attempts=[])
            await failover.send(gw, call, "openai", lambda _c: request)  # type: ignore[arg-type]
        return time.process_time() - start

    async def run() -> tuple[float, float]:
        await direct()
        await routed()  # warm both
        return min([await direct() for _ in range(3)]), min([await routed() for _ in range(3)])

    before, after = asyncio.run(run())
    return {"requests": n, "direct_us": 1e6 * before / n, "failover_us": 1e6 * after / n,
            "routing_us": 1e6 * (after - before) / n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=("main", "upstream", "client", "tollway-cprofile"),
                    default="main", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--requests", type=int, default=1000,
                    help="requests per measurement (per target, mode, concurrency, round)")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="nonstream,stream")
    ap.add_argument("--warm", type=int, default=50,
                    help="untimed requests on fresh connections before each measurement")
    ap.add_argument("--postgres", metavar="URL",
                    help="also Tollway on a fresh database on this PostgreSQL server "
                         "(or TOLLWAY_BENCH_POSTGRES_URL)")
    ap.add_argument("--no-sqlite", action="store_true", help="skip Tollway on SQLite")
    ap.add_argument("--litellm", nargs="?", const="", default=None, metavar="PYTHON",
                    help="also LiteLLM's proxy; PYTHON is an interpreter that has "
                         "litellm[proxy] (default: this one, $TOLLWAY_BENCH_LITELLM_PYTHON, "
                         "var/litellm-venv)")
    ap.add_argument("--litellm-requests", type=int, default=200,
                    help="requests per LiteLLM measurement (it serves ~20-60 req/s)")
    ap.add_argument("--baseline-src", metavar="DIR",
                    help="also Tollway imported from this source tree (a `git archive` of "
                         "another commit's src/) on each backend, interleaved with the others: "
                         "a before/after comparison in one run (targets tollway-sqlite@base, "
                         "tollway-pg@base)")
    ap.add_argument("--limits", action="store_true",
                    help="also run each Tollway with every limit on (limiter cost)")
    ap.add_argument("--layout", choices=("proxy", "servers", "none"), default="proxy")
    ap.add_argument("--profile", metavar="DIR",
                    help="after the rounds, sample each Tollway server with py-spy (one "
                         "non-streaming and one streaming run at the highest concurrency)")
    ap.add_argument("--profile-tool", choices=("cprofile", "py-spy"), default="cprofile",
                    help="cprofile: a second server on the same database under cProfile (loop "
                         "and writer threads, exact call counts, inflated Python call cost); "
                         "py-spy: samples the measured server (pip install py-spy)")
    ap.add_argument("--profile-requests", type=int, default=3000)
    ap.add_argument("--profile-top", type=int, default=20)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--channels", type=int, default=1, metavar="N",
                    help="sell the bench model through N channels (selection on every request)")
    ap.add_argument("--routing", type=int, nargs="?", const=200_000, metavar="N",
                    help="only measure the CPU the channel routing adds per request, in "
                         "process: N sends through gateway.failover (two channels) against N "
                         "direct sends to one adapter (the path before channels), then exit")
    if argv is None and len(sys.argv) > 2 and sys.argv[1:3] == ["--role", "tollway-cprofile"]:
        return run_profiled_tollway(sys.argv[3:])
    args = ap.parse_args(argv)
    global CHANNELS
    CHANNELS = args.channels
    if args.routing:
        result = routing_bench(args.routing)
        print(json.dumps(result, indent=2) if args.json else
              f"routing: {result['direct_us']:.2f} µs/req direct (one adapter, before "
              f"channels), {result['failover_us']:.2f} µs/req through gateway.failover (two "
              f"channels, weighted 3:1): +{result['routing_us']:.2f} µs CPU per request "
              f"(target ≤ 20 µs) over {result['requests']} requests")
        return 0
    if args.role == "upstream":
        run_upstream(args.port)
        return 0
    if args.role == "client":
        run_client()
        return 0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    concs = [int(c) for c in args.concurrency.split(",") if c.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    layout = make_layout(args.layout)
    work = Path(tempfile.mkdtemp(prefix="tollway-gwbench-"))
    started = time.monotonic()
    procs: list[Proc] = []
    targets: list[Target] = []
    client: Client | None = None
    pg: PostgresDatabase | None = None
    pg_limits: PostgresDatabase | None = None
    pg_base: PostgresDatabase | None = None
    results: dict[str, Any] = {"machine": machine(), "params": {
        "requests": args.requests, "concurrency": concs, "rounds": args.rounds,
        "modes": modes, "warm": args.warm, "layout": layout.describe(),
        "layout_name": layout.name, "profile_top": args.profile_top,
        "command": " ".join([Path(sys.executable).name, "bench/gateway.py",
                             *(argv if argv is not None else sys.argv[1:])])}}
    notes: dict[str, str] = {}
    try:
        up_port = free_port()
        upstream = Proc("upstream", [sys.executable, str(Path(__file__).resolve()), "--role",
                                     "upstream", "--port", str(up_port)], work,
                        cpu=layout.upstream)
        procs.append(upstream)
        up_base = f"http://127.0.0.1:{up_port}"
        upstream.wait_http(up_base + "/healthz")
        log(f"[setup] fake upstream on :{up_port} (pid {upstream.pid}); work dir {work}")
        plain = {"Authorization": "Bearer sk-none", "Content-Type": "application/json"}
        targets.append(Target("direct", up_base + "/v1/chat/completions", plain, None,
                              kind="direct"))

        pt_port = free_port()
        pt = Proc("passthrough", [sys.executable, str(HERE / "passthrough.py"), "--upstream",
                                  up_base, "--port", str(pt_port)], work, cpu=layout.proxy)
        procs.append(pt)
        pt.wait_http(f"http://127.0.0.1:{pt_port}/healthz")
        log(f"[setup] passthrough on :{pt_port} (pid {pt.pid})")
        targets.append(Target("passthrough", f"http://127.0.0.1:{pt_port}/v1/chat/completions",
                              plain, pt, kind="passthrough"))

        if not args.no_sqlite:
            t = start_tollway("tollway-sqlite", f"sqlite:///{work / 'tollway.db'}", up_base,
                              work, layout.proxy, log)
            procs.append(t.proc)  # type: ignore[arg-type]
            targets.append(t)
            sync = os.environ.get("TOLLWAY_SQLITE_SYNCHRONOUS", "normal (the default)")
            notes["tollway-sqlite"] = (f"SQLite file in {work} (ext4; WAL, synchronous={sync}; "
                                       "a baseline runs its own default)")
            if args.limits:
                t = start_tollway("tollway-sqlite+limits",
                                  f"sqlite:///{work / 'tollway-limits.db'}", up_base, work,
                                  layout.proxy, log, limits=True)
                procs.append(t.proc)  # type: ignore[arg-type]
                targets.append(t)
                notes["tollway-sqlite+limits"] = "the same, every limit on (none reached)"
        if args.baseline_src and not args.no_sqlite:
            src = str(Path(args.baseline_src).resolve())
            t = start_tollway("tollway-sqlite@base", f"sqlite:///{work / 'tollway-base.db'}",
                              up_base, work, layout.proxy, log, src=src)
            procs.append(t.proc)  # type: ignore[arg-type]
            targets.append(t)
            notes["tollway-sqlite@base"] = (f"the same, tollway imported from {src} "
                                            f"(source digest {source_digest(src)})")
        pg_url = args.postgres or os.environ.get("TOLLWAY_BENCH_POSTGRES_URL")
        if pg_url:
            pg = PostgresDatabase(pg_url)
            pinned = layout.database is not None and pg.pin(layout.database)
            t = start_tollway("tollway-pg", pg.url, up_base, work, layout.proxy, log)
            t.db_root_pid = pg.postmaster
            procs.append(t.proc)  # type: ignore[arg-type]
            targets.append(t)
            if args.limits:
                pg_limits = PostgresDatabase(pg_url, "_limits")
                t = start_tollway("tollway-pg+limits", pg_limits.url, up_base, work,
                                  layout.proxy, log, limits=True)
                t.db_root_pid = pg.postmaster
                procs.append(t.proc)  # type: ignore[arg-type]
                targets.append(t)
                notes["tollway-pg+limits"] = (f"the same server, fresh database "
                                              f"{pg_limits.name}, every limit on (none reached)")
            if args.baseline_src:
                src = str(Path(args.baseline_src).resolve())
                pg_base = PostgresDatabase(pg_url, "_base")
                t = start_tollway("tollway-pg@base", pg_base.url, up_base, work, layout.proxy,
                                  log, src=src)
                t.db_root_pid = pg.postmaster
                procs.append(t.proc)  # type: ignore[arg-type]
                targets.append(t)
                notes["tollway-pg@base"] = (f"the same server, fresh database {pg_base.name}, "
                                            f"tollway imported from {src}")
            notes["tollway-pg"] = (
                f"PostgreSQL {pg.version} (fsync={pg.settings['fsync']}, synchronous_commit="
                f"{pg.settings['synchronous_commit']}), fresh database {pg.name}; server "
                + (f"pinned to CPU {layout.database}" if pinned else "not pinned")
                + ("; its CPU is the 'db CPU' column" if pg.postmaster else
                   "; not local: its CPU is not measured"))
        if args.litellm is not None:
            py = litellm_python(args.litellm)
            if py is None:
                notes["litellm"] = ("skipped: no interpreter with litellm[proxy] importable "
                                    "(pip install 'litellm[proxy]')")
                log("[setup] " + notes["litellm"])
            else:
                try:
                    t = start_litellm(py, up_base, work, layout.proxy, log)
                    t.requests = args.litellm_requests
                    procs.append(t.proc)  # type: ignore[arg-type]
                    targets.append(t)
                    notes["litellm"] = "; ".join(t.notes) + (
                        f"; {t.requests} requests per measurement, 10 warm-up")
                except RuntimeError as exc:
                    notes["litellm"] = f"skipped: it did not start: {str(exc)[-400:]}"
                    log("[setup] " + notes["litellm"])
        results["target_notes"] = notes

        client = Client(layout.client)
        log(f"[setup] load generator pid {client.popen.pid}; {layout.describe()}")
        everyone = ([client.popen.pid, *(p.pid for p in procs)],
                    [t.db_root_pid for t in targets if t.db_root_pid])
        # Warm every target up once: imports, tokenizer, pools, caches, JIT-less first calls.
        for t in targets:
            for mode in modes:
                measure(t, upstream, client, mode, max(concs),
                        max(100, requests_for(t, args.requests) // 5),
                        10 if t.requests else args.warm, everyone)
        log(f"[setup] warm-up done ({time.monotonic() - started:.0f}s)")

        runs: dict[tuple[str, str, int], list[dict[str, Any]]] = collections.defaultdict(list)
        for r in range(args.rounds):
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            for mode in modes:
                for c in concs:
                    msg = []
                    for t in order:
                        if t.died:
                            continue
                        res = measure(t, upstream, client, mode, c,
                                      requests_for(t, args.requests),
                                      10 if t.requests else args.warm, everyone)
                        runs[(t.name, mode, c)].append(res)
                        if t.proc and t.proc.popen.poll() is not None:
                            t.died = (f"exited with status {t.proc.popen.returncode} during "
                                      f"round {r + 1}, {mode} C={c}; log {t.proc.log_path}:\n"
                                      + t.proc.tail(15))
                            log(f"[round {r + 1}] {t.name} DIED: {t.died}")
                        msg.append(f"{t.name} {res['rps']:,.0f}/s p50 {res['p50_ms']:.2f}"
                                   + (f" ({res['errors']} errors)" if res["errors"] else ""))
                    log(f"[round {r + 1}/{args.rounds}] {mode} C={c}: " + "; ".join(msg))
        for t in targets:
            if t.proc and not t.died:
                t.peak_rss_mib = rss_mib(t.proc.pid)
        results["deaths"] = {t.name: t.died for t in targets if t.died}
        results["rows"] = summarise(runs, targets, modes, concs, args.rounds)
        results["verdicts"] = verdicts(results["rows"], concs)
        results["limiter"] = limiter_costs(runs, targets, modes, concs)

        if args.profile:
            out = Path(args.profile)
            out.mkdir(parents=True, exist_ok=True)
            results["profiles"] = {}
            for t in targets:
                if t.kind == "tollway":
                    results["profiles"][t.name] = profile_target(
                        t, client, args, out, modes, max(concs), layout, work, log)

        client.stop()
        client = None
        for t in targets:  # stop servers before the checks: every write is flushed
            if t.proc and t.kind == "tollway":
                t.proc.stop()
        results["checks"] = {}
        for t in targets:
            if t.kind == "tollway":
                t.check = check_tollway(t)
                results["checks"][t.name] = t.check
        results["ok"] = all(c["ok"] for c in results["checks"].values())
        results["source_digest_at_end"] = source_digest()
        if results["source_digest_at_end"] != results["machine"]["source_digest"]:
            log("WARNING: the tollway source changed during the run: targets may have run "
                "different code")
        results["seconds"] = time.monotonic() - started
    finally:
        if client is not None:
            client.stop()
        for p in reversed(procs):
            p.stop()
        if pg is not None:
            pg.drop()
        if pg_limits is not None:
            pg_limits.drop()
        if pg_base is not None:
            pg_base.drop()
        if (results.get("ok") and not results.get("deaths")
                and not os.environ.get("TOLLWAY_BENCH_KEEP")):
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work dir kept: {work}")
    print(json.dumps(results, indent=2) if args.json else render(results))
    log(f"done in {results['seconds']:.0f}s")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
