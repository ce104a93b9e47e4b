"""What a worker process counts, for ``GET /metrics`` (Prometheus text exposition format).

Every worker counts its own requests (there is no shared memory between uvicorn workers);
a scrape through a port served by several workers reaches one of them, so run one worker per
port (or per instance) when per-process detail matters — the ledger-side figures (open holds,
their age) come from the database and are the same from every worker.

The hot path only adds to plain ints in dicts: no locks (the event loop is one thread; the
writer thread only touches the writer's own histograms, and the GIL makes each ``+=`` on them
safe enough for monitoring). Money counters are integer nano-USD (``_nano_usd_total``):
Prometheus values are floats, but an integer below 2**53 is exact in one.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
COMMIT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class Histogram:
    """Cumulative-bucket histogram; ``counts[i]`` counts values in (bounds[i-1], bounds[i]]."""

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

    def lines(self, name: str, labels: str) -> Iterable[str]:
        sep = "," if labels else ""
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            yield f'{name}_bucket{{{labels}{sep}le="{_num(bound)}"}} {running}'
        yield f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}'
        braced = f"{{{labels}}}" if labels else ""
        yield f"{name}_sum{braced} {_num(self.total)}"
        yield f"{name}_count{braced} {self.count}"


class Metrics:
    """The process's counters. One instance, :data:`METRICS`."""

    def __init__(self) -> None:
        self.started_s = time.time()
        #: (route, product, status) → request latency histogram (its count is the requests)
        self.requests: dict[tuple[str, str, str], Histogram] = {}
        #: product → [charges, revenue in nano-USD]
        self.charges: dict[str, list[int]] = {}
        #: (product, code, status) → upstream failures
        self.upstream_errors: dict[tuple[str, str, str], int] = {}
        #: (channel, outcome: ok | error | the failing status) → upstream attempts
        self.channel_attempts: dict[tuple[str, str], int] = {}
        #: the channels and their circuit states now, set by the gateway: () → [(id, state)]
        self.channel_states: Callable[[], list[tuple[str, str]]] | None = None
        self.shed = 0
        self.inflight = 0
        self.storage_unavailable = 0
        self.writer_batch = Histogram(BATCH_BUCKETS)
        self.writer_commit = Histogram(COMMIT_BUCKETS_S)

    def request(self, route: str, product: str, status: int, seconds: float) -> None:
        key = (route, product, str(status))
        histogram = self.requests.get(key)
        if histogram is None:
            histogram = self.requests[key] = Histogram(LATENCY_BUCKETS_S)
        histogram.observe(seconds)

    def charge(self, product: str, cost_nano: int) -> None:
        found = self.charges.get(product)
        if found is None:
            self.charges[product] = [1, cost_nano]
        else:
            found[0] += 1
            found[1] += cost_nano

    def channel_attempt(self, channel: str, outcome: str) -> None:
        key = (channel, outcome)
        self.channel_attempts[key] = self.channel_attempts.get(key, 0) + 1

    def upstream_error(self, product: str, code: str, status: int) -> None:
        key = (product, code, str(status))
        self.upstream_errors[key] = self.upstream_errors.get(key, 0) + 1

    def exposition(self, *, open_holds: int, oldest_hold_age_s: float) -> str:
        """Everything in Prometheus text format 0.0.4."""
        out: list[str] = []

        def family(name: str, kind: str, help_: str) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")

        family("tollway_http_requests_total", "counter",
               "HTTP requests answered by this worker, by route, product and status")
        for (route, product, status), hist in sorted(self.requests.items()):
            out.append(f"tollway_http_requests_total{{{_labels(route, product, status)}}} "
                       f"{hist.count}")
        family("tollway_http_request_duration_seconds", "histogram",
               "time from the request's arrival to the end of its response (streams included)")
        for (route, product, status), hist in sorted(self.requests.items()):
            out.extend(hist.lines("tollway_http_request_duration_seconds",
                                  _labels(route, product, status)))
        family("tollway_charges_total", "counter", "settled charges, by product")
        family("tollway_revenue_nano_usd_total", "counter",
               "charged amount in nano-USD (1e-9 USD), by product")
        for product, (count, nano) in sorted(self.charges.items()):
            out.append(f'tollway_charges_total{{product="{_esc(product)}"}} {count}')
            out.append(f'tollway_revenue_nano_usd_total{{product="{_esc(product)}"}} {nano}')
        family("tollway_upstream_errors_total", "counter",
               "upstream failures (code upstream_error or upstream_timeout; status as answered "
               "to the client), by product")
        for (product, code, status), count in sorted(self.upstream_errors.items()):
            out.append(f'tollway_upstream_errors_total{{product="{_esc(product)}",'
                       f'code="{code}",status="{status}"}} {count}')
        family("tollway_channel_attempts_total", "counter",
               "upstream attempts by channel and outcome (ok, error, or the failing status)")
        for (channel, outcome), count in sorted(self.channel_attempts.items()):
            out.append(f'tollway_channel_attempts_total{{channel="{_esc(channel)}",'
                       f'outcome="{outcome}"}} {count}')
        family("tollway_channel_state", "gauge",
               "1 for each channel's circuit state in this worker (closed, open, half_open, "
               "disabled)")
        for channel, state in (self.channel_states() if self.channel_states else []):
            out.append(f'tollway_channel_state{{channel="{_esc(channel)}",'
                       f'state="{state}"}} 1')
        family("tollway_inflight_requests", "gauge", "requests this worker is serving now")
        out.append(f"tollway_inflight_requests {self.inflight}")
        family("tollway_shed_requests_total", "counter",
               "requests refused with 503 overloaded (max_inflight_requests reached)")
        out.append(f"tollway_shed_requests_total {self.shed}")
        family("tollway_storage_unavailable_total", "counter",
               "requests answered 503 storage_unavailable (the database could not be reached)")
        out.append(f"tollway_storage_unavailable_total {self.storage_unavailable}")
        family("tollway_open_holds", "gauge", "holds not yet settled, voided or expired "
               "(whole database)")
        out.append(f"tollway_open_holds {open_holds}")
        family("tollway_oldest_open_hold_age_seconds", "gauge",
               "age of the oldest open hold (0 when none); one older than the hold TTL means "
               "a dead process left it and the reaper has not run")
        out.append(f"tollway_oldest_open_hold_age_seconds {_num(oldest_hold_age_s)}")
        family("tollway_writer_batch_size", "histogram",
               "operations per database writer transaction")
        out.extend(self.writer_batch.lines("tollway_writer_batch_size", ""))
        family("tollway_writer_commit_seconds", "histogram",
               "duration of a writer transaction, from BEGIN to durable COMMIT")
        out.extend(self.writer_commit.lines("tollway_writer_commit_seconds", ""))
        rss, peak = memory_bytes()
        family("tollway_process_resident_memory_bytes", "gauge", "this worker's resident memory")
        out.append(f"tollway_process_resident_memory_bytes {rss}")
        family("tollway_process_peak_resident_memory_bytes", "gauge",
               "this worker's peak resident memory (VmHWM)")
        out.append(f"tollway_process_peak_resident_memory_bytes {peak}")
        family("tollway_process_start_time_seconds", "gauge", "when this worker started (Unix)")
        out.append(f"tollway_process_start_time_seconds {_num(self.started_s)}")
        family("tollway_process_info", "gauge", "this worker's pid")
        out.append(f'tollway_process_info{{pid="{os.getpid()}"}} 1')
        return "\n".join(out) + "\n"


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


def _labels(route: str, product: str, status: str) -> str:
    return f'route="{_esc(route)}",product="{_esc(product)}",status="{status}"'


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value)) if abs(
        value) < 1e15 else repr(float(value))


METRICS = Metrics()
