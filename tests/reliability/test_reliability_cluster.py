"""Several instances, one ledger: three ``tollway serve --workers 2`` processes (six workers,
each with its own writer, key cache and catalog snapshot) on one PostgreSQL database, under a
mixed load of LLM requests (streaming and not, through the official ``openai`` client and raw
HTTP) and per-call requests, some of which fail by design (upstream 500s, insufficient
balance).

Afterwards every response a client saw succeed has exactly one usage record carrying the cost
the client was told, every failed one is charged nothing, nothing was charged that no client
saw, no balance is negative and ``tollway ledger verify`` passes. ``make stress`` runs the same
with ``TOLLWAY_STRESS=1`` (many more requests).
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from cluster import (
    FAKE_CHAT_COST,
    LOOKUP_COST,
    TOLLWAY,
    Outcome,
    Plan,
    Server,
    catalog_text,
    check_books,
    customers,
    prepare,
    report,
    run_load,
    server_env,
    servers,
)
from fakes import FakeUpstream
from tollway.money import parse_usd
from tollway.store.db import Database

STRESS = bool(os.environ.get("TOLLWAY_STRESS"))
REQUESTS = 10_000 if STRESS else 360
CONCURRENCY = 48 if STRESS else 24
INSTANCES = 3

pytestmark = pytest.mark.skipif(not TOLLWAY.exists(), reason="tollway is not installed")


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


async def through_openai(urls: list[str], key: str) -> list[Outcome]:
    """A few requests with the official client, streaming and not, on every instance."""
    seen = []
    for url in urls:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0,
                                      timeout=60) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-test", messages=[{"role": "user", "content": "hi"}])
            seen.append(Outcome("openai-chat", raw.http_response.status_code,
                                raw.headers["x-request-id"],
                                parse_usd(raw.headers["x-tollway-cost-usd"]), complete=True))
            stream = await client.chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True,
                stream_options={"include_usage": True})
            final = [chunk async for chunk in stream][-1]
            assert final.usage is not None and final.model_extra is not None
            tollway = final.model_extra["tollway"]
            seen.append(Outcome("openai-stream", 200, tollway["request_id"],
                                parse_usd(tollway["cost_usd"]), complete=True))
    return seen


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_three_instances_one_postgresql_ledger(db_url: str, tmp_path: Path,
                                               fake: FakeUpstream) -> None:
    env = server_env(db_url, tmp_path / "data")
    prepare(env, tmp_path, catalog_text(fake))
    db = Database(db_url)
    try:
        accounts = customers(db, 4, usd=50)
        keys = [key for _, key in accounts[:-1]]
        poor_key = accounts[-1][1]
        with servers() as running:
            for n in range(INSTANCES):
                running.append(Server(env, tmp_path / f"serve-{n}.log", workers=2).start())
            urls = [s.url for s in running]
            outcomes = asyncio.run(through_openai(urls, keys[0]))
            outcomes += asyncio.run(run_load(urls, keys, poor_key,
                                             Plan(REQUESTS, CONCURRENCY)))
            for server in running:
                server.stop()
        logs = "".join((tmp_path / f"serve-{n}.log").read_text() for n in range(INSTANCES))
        assert logs.count("Application startup complete") == 2 * INSTANCES
        assert "Traceback" not in logs, logs[-5000:]

        seen = Counter((o.kind, o.status, o.code) for o in outcomes)
        # The failures by design fail the same way everywhere; everything else succeeds. A
        # broken upstream also opens its channel's circuit in a worker after its consecutive
        # failures: then 503 no_channel_available, uncharged, until the probe.
        for (kind, status, code), _ in seen.items():
            expected = {"broken-model": (502, "upstream_error"), "broken-api": (500, None),
                        "poor": (402, "insufficient_balance")}.get(kind, (200, None))
            opened = kind.startswith("broken") and (status, code) == (503, "no_channel_available")
            assert (status, code) == expected or opened, seen
        assert {o.cost_nano for o in outcomes if o.kind in ("chat", "stream", "stream-quiet",
                                                            "openai-chat", "openai-stream")} == {
            FAKE_CHAT_COST}
        assert {o.cost_nano for o in outcomes if o.kind == "lookup"} == {LOOKUP_COST}
        assert all(o.complete for o in outcomes if o.status == 200), seen

        figures = check_books(db, env, outcomes, exact=True)
        report("three instances, one PostgreSQL ledger", {**figures, "instances": INSTANCES,
                                                          "workers_each": 2})
    finally:
        db.dispose()
