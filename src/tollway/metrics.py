"""What the server counts, for ``GET /metrics`` (Prometheus text exposition format 0.0.4).

The counters are ``prometheus_client`` metrics. Under ``tollway serve`` they run in its
*multiprocess mode*: each worker writes its values to memory-mapped files in a directory the
server owns (``PROMETHEUS_MULTIPROC_DIR``, emptied when the server starts, see
:mod:`tollway.metrics_files`), and a scrape, whichever worker answers it, merges the files of every
worker the server has had. So counters never go backwards between scrapes (a dead worker's
files stay and keep counting in the sums), histograms merge bucket by bucket, and the in-flight
gauge sums the live workers only. Outside ``tollway serve`` (an app built by a test) the values
live in this process.

Per worker, never summed: the standard process metrics (CPU, memory, open files) of every live
worker, read from ``/proc`` at scrape time and labelled ``worker="<pid>"``. Every sample also
gets ``instance`` (the ``instance`` setting) at scrape time, which costs nothing per request.

The request path only adds to plain ints; each worker publishes them to its files once a
second and before it answers a scrape (see :class:`Metrics` for why, measured).
``tollway_http_requests_total`` is derived from the latency histogram's count at scrape time
rather than counted twice. Money counters are integer
nano-USD (``_nano_usd_total``): Prometheus values are floats, exact for integers below 2**53.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from bisect import bisect_left
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import values as _values
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from tollway import settings
from tollway.metrics_files import MULTIPROC_ENV, WORKER_MARK

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
COMMIT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: how often a worker adds its counts to the shared files (see :class:`Metrics`)
PUBLISH_INTERVAL_S = 1.0

log = logging.getLogger("tollway.metrics")
disable_created_metrics()  # type: ignore[no-untyped-call]  # no ``_created`` series: they are not in the 0.0.4 format we served


def multiprocess() -> bool:
    """True when prometheus_client writes values to files (it chooses once, at its import,
    from ``PROMETHEUS_MULTIPROC_DIR``: ``tollway serve`` sets that before importing the app)."""
    return bool(getattr(_values.ValueClass, "_multiprocess", False))


class Tally:
    """A histogram in plain ints; ``counts[i]`` counts values in (bounds[i-1], bounds[i]]
    (the last, values above every bound), as prometheus_client's histogram buckets do."""

    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1


