"""Overload and soak: peak memory under a flood, and no memory growth over a long run.

    python bench/soak.py [--requests 1000000] [--concurrency 64] [--workers 2]
                         [--flood 4000] [--max-inflight 256] [--max-seconds S] [--json FILE]

One ``tollway serve --workers W`` on a fresh SQLite database (``var/soak/``) with the sandbox
catalog (examples/catalog.yaml: no network, no upstream keys) and one account with enough
credit for the whole run.

1. **Flood**: ``--flood`` requests at once, each on its own connection, against a server
   whose workers admit ``--max-inflight`` each: the answers are counted by status and code
   (200 or 503 ``overloaded``; never anything else), and each worker's peak RSS (VmHWM) read.
2. **Soak**: ``--requests`` sandbox requests (chat, per-call search, stock quote: the three
   cheapest paths through billing) over ``--concurrency`` keep-alive connections (aiohttp),
   stopping early at ``--max-seconds``. Each worker's RSS (``/proc/<pid>/status`` VmRSS) is
   sampled every 5% of the run and printed as a table; "growth" compares the last sample with
   the one at 20% (after caches, pools and the allocator have warmed up).
3. **Books**: the usage records equal the successful requests, the balance equals credit
   minus the sum of the costs the clients were told, no open holds, ``tollway ledger verify``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
TOLLWAY = Path(sys.executable).parent / "tollway"
ADMIN = "soak-admin"
NANO = Decimal(1_000_000_000)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB."""
    rss = peak = 0
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1])
    return rss, peak


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


