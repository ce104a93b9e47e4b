"""Per-worker gateway state: the catalog snapshot, the key cache and the upstream adapters.

The catalog is re-read from the database every ``catalog_refresh_seconds`` (an applied price
change takes effect within that time, and each usage record names the price version it used);
a key is cached for ``key_cache_seconds`` after its lookup (:mod:`.keycache`: single-flight,
refreshed ahead while in use), so a revocation made through another process takes effect within
that time (one made through this process, at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import quote

from sqlalchemy.engine import Connection
from starlette.concurrency import run_in_threadpool
from starlette.types import Scope

from tollway import tokens
from tollway.billing import keys
from tollway.billing import limits as rate_limits
from tollway.billing.limits import Limits
from tollway.clock import now_ms
from tollway.errors import InvalidApiKey, StorageUnavailable, UnknownEndpoint, UnknownModel
from tollway.gateway.keycache import KeyCache
from tollway.gateway.watchdog import Watchdog
from tollway.metrics import METRICS
from tollway.pricing.catalog import Tier
from tollway.runtime.context import Context
from tollway.runtime.http import client_address
from tollway.store import catalog as catalog_store
from tollway.store.accounts import ApiKeyRecord, key_by_hash
from tollway.store.catalog import Item
from tollway.store.channels import disabled_channels
from tollway.upstreams.channels import Board
from tollway.upstreams.health import Health, check
from tollway.upstreams.registry import Registry

log = logging.getLogger("tollway")


@dataclass(frozen=True, slots=True)
class Endpoint:
    item: Item
    method: str
    pattern: re.Pattern[str]
    upstream_path: str

    def upstream_for(self, params: dict[str, str]) -> str:
        """The upstream path with the path parameters filled in, each percent-encoded whole:
        a parameter is one path segment, never a ``?query``, ``#fragment`` or more path."""
        return re.sub(r"\{([^}]+)\}", lambda m: quote(params.get(m.group(1), ""), safe=""),
                      self.upstream_path)


def _pattern(path: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]+\})", path)
    regex = "".join(f"(?P<{p[1:-1]}>[^/]+)" if p.startswith("{") else re.escape(p)
                    for p in parts)
    return re.compile(regex + "/?")


@dataclass(frozen=True, slots=True)
class CatalogSnapshot:
    models: dict[str, Item]
    endpoints: tuple[Endpoint, ...]
    ratios: dict[str, Decimal]
    providers: dict[str, tuple[str, dict[str, Any]]]
    tiers: dict[str, Tier] = field(default_factory=dict)
    default_tier: str | None = None
    #: channel ids the operator disabled
    disabled: frozenset[str] = frozenset()
    #: model id -> (its protocols, the routes it is sold on), worked out on first use: the
    #: snapshot never changes, so neither do they (``model`` is on every request's path)
    _served: dict[str, tuple[dict[str, str], list[str]]] = field(
        default_factory=dict, init=False, compare=False, repr=False)

    def limits(self, key: ApiKeyRecord) -> Limits:
        """The key's limits: its account's tier (a tier no longer in the catalog counts as
        the default one), each lowered by the key's own."""
        tier = self.tiers.get(key.account_tier or "") or self.tiers.get(self.default_tier or "")
        return rate_limits.effective(tier, key.limits)

    def model(self, model_id: object, route: str) -> tuple[Item, str]:
        """The model and the provider that serves it on ``route`` (a gateway route such as
        ``/v1/messages``); UnknownModel if it is not for sale or not served there."""
        item = self.models.get(model_id) if isinstance(model_id, str) else None
        if item is None:
            raise UnknownModel(f"unknown model {model_id!r}: GET /v1/models lists the models "
                               "this key may use")
        served = self._served.get(item.id)
        if served is None:
            kinds = {pid: kind for pid, (kind, _) in self.providers.items()}
            protocols = catalog_store.item_protocols(item, kinds)
            served = self._served[item.id] = (protocols,
                                              catalog_store.item_routes(item, protocols))
        protocols, routes = served
        if route not in routes:
            listed = ", ".join(routes) or "no route"
            raise UnknownModel(f"model {item.id!r} is not served on {route} (it is served on "
                               f"{listed}): GET /v1/marketplace lists each model's routes")
        family = "anthropic" if route == "/v1/messages" else "openai"
        return item, protocols[family]

    def endpoint(self, method: str, path: str) -> tuple[Endpoint, dict[str, str]]:
        allowed = False
        for endpoint in self.endpoints:
            match = endpoint.pattern.fullmatch(path)
            # "." and ".." would be resolved by the URL layer and climb out of upstream_path.
            if match and not any(v in (".", "..") for v in match.groupdict().values()):
                if endpoint.method == method:
                    return endpoint, match.groupdict()
                allowed = True
        why = f"{method} is not allowed there" if allowed else "no such API"
        raise UnknownEndpoint(f"unknown endpoint {method} /apis/v1{path}: {why}")


def load_snapshot(conn: Connection) -> CatalogSnapshot:
    items = catalog_store.current_items(conn, now_ms=now_ms())
    endpoints = tuple(
        Endpoint(item, str(item.spec.method), _pattern(item.spec.path),
                 item.spec.upstream_path or item.spec.path)
        for item in items if item.spec.path is not None)
    tiers, default_tier = catalog_store.list_tiers(conn)
    return CatalogSnapshot(
        models={item.id: item for item in items if not item.spec.is_endpoint},
        endpoints=endpoints, ratios=catalog_store.group_ratios(conn),
        providers=catalog_store.list_providers(conn),
        tiers={tier.name: tier for tier in tiers}, default_tier=default_tier,
        disabled=frozenset(disabled_channels(conn)))


