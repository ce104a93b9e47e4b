"""Reports benchmark: usage log pages, summaries, statements and CSV exports at 10M records.

    python bench/reports.py [--records 10000000] [--accounts 1000] [--days 90]
                            [--postgres URL] [--sqlite-path PATH] [--no-sqlite] [--reuse]
                            [--pg-database NAME] [--load-only] [--iterations 100] [--warmup 5]
                            [--seed 1] [--plans] [--json] [--json-out PATH]

**Data.** A deterministic generator (``--seed``) writes, in time order (all accounts interleaved,
as a live gateway would), ``--records`` gateway request records for ``--accounts`` customer
accounts over the ``--days`` UTC days before today: token products (chat, reasoning,
embeddings, with cache reads/writes) and per-call products, 1-4 API keys per account, a skewed
(log-normal) share of traffic per account, a daily and weekly rhythm, ~3 % error records (not
charged), a price change mid-period, group ratios and per-model overrides; plus the account's
other history: key created/revoked (``system``), top-ups (when the balance runs low) and
operator adjustments. Each request's cost is computed with integer arithmetic and checked
against ``tollway.billing.reports.recharge`` on a sample. From the same rows the generator
computes the hourly ``usage_rollups`` (per account x key x product: they equal the sums of the
raw rows, checked after the load) and the ``wallet_days`` (each account's days add up to its
balance, checked after the load). Ledger entries and postings are NOT generated (this is the
bulk path, not the ledger): ``tollway ledger verify`` does not apply to this database.

**Load.** The schema comes from the migrations. SQLite: the secondary indexes of usage_records
are dropped, rows go in with ``executemany`` in transactions of ~1M rows with
``PRAGMA synchronous=OFF`` (``journal_mode=WAL``, cache 2 GB) on the loading connection only,
then the indexes are created again from their own SQL. PostgreSQL: the secondary indexes and
the ``request_id`` unique constraint are dropped, rows go in with ``COPY`` (psycopg
``cursor.copy``) with ``session_replication_role=replica`` (no FK triggers; the generator
writes only ids that exist), then indexes and constraint are recreated, sequences set and
``VACUUM (ANALYZE)`` run (what autovacuum would do after such a load). ``--reuse`` skips the
load when the database already holds data made with the same parameters.

**Timing.** Through the store functions the API calls, on the app's own ``Database`` (its
pools and pragmas), one read transaction per call as ``Context.read`` does, including the
view code and ``json.dumps`` the route would run (``record_view`` for log pages). Each
iteration runs every query once, interleaved, on a random account (the same seeded sequence on
every backend); p50 / p95 / max over ``--iterations`` after ``--warmup``. Exports: the full
account CSV (``iter_usage`` + ``export_csv``), rows/s, and peak memory (tracemalloc, in a
separate pass; RSS high-water delta in the timed pass) for a median and the largest account.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import random
import sqlite3
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from types import SimpleNamespace
from typing import Any

import psycopg
import sqlalchemy as sa
from hostinfo import cpu_model, git_commit, loadavg

from tollway.billing.reports import (
    export_csv,
    month_bounds,
    recharge,
    record_view,
    statement_view,
    summary_view,
)
from tollway.money import format_usd, parse_usd
from tollway.store import reports as store
from tollway.store.accounts import get_account
from tollway.store.db import Database, normalize_url
from tollway.store.migrate import upgrade
from tollway.store.reports import LogFilter, encode_cursor
from tollway.store.tables import usage_records, usage_rollups, wallet_days

HOUR = 3_600_000
DAY = 86_400_000
GENERATOR_VERSION = 4  # bump when the generated data changes (so --reuse regenerates)
META = "bench_reports_meta"
PAGE = 50
DEEP_PAGES = 100
LOG_TARGET_MS = 50.0
STATEMENT_TARGET_MS = 200.0

# --------------------------------------------------------------------------- the catalog

#: id, billing type, route, prices in USD (input, output, cache read, cache write per 1M
#: tokens | per call), popularity, kind
PRODUCTS: list[tuple[str, str, str, tuple[str | None, ...], float, str]] = [
    ("gpt-4o", "token", "/v1/chat/completions", ("2.50", "10", "1.25", None), 10, "chat"),
    ("gpt-4o-mini", "token", "/v1/chat/completions", ("0.15", "0.60", "0.075", None), 18, "chat"),
    ("claude-sonnet-4", "token", "/v1/messages", ("3", "15", "0.30", "3.75"), 9, "chat"),
    ("claude-haiku-3.5", "token", "/v1/messages", ("0.80", "4", "0.08", "1"), 6, "chat"),
    ("deepseek-v3", "token", "/v1/chat/completions", ("0.27", "1.10", "0.07", None), 7, "chat"),
    ("llama-3.1-70b", "token", "/v1/chat/completions", ("0.88", "0.88", None, None), 4, "chat"),
    ("o3-mini", "token", "/v1/chat/completions", ("1.10", "4.40", "0.55", None), 3, "reason"),
    ("text-embedding-3-small", "token", "/v1/embeddings", ("0.02", "0", None, None), 8, "embed"),
    ("web-search", "per_call", "/v1/tools/web-search", ("0.005",), 5, "call"),
    ("image-gen", "per_call", "/v1/images/generations", ("0.04",), 2, "image"),
    ("ocr-page", "per_call", "/v1/tools/ocr", ("0.0015",), 1, "call"),
    ("rerank", "per_call", "/v1/rerank", ("0.002",), 3, "call"),
]
#: gpt-4o gets cheaper halfway through the period (a second price version).
PRICE_CHANGE = ("gpt-4o", ("2.00", "8", "1.00", None))
GROUPS = {"default": "1", "vip": "0.8", "reseller": "0.9"}
OVERRIDES = {"claude-sonnet-4": {"vip": "0.85"}, "deepseek-v3": {"reseller": "0.95"}}
KEY_NAMES = ("production", "staging", "batch-jobs", "notebook")
KEY_WEIGHTS = (0.6, 0.25, 0.1, 0.05)
ERRORS = (
    (429, "upstream_rate_limited", "the upstream rate-limited the request (429)"),
    (502, "upstream_error", "the upstream answered 502 Bad Gateway"),
    (504, "upstream_timeout", "the upstream did not answer within 60 s"),
    (500, "upstream_error", "the upstream failed with 500 Internal Server Error"),
    (499, "client_closed", "the client closed the connection before the upstream answered"),
)
ERROR_RATE = 0.03
ESTIMATED = "the stream ended without a usage block; tokens counted with the model's tokenizer"
AVG_COST_GUESS_NANO = 3_000_000  # ~$0.003 per request, only to size the first top-up

#: The generator writes the columns up to ``note`` (migration 0005's record); later ones (1-hour
#: cache writes, channels, upstream cost, ...) are left to their defaults (0 and NULL): the
#: generated traffic is a chat-completions mix through one channel, which has none of them.
_RECORD = [c.name for c in usage_records.c if c.name != "id"]
COLUMNS = _RECORD[:_RECORD.index("note") + 1]
ROLLUP_COLUMNS = ["account_id", "hour_ms", "key_id", "product", "billing_type", "requests",
                  "errors", "input_tokens", "cached_input_tokens", "cache_write_tokens",
                  "output_tokens", "reasoning_tokens", "calls", "cost_nano"]
#: What the generator knows of a wallet day; the loader writes the columns the schema has
#: (``closing_balance_nano`` existed in earlier revisions of migration 0002).
WALLET_FIELDS = ("account_id", "day_ms", "topups_nano", "adjustments_nano", "charges_nano",
                 "written_off_nano", "closing_balance_nano")
WALLET_COLUMNS = [c.name for c in wallet_days.c if c.name in WALLET_FIELDS]  # grants: 0
_WALLET_PICK = [WALLET_FIELDS.index(c) for c in WALLET_COLUMNS]
_C = {name: i for i, name in enumerate(COLUMNS)}


def _nano(usd: str | None) -> int | None:
    return None if usd is None else parse_usd(Decimal(usd))


def _wallet_row(fields: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(fields[i] for i in _WALLET_PICK)


def _ceil_usd(nano: int, step_usd: int = 10) -> int:
    step = step_usd * 1_000_000_000
    return -(-nano // step) * step


# --------------------------------------------------------------------------- the generator


@dataclass
class Account:
    id: int
    name: str
    group: str
    weight: float
    created_ms: int
    keys: list[tuple[int, str, int]]  # (key id, name, revoked at ms or a far future)
    keytab: list[tuple[int, str, int]]  # 16 picks by weight
    products: list[int]  # indexes into PRODUCTS
    prodtab: list[int]  # 64 picks by weight
    tpl: dict[int, tuple[tuple[Any, ...], tuple[Any, ...]]] = field(default_factory=dict)
    share: float = 0.0
    balance: int = 0
    spent: int = 0
    used: int = 0
    consumes: int = 0
    rows: int = 0
    prod_rows: dict[str, int] = field(default_factory=dict)


@dataclass
class Chunk:
    label: str
    usage: list[tuple[Any, ...]]
    rollups: list[tuple[Any, ...]]
    wallet: list[tuple[Any, ...]]
    requests: int


class Generator:
    """Deterministic data for ``records`` requests over ``days`` days ending at ``end_ms``."""

    def __init__(self, *, records: int, accounts: int, days: int, seed: int,
                 end_ms: int) -> None:
        self.records, self.days, self.seed = records, days, seed
        self.end_ms = end_ms
        self.start_ms = end_ms - days * DAY
        self.change_ms = self.start_ms + (days // 2) * DAY
        rng = self.rng = random.Random(seed)
        self.checked = 0

        # price versions: one per product, gpt-4o gets a second one
        self.versions: list[dict[str, Any]] = []
        self.tables_pv: dict[str, list[tuple[int, int, tuple[Any, ...]]]] = {}
        vid = 101
        for pid, bt, _route, prices, _pop, _kind in PRODUCTS:
            entries = [(self.start_ms - 365 * DAY, prices)]
            if pid == PRICE_CHANGE[0]:
                entries.append((self.change_ms, PRICE_CHANGE[1]))
            for eff, pr in entries:
                cols = self._price_columns(bt, pr)
                self.versions.append({"id": vid, "item_id": pid, "billing_type": bt,
                                      **cols["stored"], "effective_from_ms": eff,
                                      "group_ratios": json.dumps(OVERRIDES.get(pid, {}),
                                                                 sort_keys=True),
                                      "created_at_ms": eff})
                self.tables_pv.setdefault(pid, []).append((eff, vid, cols["record"]))
                vid += 1

        # accounts and keys
        self.accounts: list[Account] = []
        key_id = 101
        pops = [p[4] for p in PRODUCTS]
        far = 2**62
        for i in range(accounts):
            r = rng.random()
            group = "default" if r < 0.7 else ("vip" if r < 0.9 else "reseller")
            created = self.start_ms - rng.randrange(1, 30) * DAY - rng.randrange(DAY)
            nkeys = rng.choices((1, 2, 3, 4), (0.35, 0.35, 0.2, 0.1))[0]
            keys = []
            for k in range(nkeys):
                revoked = far
                if k > 0 and rng.random() < 0.1:
                    revoked = self.start_ms + rng.randrange(days * DAY)
                keys.append((key_id, KEY_NAMES[k], revoked))
                key_id += 1
            keytab = rng.choices(keys, KEY_WEIGHTS[:nkeys], k=16)
            nprod = rng.choices((2, 3, 4, 5, 6), (0.2, 0.3, 0.25, 0.15, 0.1))[0]
            chosen: list[int] = []
            while len(chosen) < nprod:
                p = rng.choices(range(len(PRODUCTS)), pops)[0]
                if p not in chosen:
                    chosen.append(p)
            prefs = [rng.lognormvariate(0, 1.0) for _ in chosen]
            prodtab = rng.choices(chosen, prefs, k=64)
            acct = Account(101 + i, f"bench-{i + 1:05d}", group, rng.lognormvariate(0, 1.2),
                           created, keys, keytab, chosen, prodtab)
            for p in chosen:
                acct.tpl[p] = self._templates(acct, p)
            self.accounts.append(acct)
        self.key_count = key_id - 101
        total_w = sum(a.weight for a in self.accounts)
        self.cum_weights = list(_accumulate(a.weight for a in self.accounts))
        for a in self.accounts:
            a.share = a.weight / total_w

        # token count tables (log-normal), indexed by 12 random bits
        self.in_tab = [min(200_000, max(5, int(rng.lognormvariate(math.log(1200), 1.1))))
                       for _ in range(4096)]
        self.out_tab = [min(16_000, max(1, int(rng.lognormvariate(math.log(220), 0.9))))
                        for _ in range(4096)]
        self.emb_tab = [min(8_000, max(1, int(rng.lognormvariate(math.log(300), 1.0))))
                        for _ in range(4096)]

        # planned events inside the period: adjustments and key revocations
        planned: list[tuple[int, str, Account, Any]] = []
        for a in self.accounts:
            if rng.random() < 0.15:
                planned.append((self.start_ms + rng.randrange(days * DAY), "adjustment", a,
                                rng.choice((5, 10, 25)) * 1_000_000_000))
            if rng.random() < 0.05:
                planned.append((self.start_ms + rng.randrange(days * DAY), "adjustment", a,
                                -rng.randrange(1, 4) * 1_000_000_000))
            for kid, kname, revoked in a.keys:
                if revoked < far:
                    planned.append((revoked, "revoke", a, (kid, kname)))
        planned.sort(key=lambda e: e[0])
        self.planned = planned
        self.entry_id = 101

        # requests per hour: a daily and weekly rhythm, summing exactly to ``records``
        hours = days * 24
        weights = []
        for h in range(hours):
            at = dt.datetime.fromtimestamp((self.start_ms + h * HOUR) / 1000, dt.UTC)
            w = 1 + 0.5 * math.sin(2 * math.pi * (at.hour - 9) / 24)
            weights.append(w * (0.75 if at.weekday() >= 5 else 1.0))
        total = sum(weights)
        self.per_hour = []
        acc = 0.0
        done = 0
        for w in weights:
            acc += w
            upto = round(records * acc / total)
            self.per_hour.append(upto - done)
            done = upto

    # -- helpers

    @staticmethod
    def _price_columns(bt: str, prices: tuple[str | None, ...]) -> dict[str, Any]:
        if bt == "per_call":
            stored = {"input_nano_per_1m": None, "output_nano_per_1m": None,
                      "cache_read_nano_per_1m": None, "cache_write_nano_per_1m": None,
                      "per_call_nano": _nano(prices[0])}
            return {"stored": stored, "record": (None, None, None, None, _nano(prices[0]))}
        pin, pout, pcr, pcw = (_nano(p) for p in prices)
        stored = {"input_nano_per_1m": pin, "output_nano_per_1m": pout,
                  "cache_read_nano_per_1m": pcr, "cache_write_nano_per_1m": pcw,
                  "per_call_nano": None}
        # a usage record keeps the cache prices actually applied (missing = input price)
        return {"stored": stored,
                "record": (pin, pout, pin if pcr is None else pcr, pin if pcw is None else pcw,
                           None)}

    def _templates(self, acct: Account, p: int) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        pid, bt, route, _prices, _pop, kind = PRODUCTS[p]
        override = OVERRIDES.get(pid, {})
        if acct.group in override:
            ratio, source = override[acct.group], "model"
        else:
            ratio, source = GROUPS[acct.group], "group"
        frac = Fraction(ratio)
        out = []
        for _eff, vid, cols in self.tables_pv[pid][:1] + self.tables_pv[pid][-1:]:
            out.append((acct.group, str(Decimal(ratio)), source, bt, pid, route, *cols, vid,
                        frac.numerator, frac.denominator, kind))
        return out[0], out[1]

    def _event(self, request_id: str, at: int, acct: Account, type_: str, *,
               credit: int = 0, key: tuple[int, str] | None = None,
               note: str | None = None) -> tuple[Any, ...]:
        """A non-request row, exactly as ``tollway.store.usage.insert_event`` writes it."""
        acct.rows += 1
        row: list[Any] = [None] * len(COLUMNS)
        for c in ("input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens",
                  "reasoning_tokens", "calls", "cost_nano"):
            row[_C[c]] = 0
        row[_C["stream"]] = False
        row[_C["request_id"]] = request_id
        row[_C["created_at_ms"]] = at
        row[_C["account_id"]] = acct.id
        row[_C["type"]] = type_
        row[_C["credit_nano"]] = credit
        if key is not None:
            row[_C["key_id"]], row[_C["key_name"]] = key
        row[_C["note"]] = note
        return tuple(row)

    def _entry(self) -> str:
        self.entry_id += 1
        return f"entry-{self.entry_id}"

    def _check(self, row: tuple[Any, ...]) -> None:
        """The generator's integer cost must be what the product's rating gives."""
        view = SimpleNamespace(**dict(zip(COLUMNS, row, strict=True)),
                               cache_write_1h_tokens=0, cache_write_1h_nano_per_1m=None)
        charge = recharge(view)
        want = 0 if view.type == "error" else charge.cost_nano_usd  # type: ignore[union-attr]
        if want != view.cost_nano:
            raise AssertionError(f"generated cost {view.cost_nano} != rated {want}: {row}")
        self.checked += 1

    # -- the rows

    def prelude(self) -> Chunk:
        """Account creation (before the period): keys created, the first top-up."""
        rows = []
        wallet = []
        for a in self.accounts:
            for j, (kid, kname, _rev) in enumerate(a.keys):
                rows.append(self._event(f"key-{kid}-created", a.created_ms + j * 60_000, a,
                                        "system", key=(kid, kname),
                                        note=f"API key tw-{kid:06x}… created"))
            daily = a.share * self.records / self.days * AVG_COST_GUESS_NANO
            amount = max(20 * 10**9, _ceil_usd(int(daily * 10)))
            rows.append(self._event(self._entry(), a.created_ms + 30_000, a, "topup",
                                    credit=amount, note="first top-up"))
            a.balance = amount
            wallet.append(_wallet_row((a.id, a.created_ms - a.created_ms % DAY, amount, 0, 0, 0,
                                       amount)))
        rows.sort(key=lambda r: r[1])
        return Chunk("accounts", rows, [], wallet, 0)

    def chunks(self) -> Iterator[Chunk]:
        """One chunk per UTC day of the period, rows in time order."""
        yield self.prelude()
        for d in range(self.days):
            usage: list[tuple[Any, ...]] = []
            rollups: list[tuple[Any, ...]] = []
            day_ms = self.start_ms + d * DAY
            day: dict[int, list[int]] = {}  # account index -> [topups, adjustments, charges]
            requests = 0
            for h in range(24):
                hour_index = d * 24 + h
                n = self.per_hour[hour_index]
                requests += n
                self._hour(day_ms + h * HOUR, n, usage, rollups, day)
            wallet = []
            for ai in sorted(day):
                t, adj, ch = day[ai]
                a = self.accounts[ai]
                wallet.append(_wallet_row((a.id, day_ms, t, adj, ch, 0, a.balance)))
            yield Chunk(dt.datetime.fromtimestamp(day_ms / 1000, dt.UTC).strftime("%Y-%m-%d"),
                        usage, rollups, wallet, requests)

    def _hour(self, hour_ms: int, n: int, usage: list[tuple[Any, ...]],
              rollups: list[tuple[Any, ...]], day: dict[int, list[int]]) -> None:
        rng = self.rng
        rand = rng.random
        grb = rng.getrandbits
        accounts = self.accounts
        picks = rng.choices(range(len(accounts)), cum_weights=self.cum_weights, k=n)
        times = sorted(hour_ms + grb(22) % HOUR for _ in range(n))
        in_tab, out_tab, emb_tab = self.in_tab, self.out_tab, self.emb_tab
        roll: dict[tuple[int, int, str], list[Any]] = {}
        cost_hour: dict[int, int] = {}
        rows: list[tuple[Any, ...]] = []
        append = rows.append
        change = self.change_ms
        check_every = 9973
        for i in range(n):
            ai = picks[i]
            t = times[i]
            a = accounts[ai]
            kid, kname, krev = a.keytab[grb(4)]
            if t >= krev:
                kid, kname, krev = a.keys[0]
            p = a.prodtab[grb(6)]
            before, after = a.tpl[p]
            (group, ratio, source, bt, pid, route, pin, pout, pcr, pcw, ppc, vid, rn, rd,
             kind) = before if t < change else after
            reasoning = 0
            ttft = None
            stream = False
            note = None
            if rand() < ERROR_RATE:
                status, code, note = ERRORS[grb(8) % len(ERRORS)]
                row: tuple[Any, ...] = (
                       f"req_{grb(96):024x}", t, a.id, kid, kname, group, ratio, source,
                       "error", bt, pid, route, status, False, 50 + grb(13), None,
                       0, 0, 0, 0, 0, 0, pin, pout, pcr, pcw, ppc, vid, 0, 0, "none", None,
                       code, note)
                append(row)
                a.rows += 1
                key = (a.id, kid, pid)
                r = roll.get(key)
                if r is None:
                    roll[key] = r = [bt, 0, 0, 0, 0, 0, 0, 0, 0, 0]
                r[2] += 1
                continue
            source_usage = "upstream"
            if bt == "per_call":
                calls = 1 + (grb(2) if kind == "image" else 0)
                inp = cached = cw = out = 0
                cost = (2 * calls * ppc * rn + rd) // (2 * rd)
                duration = 300 + grb(11)
            else:
                calls = 0
                cached = cw = 0
                if kind == "embed":
                    inp = emb_tab[grb(12)]
                    out = 0
                    duration = 40 + grb(7)
                else:
                    inp = in_tab[grb(12)]
                    out = out_tab[grb(12)]
                    if kind == "reason":
                        out *= 3
                        reasoning = out * (40 + grb(5)) // 100
                    if pcr != pin and rand() < 0.35:
                        cached = inp * (30 + grb(6)) // 100
                    if pcw != pin and rand() < 0.08:
                        cw = (inp - cached) // 2
                    stream = rand() < 0.6
                    duration = 250 + out * 12 + grb(10)
                    if stream:
                        ttft = 120 + grb(10)
                        if rand() < 0.005:
                            source_usage = "estimated"
                            note = ESTIMATED
                s = (inp - cached - cw) * pin + cached * pcr + cw * pcw + out * pout
                den = 1_000_000 * rd
                cost = (2 * s * rn + den) // (2 * den)
            row = (f"req_{grb(96):024x}", t, a.id, kid, kname, group, ratio, source,
                   "consume", bt, pid, route, 200, stream, duration, ttft,
                   inp, cached, cw, out, reasoning, calls, pin, pout, pcr, pcw, ppc, vid,
                   cost, 0, source_usage, None, None, note)
            append(row)
            if i % check_every == 0:
                self._check(row)
            a.rows += 1
            a.consumes += 1
            cost_hour[ai] = cost_hour.get(ai, 0) + cost
            key = (a.id, kid, pid)
            r = roll.get(key)
            if r is None:
                roll[key] = r = [bt, 0, 0, 0, 0, 0, 0, 0, 0, 0]
            r[1] += 1
            r[3] += inp
            r[4] += cached
            r[5] += cw
            r[6] += out
            r[7] += reasoning
            r[8] += calls
            r[9] += cost
        for (aid, kid, pid), r in roll.items():
            rollups.append((aid, hour_ms, kid, pid, *r))
            a = accounts[aid - 101]
            a.prod_rows[pid] = a.prod_rows.get(pid, 0) + r[1] + r[2]

        # other activity in this hour: planned adjustments and revocations, then top-ups
        events: list[tuple[Any, ...]] = []
        end = hour_ms + HOUR
        planned = self.planned
        while planned and planned[0][0] < end:
            at, kind, a, value = planned.pop(0)
            ai = a.id - 101
            d = day.setdefault(ai, [0, 0, 0])
            if kind == "revoke":
                kid, kname = value
                events.append(self._event(f"key-{kid}-revoked", at, a, "system",
                                          key=(kid, kname),
                                          note=f"API key tw-{kid:06x}… revoked"))
                continue
            amount = value
            if amount < 0 and a.balance + amount - cost_hour.get(ai, 0) < 10**9:
                amount = -amount  # would overdraw: a credit instead
            note = ("goodwill credit after an upstream incident" if amount > 0
                    else "correction: duplicate top-up reversed")
            events.append(self._event(self._entry(), at, a, "adjustment", credit=amount,
                                      note=note))
            a.balance += amount
            d[1] += amount
        elapsed_h = max(24, (end - self.start_ms) // HOUR)
        for ai, cost in cost_hour.items():
            a = accounts[ai]
            daily = max(10**9, a.spent * 24 // elapsed_h)
            if a.balance - cost < daily:
                amount = max(20 * 10**9, _ceil_usd(10 * daily),
                             _ceil_usd(cost - a.balance + daily))
                events.append(self._event(self._entry(), hour_ms + grb(16), a, "topup",
                                          credit=amount, note=None))
                a.balance += amount
                day.setdefault(ai, [0, 0, 0])[0] += amount
            a.balance -= cost
            a.spent += cost
            a.used += cost
            day.setdefault(ai, [0, 0, 0])[2] += cost
        if events:
            rows.extend(events)
            rows.sort(key=lambda r: r[1])
        usage.extend(rows)

    def account_rows(self) -> list[dict[str, Any]]:
        return [{"id": a.id, "name": a.name, "kind": "customer", "group_name": a.group,
                 "available_nano": 0, "held_nano": 0, "used_nano": 0, "requests": 0,
                 "created_at_ms": a.created_ms} for a in self.accounts]

    def key_rows(self) -> list[dict[str, Any]]:
        out = []
        for a in self.accounts:
            for j, (kid, kname, revoked) in enumerate(a.keys):
                out.append({"id": kid, "account_id": a.id, "prefix": f"tw-{kid:06x}",
                            "key_hash": f"{self.seed:08x}{kid:056x}", "name": kname,
                            "group_name": None, "models": None, "quota_nano": None,
                            "used_nano": 0, "held_nano": 0, "expires_at_ms": None,
                            "revoked_at_ms": revoked if revoked < 2**62 else None,
                            "created_at_ms": a.created_ms + j * 60_000})
        return out

    def account_stats(self) -> dict[str, Any]:
        return {str(a.id): {"rows": a.rows, "consumes": a.consumes, "balance": a.balance,
                            "used": a.used, "products": a.prod_rows,
                            "token_products": sorted(
                                PRODUCTS[p][0] for p in a.products if PRODUCTS[p][1] == "token"
                                and a.prod_rows.get(PRODUCTS[p][0]))}
                for a in self.accounts}


def _accumulate(values: Iterator[float] | Any) -> Iterator[float]:
    total = 0.0
    for v in values:
        total += v
        yield total


# --------------------------------------------------------------------------- progress


class Progress:
    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.start = time.perf_counter()
        self.last = 0.0
        self.tty = sys.stderr.isatty()

    def update(self, done: int, extra: str = "", final: bool = False) -> None:
        now = time.perf_counter()
        if not final and now - self.last < (0.5 if self.tty else 10):
            return
        self.last = now
        elapsed = now - self.start
        rate = done / elapsed if elapsed else 0
        frac = done / self.total if self.total else 1
        eta = (self.total - done) / rate if rate else 0
        bar = "#" * int(frac * 30)
        line = (f"{self.label} [{bar:<30}] {done:,}/{self.total:,} ({frac:.0%}) "
                f"{rate:,.0f} rows/s elapsed {_dur(elapsed)} eta {_dur(eta)} {extra}")
        if self.tty:
            print("\r" + line + " " * 5, end="\n" if final else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


def _dur(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- backends


class Backend:
    name: str
    url: str

    def exists(self) -> dict[str, Any] | None:
        """The meta of a complete earlier load, or None."""
        raise NotImplementedError

    def fresh(self) -> None:
        raise NotImplementedError

    def loader(self) -> Loader:
        raise NotImplementedError

    def size(self) -> int:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def explain(self, conn: sa.Connection, statement: str, params: Any) -> list[str]:
        raise NotImplementedError


class Loader:
    def write(self, chunk: Chunk) -> None:
        raise NotImplementedError

    def finish(self, log_step: Callable[[str, float], None]) -> None:
        raise NotImplementedError


def _read_meta(engine: sa.Engine) -> dict[str, Any] | None:
    try:
        with engine.connect() as conn:
            rows: dict[str, str] = dict(conn.exec_driver_sql(
                f"SELECT name, value FROM {META}").all())
    except sa.exc.DBAPIError:
        return None
    if rows.get("state") != "complete":
        return None
    return {k: json.loads(v) for k, v in rows.items() if k != "state"}


def _write_meta(db: Database, meta: dict[str, Any]) -> None:
    with db.write() as conn:
        conn.exec_driver_sql(f"CREATE TABLE IF NOT EXISTS {META} (name VARCHAR(64) PRIMARY KEY,"
                             " value TEXT NOT NULL)")
        conn.exec_driver_sql(f"DELETE FROM {META}")
        for k, v in meta.items():
            conn.execute(sa.text(f"INSERT INTO {META} (name, value) VALUES (:n, :v)"),
                         {"n": k, "v": json.dumps(v)})
        conn.execute(sa.text(f"INSERT INTO {META} (name, value) VALUES ('state', 'complete')"))


class SQLiteBackend(Backend):
    name = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.url = f"sqlite:///{self.path}"

    def exists(self) -> dict[str, Any] | None:
        if not os.path.exists(self.path):
            return None
        engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool)
        try:
            return _read_meta(engine)
        finally:
            engine.dispose()

    def fresh(self) -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            if os.path.exists(self.path + suffix):
                os.remove(self.path + suffix)
        db = Database(self.url)
        upgrade(db)
        db.dispose()

    def loader(self) -> Loader:
        return SQLiteLoader(self.path)

    def size(self) -> int:
        return sum(os.path.getsize(self.path + s) for s in ("", "-wal")
                   if os.path.exists(self.path + s))

    def settings(self) -> dict[str, Any]:
        return {"sqlite_version": sqlite3.sqlite_version, "path": self.path,
                "read_pragmas": "journal_mode=WAL, synchronous=FULL, cache_size default "
                                "(2 MB per connection), no ANALYZE (the app runs none)"}

    def explain(self, conn: sa.Connection, statement: str, params: Any) -> list[str]:
        rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params).all()
        depth: dict[int, int] = {0: -1}
        out = []
        for node, parent, _unused, detail in rows:
            depth[node] = depth.get(parent, -1) + 1
            out.append("  " * depth[node] + detail)
        return out


class SQLiteLoader(Loader):
    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        cur = self.conn.cursor()
        # load-only settings, on this connection only: not durable while loading
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = OFF")
        cur.execute("PRAGMA cache_size = -2000000")
        cur.execute("PRAGMA threads = 2")
        self.indexes = cur.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND "
            "tbl_name = 'usage_records' AND sql IS NOT NULL").fetchall()
        for name, _sql in self.indexes:
            cur.execute(f"DROP INDEX {name}")
        cols = ", ".join(COLUMNS)
        self.insert_usage = (f"INSERT INTO usage_records ({cols}) VALUES "
                             f"({', '.join('?' * len(COLUMNS))})")
        self.insert_rollups = (f"INSERT INTO usage_rollups ({', '.join(ROLLUP_COLUMNS)}) "
                               f"VALUES ({', '.join('?' * len(ROLLUP_COLUMNS))})")
        self.insert_wallet = (f"INSERT INTO wallet_days ({', '.join(WALLET_COLUMNS)}) "
                              f"VALUES ({', '.join('?' * len(WALLET_COLUMNS))})")
        self.pending = 0

    def write(self, chunk: Chunk) -> None:
        cur = self.conn.cursor()
        if not self.conn.in_transaction:
            cur.execute("BEGIN")
        cur.executemany(self.insert_usage, chunk.usage)
        if chunk.rollups:
            cur.executemany(self.insert_rollups, chunk.rollups)
        if chunk.wallet:
            cur.executemany(self.insert_wallet, chunk.wallet)
        # Few, large transactions: random inserts into the request_id unique index (which
        # stays) dirty most of its pages in every transaction, and each commit writes them all
        # to the WAL again; one commit per ~1M rows keeps that to a few GB in total.
        self.pending += len(chunk.usage)
        if self.pending >= 1_000_000:
            cur.execute("COMMIT")
            self.pending = 0

    def finish(self, log_step: Callable[[str, float], None]) -> None:
        cur = self.conn.cursor()
        if self.conn.in_transaction:
            cur.execute("COMMIT")
        for name, sql in self.indexes:
            t0 = time.perf_counter()
            cur.execute(sql)
            log_step(f"CREATE INDEX {name}", time.perf_counter() - t0)
        t0 = time.perf_counter()
        cur.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        log_step("wal_checkpoint(TRUNCATE)", time.perf_counter() - t0)
        self.conn.close()


class PostgresBackend(Backend):
    name = "postgresql"

    def __init__(self, url: str, database: str) -> None:
        base = sa.engine.make_url(normalize_url(url))
        self.server = base
        self.database = database
        self.url = base.set(database=database).render_as_string(hide_password=False)
        self.libpq = base.set(drivername="postgresql", database=database) \
            .render_as_string(hide_password=False)
        self.admin = sa.create_engine(base, isolation_level="AUTOCOMMIT",
                                      poolclass=sa.pool.NullPool)

    def exists(self) -> dict[str, Any] | None:
        with self.admin.connect() as conn:
            found = conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                 {"n": self.database}).first()
        if not found:
            return None
        engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool)
        try:
            return _read_meta(engine)
        finally:
            engine.dispose()

    def fresh(self) -> None:
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {self.database} WITH (FORCE)")
            conn.exec_driver_sql(f"CREATE DATABASE {self.database}")
        db = Database(self.url)
        upgrade(db)
        db.dispose()

    def drop(self) -> None:
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {self.database} WITH (FORCE)")

    def loader(self) -> Loader:
        return PostgresLoader(self.libpq)

    def size(self) -> int:
        with self.admin.connect() as conn:
            return int(conn.execute(sa.text("SELECT pg_database_size(:n)"),
                                    {"n": self.database}).scalar_one())

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with self.admin.connect() as conn:
            for name in ("server_version", "shared_buffers", "work_mem", "effective_cache_size",
                         "random_page_cost", "fsync", "synchronous_commit"):
                out[name] = conn.exec_driver_sql(f"SHOW {name}").scalar_one()
        out["host"] = f"{self.server.host}:{self.server.port}"
        out["database"] = self.database
        return out

    def explain(self, conn: sa.Connection, statement: str, params: Any) -> list[str]:
        rows = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement, params).all()
        return [r[0] for r in rows]


class PostgresLoader(Loader):
    def __init__(self, libpq_url: str) -> None:
        self.conn = psycopg.connect(libpq_url)
        cur = self.conn.cursor()
        cur.execute("SET session_replication_role = replica")  # no FK triggers while loading
        cur.execute("SET maintenance_work_mem = '1GB'")
        self.constraints = cur.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'usage_records'::regclass AND contype = 'u'").fetchall()
        self.indexes = cur.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'usage_records' "
            "AND indexname NOT IN (SELECT conname FROM pg_constraint "
            "WHERE conrelid = 'usage_records'::regclass)").fetchall()
        for name, _ in self.constraints:
            cur.execute(f"ALTER TABLE usage_records DROP CONSTRAINT {name}")
        for name, _ in self.indexes:
            cur.execute(f"DROP INDEX {name}")
        self.conn.commit()
        self.copy_usage = f"COPY usage_records ({', '.join(COLUMNS)}) FROM STDIN"
        self.copy_rollups = f"COPY usage_rollups ({', '.join(ROLLUP_COLUMNS)}) FROM STDIN"
        self.copy_wallet = f"COPY wallet_days ({', '.join(WALLET_COLUMNS)}) FROM STDIN"

    def write(self, chunk: Chunk) -> None:
        cur = self.conn.cursor()
        for sql, rows in ((self.copy_usage, chunk.usage), (self.copy_rollups, chunk.rollups),
                          (self.copy_wallet, chunk.wallet)):
            if not rows:
                continue
            with cur.copy(sql) as copy:
                write = copy.write_row
                for row in rows:
                    write(row)
        self.conn.commit()

    def finish(self, log_step: Callable[[str, float], None]) -> None:
        cur = self.conn.cursor()
        for name, definition in self.constraints:
            t0 = time.perf_counter()
            cur.execute(f"ALTER TABLE usage_records ADD CONSTRAINT {name} {definition}")
            self.conn.commit()
            log_step(f"ADD CONSTRAINT {name} {definition}", time.perf_counter() - t0)
        for name, definition in self.indexes:
            t0 = time.perf_counter()
            cur.execute(definition)
            self.conn.commit()
            log_step(f"CREATE INDEX {name}", time.perf_counter() - t0)
        cur.execute("SET session_replication_role = DEFAULT")
        for table in ("accounts", "api_keys", "price_versions", "usage_records"):
            cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                        f"(SELECT max(id) FROM {table}))")
        self.conn.commit()
        self.conn.autocommit = True
        t0 = time.perf_counter()
        cur.execute("VACUUM (ANALYZE) usage_records, usage_rollups, wallet_days, accounts, "
                    "api_keys")
        log_step("VACUUM (ANALYZE)", time.perf_counter() - t0)
        self.conn.close()


# --------------------------------------------------------------------------- the load


def _small_tables(db: Database, gen: Generator, now: int) -> None:
    from tollway.store.tables import accounts, api_keys, catalog_items, groups, price_versions
    with db.write() as conn:
        conn.execute(groups.insert(), [{"name": n, "ratio": r} for n, r in GROUPS.items()])
        conn.execute(catalog_items.insert(), [
            # as the catalog stores them: a data API (kind "call") has its path, a model
            # (image models too) its upstream model; summaries by model and by endpoint
            # tell the two apart by it
            {"id": pid, "billing_type": bt, "provider": "bench-upstream",
             "spec": json.dumps({"path": route} if kind == "call" else {"upstream_model": pid}),
             "active": True, "updated_at_ms": now}
            for pid, bt, route, _pr, _pop, kind in PRODUCTS])
        conn.execute(price_versions.insert(), gen.versions)
        conn.execute(accounts.insert(), gen.account_rows())
        conn.execute(api_keys.insert(), gen.key_rows())


def _finish_accounts(db: Database, gen: Generator) -> None:
    from tollway.store.tables import accounts
    with db.write() as conn:
        conn.execute(accounts.update().where(accounts.c.id == sa.bindparam("aid"))
                     .values(available_nano=sa.bindparam("bal"), used_nano=sa.bindparam("used"),
                             requests=sa.bindparam("req")),
                     [{"aid": a.id, "bal": a.balance, "used": a.used, "req": a.consumes}
                      for a in gen.accounts])


def load(backend: Backend, params: dict[str, Any]) -> dict[str, Any]:
    t_all = time.perf_counter()
    backend.fresh()
    gen = Generator(records=params["records"], accounts=params["accounts"],
                    days=params["days"], seed=params["seed"], end_ms=params["end_ms"])
    db = Database(backend.url)
    _small_tables(db, gen, params["end_ms"])
    loader = backend.loader()
    progress = Progress(f"[{backend.name}] load", params["records"])
    counts = {"usage_rows": 0, "requests": 0, "rollup_rows": 0, "wallet_rows": 0}
    t_gen = 0.0
    t0 = time.perf_counter()
    it = gen.chunks()
    while True:
        g0 = time.perf_counter()
        chunk = next(it, None)
        t_gen += time.perf_counter() - g0
        if chunk is None:
            break
        loader.write(chunk)
        counts["usage_rows"] += len(chunk.usage)
        counts["requests"] += chunk.requests
        counts["rollup_rows"] += len(chunk.rollups)
        counts["wallet_rows"] += len(chunk.wallet)
        progress.update(counts["requests"], f"({chunk.label})")
    progress.update(counts["requests"], "(rows written)", final=True)
    t_rows = time.perf_counter() - t0
    steps: list[dict[str, Any]] = []

    def log_step(what: str, seconds: float) -> None:
        steps.append({"step": what, "seconds": round(seconds, 1)})
        log(f"[{backend.name}] {what}: {seconds:.1f} s")

    t1 = time.perf_counter()
    loader.finish(log_step)
    t_index = time.perf_counter() - t1
    _finish_accounts(db, gen)
    total = time.perf_counter() - t_all
    stats = {**counts, "events": counts["usage_rows"] - counts["requests"],
             "seconds_total": round(total, 1), "seconds_rows": round(t_rows, 1),
             "seconds_generate": round(t_gen, 1), "seconds_after": round(t_index, 1),
             "rows_per_s": round(counts["usage_rows"] / t_rows), "steps": steps,
             "cost_checks": gen.checked, "loaded_at": _now_text()}
    log(f"[{backend.name}] loaded {counts['usage_rows']:,} usage rows "
        f"({counts['requests']:,} requests), {counts['rollup_rows']:,} rollups, "
        f"{counts['wallet_rows']:,} wallet days in {_dur(total)} "
        f"(rows {_dur(t_rows)} of which generating {_dur(t_gen)}, indexes etc. {_dur(t_index)})")
    check = verify_rollups(db)
    stats["rollup_check"] = check
    meta = {"params": params, "load": stats, "accounts": gen.account_stats()}
    _write_meta(db, meta)
    db.dispose()
    return meta


def verify_rollups(db: Database) -> dict[str, Any]:
    """Totals over the whole raw log equal totals over the rollups (not timed)."""
    t0 = time.perf_counter()
    counters = ("input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens",
                "reasoning_tokens", "calls", "cost_nano")
    raw_sql = ("SELECT SUM(CASE WHEN type = 'consume' THEN 1 ELSE 0 END), "
               "SUM(CASE WHEN type = 'error' THEN 1 ELSE 0 END), "
               + ", ".join(f"SUM({c})" for c in counters)
               + " FROM usage_records WHERE type IN ('consume', 'error')")
    roll_sql = ("SELECT SUM(requests), SUM(errors), " + ", ".join(f"SUM({c})" for c in counters)
                + " FROM usage_rollups")
    with db.read() as conn:
        raw = [int(x or 0) for x in conn.exec_driver_sql(raw_sql).one()]
        roll = [int(x or 0) for x in conn.exec_driver_sql(roll_sql).one()]
        # every account's wallet days add up to its balance (what ``ledger verify`` checks)
        wallets: dict[Any, Any] = dict(conn.exec_driver_sql(
            "SELECT account_id, SUM(topups_nano + adjustments_nano - charges_nano) "
            "FROM wallet_days GROUP BY account_id").all())
        balances: dict[Any, Any] = dict(conn.exec_driver_sql(
            "SELECT id, available_nano + held_nano FROM accounts WHERE kind = 'customer'").all())
    wallet_ok = {int(k): int(v) for k, v in wallets.items()} == {
        int(k): int(v) for k, v in balances.items()}
    ok = raw == roll and wallet_ok
    names = ("requests", "errors", *counters)
    log(f"rollups == raw sums over the whole log: {'OK' if raw == roll else 'MISMATCH'}; "
        f"wallet days add up to every balance: {'OK' if wallet_ok else 'MISMATCH'} "
        f"({time.perf_counter() - t0:.1f} s)")
    return {"ok": ok, "wallet_days_match_balances": wallet_ok,
            "raw": dict(zip(names, raw, strict=True)),
            "rollups": dict(zip(names, roll, strict=True))}


def _now_text() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


# --------------------------------------------------------------------------- the queries


def _json(content: Any) -> bytes:
    # what starlette's JSONResponse.render does
    return json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None,
                      separators=(",", ":")).encode("utf-8")


Timed = Callable[[], tuple[float, float]]  # -> (total seconds, database seconds)


def page_call(db: Database, where: LogFilter, cursor: str | None = None,
              out: list[Any] | None = None) -> Timed:
    def run() -> tuple[float, float]:
        t0 = time.perf_counter()
        with db.read() as conn:
            rows, nxt = store.usage_page(conn, where, limit=PAGE, cursor=cursor)
        t1 = time.perf_counter()
        _json({"object": "list", "data": [record_view(r) for r in rows], "next_cursor": nxt,
               "has_more": nxt is not None})
        if out is not None:
            out[:] = [nxt, len(rows)]
        return time.perf_counter() - t0, t1 - t0
    return run


def summary_call(db: Database, account_id: int, start: int, end: int,
                 group_by: list[str]) -> Timed:
    def run() -> tuple[float, float]:
        t0 = time.perf_counter()
        with db.read() as conn:
            rows, totals = store.summary(conn, account_id=account_id, start_ms=start,
                                         end_ms=end, group_by=group_by)
            t1 = time.perf_counter()
            view = summary_view(rows, totals, start_ms=start, end_ms=end)
            account = get_account(conn, account_id)
            view["account"] = {"id": account.id, "balance_usd": format_usd(account.balance_nano),
                               "held_usd": format_usd(account.held_nano),
                               "available_usd": format_usd(account.available_nano)}
        _json(view)
        return time.perf_counter() - t0, t1 - t0
    return run


def statement_call(db: Database, account_id: int, month: str) -> Timed:
    start, end = month_bounds(month)

    def run() -> tuple[float, float]:
        t0 = time.perf_counter()
        with db.read() as conn:
            account = get_account(conn, account_id)
            st = store.statement(conn, account_id, start_ms=start, end_ms=end)
            t1 = time.perf_counter()
            view = statement_view(account, month, st)  # asserts the statement reconciles
        _json(view)
        return time.perf_counter() - t0, t1 - t0
    return run


@dataclass
class Query:
    key: str
    label: str
    target_ms: float | None
    prepare: Callable[[random.Random], Timed]
    note: str = ""
    samples: list[float] = field(default_factory=list)
    db_samples: list[float] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)
    sql: str = ""


class Bench:
    def __init__(self, backend: Backend, meta: dict[str, Any], args: argparse.Namespace) -> None:
        self.backend = backend
        self.meta = meta
        self.args = args
        self.db = Database(backend.url)
        params = meta["params"]
        self.end_ms = params["end_ms"]
        self.start_ms = self.end_ms - params["days"] * DAY
        stats = meta["accounts"]
        self.accounts = sorted(int(a) for a in stats)
        self.rows = {int(a): s["rows"] for a, s in stats.items()}
        self.models = {int(a): s["token_products"] for a, s in stats.items()}
        self.largest = max(self.accounts, key=lambda a: self.rows[a])
        by_rows = sorted(self.accounts, key=lambda a: self.rows[a])
        self.median = by_rows[len(by_rows) // 2]
        self.deep_accounts = [a for a in self.accounts
                              if self.rows[a] >= PAGE * (DEEP_PAGES + 1) + 1]
        self.month = self._month()
        counts: dict[str, int] = {}
        for s in stats.values():
            for p, n in s["products"].items():
                counts[p] = counts.get(p, 0) + n
        self.rarest = min(counts, key=lambda p: counts[p])
        self.product_counts = counts
        self.follow = Query("follow", f"log pages 2-{DEEP_PAGES} (following next_cursor)",
                            LOG_TARGET_MS, lambda rng: (lambda: (0.0, 0.0)))
        self.capture: list[tuple[str, Any]] | None = None
        sa.event.listen(self.db.engine, "before_cursor_execute", self._on_execute)

    def _on_execute(self, conn: Any, cursor: Any, statement: str, parameters: Any,
                    context: Any, executemany: bool) -> None:
        if self.capture is not None and statement.lstrip().upper().startswith("SELECT"):
            self.capture.append((statement, parameters))

    def _month(self) -> str:
        """The latest whole calendar month inside the data."""
        end = dt.datetime.fromtimestamp(self.end_ms / 1000, dt.UTC)
        first = end.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        month_start = (first - dt.timedelta(days=1)).replace(day=1)
        if month_start.timestamp() * 1000 < self.start_ms:
            month_start = first  # less than a whole month of data: take the last one
        return month_start.strftime("%Y-%m")

    def queries(self) -> list[Query]:
        db = self.db
        accounts = self.accounts
        end, start = self.end_ms, self.start_ms
        thirty = end - 30 * DAY

        def account(rng: random.Random) -> int:
            return rng.choice(accounts)

        def page(make: Callable[[random.Random], LogFilter]) -> Callable[[random.Random], Timed]:
            return lambda rng: page_call(db, make(rng))

        def model_filter(rng: random.Random) -> LogFilter:
            a = account(rng)
            models = self.models[a] or ["gpt-4o-mini"]
            return LogFilter(account_id=a, product=rng.choice(models))

        def day_filter(rng: random.Random) -> LogFilter:
            a = account(rng)
            s = start + rng.randrange((end - start - DAY) // HOUR) * HOUR
            return LogFilter(account_id=a, start_ms=s, end_ms=s + DAY)

        def deep(rng: random.Random) -> Timed:
            a = rng.choice(self.deep_accounts or accounts)
            where = LogFilter(account_id=a)
            cursor = None
            out: list[Any] = [None, 0]
            for n in range(DEEP_PAGES):
                total, dbt = page_call(db, where, cursor, out)()
                if n:
                    self.follow.samples.append(total)
                    self.follow.db_samples.append(dbt)
                cursor = out[0]
                if cursor is None:
                    break
            return page_call(db, where, cursor)

        def largest_deep(rng: random.Random) -> Timed:
            return page_call(db, LogFilter(account_id=self.largest), self._cursor_at(
                self.largest, int(self.rows[self.largest] * 0.9)))

        def admin_day(rng: random.Random) -> LogFilter:
            s = start + rng.randrange((end - start - DAY) // HOUR) * HOUR
            return LogFilter(start_ms=s, end_ms=s + DAY)

        qs = [
            Query("page", "log page 1, account", LOG_TARGET_MS,
                  page(lambda rng: LogFilter(account_id=account(rng)))),
            Query("page_model", "log page 1, account + model", LOG_TARGET_MS, page(model_filter)),
            Query("page_range", "log page 1, account + 24 h range", LOG_TARGET_MS,
                  page(day_filter)),
            Query("page_deep", f"log page {DEEP_PAGES + 1}, account (after "
                  f"{DEEP_PAGES} next_cursor)", LOG_TARGET_MS, deep),
            Query("summary_model", "summary 30 d by model", LOG_TARGET_MS,
                  lambda rng: summary_call(db, account(rng), thirty, end, ["model"])),
            Query("summary_day", "summary 30 d by day", LOG_TARGET_MS,
                  lambda rng: summary_call(db, account(rng), thirty, end, ["day"])),
            Query("summary_model_day", "summary 30 d by model,day", LOG_TARGET_MS,
                  lambda rng: summary_call(db, account(rng), thirty, end, ["model", "day"])),
            Query("statement", f"statement {self.month}", STATEMENT_TARGET_MS,
                  lambda rng: statement_call(db, account(rng), self.month)),
            Query("admin_page", "admin log page 1, all accounts", LOG_TARGET_MS,
                  page(lambda rng: LogFilter())),
            # beyond the list: filters the API offers, and the worst account
            Query("page_key", "log page 1, account + key", LOG_TARGET_MS,
                  page(lambda rng: self._key_filter(rng))),
            Query("page_topup", "log page 1, account + type=topup", LOG_TARGET_MS,
                  page(lambda rng: LogFilter(account_id=account(rng), type="topup"))),
            Query("page_error", "log page 1, account + type=error", LOG_TARGET_MS,
                  page(lambda rng: LogFilter(account_id=account(rng), type="error"))),
            Query("page_per_call", "log page 1, account + billing_type=per_call",
                  LOG_TARGET_MS,
                  page(lambda rng: LogFilter(account_id=account(rng), billing_type="per_call"))),
            Query("largest_page", f"largest account ({self.rows[self.largest]:,} rows): page 1",
                  LOG_TARGET_MS, page(lambda rng: LogFilter(account_id=self.largest))),
            Query("largest_deep", "largest account: page at 90 % depth", LOG_TARGET_MS,
                  largest_deep, note="cursor computed with OFFSET (untimed)"),
            Query("largest_summary", "largest account: summary 30 d by model,day",
                  LOG_TARGET_MS, lambda rng: summary_call(db, self.largest, thirty, end,
                                                          ["model", "day"])),
            Query("largest_statement", f"largest account: statement {self.month}",
                  STATEMENT_TARGET_MS, lambda rng: statement_call(db, self.largest, self.month)),
            Query("admin_range", "admin log page 1, 24 h range", LOG_TARGET_MS,
                  page(admin_day)),
            Query("admin_rare", f"admin log page 1, product={self.rarest} (rarest)",
                  LOG_TARGET_MS, page(lambda rng: LogFilter(product=self.rarest))),
            Query("admin_topup", "admin log page 1, type=topup", LOG_TARGET_MS,
                  page(lambda rng: LogFilter(type="topup"))),
        ]
        return qs

    def _key_filter(self, rng: random.Random) -> LogFilter:
        a = rng.choice(self.accounts)
        with self.db.read() as conn:
            keys = [k for (k,) in conn.exec_driver_sql(
                f"SELECT id FROM api_keys WHERE account_id = {int(a)} ORDER BY id")]
        return LogFilter(account_id=a, key_id=rng.choice(keys))

    def _cursor_at(self, account_id: int, offset: int) -> str:
        with self.db.read() as conn:
            at, rid = conn.exec_driver_sql(
                "SELECT created_at_ms, id FROM usage_records WHERE account_id = "
                f"{int(account_id)} ORDER BY created_at_ms DESC, id DESC LIMIT 1 "
                f"OFFSET {int(offset)}").one()
        return encode_cursor(int(at), int(rid))

    def run(self) -> dict[str, Any]:
        args = self.args
        qs = self.queries()
        rng = random.Random(args.seed * 1000 + 7)
        total = args.warmup + args.iterations
        t0 = time.perf_counter()
        for it in range(total):
            for q in qs:
                fn = q.prepare(rng)
                if it < args.warmup:
                    fn()
                    continue
                tot, dbt = fn()
                q.samples.append(tot)
                q.db_samples.append(dbt)
            if it == args.warmup - 1:
                self.follow.samples.clear()
                self.follow.db_samples.clear()
            if (it + 1) % 10 == 0 or it + 1 == total:
                log(f"[{self.backend.name}] queries: iteration {it + 1}/{total} "
                    f"({_dur(time.perf_counter() - t0)})")
        qs.insert(4, self.follow)
        if args.plans or args.json or args.json_out:
            self.plans(qs, random.Random(args.seed * 1000 + 99))
        return {"queries": [self._stats(q) for q in qs], "exports": self.exports(),
                "month": self.month, "largest_account": self.largest,
                "median_account": self.median}

    def plans(self, qs: list[Query], rng: random.Random) -> None:
        for q in qs:
            if q.key == "follow":
                continue
            fn = q.prepare(rng)
            self.capture = []
            try:
                fn()
            finally:
                captured, self.capture = self.capture, None
            lines: list[str] = []
            sqls = []
            with self.db.read() as conn:
                for statement, params in captured:
                    if not any(t in statement for t in ("usage_records", "usage_rollups",
                                                        "wallet_days")):
                        continue
                    sqls.append(_one_line(statement))
                    lines.append("-- " + _one_line(statement)[:160] + " ...")
                    lines += self.backend.explain(conn, statement, params)
            q.plan = lines
            q.sql = "\n".join(sqls)

    @staticmethod
    def _stats(q: Query) -> dict[str, Any]:
        s = sorted(x * 1000 for x in q.samples)
        d = sorted(x * 1000 for x in q.db_samples)
        if not s:
            return {"key": q.key, "label": q.label, "n": 0}
        p95 = s[max(0, math.ceil(0.95 * len(s)) - 1)]
        return {"key": q.key, "label": q.label, "n": len(s), "p50_ms": statistics.median(s),
                "p95_ms": p95, "max_ms": s[-1], "db_p50_ms": statistics.median(d),
                "db_p95_ms": d[max(0, math.ceil(0.95 * len(d)) - 1)],
                "target_ms": q.target_ms,
                "pass": None if q.target_ms is None else p95 < q.target_ms,
                "note": q.note, "plan": q.plan}

    # -- exports

    def exports(self) -> dict[str, Any]:
        """Rows/s untraced; then the same export under tracemalloc, noting the peak after the
        first 10 % of the rows (at least 3 keyset chunks of ``iter_usage``) and at the end: a
        streamed export's peak must not grow with the rows it has written. An account with
        fewer than twice that many rows cannot show it (its peak is one or two chunks)."""
        out: dict[str, Any] = {"runs": []}
        for label, account_id in (("median account", self.median),
                                  ("largest account", self.largest)):
            timed = self._export(account_id, traced=False)
            traced = self._export(account_id, traced=True)
            run = {"label": label, "account_id": account_id, "rows": timed["rows"],
                   "bytes": timed["bytes"], "seconds": timed["seconds"],
                   "rows_per_s": timed["rows"] / timed["seconds"],
                   "rss_peak_delta_mib": timed["rss_delta_mib"],
                   "tracemalloc_peak_mib": traced["peak_mib"],
                   "tracemalloc_peak_at_10pct_mib": traced["early_peak_mib"],
                   "traced_seconds": traced["seconds"]}
            run["flat"] = (None if not traced["early_peak_mib"] else
                           run["tracemalloc_peak_mib"]
                           <= 1.25 * run["tracemalloc_peak_at_10pct_mib"] + 0.5)
            run["early_rows"] = traced["early_rows"]
            out["runs"].append(run)
            early = (f"{run['tracemalloc_peak_at_10pct_mib']:.2f} MiB after "
                     f"{run['early_rows']:,} rows, " if run["early_rows"] else "")
            log(f"[{self.backend.name}] export {label} {account_id}: {run['rows']:,} rows in "
                f"{run['seconds']:.2f} s ({run['rows_per_s']:,.0f} rows/s); traced peak "
                f"{early}{run['tracemalloc_peak_mib']:.2f} MiB at the end; RSS high-water "
                f"{run['rss_peak_delta_mib']:+.1f} MiB")
        small, big = out["runs"]
        judged = [r["flat"] for r in out["runs"] if r["flat"] is not None]
        out["flat"] = {"pass": all(judged) if judged else None,
                       "rows_ratio": big["rows"] / max(1, small["rows"]),
                       "rule": "peak at the end <= 1.25 x peak after max(10 %, 6,001) of the "
                               "rows + 0.5 MiB"}
        return out

    def _export(self, account_id: int, *, traced: bool) -> dict[str, Any]:
        where = LogFilter(account_id=account_id)
        count = 0
        early_at = max(self.rows[account_id] // 10, 3 * 2000 + 1)
        if 2 * early_at > self.rows[account_id]:
            early_at = 0  # too few rows to tell growth from the chunk size
        early_peak = 0

        def counted(rows: Iterator[Any]) -> Iterator[Any]:
            nonlocal count, early_peak
            for r in rows:
                count += 1
                if traced and count == early_at:
                    early_peak = tracemalloc.get_traced_memory()[1]
                yield r

        nbytes = 0
        _reset_hwm()
        rss0 = _rss_mib()
        if traced:
            tracemalloc.start()
            tracemalloc.reset_peak()
        t0 = time.perf_counter()
        with self.db.read() as conn:
            for chunk in export_csv(counted(store.iter_usage(conn, where))):
                nbytes += len(chunk)
        seconds = time.perf_counter() - t0
        peak = 0
        if traced:
            _cur, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        return {"rows": count, "bytes": nbytes, "seconds": seconds, "peak_mib": peak / 2**20,
                "early_peak_mib": early_peak / 2**20, "early_rows": early_at,
                "rss_delta_mib": _hwm_mib() - rss0}


def _one_line(sql: str) -> str:
    return " ".join(sql.split())


def _status(field_name: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _rss_mib() -> float:
    return _status("VmRSS")


def _hwm_mib() -> float:
    return _status("VmHWM")


def _reset_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        pass


# --------------------------------------------------------------------------- output


def machine() -> dict[str, Any]:
    model, commit = cpu_model(), git_commit()
    mem = _meminfo_gib()
    return {"nproc": os.cpu_count(), "cpu_model": model, "memory_gib": mem,
            "python": platform.python_version(), "sqlalchemy": sa.__version__,
            "psycopg": psycopg.__version__, "commit": commit,
            "loadavg_start": loadavg(), "date": _now_text()}


def _meminfo_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            return round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return float("nan")


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"Tollway reports benchmark  ({m['date']})",
        (f"machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB RAM, Python "
         f"{m['python']}, SQLAlchemy {m['sqlalchemy']}, psycopg {m['psycopg']}, commit "
         f"{m['commit']}; load average at start {m['loadavg_start']}, at end "
         f"{m['loadavg_end']}"),
    ]
    for b in results["backends"]:
        p, ld = b["meta"]["params"], b["meta"]["load"]
        lines.append(
            f"{b['backend']}: {ld['requests']:,} requests + {ld['events']:,} other events for "
            f"{p['accounts']:,} accounts over {p['days']} days (seed {p['seed']}); "
            f"{ld['rollup_rows']:,} rollup rows, {ld['wallet_rows']:,} wallet days; "
            f"database {b['size_bytes'] / 2**30:.1f} GiB")
        reused = " (reused: loaded earlier)" if b["reused"] else ""
        lines.append(
            f"  load{reused} {ld['loaded_at']}: {_dur(ld['seconds_total'])} total = rows "
            f"{_dur(ld['seconds_rows'])} ({ld['rows_per_s']:,} rows/s; generator "
            f"{_dur(ld['seconds_generate'])} of it) + indexes/after "
            f"{_dur(ld['seconds_after'])}; rollups == raw sums, wallet days == balances: "
            f"{'OK' if ld['rollup_check']['ok'] else 'MISMATCH'}")
        lines.append("  settings: " + ", ".join(f"{k}={v}" for k, v in b["settings"].items()))
    header = (f"{'backend':<10} {'query':<52} {'n':>5} {'p50':>7} {'p95':>7} {'max':>7} "
              f"{'db p50':>7} {'target':>7}  result")
    lines += ["", "times in ms; 'db' = the store call alone (no view/JSON)", header,
              "-" * len(header)]
    for b in results["backends"]:
        for q in b["queries"]:
            if not q["n"]:
                continue
            target = f"{q['target_ms']:.0f}" if q["target_ms"] else "-"
            verdict = "-" if q["pass"] is None else ("PASS" if q["pass"] else "FAIL")
            lines.append(f"{b['backend']:<10} {q['label']:<52} {q['n']:>5} {q['p50_ms']:>7.1f} "
                         f"{q['p95_ms']:>7.1f} {q['max_ms']:>7.1f} {q['db_p50_ms']:>7.1f} "
                         f"{target:>7}  {verdict}")
    lines.append("")
    for b in results["backends"]:
        e = b["exports"]
        for r in e["runs"]:
            lines.append(
                f"{b['backend']:<10} CSV export, {r['label']} {r['account_id']} "
                f"({r['rows']:,} rows, {r['bytes'] / 2**20:.1f} MiB): {r['rows_per_s']:,.0f} "
                f"rows/s; peak Python heap (tracemalloc) "
                + (f"{r['tracemalloc_peak_at_10pct_mib']:.2f} MiB after {r['early_rows']:,} "
                   "rows, " if r["early_rows"] else "")
                + f"{r['tracemalloc_peak_mib']:.2f} MiB at the end; "
                f"RSS high-water {r['rss_peak_delta_mib']:+.1f} MiB")
        f = e["flat"]
        verdict = "n/a" if f["pass"] is None else ("PASS" if f["pass"] else "FAIL")
        lines.append(f"{b['backend']:<10} export memory flat ({f['rule']}): {verdict}")
    if results.get("plans"):
        for b in results["backends"]:
            lines += ["", f"query plans, {b['backend']}:"]
            for q in b["queries"]:
                if q.get("plan"):
                    lines.append(f"  [{q['label']}]")
                    lines += ["    " + x for x in q["plan"]]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _schema() -> str:
    """A fingerprint of the reported tables' columns and indexes: migrations get edited in place,
    so an old database must not be reused after its schema changed."""
    parts = []
    for table in (usage_records, usage_rollups, wallet_days):
        parts.append(table.name + ":" + ",".join(c.name for c in table.c))
        parts += sorted(f"{i.name}({','.join(c.name for c in i.columns)})"
                        for i in table.indexes)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def prepare(backend: Backend, params: dict[str, Any], reuse: bool) -> tuple[dict[str, Any], bool]:
    if reuse:
        meta = backend.exists()
        if meta is not None:
            want = {k: params[k] for k in ("records", "accounts", "days", "seed", "generator",
                                           "schema")}
            have = {k: meta["params"].get(k) for k in want}
            if want == have:
                log(f"[{backend.name}] --reuse: data loaded {meta['load']['loaded_at']} "
                    "with the same parameters, skipping the load")
                return meta, True
            log(f"[{backend.name}] --reuse: the database holds other data ({have}); loading")
        else:
            log(f"[{backend.name}] --reuse: no complete earlier load found; loading")
    return load(backend, params), False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=10_000_000, help="gateway request records")
    ap.add_argument("--accounts", type=int, default=1000)
    ap.add_argument("--days", type=int, default=90)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--postgres", metavar="URL",
                    help="PostgreSQL server (or TOLLWAY_BENCH_POSTGRES_URL); the bench "
                         "creates its own database on it (--pg-database)")
    ap.add_argument("--pg-database", default="tollway_bench_reports")
    ap.add_argument("--sqlite-path", default=os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "var",
        "bench-reports.sqlite"))
    ap.add_argument("--no-sqlite", action="store_true")
    ap.add_argument("--reuse", action="store_true",
                    help="skip the load when the database already holds this data")
    ap.add_argument("--load-only", action="store_true", help="load, do not time")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--plans", action="store_true",
                    help="print each query's plan (EXPLAIN QUERY PLAN / EXPLAIN ANALYZE)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--json-out", metavar="PATH", help="also write the results as JSON here")
    args = ap.parse_args(argv)

    today = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    params = {"records": args.records, "accounts": args.accounts, "days": args.days,
              "seed": args.seed, "generator": GENERATOR_VERSION, "schema": _schema(),
              "end_ms": int(today.timestamp() * 1000)}
    backends: list[Backend] = []
    if not args.no_sqlite:
        backends.append(SQLiteBackend(args.sqlite_path))
    pg = args.postgres or os.environ.get("TOLLWAY_BENCH_POSTGRES_URL")
    if pg:
        backends.append(PostgresBackend(pg, args.pg_database))
    results: dict[str, Any] = {"machine": machine(), "backends": [], "plans": args.plans}
    ok = True
    for backend in backends:
        meta, reused = prepare(backend, params, args.reuse)
        ok &= meta["load"]["rollup_check"]["ok"]
        entry: dict[str, Any] = {"backend": backend.name, "meta": {
            "params": meta["params"], "load": meta["load"]}, "reused": reused,
            "size_bytes": backend.size(), "settings": backend.settings()}
        if not args.load_only:
            bench = Bench(backend, meta, args)
            entry.update(bench.run())
            bench.db.dispose()
        else:
            entry.update({"queries": [], "exports": {"runs": [], "flat": {
                "pass": True, "rows_ratio": 0, "rule": "-"}}})
        results["backends"].append(entry)
    results["machine"]["loadavg_end"] = loadavg()
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2, default=str)
    print(json.dumps(results, indent=2, default=str) if args.json else render(results))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
