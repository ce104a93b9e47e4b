"""The gateway's key cache (``gateway/keycache.py``): one lookup per key at a time, a busy key
refreshed ahead of its expiry without making a request wait, an unknown key never cached, a
database failure during a refresh keeping the entry until it expires, ``clear`` at once.

The lookup is a coroutine the test controls (the database edge); time is a fake monotonic
clock."""

from __future__ import annotations

import asyncio

import pytest

from tollway.errors import InvalidApiKey, StorageUnavailable
from tollway.gateway.keycache import KeyCache


class Lookups:
    """A lookup whose answers the test releases one by one."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.gates: list[asyncio.Future[str]] = []

    async def __call__(self, digest: str) -> str:
        self.calls.append(digest)
        gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.gates.append(gate)
        return await gate


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_concurrent_requests_for_one_key_share_one_lookup() -> None:
    async def run() -> None:
        lookups, clock = Lookups(), Clock()
        cache = KeyCache(lookups, ttl_s=8, clock=clock)
        waiting = [asyncio.ensure_future(cache.get("k")) for _ in range(50)]
        await settle()
        assert lookups.calls == ["k"]
        lookups.gates[0].set_result("record-1")
        assert await asyncio.gather(*waiting) == ["record-1"] * 50
        assert await cache.get("k") == "record-1" and lookups.calls == ["k"]

    asyncio.run(run())


def test_a_key_in_use_is_refreshed_ahead_and_no_request_waits() -> None:
    async def run() -> None:
        lookups, clock = Lookups(), Clock()
        cache = KeyCache(lookups, ttl_s=8, clock=clock)
        first = asyncio.ensure_future(cache.get("k"))
        await settle()
        lookups.gates[0].set_result("old")
        assert await first == "old"
        clock.now += 5.9  # before the last quarter of 8 s: served, no lookup
        assert await cache.get("k") == "old" and len(lookups.calls) == 1
        clock.now += 0.2  # 6.1 s: in the last quarter: served at once, one refresh starts
        assert await cache.get("k") == "old"
        assert await cache.get("k") == "old"
        await settle()
        assert len(lookups.calls) == 2
        lookups.gates[1].set_result("new")
        await settle()
        clock.now += 7  # past the first entry's expiry, inside the refreshed one's
        assert await cache.get("k") == "new" and len(lookups.calls) == 2

    asyncio.run(run())


def test_an_expired_entry_is_looked_up_before_the_request_proceeds() -> None:
    async def run() -> None:
        lookups, clock = Lookups(), Clock()
        cache = KeyCache(lookups, ttl_s=8, clock=clock)
        first = asyncio.ensure_future(cache.get("k"))
        await settle()
        lookups.gates[0].set_result("old")
        await first
        clock.now += 8
        waiting = asyncio.ensure_future(cache.get("k"))
        await settle()
        assert not waiting.done() and len(lookups.calls) == 2
        lookups.gates[1].set_result("revoked")
        assert await waiting == "revoked"

    asyncio.run(run())


def test_an_unknown_key_is_not_cached_and_a_deleted_key_stops_at_its_refresh() -> None:
    async def run() -> None:
        lookups, clock = Lookups(), Clock()
        cache = KeyCache(lookups, ttl_s=8, clock=clock)
        unknown = asyncio.ensure_future(cache.get("x"))
        await settle()
        lookups.gates[0].set_exception(InvalidApiKey("invalid API key"))
        with pytest.raises(InvalidApiKey):
            await unknown
        assert len(cache) == 0
        again = asyncio.ensure_future(cache.get("x"))
        await settle()
        assert len(lookups.calls) == 2  # asked again, not answered from a cache
        lookups.gates[1].set_result("created since")
        assert await again == "created since"
        clock.now += 7  # refresh ahead finds the key gone: the entry goes at once
        assert await cache.get("x") == "created since"
        await settle()
        lookups.gates[2].set_exception(InvalidApiKey("invalid API key"))
        await settle()
        assert len(cache) == 0

    asyncio.run(run())


def test_a_database_failure_during_a_refresh_keeps_the_entry_until_it_expires(
        caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> None:
        lookups, clock = Lookups(), Clock()
        cache = KeyCache(lookups, ttl_s=8, clock=clock)
        first = asyncio.ensure_future(cache.get("k"))
        await settle()
        lookups.gates[0].set_result("record")
        await first
        clock.now += 7
        assert await cache.get("k") == "record"
        await settle()
        lookups.gates[1].set_exception(StorageUnavailable("the database is unavailable"))
        await settle()
        assert await cache.get("k") == "record"  # still cached, a new refresh is tried
        await settle()
        assert len(lookups.calls) == 3
        lookups.gates[2].set_exception(StorageUnavailable("the database is unavailable"))
        await settle()
        clock.now += 1  # expired: the request waits for a lookup and gets its error
        failing = asyncio.ensure_future(cache.get("k"))
        await settle()
        lookups.gates[3].set_exception(StorageUnavailable("the database is unavailable"))
        with pytest.raises(StorageUnavailable):
            await failing

    asyncio.run(run())
    assert "refreshing a cached API key failed" in caplog.text


def test_clear_drops_every_entry_and_a_lookup_in_flight_is_not_stored() -> None:
    async def run() -> None:
        lookups, clock = Lookups(), Clock()
        cache = KeyCache(lookups, ttl_s=8, clock=clock)
        first = asyncio.ensure_future(cache.get("k"))
        await settle()
        cache.clear()  # e.g. the operator disabled the account through this process
        lookups.gates[0].set_result("stale")
        assert await first == "stale"  # its waiters get it ...
        assert len(cache) == 0  # ... but it is not kept
        second = asyncio.ensure_future(cache.get("k"))
        await settle()
        lookups.gates[1].set_result("fresh")
        assert await second == "fresh"
        cache.clear()
        third = asyncio.ensure_future(cache.get("k"))
        await settle()
        assert len(lookups.calls) == 3
        lookups.gates[2].set_result("fresh")
        await third

    asyncio.run(run())
