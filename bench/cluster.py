"""Scale-out benchmark: several ``tollway serve`` instances on ONE PostgreSQL database.

    python bench/cluster.py --postgres URL [--instances 3] [--accounts 100] [--requests 3000]
                            [--concurrency 48] [--rounds 3] [--mode nonstream|stream]
                            [--drain 2000] [--json]

Issue 12's scale-out target: three instances sharing one ledger, with ALL traffic on ONE
account, reach at least 0.8 x the throughput of the same load spread over 100 accounts (a hot
account's row lock must not serialise the cluster).

Pieces (all on 127.0.0.1, reused from ``bench/gateway.py``): the fake upstream; a fresh
database on the PostgreSQL server (dropped after) with the catalog, one *hot* account with one
key, ``--accounts`` *spread* accounts with a key each, and a *drain* account; ``--instances``
``tollway serve`` processes (1 worker each, not pinned) on that database; one load generator
(aiohttp, closed loop, C workers) that sends request n to instance ``n mod I`` with key
``n mod K`` (K = 1 for "hot", ``--accounts`` for "spread"; I and K coprime, so every instance
sees every key). Rounds alternate hot and spread (order rotated each round); figures are
medians, the ratio is the median of the per-round ratios hot / spread.

Checks, after the instances are stopped (exit status 1 if one fails):

* usage records of type ``consume`` == successful requests, per account (hot, spread, drain);
  no ``error`` records;
* no overdraft: every customer account has ``available_nano >= 0`` and ``held_nano == 0``;
* ``tollway ledger verify`` clean;
* the *drain* phase (``--drain N``, 0 to skip): an account funded for about half of N
  requests takes N requests over all instances at once: some must be refused (402), every
  success has its record, and the balance ends at zero or above.

The machine's load (``/proc/loadavg``) and the CPU other processes used are printed with the
figures: on a shared 2-core machine they decide how much the absolute numbers mean.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gateway as gw  # noqa: E402 - bench/ is not a package

USD = 10**9  # nano-USD


class ClusterLoadClient(gw.LoadClient):
    """Request n goes to ``urls[n % len(urls)]`` with ``keys[n % len(keys)]``."""

    async def open(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.urls: list[str] = cmd["urls"]
        self.key_headers = [{"Authorization": f"Bearer {k}",
                             "Content-Type": "application/json"} for k in cmd["keys"]]
        self.sent = 0
        return await super().open({**cmd, "url": self.urls[0],
                                   "headers": self.key_headers[0]})

    def _next(self) -> tuple[str, dict[str, str]]:
        n = self.sent
        self.sent += 1
        return self.urls[n % len(self.urls)], self.key_headers[n % len(self.key_headers)]


def setup_accounts(db_url: str, spread: int, drain_nano: int) -> dict[str, Any]:
    """The hot, spread and drain accounts with a key each (in process: 300 CLI calls would
    take minutes). Returns {"hot": [key], "spread": [keys], "drain": [key], "ids": {...}}."""
    from tollway import clock
    from tollway.billing import credits, logins
    from tollway.billing import keys as key_ops
    from tollway.store.db import Database

    db = Database(db_url)
    out: dict[str, Any] = {"ids": {}}
    plan = ([("hot", "cluster-hot", 1_000_000 * USD)]
            + [("spread", f"cluster-spread-{i:03d}", 10_000 * USD) for i in range(spread)]
            + [("drain", "cluster-drain", drain_nano)])
    try:
        for role, name, amount in plan:
            with db.write() as conn:
                account = logins.create_account(conn, name, "default")
                credits.topup(conn, account.id, amount, idempotency_key=f"fund-{name}",
                              at_ms=clock.now_ms())
                new = key_ops.create_key(conn, account.id, at_ms=clock.now_ms(), name=name)
            out.setdefault(role, []).append(new.secret)
            out["ids"].setdefault(role, []).append(account.id)
    finally:
        db.dispose()
    return out


def start_instances(n: int, db_url: str, upstream_base: str, work: Path,
                    log: Any) -> list[gw.Proc]:
    cli = gw._tollway_cli()
    env = {"TOLLWAY_DATA_DIR": str(work), "TOLLWAY_BENCH_UPSTREAM_KEY": "sk-fake-upstream"}
    procs = []
    for i in range(n):
        port = gw.free_port()
        proc = gw.Proc(f"tollway-{i + 1}", cli + ["serve", "--host", "127.0.0.1", "--port",
                                                  str(port), "--database-url", db_url],
                       work, cpu=None, env=env)
        proc.port = port  # type: ignore[attr-defined]
        procs.append(proc)
    for proc in procs:
        proc.wait_http(f"http://127.0.0.1:{proc.port}/healthz")  # type: ignore[attr-defined]
        log(f"[setup] {proc.name}: tollway serve on :{proc.port} (pid {proc.pid})")  # type: ignore[attr-defined]
    return procs


class WaitSampler:
    """What the database's client backends are doing, sampled from ``pg_stat_activity``
    every 20 ms while a run lasts: the database side's profile. Per sample each backend of
    the benchmark database is one of: ``lock`` (waiting for a lock another transaction holds:
    the hot account's row), ``in-transaction`` (idle in transaction: the server waits for the
    client's next statement, a round trip or the client's own work, locks held), ``active``
    (executing, or waiting on I/O or the CPU) and ``idle`` (no transaction)."""

    def __init__(self, url: str) -> None:
        import threading

        import psycopg

        self.conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"),
                                    autocommit=True)
        self.counts: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sql = ("SELECT state, wait_event_type FROM pg_stat_activity WHERE datname = "
               "current_database() AND pid <> pg_backend_pid() "
               "AND backend_type = 'client backend'")
        while not self.stop.wait(0.02):
            rows = self.conn.execute(sql).fetchall()
            self.samples += 1
            for state, wait in rows:
                kind = ("lock" if wait == "Lock" else "in-transaction"
                        if state and state.startswith("idle in transaction") else
                        "idle" if state == "idle" else "active")
                self.counts[kind] += 1

    def result(self) -> dict[str, float]:
        self.stop.set()
        self.thread.join()
        self.conn.close()
        n = max(1, self.samples)
        return {kind: self.counts[kind] / n for kind in ("lock", "in-transaction", "active",
                                                         "idle")}


def run_phase(client: gw.Client, urls: list[str], keys: list[str], body: str, stream: bool,
              concurrency: int, requests: int, warm: int, pids: list[int],
              db_root: int | None, db_url: str) -> dict[str, Any]:
    opened = client.call(op="open", urls=urls, keys=keys, body=body, stream=stream,
                         concurrency=concurrency, warm=warm)
    cpu0 = gw.ours_cpu_seconds(pids, [])
    db0 = gw.tree_cpu_seconds(db_root) if db_root else 0.0
    sys0 = gw.system_busy_seconds()
    sampler = WaitSampler(db_url)
    res = client.call(op="run", requests=requests)
    res["backends"] = sampler.result()
    sys1 = gw.system_busy_seconds()
    cpu1 = gw.ours_cpu_seconds(pids, [])
    db1 = gw.tree_cpu_seconds(db_root) if db_root else 0.0
    client.call(op="close")
    sent = max(1, res["sent"])
    ours = (cpu1 - cpu0) + (db1 - db0) + res["client_cpu_s"]
    res.update(
        warm_ok=opened["ok"], warm_errors=opened["errors"],
        instances_cpu_ms_per_req=1e3 * (cpu1 - cpu0) / sent,
        db_cpu_ms_per_req=1e3 * (db1 - db0) / sent,
        foreign_cores=max(0.0, (sys1 - sys0) - ours) / res["seconds"] if res["seconds"] else 0)
    return res


def check(db_url: str, ids: dict[str, list[int]], ok: dict[str, int]) -> dict[str, Any]:
    import sqlalchemy as sa

    from tollway.store.db import Database
    from tollway.store.tables import accounts, usage_records

    db = Database(db_url)
    try:
        with db.read() as conn:
            by_account = {int(a): int(n) for a, n in conn.execute(
                sa.select(usage_records.c.account_id, sa.func.count())
                .where(usage_records.c.type == "consume")
                .group_by(usage_records.c.account_id)).all()}
            errors = conn.execute(sa.select(sa.func.count()).select_from(usage_records)
                                  .where(usage_records.c.type == "error")).scalar_one()
            wallets = conn.execute(sa.select(accounts.c.id, accounts.c.available_nano,
                                             accounts.c.held_nano)
                                   .where(accounts.c.kind == "customer")).all()
    finally:
        db.dispose()
    records = {role: sum(by_account.get(i, 0) for i in ids[role]) for role in ids}
    overdrawn = [int(w.id) for w in wallets if w.available_nano < 0 or w.held_nano != 0]
    drain_left = next(int(w.available_nano) for w in wallets if w.id == ids["drain"][0])
    verify = gw.subprocess.run(gw._tollway_cli() + ["ledger", "verify", "--database-url",
                                                    db_url], capture_output=True, text=True,
                               cwd=str(gw.ROOT))
    result = {
        "records": records, "successful_requests": ok, "error_records": int(errors),
        "accounts_negative_or_still_held": overdrawn, "drain_available_nano": drain_left,
        "ledger_verify_ok": verify.returncode == 0,
        "ledger_verify": (verify.stdout + verify.stderr).strip()[-500:]}
    result["ok"] = records == ok and errors == 0 and not overdrawn and verify.returncode == 0
    return result


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def render(r: dict[str, Any]) -> str:
    p = r["params"]
    lines = [(f"bench/cluster.py: {p['instances']} tollway instances (1 worker each) on one "
              f"PostgreSQL database ({r['postgres']}), {p['mode']}, C={p['concurrency']}, "
              f"{p['requests']} requests per run, {p['rounds']} rounds"),
             (f"machine: {r['machine']['nproc']} CPUs, {r['machine']['date']}, loadavg before "
              f"{r['loadavg_before']}, after {r['loadavg_after']}"), "",
             ("| load | req/s median (rounds) | p50 ms | p99 ms | instances CPU ms/req | "
              "db CPU ms/req | other processes, cores |"), "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("hot", "spread"):
        rs = r["runs"][name]
        label = "1 account" if name == "hot" else f"{p['accounts']} accounts"
        lines.append(
            f"| {label} | {_median([x['rps'] for x in rs]):,.0f} "
            f"({', '.join(format(x['rps'], ',.0f') for x in rs)}) | "
            f"{_median([x['p50_ms'] for x in rs]):.1f} | {_median([x['p99_ms'] for x in rs]):.1f}"
            f" | {_median([x['instances_cpu_ms_per_req'] for x in rs]):.2f} | "
            f"{_median([x['db_cpu_ms_per_req'] for x in rs]):.2f} | "
            f"{_median([x['foreign_cores'] for x in rs]):.2f} |")
    lines += ["", ("Database backends, mean count per sample (pg_stat_activity every 20 ms): "
              "waiting for a lock / idle in transaction (waiting for the client) / active / "
              "idle")]
    for name in ("hot", "spread"):
        b = [x["backends"] for x in r["runs"][name]]
        lines.append(f"- {name}: " + " / ".join(
            f"{_median([x[k] for x in b]):.2f}" for k in ("lock", "in-transaction", "active",
                                                          "idle")))
    lines += ["", f"hot / spread: **{r['ratio']:.2f}** (rounds: "
              + ", ".join(f"{x:.2f}" for x in r["ratio_rounds"]) + "; target >= 0.8)"]
    if r.get("drain"):
        d = r["drain"]
        lines.append(f"drain: {d['sent']} requests on an account funded for about half: "
                     f"{d['ok']} served, {d['errors']} refused "
                     f"({'; '.join(e[:60] for e in d['error_samples'])})")
    c = r["check"]
    lines.append(f"check: {'OK' if c['ok'] else 'FAILED'} - records {c['records']} vs "
                 f"successful {c['successful_requests']}, {c['error_records']} error records, "
                 f"overdrawn or still held: {c['accounts_negative_or_still_held'] or 'none'}, "
                 f"ledger verify {'clean' if c['ledger_verify_ok'] else c['ledger_verify']}")
    errs = sum(x["errors"] + x["warm_errors"] for n in ("hot", "spread") for x in r["runs"][n])
    if errs:
        lines.append(f"{errs} failed requests in the measured runs: "
                     + "; ".join(sorted({e for n in ("hot", "spread") for x in r["runs"][n]
                                         for e in x["error_samples"]})[:3]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=("main", "client"), default="main",
                    help=argparse.SUPPRESS)
    ap.add_argument("--postgres", metavar="URL",
                    help="PostgreSQL server (or TOLLWAY_BENCH_POSTGRES_URL)")
    ap.add_argument("--instances", type=int, default=3)
    ap.add_argument("--accounts", type=int, default=100, help="accounts of the spread load")
    ap.add_argument("--requests", type=int, default=3000, help="requests per run")
    ap.add_argument("--concurrency", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mode", choices=("nonstream", "stream"), default="nonstream")
    ap.add_argument("--drain", type=int, default=2000, metavar="N",
                    help="requests of the no-overdraft phase (0: skip)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.role == "client":
        gw.run_client(ClusterLoadClient)
        return 0
    pg_url = args.postgres or os.environ.get("TOLLWAY_BENCH_POSTGRES_URL")
    if not pg_url:
        ap.error("--postgres URL (or TOLLWAY_BENCH_POSTGRES_URL) is required")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="tollway-cluster-"))
    stream = args.mode == "stream"
    body = gw.request_body(stream)
    procs: list[gw.Proc] = []
    client: gw.Client | None = None
    pg: gw.PostgresDatabase | None = None
    started = time.monotonic()
    results: dict[str, Any] = {"machine": gw.machine(), "params": vars(args),
                               "loadavg_before": Path("/proc/loadavg").read_text().split()[:3]}
    try:
        up_port = gw.free_port()
        upstream = gw.Proc("upstream", [sys.executable, str(gw.HERE / "gateway.py"), "--role",
                                        "upstream", "--port", str(up_port)], work, cpu=None)
        procs.append(upstream)
        up_base = f"http://127.0.0.1:{up_port}"
        upstream.wait_http(up_base + "/healthz")
        pg = gw.PostgresDatabase(pg_url, "_cluster")
        results["postgres"] = (f"PostgreSQL {pg.version}, fsync={pg.settings['fsync']}, "
                               f"synchronous_commit={pg.settings['synchronous_commit']}")
        cli, common = gw._tollway_cli(), ["--database-url", pg.url]
        catalog = work / "catalog.yaml"
        catalog.write_text(gw._catalog(up_base))
        env = {**os.environ, "TOLLWAY_DATA_DIR": str(work)}
        gw._run(cli + ["db", "upgrade", *common], env=env)
        gw._run(cli + ["catalog", "apply", str(catalog), *common], env=env)
        # The drain account affords about half of its requests (each costs 20 prompt tokens
        # at $0.15/1M + 10 completion tokens at $0.60/1M = $0.000009, the fake's usage).
        per_request_nano = 20 * 150 + 10 * 600
        accounts = setup_accounts(pg.url, args.accounts,
                                  max(1, args.drain // 2) * per_request_nano)
        log(f"[setup] database {pg.name}: 1 hot + {args.accounts} spread + 1 drain account")
        instances = start_instances(args.instances, pg.url, up_base, work, log)
        procs += instances
        urls = [f"http://127.0.0.1:{p.port}/v1/chat/completions"  # type: ignore[attr-defined]
                for p in instances]
        pids = [p.pid for p in instances]
        client = gw.Client(None, Path(__file__).resolve())
        ok = {"hot": 0, "spread": 0, "drain": 0}
        # Warm-up: every key used on every instance (key caches, pools, prepared statements).
        for name in ("hot", "spread"):
            res = run_phase(client, urls, accounts[name], body, stream, args.concurrency,
                            max(300, args.instances * len(accounts[name]) * 2),
                            args.concurrency, pids, pg.postmaster, pg.url)
            ok[name] += res["ok"] + res["warm_ok"]
        log(f"[setup] warm-up done ({time.monotonic() - started:.0f}s)")
        runs: dict[str, list[dict[str, Any]]] = {"hot": [], "spread": []}
        for r in range(args.rounds):
            order = ("hot", "spread") if r % 2 == 0 else ("spread", "hot")
            for name in order:
                res = run_phase(client, urls, accounts[name], body, stream, args.concurrency,
                                args.requests, args.concurrency, pids, pg.postmaster, pg.url)
                ok[name] += res["ok"] + res["warm_ok"]
                runs[name].append(res)
                log(f"[round {r + 1}/{args.rounds}] {name}: {res['rps']:,.0f} req/s, p50 "
                    f"{res['p50_ms']:.1f} ms, {res['errors']} errors, other processes "
                    f"{res['foreign_cores']:.2f} cores")
        results["runs"] = runs
        results["ratio_rounds"] = [h["rps"] / s["rps"] for h, s in
                                   zip(runs["hot"], runs["spread"], strict=True) if s["rps"]]
        results["ratio"] = _median(results["ratio_rounds"])
        if args.drain:
            res = run_phase(client, urls, accounts["drain"], body, stream, args.concurrency,
                            args.drain, 0, pids, pg.postmaster, pg.url)
            ok["drain"] += res["ok"] + res["warm_ok"]
            results["drain"] = res
            log(f"[drain] {res['ok']} served, {res['errors']} refused")
        client.stop()
        client = None
        for p in instances:  # stop before the checks: every write is flushed
            p.stop()
        results["check"] = check(pg.url, accounts["ids"], ok)
        if args.drain and not results["drain"]["errors"]:
            results["check"]["ok"] = False
            results["check"]["drain_note"] = "the drain phase refused nothing"
        results["ok"] = results["check"]["ok"]
        results["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
        results["seconds"] = time.monotonic() - started
    finally:
        if client is not None:
            client.stop()
        for p in reversed(procs):
            p.stop()
        if pg is not None:
            pg.drop()
    print(json.dumps(results, indent=2, default=str) if args.json else render(results))
    log(f"done in {results['seconds']:.0f}s")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
