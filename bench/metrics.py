"""What counting one request costs the hot path: CPU per request of the metric updates a
metered request makes (in-flight up and down, the latency histogram, a charge), same run, three
ways:

* ``plain`` - plain ints in dicts, as the hand-written exposition before issue 15 did;
* ``direct`` - prometheus_client metrics updated on every request, in multiprocess mode (each
  update a locked write to an mmap file), as its documentation suggests;
* ``tollway`` - ``tollway.metrics`` as ``tollway serve`` runs it: plain ints on the request
  path, published to prometheus_client's multiprocess files once a second (here: once every
  ``--publish-every`` requests, its cost included);

and the CPU of one scrape (publish, merge the files, read /proc).

    python bench/metrics.py [--requests N] [--rounds R] [--products P]

Each variant runs in its own fresh interpreter (the multiprocess mode is chosen at import),
rounds interleaved; figures are the median CPU time (``time.process_time``) per request.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, sys, time
from bisect import bisect_left
requests, products, variant = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
labels = [(f"/v1/chat/completions", f"model-{i % products}", 200) for i in range(requests)]
if variant == "plain":
    BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
    class H:
        __slots__ = ("counts", "total", "count")
        def __init__(self):
            self.counts = [0] * 14; self.total = 0.0; self.count = 0
        def observe(self, v):
            self.counts[bisect_left(BOUNDS, v)] += 1; self.total += v; self.count += 1
    class M:
        def __init__(self):
            self.inflight = 0; self.requests = {}; self.charges = {}
        def request(self, route, product, status, seconds):
            key = (route, product, str(status)); h = self.requests.get(key)
            if h is None:
                h = self.requests[key] = H()
            h.observe(seconds)
        def charge(self, product, nano):
            found = self.charges.get(product)
            if found is None:
                self.charges[product] = [1, nano]
            else:
                found[0] += 1; found[1] += nano
    metrics = M()
elif variant == "direct":
    from prometheus_client import Counter, Gauge, Histogram
    from tollway.metrics import LATENCY_BUCKETS_S
    class D:
        def __init__(self):
            self.hist = Histogram("d_seconds", "", ("route", "product", "status"),
                                  buckets=LATENCY_BUCKETS_S, registry=None)
            self.charges = Counter("d_charges", "", ("product",), registry=None)
            self.revenue = Counter("d_revenue", "", ("product",), registry=None)
            self.gauge = Gauge("d_inflight", "", multiprocess_mode="livesum", registry=None)
            self.children = {}; self.charge_children = {}; self._inflight = 0
        @property
        def inflight(self):
            return self._inflight
        @inflight.setter
        def inflight(self, value):
            self._inflight = value; self.gauge.set(value)
        def request(self, route, product, status, seconds):
            key = (route, product, str(status)); child = self.children.get(key)
            if child is None:
                child = self.children[key] = self.hist.labels(*key)
            child.observe(seconds)
        def charge(self, product, nano):
            c = self.charge_children.get(product)
            if c is None:
                c = self.charge_children[product] = (self.charges.labels(product),
                                                     self.revenue.labels(product))
            c[0].inc(); c[1].inc(nano)
    metrics = D()
else:
    from tollway.metrics import METRICS as metrics, multiprocess
    assert multiprocess()
publish = getattr(metrics, "publish", None) if variant == "tollway" else None
every = int(sys.argv[4])
started = time.process_time()
for i, (route, product, status) in enumerate(labels):
    metrics.inflight += 1
    metrics.inflight -= 1
    metrics.request(route, product, status, 0.012)
    metrics.charge(product, 6000)
    if publish is not None and i % every == 0:
        publish()
cpu = time.process_time() - started
scrape = None
if variant == "tollway":
    started = time.process_time()
    for _ in range(20):
        metrics.exposition(open_holds=0, oldest_hold_age_s=0.0)
    scrape = (time.process_time() - started) / 20
print(json.dumps({"per_request_us": cpu / requests * 1e6, "scrape_ms": scrape and scrape * 1e3}))
"""


def run(variant: str, requests: int, products: int, every: int) -> dict[str, float]:
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as directory:
        if variant != "plain":
            env["PROMETHEUS_MULTIPROC_DIR"] = directory
        done = subprocess.run([sys.executable, "-c", CHILD, str(requests), str(products),
                               variant, str(every)], env=env, capture_output=True, text=True,
                              check=True)
    return dict(json.loads(done.stdout))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--products", type=int, default=20)
    ap.add_argument("--publish-every", type=int, default=1000)
    args = ap.parse_args()
    results: dict[str, list[dict[str, float]]] = {"plain": [], "direct": [], "tollway": []}
    for _ in range(args.rounds):
        for variant in results:
            results[variant].append(run(variant, args.requests, args.products,
                                        args.publish_every))
    cpu = {v: statistics.median(r["per_request_us"] for r in rs) for v, rs in results.items()}
    scrape = statistics.median(r["scrape_ms"] for r in results["tollway"])
    print(f"{args.requests} requests x {args.rounds} rounds, {args.products} products, "
          f"published every {args.publish_every} requests")
    for variant, label in (("plain", "plain ints (before issue 15)"),
                           ("direct", "prometheus_client updated per request"),
                           ("tollway", "plain ints, published (now)")):
        added = cpu[variant] - cpu["plain"]
        print(f"{label:38}: {cpu[variant]:6.2f} us CPU per request, +{added:5.2f} us "
              f"({added / 1000:.4f} ms; limit 0.01 ms)")
    print(f"one scrape (publish, merge, /proc of this process): {scrape:.1f} ms CPU")


if __name__ == "__main__":
    main()