class Metrics:
    """The server's counters. One instance, :data:`METRICS`.

    The request path only adds to plain ints (no lock: the event loop is one thread; the
    writer thread touches only the writer's tallies, each ``+=`` safe under the GIL). Every
    :data:`PUBLISH_INTERVAL_S`, when the worker stops, and before it answers a scrape,
    :meth:`publish` adds what changed since the last time to the prometheus_client metrics
    (in multiprocess mode, the worker's mmap files): updating those on every request cost
    13.6 µs of CPU (docs/benchmarks.md), more than the 10 µs allowed. So a scrape shows the
    answering worker's counts as of now and the others' as of at most that interval ago."""

    def __init__(self) -> None:
        self.multiprocess = multiprocess()
        #: the in-process registry (None in multiprocess mode: a scrape merges the files)
        self.registry = None if self.multiprocess else CollectorRegistry(auto_describe=False)
        #: (route, product, status) → request latency (its count is the requests)
        self.requests: dict[tuple[str, str, str], Tally] = {}
        #: product → [charges, revenue in nano-USD]
        self.charges: dict[str, list[int]] = {}
        #: (product, code, status) → upstream failures
        self.upstream_errors: dict[tuple[str, str, str], int] = {}
        self.shed = 0
        self.inflight = 0
        self.storage_unavailable = 0
        self.writer_batch = Tally(BATCH_BUCKETS)
        self.writer_commit = Tally(COMMIT_BUCKETS_S)
        self._published = _Published(self.registry)
        self._done: dict[tuple[str, ...], Any] = {}  # what was published, by series
        #: (channel, outcome: ok | error | the failing status) → upstream attempts (this worker)
        self.channel_attempts: dict[tuple[str, str], int] = {}
        #: the channels and their circuit states now, set by the gateway: () → [(id, state)]
        self.channel_states: Callable[[], list[tuple[str, str]]] | None = None

    def channel_attempt(self, channel: str, outcome: str) -> None:
        key = (channel, outcome)
        self.channel_attempts[key] = self.channel_attempts.get(key, 0) + 1

    def request(self, route: str, product: str, status: int, seconds: float) -> None:
        key = (route, product, str(status))
        tally = self.requests.get(key)
        if tally is None:
            tally = self.requests[key] = Tally(LATENCY_BUCKETS_S)
        tally.observe(seconds)

    def charge(self, product: str, cost_nano: int) -> None:
        found = self.charges.get(product)
        if found is None:
            self.charges[product] = [1, cost_nano]
        else:
            found[0] += 1
            found[1] += cost_nano

    def upstream_error(self, product: str, code: str, status: int) -> None:
        key = (product, code, str(status))
        self.upstream_errors[key] = self.upstream_errors.get(key, 0) + 1

    def publish(self) -> None:
        """Add what changed since the last call to the prometheus_client metrics."""
        out = self._published
        for key, tally in list(self.requests.items()):
            self._histogram(("request", *key), tally, out.duration.labels(*key))
        self._histogram(("batch",), self.writer_batch, out.writer_batch)
        self._histogram(("commit",), self.writer_commit, out.writer_commit)
        for product, (count, nano) in list(self.charges.items()):
            self._counter(("charges", product), count, out.charges.labels(product))
            self._counter(("revenue", product), nano, out.revenue.labels(product))
        for key, count in list(self.upstream_errors.items()):
            self._counter(("upstream", *key), count, out.upstream_errors.labels(*key))
        for (channel, outcome), count in list(self.channel_attempts.items()):
            self._counter(("channel", channel, outcome), count,
                          out.channel_attempts.labels(channel, outcome))
        self._counter(("shed",), self.shed, out.shed)
        self._counter(("unavailable",), self.storage_unavailable, out.storage_unavailable)
        out.inflight.set(self.inflight)

    async def publish_every(self, seconds: float = 0.0) -> None:
        """A worker's background task: :meth:`publish` every ``seconds`` (default
        :data:`PUBLISH_INTERVAL_S`), and once more when cancelled."""
        try:
            while True:
                await asyncio.sleep(seconds or PUBLISH_INTERVAL_S)
                try:
                    self.publish()
                except Exception:  # noqa: BLE001 - monitoring must not stop serving
                    log.exception("could not publish the metrics (next try in a second)")
        finally:
            self.publish()

    def _counter(self, key: tuple[str, ...], value: int, counter: Any) -> None:
        done = self._done.get(key, 0)
        if value != done:
            counter.inc(value - done)
            self._done[key] = value

    def _histogram(self, key: tuple[str, ...], tally: Tally, histogram: Any) -> None:
        counts, total = list(tally.counts), tally.total
        done_counts, done_total = self._done.get(key) or ([0] * len(counts), 0.0)
        if counts == done_counts:
            return
        # prometheus_client has no public call to add n observations at once: its children's
        # per-bucket values (what ``observe`` increments) are used directly.
        for value, (now, before) in zip(histogram._buckets, zip(counts, done_counts,
                                                                 strict=True), strict=True):
            if now != before:
                value.inc(now - before)
        histogram._sum.inc(total - done_total)
        self._done[key] = (counts, total)

    def exposition(self, *, open_holds: int, oldest_hold_age_s: float) -> str:
        """Every worker's counters (merged), the database's hold figures and each live
        worker's process metrics, every sample labelled with the instance."""
        self.publish()
        if self.multiprocess:
            directory = os.environ[MULTIPROC_ENV]
            workers = sweep_workers(Path(directory))
            collector = MultiProcessCollector(None, directory)  # type: ignore[no-untyped-call]
            families = list(collector.collect())  # type: ignore[no-untyped-call]
        else:
            assert self.registry is not None
            workers = [os.getpid()]
            families = list(self.registry.collect())
        families = [*_with_request_counts(families),
                    GaugeMetricFamily("tollway_open_holds",
                                      "holds not yet settled, voided or expired "
                                      "(whole database)", value=open_holds),
                    GaugeMetricFamily("tollway_oldest_open_hold_age_seconds",
                                      "age of the oldest open hold (0 when none); one older "
                                      "than the hold TTL means a dead process left it and the "
                                      "reaper has not run", value=oldest_hold_age_s),
                    *worker_families(workers), *self._channel_families()]
        label = instance()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Fixed([_labelled(f, "instance", label) for f in families]))
        return generate_latest(registry).decode()


    def _channel_families(self) -> list[Metric]:
        """Each channel's circuit state in this worker (a circuit is per process), labelled
        with the worker, so two workers' states are two series, never one mixed one. Attempts
        are counters, merged over the workers like the others (``publish``)."""
        states = GaugeMetricFamily(
            "tollway_channel_state", "1 for each channel's circuit state in the answering "
            "worker (closed, open, half_open, disabled)", labels=["channel", "state", "worker"])
        worker = str(os.getpid())
        for channel, state in (self.channel_states() if self.channel_states else []):
            states.add_metric([channel, state, worker], 1)
        return [states]