def configure_board(board: Board, catalog: CatalogSnapshot) -> None:
    """The snapshot's channels (every model and endpoint) with the stored disabled ones."""
    board.configure(
        [*((i.id, i.spec, i.provider) for i in catalog.models.values()),
         *((e.item.id, e.item.spec, e.item.provider) for e in catalog.endpoints)],
        catalog.providers, catalog.disabled)


STREAM_DISCONNECT = ("cancel", "finish")


class Gateway:
    def __init__(self, ctx: Context, registry: Registry, *, catalog_refresh_s: float,
                 key_cache_s: float, max_body_bytes: int, headers_timeout_s: float = 30,
                 read_timeout_s: float = 600, cost_tolerance: Decimal = Decimal("0.05"),
                 health_interval_s: float = 0, stream_disconnect: str = "cancel") -> None:
        if stream_disconnect not in STREAM_DISCONNECT:
            raise ValueError("TOLLWAY_STREAM_DISCONNECT must be cancel or finish, got "
                             f"{stream_disconnect!r}")
        self.ctx = ctx
        #: Milliseconds since the epoch: limit windows, holds and records take their time
        #: from the server's one clock (tests pass a clock they move).
        self.clock = ctx.clock
        self.registry = registry
        self.catalog_refresh_s = catalog_refresh_s
        self.key_cache_s = key_cache_s
        self.max_body_bytes = max_body_bytes
        #: failover (gateway.failover): the wait for response headers, the whole answer's
        #: bound, and the upstream-cost tolerance of the margin reconciliation
        self.headers_timeout_s = headers_timeout_s
        self.read_timeout_s = read_timeout_s
        self.cost_tolerance = cost_tolerance
        #: a client leaving a stream: ``cancel`` the upstream, or ``finish`` reading it
        self.stream_disconnect = stream_disconnect
        self.health_interval_s = health_interval_s
        self.watchdog = Watchdog()
        self._health: asyncio.Task[None] | None = None
        self.catalog = CatalogSnapshot({}, (), {}, {})
        self.keys: KeyCache[ApiKeyRecord] = KeyCache(self._lookup_key, ttl_s=key_cache_s)
        self._refresher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh()
        METRICS.channel_states = lambda: [(c.id, c.state(self.clock()))
                                          for c in self.board.channels.values()]
        if any(kind == "sandbox" for kind, _ in self.catalog.providers.values()):
            # the sandbox counts every request with the tokenizer; real upstreams report usage
            # and the vocabulary (~135 MiB) is loaded only when a stream ends without it
            await run_in_threadpool(tokens.warm_up)
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())
        if self.health_interval_s > 0:
            self._health = asyncio.get_running_loop().create_task(self._health_loop())

    async def stop(self) -> None:
        for task in (self._refresher, self._health):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.watchdog.stop()
        await self.registry.close()

    async def refresh(self) -> None:
        self.catalog = await self.ctx.read(load_snapshot)
        self.registry.configure(self.catalog.providers)
        configure_board(self.board, self.catalog)

    @property
    def board(self) -> Board:
        return self.ctx.channels

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.catalog_refresh_s)
            try:
                await self.refresh()
            except StorageUnavailable:
                log.warning("refreshing the catalog failed: the database is unavailable")
            except Exception:  # noqa: BLE001 - keep serving the last good catalog
                log.exception("refreshing the catalog failed")

    async def _health_loop(self) -> None:
        """Every channel gets a free request (``upstreams.health``) each interval: a failure
        counts toward its circuit, a success closes a circuit whose cooldown is over (the
        half-open probe, without a customer's request)."""
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self.check_channels()
            except Exception:  # noqa: BLE001 - keep checking
                log.exception("the channel health check failed")

    async def check_channels(self) -> list[Health]:
        board, providers = self.board, self.catalog.providers
        channels = [c for c in board.channels.values()
                    if not c.disabled and c.provider in providers]
        results = await asyncio.gather(*(check(self.registry, c, *providers[c.provider])
                                         for c in channels))
        now = self.clock()
        for channel, health in zip(channels, results, strict=True):
            if health.ok is False:
                board.failed(channel, health.latency_ms, now)
            elif health.ok and (not channel.opened or now >= channel.open_until_ms):
                board.succeeded(channel, health.latency_ms)
        return list(results)

    async def authenticate(self, scope: Scope) -> ApiKeyRecord:
        """The usable key of the request (revoked, expired and IP allowlist checked)."""
        secret = _secret(scope)
        if not secret:
            raise InvalidApiKey("missing API key: send 'Authorization: Bearer <key>' or "
                                "'x-api-key: <key>'")
        record = await self.keys.get(keys.hash_key(secret))
        keys.check_usable(record, now_ms=self.clock())
        if record.limits.allowed_ips is not None:  # the address is parsed only when needed
            keys.check_ip(record, client_address(scope, self.ctx.trusted_proxies))
        return record

    def forget_keys(self) -> None:
        self.keys.clear()

    async def _lookup_key(self, digest: str) -> ApiKeyRecord:
        return await self.ctx.read(lambda conn: _lookup(conn, digest))


def _lookup(conn: Connection, digest: str) -> ApiKeyRecord:
    record = key_by_hash(conn, digest)
    if record is None:
        raise InvalidApiKey("invalid API key")
    return record


def _secret(scope: Scope) -> str | None:
    """The customer's key from ``Authorization: Bearer`` (OpenAI clients) or ``x-api-key``
    (Anthropic clients); Bearer wins when both are sent."""
    api_key = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return str(token.strip())
        elif name == b"x-api-key" and value.strip():
            api_key = str(value.decode("latin-1").strip())
    return api_key