class Served:
    def __init__(self, workdir: Path, workers: int, max_inflight: int) -> None:
        self.workdir = workdir
        self.workers = workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
        self.env.update({"TOLLWAY_DATABASE_URL": f"sqlite:///{workdir / 'soak.db'}",
                         "TOLLWAY_DATA_DIR": str(workdir / "data"), "TOLLWAY_ADMIN_TOKEN": ADMIN,
                         "TOLLWAY_MAX_INFLIGHT_REQUESTS": str(max_inflight),
                         "TOLLWAY_LOG_REQUESTS": "errors"})
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> str:
        done = subprocess.run([str(TOLLWAY), "--json", *args], env=self.env,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"tollway {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout

    def start(self) -> None:
        log = (self.workdir / "serve.log").open("ab")
        self.proc = subprocess.Popen(
            [str(TOLLWAY), "serve", "--workers", str(self.workers), "--port", str(self.port)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        ok = 0
        while ok < 2 * self.workers:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("tollway serve did not start: see " +
                                   str(self.workdir / "serve.log"))
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=5):
                    ok += 1
            except OSError:
                ok = 0
                time.sleep(0.2)

    def pids(self) -> list[int]:
        assert self.proc is not None
        workers = [p for p in children(self.proc.pid)
                   if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
        return workers or [self.proc.pid]

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)


REQUESTS = (
    ("POST", "/v1/chat/completions",
     {"model": "sandbox-chat", "messages": [{"role": "user", "content": "soak"}]}),
    ("GET", "/apis/v1/search/web?q=soak", None),
    ("GET", "/apis/v1/finance/quote/ACME", None),
)


async def flood(url: str, key: str, count: int) -> tuple[Counter[str], int]:
    """``count`` requests at once, one connection each: outcomes and the costs told."""
    seen: Counter[str] = Counter()
    cost_nano = 0
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                     timeout=timeout) as session:
        async def one(i: int) -> None:
            nonlocal cost_nano
            method, path, body = REQUESTS[i % len(REQUESTS)]
            try:
                async with session.request(method, url + path, json=body, headers={
                        "Authorization": f"Bearer {key}"}) as response:
                    raw = await response.read()
                    code = "" if response.status == 200 else json.loads(raw)["error"]["code"]
                    if response.status == 200:
                        cost_nano += int(Decimal(response.headers["x-tollway-cost-usd"]) * NANO)
                    seen[f"{response.status} {code}".strip()] += 1
            except (aiohttp.ClientError, OSError) as exc:
                seen[f"client error {type(exc).__name__}"] += 1

        await asyncio.gather(*(one(i) for i in range(count)))
    return seen, cost_nano


async def soak(served: Served, key: str, total: int, concurrency: int,
               max_seconds: float) -> dict[str, Any]:
    done = 0
    ok = 0
    cost_nano = 0
    failures: Counter[str] = Counter()
    samples: list[tuple[int, float, list[int]]] = []
    step = max(total // 20, 1)
    started = time.monotonic()
    stop_at = started + max_seconds
    counter = iter(range(total))
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def worker() -> None:
            nonlocal done, ok, cost_nano
            for i in counter:
                if time.monotonic() > stop_at:
                    return
                method, path, body = REQUESTS[i % len(REQUESTS)]
                async with session.request(method, served.url + path, json=body,
                                           headers=headers) as response:
                    await response.read()
                    if response.status == 200:
                        ok += 1
                        cost_nano += int(Decimal(response.headers["x-tollway-cost-usd"]) * NANO)
                    else:
                        failures[str(response.status)] += 1
                done += 1
                if done % step == 0:
                    samples.append((done, time.monotonic() - started,
                                    [memory(p)[0] for p in served.pids()]))

        samples.append((0, 0.0, [memory(p)[0] for p in served.pids()]))
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    samples.append((done, elapsed, [memory(p)[0] for p in served.pids()]))
    return {"requests": done, "ok": ok, "cost_nano": cost_nano, "failures": dict(failures),
            "seconds": elapsed, "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--flood", type=int, default=4000)
    parser.add_argument("--max-inflight", type=int, default=256)
    parser.add_argument("--max-seconds", type=float, default=6 * 3600)
    parser.add_argument("--json", help="append the results as one JSON line to this file")
    args = parser.parse_args()

    workdir = ROOT / "var" / "soak"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    served = Served(workdir, args.workers, args.max_inflight)
    served.cli("db", "upgrade")
    served.cli("catalog", "apply", str(ROOT / "examples" / "catalog.yaml"))
    account = json.loads(served.cli("accounts", "create", "soak"))["id"]
    credit_usd = 1_000_000
    served.cli("topup", str(account), str(credit_usd))
    key = json.loads(served.cli("keys", "create", str(account)))["key"]
    served.start()
    result: dict[str, Any] = {"test": "overload + soak", "workers": args.workers}
    flood_cost = 0
    try:
        pids = served.pids()
        print(f"tollway serve --workers {args.workers}: worker pids {pids}", flush=True)
        if args.flood:
            seen, flood_cost = asyncio.run(flood(served.url, key, args.flood))
            peaks = [memory(p)[1] for p in pids]
            print(f"flood of {args.flood} concurrent requests, max_inflight_requests="
                  f"{args.max_inflight} per worker: {dict(seen)}", flush=True)
            print(f"peak RSS per worker after the flood (VmHWM): "
                  f"{', '.join(f'{kb / 1024:.0f} MiB' for kb in peaks)}", flush=True)
            result.update({"flood": args.flood, "flood_outcomes": dict(seen),
                           "flood_peak_rss_mib": [round(kb / 1024) for kb in peaks]})
        out = asyncio.run(soak(served, key, args.requests, args.concurrency, args.max_seconds))
        final_peaks = [memory(p)[1] for p in served.pids()]
    finally:
        served.stop()

    print(f"\nsoak: {out['requests']:,} requests in {out['seconds']:.0f} s "
          f"({out['requests'] / max(out['seconds'], 1e-9):,.0f}/s), {out['ok']:,} ok, "
          f"failures {out['failures'] or 'none'}")
    print(f"{'requests':>12} {'seconds':>9}  " + "  ".join(
        f"{'worker ' + str(i) + ' RSS':>16}" for i in range(len(out['samples'][0][2]))))
    for count, seconds, rss in out["samples"]:
        print(f"{count:>12,} {seconds:>9.0f}  " + "  ".join(f"{kb / 1024:>12.1f} MiB"
                                                            for kb in rss))
    samples = out["samples"]
    warm = samples[min(len(samples) - 1, max(1, len(samples) // 5))]
    last = samples[-1]
    growth = [round((b - a) / 1024, 1) for a, b in zip(warm[2], last[2], strict=False)]
    print(f"RSS growth from {warm[0]:,} to {last[0]:,} requests: "
          f"{', '.join(f'{g:+.1f} MiB' for g in growth)}")

    db = sqlite3.connect(workdir / "soak.db")
    records = db.execute("SELECT count(*), coalesce(sum(cost_nano), 0) FROM usage_records "
                         "WHERE type = 'consume'").fetchone()
    available, held = db.execute("SELECT available_nano, held_nano FROM accounts WHERE id = ?",
                                 (account,)).fetchone()
    open_holds = db.execute("SELECT count(*) FROM holds WHERE status = 'open'").fetchone()[0]
    db.close()
    verified = subprocess.run([str(TOLLWAY), "ledger", "verify"], env=served.env,
                              capture_output=True, text=True)
    books = {
        "records_equal_ok": records[0] == out["ok"] + result.get("flood_outcomes", {}).get(
            "200", 0),
        "balance_exact": available == credit_usd * 1_000_000_000 - int(records[1]),
        "client_costs_equal_records": int(records[1]) == out["cost_nano"] + flood_cost,
        "open_holds": open_holds, "held": held,
        "ledger_verify": verified.returncode == 0,
    }
    print(f"books: {books}")
    result.update({"requests": out["requests"], "ok": out["ok"], "seconds": round(out["seconds"]),
                   "rps": round(out["requests"] / max(out["seconds"], 1e-9)),
                   "rss_mib_samples": [[c, round(s), [round(kb / 1024, 1) for kb in r]]
                                       for c, s, r in samples],
                   "rss_growth_mib": growth,
                   "peak_rss_mib": [round(kb / 1024) for kb in final_peaks], "books": books})
    if args.json:
        with open(args.json, "a") as out_file:
            out_file.write(json.dumps(result) + "\n")
    ok = all(books[k] for k in ("records_equal_ok", "balance_exact", "ledger_verify",
                                "client_costs_equal_records")) and open_holds == held == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