class _Published:
    """The prometheus_client side of :class:`Metrics` (written only by ``publish``)."""

    def __init__(self, reg: CollectorRegistry | None) -> None:
        self.duration = Histogram(
            "tollway_http_request_duration_seconds",
            "time from the request's arrival to the end of its response (streams included)",
            ("route", "product", "status"), buckets=LATENCY_BUCKETS_S, registry=reg)
        self.charges = Counter("tollway_charges", "settled charges, by product", ("product",),
                               registry=reg)
        self.revenue = Counter("tollway_revenue_nano_usd",
                               "charged amount in nano-USD (1e-9 USD), by product",
                               ("product",), registry=reg)
        self.upstream_errors = Counter(
            "tollway_upstream_errors",
            "upstream failures (code upstream_error or upstream_timeout; status as answered to "
            "the client), by product", ("product", "code", "status"), registry=reg)
        self.channel_attempts = Counter(
            "tollway_channel_attempts",
            "upstream attempts by channel and outcome (ok, error, or the failing status)",
            ("channel", "outcome"), registry=reg)
        self.inflight = Gauge("tollway_inflight_requests",
                              "requests the server's live workers are serving now",
                              multiprocess_mode="livesum", registry=reg)
        self.shed = Counter("tollway_shed_requests",
                            "requests refused with 503 overloaded (max_inflight_requests "
                            "reached)", registry=reg)
        self.storage_unavailable = Counter(
            "tollway_storage_unavailable",
            "requests answered 503 storage_unavailable (the database could not be reached)",
            registry=reg)
        self.writer_batch = Histogram("tollway_writer_batch_size",
                                      "operations per database writer transaction",
                                      buckets=BATCH_BUCKETS, registry=reg)
        self.writer_commit = Histogram(
            "tollway_writer_commit_seconds",
            "duration of a writer transaction, from BEGIN to durable COMMIT",
            buckets=COMMIT_BUCKETS_S, registry=reg)


def register_worker() -> None:
    """Called once by each worker's app: its process metrics are shown while it lives."""
    if multiprocess():
        (Path(os.environ[MULTIPROC_ENV]) / f"{WORKER_MARK}{os.getpid()}").touch()


def sweep_workers(directory: Path) -> list[int]:
    """The live workers' pids; a dead worker's live gauges are dropped (its counters stay, so
    that sums never go backwards) and so is its mark."""
    live = []
    for mark in directory.glob(WORKER_MARK + "*"):
        pid = int(mark.name[len(WORKER_MARK):])
        if _alive(pid):
            live.append(pid)
        else:
            mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
            mark.unlink(missing_ok=True)
    return sorted(live)


def worker_families(pids: list[int]) -> list[Metric]:
    """The standard ``process_*`` metrics and the peak resident memory of each worker, one
    series per worker (``worker="<pid>"``)."""
    merged: dict[str, Metric] = {}
    for pid in pids:
        found = list(ProcessCollector(pid=_constant(pid), registry=None).collect())
        found.append(GaugeMetricFamily("tollway_process_peak_resident_memory_bytes",
                                       "the worker's peak resident memory (VmHWM)",
                                       value=memory_bytes(pid)[1]))
        for family in found:
            family = _labelled(family, "worker", str(pid))
            if family.name in merged:
                merged[family.name].samples.extend(family.samples)
            else:
                merged[family.name] = family
    return list(merged.values())


def instance() -> str:
    """What tells this server's series from another's (the ``instance`` setting; ``tollway
    serve`` defaults it to host:port)."""
    return settings.get("instance") or socket.gethostname()


def memory_bytes(pid: int | str = "self") -> tuple[int, int]:
    """(resident, peak resident) memory of a process in bytes, from /proc (0 elsewhere)."""
    rss = peak = 0
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, peak


def _constant(pid: int) -> Callable[[], int]:
    return lambda: pid


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _with_request_counts(families: list[Metric]) -> Iterable[Metric]:
    """``tollway_http_requests_total`` (from the latency histogram's counts) before it."""
    for family in families:
        if family.name == "tollway_http_request_duration_seconds":
            counts = Metric("tollway_http_requests",
                            "HTTP requests answered, by route, product and status", "counter")
            counts.samples = [Sample("tollway_http_requests_total", s.labels, s.value)
                              for s in family.samples if s.name.endswith("_count")]
            yield counts
        yield family


def _labelled(family: Metric, name: str, value: str) -> Metric:
    copy = Metric(family.name, family.documentation, family.type, family.unit)
    copy.samples = [s._replace(labels={**s.labels, name: value}) for s in family.samples]
    return copy


class _Fixed(Collector):
    """A collector of families already collected (for ``generate_latest``)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


METRICS = Metrics()
