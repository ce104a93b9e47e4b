"""``/metrics`` of a real ``tollway serve --workers 2``: whichever worker answers a scrape, it
shows every worker's counts (its own as of now, the other's as of its last publication, at
most a second ago). Each scrape comes on a new connection (so the kernel spreads them
over the workers), as do the requests; every counter only ever rises from one scrape to the
next, and once the requests are done the totals are exactly what was sent. A worker killed
with SIGKILL takes nothing back: its counts stay, its process metrics go."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cluster import (
    ADMIN_TOKEN,
    FAKE_CHAT_COST,
    LOOKUP_COST,
    Server,
    catalog_text,
    customers,
    prepare,
    request_for,
    server_env,
    servers,
)
from fakes import IGNORE_TOKENIZER_WARNING, FakeUpstream
from promtext import Samples, parse
from tollway.store.db import Database

pytestmark = pytest.mark.filterwarnings(IGNORE_TOKENIZER_WARNING)
ROUNDS = 30  # each: one chat, one data call, and a scrape after each
CHAT = 'tollway_http_requests_total{route="/v1/chat/completions",product="gpt-test",status="200"}'
LOOKUP = ('tollway_http_requests_total{route="/apis/v1/{path:path}",product="lookup",'
          'status="200"}')


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


#: a new connection for every request (no keep-alive), so that the kernel spreads them
FRESH = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=30)


def scrape(server: Server) -> Samples:
    response = FRESH.get(server.url + "/metrics",
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 200, response.text
    return parse(response.text, f"{socket.gethostname()}:{server.port}")


def counters(samples: Samples) -> dict[str, float]:
    """Every counter and histogram series (what must never go backwards)."""
    return {k: v for k, v in samples.items()
            if k.startswith("tollway_") and ("_total{" in k or "_bucket{" in k
                                             or "_count{" in k or "_sum{" in k)}


def send(server: Server, key: str, kind: str, i: int) -> None:
    method, path, body = request_for(kind, i)
    response = FRESH.request(method, server.url + path, json=body,
                             headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text


def workers(samples: Samples) -> set[str]:
    return {k.split('worker="')[1].split('"')[0] for k in samples
            if k.startswith("process_cpu_seconds_total{")}


def test_two_workers_one_truthful_metrics(db_url: str, tmp_path: Path,
                                          fake: FakeUpstream) -> None:
    env = server_env(db_url, tmp_path / "data")
    env.pop("TOLLWAY_INSTANCE", None)  # the default: host:port
    prepare(env, tmp_path, catalog_text(fake))
    db = Database(db_url)
    try:
        key = customers(db, 1, usd=10, poor=0)[0][1]
    finally:
        db.dispose()
    with servers() as running:
        server = Server(env, tmp_path / "serve.log", workers=2).start()
        running.append(server)
        first = previous = scrape(server)
        for _ in range(100):  # the second worker may still be starting on a loaded machine
            if len(workers(first)) == 2:
                break
            time.sleep(0.1)
            first = previous = scrape(server)
        assert len(workers(first)) == 2, sorted(first)  # one series per worker, never summed
        history = [first]
        for i in range(ROUNDS):
            for kind in ("chat", "lookup"):
                send(server, key, kind, i)
                current = scrape(server)
                history.append(current)
                for name, value in counters(previous).items():
                    assert counters(current).get(name, 0) >= value, (name, value, current)
                previous = current

        final = settled(server, ROUNDS)
        assert final[CHAT] == ROUNDS and final[LOOKUP] == ROUNDS
        assert final['tollway_charges_total{product="gpt-test"}'] == ROUNDS
        assert final['tollway_revenue_nano_usd_total{product="gpt-test"}'] == (
            ROUNDS * FAKE_CHAT_COST)
        assert final['tollway_revenue_nano_usd_total{product="lookup"}'] == ROUNDS * LOOKUP_COST
        duration = "tollway_http_request_duration_seconds"
        for labels in ('route="/v1/chat/completions",product="gpt-test",status="200"',
                       'route="/apis/v1/{path:path}",product="lookup",status="200"'):
            buckets = sorted((float(k.split('le="')[1].split('"')[0]), v) for k, v in
                             final.items() if k.startswith(f"{duration}_bucket{{")
                             and all(part in k for part in labels.split(",")))
            assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
            assert buckets[-1] == (float("inf"), ROUNDS)  # both workers' observations merged
            assert final[f"{duration}_count{{{labels}}}"] == ROUNDS

        # A worker dies: its counts stay in the sums, its process series go (uvicorn starts
        # another in its place, in its own time).
        victim = int(sorted(workers(final))[0])
        os.kill(victim, signal.SIGKILL)
        after = final
        for _ in range(100):
            with contextlib.suppress(httpx.TransportError):
                after = scrape(server)
                if str(victim) not in workers(after):
                    break
            time.sleep(0.1)
        assert str(victim) not in workers(after) and workers(after)
        for name, value in counters(final).items():
            if ('product="gpt-test"' in name or 'product="lookup"' in name) and "_sum{" not in name:
                assert after.get(name) == value, name  # nothing lost, nothing doubled
        server.stop()
    log = (tmp_path / "serve.log").read_text()
    # (a worker uvicorn was still starting when the server stopped may print a
    # KeyboardInterrupt; no request may fail)
    assert "Exception in ASGI application" not in log, log[-3000:]


def settled(server: Server, rounds: int) -> Samples:
    """A scrape once every request's count is in: the worker that did not answer the scrape
    publishes its counts once a second (``PUBLISH_INTERVAL_S``)."""
    samples = scrape(server)
    for _ in range(100):
        if samples.get(CHAT) == rounds and samples.get(LOOKUP) == rounds:
            break
        time.sleep(0.1)
        samples = scrape(server)
    return samples
