"""Channels: the upstreams an item is sold through, how one is chosen, and each one's circuit.

A channel is one provider (one key of a provider's key pool) serving one item; its id is
``ITEM/PROVIDER`` (``ITEM/PROVIDER#N`` for the N-th key of a pool). :class:`Board` holds every
channel of the catalog snapshot with its per-process state:

- **selection** (:meth:`Board.pick`): the lowest ``priority`` that has an available channel;
  among its channels, weighted random; a key pool's keys in turn (round-robin).
- **circuit breaker**: ``failures`` consecutive failures open a channel for ``cooldown_ms``
  (a 429 with ``Retry-After`` opens it at once for that long); when the time is up one request
  is let through (half-open) and its success closes the circuit, its failure opens it again.
- **disabled**: the operator's choice, stored in the database and read with the catalog.

The state is per process (each worker learns on its own); the clock is the caller's (ms),
so tests move it. No I/O here: the gateway sends, then reports each attempt's outcome.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tollway.pricing.catalog import KIND_PROTOCOLS, ChannelSpec, ItemSpec
from tollway.pricing.rating import Price

CLOSED, OPEN, HALF_OPEN, DISABLED = "closed", "open", "half_open", "disabled"
#: how many recent outcomes a channel's error rate and latency are computed over
RECENT = 100


@dataclass(frozen=True, slots=True)
class Policy:
    failures: int = 5
    cooldown_ms: int = 30_000
    max_attempts: int = 3
    retry_statuses: frozenset[int] = frozenset({408, 429, *range(500, 600)})


def parse_statuses(text: str) -> frozenset[int]:
    """``"408,429,5xx"`` → the statuses that fail over to the next channel."""
    result: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if len(part) == 3 and part.endswith("xx") and part[0].isdigit():
            base = int(part[0]) * 100
            result.update(range(base, base + 100))
        else:
            result.add(int(part))
    return frozenset(result)


@dataclass(eq=False, slots=True)
class Channel:
    id: str
    item: str
    endpoint: bool
    provider: str
    #: the registry's adapter: the provider, or ``PROVIDER#N`` for a key of a pool
    upstream: str
    upstream_model: str | None
    weight: int
    priority: int
    cost: Price | None
    families: tuple[str, ...]
    # per-process state
    disabled: bool = False
    failures: int = 0
    open_until_ms: int = 0
    opened: bool = False
    probing: bool = False
    recent: deque[tuple[bool, int]] = field(default_factory=lambda: deque(maxlen=RECENT))

    def state(self, now_ms: int) -> str:
        if self.disabled:
            return DISABLED
        if not self.opened:
            return CLOSED
        return OPEN if now_ms < self.open_until_ms or self.probing else HALF_OPEN

    def available(self, now_ms: int) -> bool:
        return not self.disabled and (not self.opened or (now_ms >= self.open_until_ms
                                                          and not self.probing))

    def view(self, now_ms: int) -> dict[str, Any]:
        outcomes = list(self.recent)
        errors = sum(1 for ok, _ in outcomes if not ok)
        latencies = sorted(ms for _, ms in outcomes)
        body: dict[str, Any] = {
            "id": self.id, ("endpoint" if self.endpoint else "model"): self.item,
            "provider": self.provider, "priority": self.priority, "weight": self.weight,
            "state": self.state(now_ms), "enabled": not self.disabled,
            "consecutive_failures": self.failures,
            "recent_requests": len(outcomes),
            "recent_error_rate": (f"{errors / len(outcomes):.3f}" if outcomes else None),
            "recent_latency_ms_p50": latencies[len(latencies) // 2] if latencies else None,
        }
        if self.opened and now_ms < self.open_until_ms:
            body["open_for_ms"] = self.open_until_ms - now_ms
        return body


@dataclass(eq=False, slots=True)
class _Entry:
    """One catalog channel: its keys (one unless the provider has a key pool)."""

    weight: int
    keys: list[Channel]
    turn: int = 0


@dataclass(slots=True)
class _Level:
    entries: list[_Entry]
    cumulative: list[int]  # running sum of the entries' weights
    total: int


@dataclass(slots=True)
class _Route:
    #: priorities ascending, each with its entries
    levels: list[_Level]
    channels: list[Channel]


class Board:
    def __init__(self, policy: Policy | None = None, rng: random.Random | None = None) -> None:
        self.policy = policy or Policy()
        self.rng = rng or random.Random()
        self.channels: dict[str, Channel] = {}
        #: (item id, protocol family or "" for endpoints) → its route
        self._routes: dict[tuple[str, str], _Route] = {}

    # ------------------------------------------------------------------ configuration

    def configure(self, items: Iterable[tuple[str, ItemSpec, str]],
                  providers: Mapping[str, tuple[str, Mapping[str, Any]]],
                  disabled: Iterable[str] = ()) -> None:
        """(Re)build from the snapshot: ``items`` are (item id, spec, provider of an item
        without ``channels``); a channel that stays keeps its circuit state."""
        off = set(disabled)
        old, channels, routes = self.channels, {}, {}
        # a key pool's turn carries over, like the circuit state
        turns = {entry.keys[0].id: entry.turn for route in self._routes.values()
                 for level in route.levels for entry in level.entries if entry.keys}
        for item_id, spec, provider in items:
            specs = spec.channels if spec.channels is not None else _implicit(spec, provider)
            made: list[tuple[ChannelSpec, list[Channel]]] = []
            for cs in specs:
                if cs.provider not in providers:
                    continue
                kind, config = providers[cs.provider]
                pool = config.get("api_key_envs") or []
                ids = ([(f"{item_id}/{cs.provider}#{n}", f"{cs.provider}#{n}")
                        for n in range(1, len(pool) + 1)] if pool
                       else [(f"{item_id}/{cs.provider}", cs.provider)])
                keys = []
                for cid, upstream in ids:
                    fresh = Channel(cid, item_id, spec.is_endpoint, cs.provider, upstream,
                                    cs.upstream_model or spec.upstream_model,
                                    cs.weight, cs.priority,
                                    cs.cost if cs.cost is not None else spec.cost,
                                    KIND_PROTOCOLS.get(kind, ()))
                    # A channel that stays is the same object, updated: requests in flight
                    # report their outcome to it, and its circuit state carries over.
                    channel = old.get(cid) or fresh
                    if channel is not fresh:
                        for name in ("item", "endpoint", "provider", "upstream",
                                     "upstream_model", "weight", "priority", "cost",
                                     "families"):
                            setattr(channel, name, getattr(fresh, name))
                    channel.disabled = cid in off
                    channels[cid] = channel
                    keys.append(channel)
                made.append((cs, keys))
            families = ("",) if spec.is_endpoint else ("openai", "anthropic")
            for family in families:
                levels: dict[int, list[_Entry]] = {}
                members: list[Channel] = []
                for cs, keys in made:
                    if family and (not keys or family not in keys[0].families):
                        continue
                    if spec.channels is None and family and spec.providers is not None \
                            and spec.providers.get(family) != cs.provider:
                        continue
                    levels.setdefault(cs.priority, []).append(
                        _Entry(cs.weight, keys, turns.get(keys[0].id, 0) if keys else 0))
                    members.extend(keys)
                if members:
                    routes[(item_id, family)] = _Route(
                        [_level(levels[p]) for p in sorted(levels)], members)
        self.channels, self._routes = channels, routes

    # ------------------------------------------------------------------ selection

    def route(self, item_id: str, family: str) -> list[Channel]:
        route = self._routes.get((item_id, family))
        return [] if route is None else route.channels

    def pick(self, item_id: str, family: str, now_ms: int,
             tried: Iterable[Channel] = ()) -> Channel | None:
        """The channel for the next attempt (None: no available channel not yet tried)."""
        route = self._routes.get((item_id, family))
        if route is None:
            return None
        for stage in route.levels:
            level = stage.entries
            if len(level) == 1:  # one channel at this priority: no random draw
                key = _next_key(level[0], now_ms, tried)
                if key is not None:
                    return key
                continue
            # Draw over every channel of the priority; only if the drawn one is unavailable,
            # draw again over the available ones. The result is the same weighted draw among
            # the available channels, and the common case costs one random number.
            drawn = level[bisect_right(stage.cumulative, self.rng.random() * stage.total)]
            key = _next_key(drawn, now_ms, tried)
            if key is not None:
                return key
            candidates = [(e, k) for e in level if (k := _peek_key(e, now_ms, tried))]
            if not candidates:
                continue
            if len(candidates) == 1:
                entry = candidates[0][0]
            else:
                total = sum(e.weight for e, _ in candidates)
                draw = self.rng.random() * total
                for entry, _ in candidates:
                    draw -= entry.weight
                    if draw < 0:
                        break
            key = _next_key(entry, now_ms, tried)
            if key is not None:
                return key
        return None

    def retry_after_ms(self, item_id: str, family: str, now_ms: int) -> int | None:
        """When the first open (not disabled) channel of the route lets a probe through."""
        waits = [c.open_until_ms - now_ms for c in self.route(item_id, family)
                 if not c.disabled and c.opened]
        return max(min(waits), 0) if waits else None

    # ------------------------------------------------------------------ outcomes

    def begin(self, channel: Channel, now_ms: int) -> None:
        """An attempt starts: a half-open channel's attempt is its one probe."""
        if channel.opened and now_ms >= channel.open_until_ms:
            channel.probing = True

    def succeeded(self, channel: Channel, latency_ms: int) -> None:
        channel.failures = 0
        channel.opened = channel.probing = False
        channel.recent.append((True, latency_ms))

    def failed(self, channel: Channel, latency_ms: int, now_ms: int, *,
               retry_after_ms: int | None = None) -> None:
        channel.failures += 1
        channel.recent.append((False, latency_ms))
        if retry_after_ms is not None and retry_after_ms > 0:
            self._open(channel, now_ms, retry_after_ms)
        elif channel.probing or channel.failures >= self.policy.failures:
            self._open(channel, now_ms, self.policy.cooldown_ms)

    def released(self, channel: Channel) -> None:
        """An attempt ended without a verdict (the request was cancelled): a probe may be
        tried again."""
        channel.probing = False

    def _open(self, channel: Channel, now_ms: int, for_ms: int) -> None:
        channel.opened, channel.probing = True, False
        channel.open_until_ms = now_ms + for_ms

    def views(self, now_ms: int) -> list[dict[str, Any]]:
        return [c.view(now_ms) for c in sorted(self.channels.values(), key=lambda c: c.id)]


def _level(entries: list[_Entry]) -> _Level:
    cumulative, total = [], 0
    for entry in entries:
        total += entry.weight
        cumulative.append(total)
    return _Level(entries, cumulative, total)


def _implicit(spec: ItemSpec, provider: str) -> tuple[ChannelSpec, ...]:
    """An item without ``channels``: one channel per provider it names."""
    names = list(dict.fromkeys(spec.providers.values())) if spec.providers else []
    if not names:
        names = [provider]
    return tuple(ChannelSpec(name) for name in names)


def _peek_key(entry: _Entry, now_ms: int, tried: Iterable[Channel]) -> Channel | None:
    keys = entry.keys
    for offset in range(len(keys)):
        key = keys[(entry.turn + offset) % len(keys)]
        if key.available(now_ms) and key not in tried:
            return key
    return None


def _next_key(entry: _Entry, now_ms: int, tried: Iterable[Channel]) -> Channel | None:
    """The pool's next available key, in turn."""
    keys = entry.keys
    for offset in range(len(keys)):
        index = (entry.turn + offset) % len(keys)
        key = keys[index]
        if key.available(now_ms) and key not in tried:
            entry.turn = index + 1
            return key
    return None
