"""The catalog file: providers, groups with ratios, token-priced models and per-call endpoints.

Loading validates everything and reports every problem at once, each naming the file, the item
and the field, so an operator can fix the file in one pass. YAML numbers are read from their
source text, so a price written as ``0.2009`` is exactly ``Decimal("0.2009")``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from tollway.errors import CatalogError
from tollway.money import MoneyFormatError, parse_decimal, parse_usd
from tollway.pricing.rating import CallPrice, Price, TokenPrice

PROVIDER_KINDS = ("openai", "anthropic", "http", "sandbox")
#: The protocol families a provider kind speaks: ``openai`` (chat completions, completions,
#: embeddings, responses, image generation) and ``anthropic`` (messages).
KIND_PROTOCOLS: Mapping[str, tuple[str, ...]] = {
    "openai": ("openai",), "anthropic": ("anthropic",), "sandbox": ("openai", "anthropic"),
    "http": ()}
#: The gateway routes of each protocol family, for token-priced and per-call (image) models.
TOKEN_ROUTES: Mapping[str, tuple[str, ...]] = {
    "openai": ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"),
    "anthropic": ("/v1/messages",)}
IMAGE_ROUTES: Mapping[str, tuple[str, ...]] = {"openai": ("/v1/images/generations",),
                                               "anthropic": ()}
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
#: The input a token model is assumed to accept when the catalog gives no ``context_window``:
#: reported input up to it is billed as reported, beyond it capped and flagged for review.
DEFAULT_CONTEXT_WINDOW = 2_000_000
DEFAULT_GROUP = "default"
_PARAM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}$")


@dataclass(frozen=True, slots=True)
class Provider:
    id: str
    kind: str
    base_url: str | None = None
    api_key_env: str | None = None
    auth: Mapping[str, str] = field(default_factory=dict)
    #: a key pool: each key is its own channel (``ITEM/PROVIDER#N``, N from 1), used in turn
    api_key_envs: tuple[str, ...] = ()
    #: what a free health check requests (default: GET /models for LLM providers)
    health_path: str | None = None


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """One upstream of an item (``channels:`` in the catalog): lowest ``priority`` first,
    ``weight`` shares traffic among the channels of one priority."""

    provider: str
    upstream_model: str | None = None
    weight: int = 1
    priority: int = 0
    #: what the operator pays this upstream (same fields as a price); None: the item's cost
    cost: Price | None = None

    def as_dict(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"provider": self.provider, "weight": self.weight,
                                "priority": self.priority}
        if self.upstream_model is not None:
            spec["upstream_model"] = self.upstream_model
        if self.cost is not None:
            spec["cost"] = price_dict(self.cost)
        return spec

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ChannelSpec:
        model = raw.get("upstream_model")
        cost = raw.get("cost")
        return cls(str(raw["provider"]), None if model is None else str(model),
                   int(raw.get("weight", 1)), int(raw.get("priority", 0)),
                   None if cost is None else price_from_dict(cost))


def price_dict(price: Price) -> dict[str, Any]:
    """A price (or cost) as stored JSON: decimal strings, only the fields that are set."""
    if isinstance(price, CallPrice):
        out: dict[str, Any] = {"per_call": str(price.per_call)}
        if price.per_size:
            out["per_size"] = {k: str(v) for k, v in sorted(price.per_size.items())}
        if price.per_quality:
            out["per_quality"] = {k: str(v) for k, v in sorted(price.per_quality.items())}
        return out
    fields = {"input": price.input_per_1m, "output": price.output_per_1m,
              "cache_read": price.cache_read_per_1m, "cache_write": price.cache_write_per_1m,
              "cache_write_1h": price.cache_write_1h_per_1m}
    token: dict[str, Any] = {k: str(v) for k, v in fields.items() if v is not None}
    if price.tool_calls:
        token["tool_calls"] = {k: str(v) for k, v in price.tool_calls}
    return token


def price_from_dict(raw: Mapping[str, Any]) -> Price:
    def dec(key: str) -> Decimal | None:
        value = raw.get(key)
        return None if value is None else Decimal(str(value))

    if "per_call" in raw:
        sizes = raw.get("per_size") or {}
        qualities = raw.get("per_quality") or {}
        return CallPrice(Decimal(str(raw["per_call"])),
                         {str(k): Decimal(str(v)) for k, v in sizes.items()},
                         {str(k): Decimal(str(v)) for k, v in qualities.items()})
    tools = raw.get("tool_calls") or {}
    return TokenPrice(Decimal(str(raw["input"])), Decimal(str(raw["output"])),
                      dec("cache_read"), dec("cache_write"), dec("cache_write_1h"),
                      tuple(sorted((str(k), Decimal(str(v))) for k, v in tools.items())))


@dataclass(frozen=True, slots=True)
class ItemSpec:
    """An item's non-price attributes: what the gateway needs to route and bound a call.
    Stored beside the item as JSON (:meth:`as_dict`: only the attributes that are set, so the
    stored text of an item is the same as before this type existed)."""

    # models
    upstream_model: str | None = None
    max_output_tokens: int | None = None
    #: the most input tokens the model takes (None: :data:`DEFAULT_CONTEXT_WINDOW`)
    context_window: int | None = None
    #: protocol family → provider serving the model through it (see KIND_PROTOCOLS)
    providers: Mapping[str, str] | None = None
    #: the gateway routes it is sold on, when narrower than every route of its protocols
    routes: tuple[str, ...] | None = None
    # endpoints
    name: str | None = None
    method: str | None = None
    path: str | None = None
    upstream_path: str | None = None
    #: the catalog's ``channels:``; None: one channel per provider (``provider``/``providers``)
    channels: tuple[ChannelSpec, ...] | None = None
    #: what the operator pays upstream for the item (channels may override it)
    cost: Price | None = None

    @property
    def is_endpoint(self) -> bool:
        return self.path is not None

    @property
    def input_bound(self) -> int:
        """The reported input billed as reported; beyond it, capped and flagged."""
        return self.context_window or DEFAULT_CONTEXT_WINDOW

    def as_dict(self) -> dict[str, Any]:
        keys = ("upstream_model", "max_output_tokens", "context_window", "name", "method",
                "path", "upstream_path")
        spec: dict[str, Any] = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        if self.providers is not None:
            spec["providers"] = dict(self.providers)
        if self.routes is not None:
            spec["routes"] = list(self.routes)
        if self.channels is not None:
            spec["channels"] = [channel.as_dict() for channel in self.channels]
        if self.cost is not None:
            spec["cost"] = price_dict(self.cost)
        return spec

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ItemSpec:
        """The stored JSON back (unknown keys are ignored)."""
        def text(key: str) -> str | None:
            value = raw.get(key)
            return None if value is None else str(value)

        providers = raw.get("providers")
        routes = raw.get("routes")
        max_out = raw.get("max_output_tokens")
        window = raw.get("context_window")
        channels = raw.get("channels")
        cost = raw.get("cost")
        return cls(upstream_model=text("upstream_model"),
                   max_output_tokens=None if max_out is None else int(max_out),
                   context_window=None if window is None else int(window),
                   providers=({str(k): str(v) for k, v in providers.items()}
                              if isinstance(providers, dict) else None),
                   routes=(tuple(str(r) for r in routes) if isinstance(routes, list)
                           else None),
                   name=text("name"), method=text("method"), path=text("path"),
                   upstream_path=text("upstream_path"),
                   channels=(tuple(ChannelSpec.from_dict(c) for c in channels)
                             if isinstance(channels, list) else None),
                   cost=None if cost is None else price_from_dict(cost))


@dataclass(frozen=True, slots=True)
class Listing:
    """One sellable item: a token-priced model or a per-call endpoint, its price and what the
    gateway needs to route and bound it (``spec``, stored beside the item)."""

    id: str
    provider: str
    price: Price
    group_ratios: Mapping[str, Decimal]
    effective_from: datetime | None
    spec: ItemSpec = ItemSpec()

    @property
    def billing_type(self) -> str:
        return "token" if isinstance(self.price, TokenPrice) else "per_call"

    @property
    def kind(self) -> str:
        return "endpoint" if self.spec.is_endpoint else "model"


def model_routes(billing_type: str, protocols: Mapping[str, str]) -> list[str]:
    """The gateway routes a model can be called through, given its protocol providers."""
    table = TOKEN_ROUTES if billing_type == "token" else IMAGE_ROUTES
    return [route for family in ("openai", "anthropic") if family in protocols
            for route in table[family]]


@dataclass(frozen=True, slots=True)
class Tier:
    """Rate limits per API key of the accounts in this tier. ``upgrade_at_nano``: the
    cumulative top-ups (nano-USD) that move an account up to this tier, if any."""

    name: str
    rpm: int
    tpm: int
    concurrency: int
    upgrade_at_nano: int | None = None


@dataclass(frozen=True, slots=True)
class Catalog:
    providers: Mapping[str, Provider]
    groups: Mapping[str, Decimal]
    listings: tuple[Listing, ...]
    tiers: tuple[Tier, ...] = ()  # lowest first
    default_tier: str | None = None

    @property
    def models(self) -> tuple[Listing, ...]:
        return tuple(item for item in self.listings if item.kind == "model")

    @property
    def endpoints(self) -> tuple[Listing, ...]:
        return tuple(item for item in self.listings if item.kind == "endpoint")


class _ExactLoader(yaml.SafeLoader):
    """A SafeLoader that never builds a binary floating-point number: YAML decimals become
    ``Decimal``, read from their source text."""


def _construct_decimal(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    text = str(loader.construct_scalar(node)).replace("_", "")
    if text.lower().lstrip("+-") in (".inf", ".nan"):
        return text  # validation reports it as not a finite number
    try:
        return Decimal(text)
    except ArithmeticError:  # YAML 1.1 sexagesimal (1:30.5) and the like: not a price
        return text


_ExactLoader.add_constructor("tag:yaml.org,2002:float", _construct_decimal)


def load_catalog(path: str | Path) -> Catalog:
    """Read and validate a catalog file; raise :class:`CatalogError` listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError([f"{path}: cannot read file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise CatalogError([f"{path}: not UTF-8 text (byte {exc.start})"]) from None
    return parse_catalog(text, source=str(path))


def _at(line: int, column: int) -> str:
    return f"line {line + 1}, column {column + 1}"  # PyYAML counts from 0, editors from 1


def _yaml_problem(source: str, text: str, exc: yaml.YAMLError) -> str:
    """PyYAML's error as one line that names the source and where in it, e.g.
    ``cat.yaml: line 1, column 11: not valid YAML: expected ',' or ']', but got '<stream
    end>' (while parsing a flow sequence from line 1, column 9)`` for ``models: [1``. Its own
    ``str`` spans several lines with a snippet of the file."""
    def flat(message: str) -> str:
        return " ".join(message.split())

    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark, context = exc.problem_mark, exc.context_mark
        message = flat(exc.problem or "")
        if exc.context:
            where = "" if context is None else f" from {_at(context.line, context.column)}"
            message += f" ({flat(exc.context)}{where})"
        return f"{source}: {_at(mark.line, mark.column)}: not valid YAML: {message}"
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow
        line = text.count("\n", 0, exc.position)
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1)
        character = f" (#x{exc.character:04x})" if isinstance(exc.character, int) else ""
        return (f"{source}: {_at(line, column)}: not valid YAML: "
                f"{flat(exc.reason)}{character}")
    return f"{source}: not valid YAML: {flat(str(exc))}"


def parse_catalog(text: str, *, source: str = "<catalog>") -> Catalog:
    try:
        data = yaml.load(text, Loader=_ExactLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise CatalogError([_yaml_problem(source, text, exc)]) from None
    except (ValueError, TypeError, AttributeError, RecursionError) as exc:
        # PyYAML's constructors raise these on scalars that match a tag's pattern but not
        # its meaning: a month 13, a UTC offset of +99:00, a malformed !!timestamp.
        raise CatalogError([f"{source}: not valid YAML: {type(exc).__name__}: {exc}"]) from None
    return _Validator(source).catalog(data)


class _Validator:
    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{self.source}: {where}: {message}")

    def catalog(self, data: Any) -> Catalog:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise CatalogError([(f"{self.source}: the catalog must be a mapping with "
                                 "providers, groups, models and endpoints")])
        for key in sorted(set(data) - {"providers", "groups", "models", "endpoints",
                                       "effective_from", "tiers", "tier_upgrades",
                                       "default_tier"}, key=str):
            self.problem(str(key), "unknown top-level section")
        default_from = self.timestamp("effective_from", data.get("effective_from"))
        providers = self.providers(data.get("providers") or {})
        groups = self.groups(data.get("groups") or {})
        listings: list[Listing] = []
        seen: dict[str, str] = {}
        routes: dict[tuple[str, str], str] = {}
        for section in ("models", "endpoints"):
            items = data.get(section) or []
            if not isinstance(items, list):
                self.problem(section, "must be a list")
                continue
            for index, item in enumerate(items):
                listing = self.listing(section, index, item, providers, groups, default_from)
                if listing is None:
                    continue
                where = f"{section}[{listing.id}]"
                if listing.id in seen:
                    self.problem(f"{where}.id", f"duplicate id (also in {seen[listing.id]})")
                    continue
                seen[listing.id] = section
                spec = listing.spec
                if spec.method and spec.path:
                    route = (spec.method, _route_shape(spec.path))
                    if route in routes:
                        self.problem(f"{where}.path", f"{spec.method} {spec.path} is "
                                     f"already served by endpoint {routes[route]}")
                    routes[route] = listing.id
                listings.append(listing)
        tiers, default_tier = self.tiers(data.get("tiers"), data.get("tier_upgrades"),
                                         data.get("default_tier"))
        if self.problems:
            raise CatalogError(self.problems)
        return Catalog(providers, groups, tuple(listings), tiers, default_tier)

    def tiers(self, raw: Any, upgrades: Any, default: Any) -> tuple[tuple[Tier, ...],
                                                                    str | None]:
        """``tiers: {name: {rpm, tpm, concurrency}}`` lowest first, ``default_tier`` (else the
        first), ``tier_upgrades: {name: "USD"}`` thresholds rising with the tiers."""
        if raw is None:
            for name, value in (("tier_upgrades", upgrades), ("default_tier", default)):
                if value is not None:
                    self.problem(name, "needs a 'tiers' section")
            return (), None
        if not isinstance(raw, dict) or not raw:
            self.problem("tiers", "must be a mapping of tier name to {rpm, tpm, concurrency}")
            return (), None
        if upgrades is not None and not isinstance(upgrades, dict):
            self.problem("tier_upgrades", "must be a mapping of tier name to a USD amount")
            upgrades = None
        upgrades = upgrades or {}
        for name in upgrades:
            if name not in raw:
                self.problem(f"tier_upgrades[{name}]", "unknown tier")
        tiers: list[Tier] = []
        last: tuple[str, int] | None = None
        for name, spec in raw.items():
            where = f"tiers[{name}]"
            if not _ID.match(str(name)) or len(str(name)) > 64:
                self.problem(where, "a tier name is 1 to 64 letters, digits, '.', '_' or '-'")
                continue
            if not isinstance(spec, dict):
                self.problem(where, "must be a mapping with rpm, tpm and concurrency")
                continue
            for field_name in sorted(set(spec) - {"rpm", "tpm", "concurrency"}):
                self.problem(f"{where}.{field_name}", "unknown field")
            values = [self.positive(f"{where}.{f}", spec.get(f))
                      for f in ("rpm", "tpm", "concurrency")]
            threshold = None
            if name in upgrades:
                amount = self.usd(f"tier_upgrades[{name}]", upgrades[name])
                if amount is not None:
                    threshold = parse_usd(upgrades[name])
                    if last is not None and threshold <= last[1]:
                        self.problem(f"tier_upgrades[{name}]", "must be more than the threshold"
                                     f" of the lower tier {last[0]!r}")
                    last = (str(name), threshold)
            if None not in values:
                rpm, tpm, concurrency = (int(v) for v in values if v is not None)
                tiers.append(Tier(str(name), rpm, tpm, concurrency, threshold))
        default_name = str(next(iter(raw))) if default is None else default
        if default_name not in raw:
            self.problem("default_tier", f"unknown tier {default!r} (tiers: "
                         f"{', '.join(str(n) for n in raw)})")
        return tuple(tiers), str(default_name)

    def positive(self, where: str, value: Any) -> int | None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            self.problem(where, f"must be a positive integer, got {value!r}")
            return None
        return value

    def providers(self, raw: Any) -> dict[str, Provider]:
        if not isinstance(raw, dict):
            self.problem("providers", "must be a mapping of provider id to settings")
            return {}
        result: dict[str, Provider] = {}
        for pid, spec in raw.items():
            where = f"providers[{pid}]"
            if not isinstance(spec, dict):
                self.problem(where, "must be a mapping with at least 'kind'")
                continue
            kind = spec.get("kind")
            if kind not in PROVIDER_KINDS:
                self.problem(f"{where}.kind", f"must be one of {', '.join(PROVIDER_KINDS)}, "
                             f"got {kind!r}")
                continue
            base_url = spec.get("base_url")
            if kind != "sandbox" and not (isinstance(base_url, str) and
                                          base_url.startswith(("http://", "https://"))):
                self.problem(f"{where}.base_url", "an http(s) URL is required for kind "
                             f"{kind!r}, got {base_url!r}")
            auth = spec.get("auth") or {}
            if not isinstance(auth, dict) or set(auth) - {"header", "query", "scheme"}:
                self.problem(f"{where}.auth", "must be a mapping with 'header' or 'query' "
                             "and optional 'scheme'")
                auth = {}
            env = spec.get("api_key_env")
            if env is not None and not isinstance(env, str):
                self.problem(f"{where}.api_key_env", "must be an environment variable name")
                env = None
            envs = spec.get("api_key_envs")
            pool: tuple[str, ...] = ()
            if envs is not None:
                if not isinstance(envs, list) or not envs or not all(
                        isinstance(e, str) and e for e in envs):
                    self.problem(f"{where}.api_key_envs", "must be a list of environment "
                                 "variable names")
                elif env is not None:
                    self.problem(f"{where}.api_key_envs", "give api_key_env or api_key_envs, "
                                 "not both")
                else:
                    pool = tuple(envs)
            health = spec.get("health_path")
            if health is not None and not (isinstance(health, str) and health.startswith("/")):
                self.problem(f"{where}.health_path", "must be a path starting with '/'")
                health = None
            result[str(pid)] = Provider(str(pid), kind, base_url, env,
                                        {str(k): str(v) for k, v in auth.items()}, pool,
                                        health)
        return result

    def groups(self, raw: Any) -> dict[str, Decimal]:
        groups: dict[str, Decimal] = {DEFAULT_GROUP: Decimal(1)}
        if not isinstance(raw, dict):
            self.problem("groups", "must be a mapping of group name to {ratio: ...}")
            return groups
        for name, spec in raw.items():
            where = f"groups[{name}]"
            value = spec.get("ratio") if isinstance(spec, dict) else None
            ratio = self.ratio(f"{where}.ratio", value)
            if ratio is not None:
                groups[str(name)] = ratio
        return groups

    def ratio(self, where: str, value: Any) -> Decimal | None:
        if value is None:
            self.problem(where, "a ratio is required, e.g. \"0.8\"")
            return None
        try:
            ratio = parse_decimal(value, what="ratio")
        except MoneyFormatError as exc:
            self.problem(where, str(exc))
            return None
        if ratio <= 0:
            self.problem(where, f"must be greater than 0, got {value}")
            return None
        return ratio

    def usd(self, where: str, value: Any) -> Decimal | None:
        try:
            parse_usd(value, what="price")  # non-negative, at most 9 decimal places
        except MoneyFormatError as exc:
            self.problem(where, str(exc))
            return None
        return parse_decimal(value)

    def timestamp(self, where: str, value: Any) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, datetime):
            moment = value
        else:
            try:
                moment = datetime.fromisoformat(str(value))
            except ValueError:
                self.problem(where, f"must be an ISO 8601 timestamp, got {value!r}")
                return None
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)

    def listing(self, section: str, index: int, item: Any, providers: Mapping[str, Provider],
                groups: Mapping[str, Decimal], default_from: datetime | None) -> Listing | None:
        if not isinstance(item, dict):
            self.problem(f"{section}[{index}]", "must be a mapping")
            return None
        item_id = item.get("id")
        if not isinstance(item_id, str) or not _ID.match(item_id):
            self.problem(f"{section}[{index}].id", "a short id of letters, digits and ._:/@- "
                         f"is required, got {item_id!r}")
            return None
        where = f"{section}[{item_id}]"
        before = len(self.problems)
        allowed = {"id", "provider", "price", "group_ratios", "effective_from", "channels",
                   "cost"} | (
            {"upstream_model", "max_output_tokens", "context_window", "providers", "routes"}
            if section == "models"
            else {"name", "method", "path", "upstream_path"})
        for key in sorted(set(item) - allowed, key=str):
            self.problem(f"{where}.{_field(key)}", "unknown field")
        provider = item.get("provider")
        protocols: dict[str, str] = {}
        channels = None
        if item.get("channels") is not None:
            if provider is not None or item.get("providers") is not None:
                self.problem(f"{where}.channels", "give channels, or provider/providers, "
                             "not both")
            channels = self.channels(where, item["channels"], providers, section)
            if channels:
                provider = channels[0].provider
        if section == "models" and channels:
            for channel in channels:
                for family in KIND_PROTOCOLS[providers[channel.provider].kind]:
                    protocols.setdefault(family, channel.provider)
            if not protocols:
                self.problem(f"{where}.channels", "no channel's provider serves a model "
                             "protocol: use openai, anthropic or sandbox providers")
        elif section == "models":
            protocols = self.protocols(where, item, providers)
            if provider is None and protocols:
                provider = next(iter(protocols.values()))
            if not protocols and isinstance(provider, str) and provider in providers:
                self.problem(f"{where}.provider", f"provider {provider!r} (kind "
                             f"{providers[provider].kind}) serves no model protocol: use an "
                             "openai, anthropic or sandbox provider")
        if not isinstance(provider, str) or provider not in providers:
            known = ", ".join(sorted(providers)) or "none defined"
            self.problem(f"{where}.provider", f"unknown provider {provider!r} (known: {known})")
        overrides: dict[str, Decimal] = {}
        raw_overrides = item.get("group_ratios") or {}
        if not isinstance(raw_overrides, dict):
            self.problem(f"{where}.group_ratios", "must be a mapping of group name to ratio")
            raw_overrides = {}
        for group, value in raw_overrides.items():
            if group not in groups:
                self.problem(f"{where}.group_ratios.{group}", "unknown group")
                continue
            ratio = self.ratio(f"{where}.group_ratios.{group}", value)
            if ratio is not None:
                overrides[str(group)] = ratio
        effective_from = self.timestamp(f"{where}.effective_from",
                                        item.get("effective_from")) or default_from
        price_raw = item.get("price")
        if not isinstance(price_raw, dict):
            self.problem(f"{where}.price", "a price is required" if price_raw is None
                         else "must be a mapping")
            return None
        if section == "models":
            listing = self.model(where, item, price_raw, overrides, effective_from)
            if listing is not None:
                routes = self.routes(where, item, listing.billing_type, protocols)
                listing = replace(listing, provider=str(provider), spec=replace(
                    listing.spec, providers=dict(protocols), routes=routes))
        else:
            listing = self.endpoint(where, item, price_raw, overrides, effective_from)
        cost = None
        if item.get("cost") is not None and listing is not None:
            cost = self.cost(f"{where}.cost", item["cost"], listing.price)
        if listing is not None and channels is not None:
            for channel in channels:
                if channel.cost is not None and not isinstance(channel.cost,
                                                               type(listing.price)):
                    self.problem(f"{where}.channels[{channel.provider}].cost",
                                 "must have the same fields as the price")
        if listing is not None:
            listing = replace(listing, provider=str(provider),
                              spec=replace(listing.spec, channels=channels, cost=cost))
        return listing if len(self.problems) == before else None

    def channels(self, where: str, raw: Any, providers: Mapping[str, Provider],
                 section: str) -> tuple[ChannelSpec, ...] | None:
        """``channels: [{provider, upstream_model, weight, priority, cost}]``."""
        if not isinstance(raw, list) or not raw:
            self.problem(f"{where}.channels", "must be a list of {provider, weight, priority}")
            return None
        result: list[ChannelSpec] = []
        seen: set[str] = set()
        for index, spec in enumerate(raw):
            at = f"{where}.channels[{index}]"
            if not isinstance(spec, dict):
                self.problem(at, "must be a mapping with at least 'provider'")
                continue
            allowed = {"provider", "weight", "priority", "cost"} | (
                {"upstream_model"} if section == "models" else set())
            for key in sorted(set(spec) - allowed, key=str):
                self.problem(f"{at}.{_field(key)}", "unknown field")
            pid = spec.get("provider")
            if not isinstance(pid, str) or pid not in providers:
                known = ", ".join(sorted(providers)) or "none defined"
                self.problem(f"{at}.provider", f"unknown provider {pid!r} (known: {known})")
                continue
            if pid in seen:
                self.problem(f"{at}.provider", f"provider {pid!r} is already a channel")
                continue
            seen.add(pid)
            weight = spec.get("weight", 1)
            if not isinstance(weight, int) or isinstance(weight, bool) or weight < 1:
                self.problem(f"{at}.weight", f"must be a positive integer, got {weight!r}")
                weight = 1
            priority = spec.get("priority", 0)
            if not isinstance(priority, int) or isinstance(priority, bool) or priority < 0:
                self.problem(f"{at}.priority", f"must be an integer >= 0, got {priority!r}")
                priority = 0
            model = spec.get("upstream_model")
            if model is not None and (not isinstance(model, str) or not model):
                self.problem(f"{at}.upstream_model", "must be a model name")
                model = None
            cost = None
            if spec.get("cost") is not None:
                cost = self.cost(f"{at}.cost", spec["cost"], None)
            result.append(ChannelSpec(pid, model, weight, priority, cost))
        return tuple(result)

    def cost(self, where: str, raw: Any, like: Price | None) -> Price | None:
        """An upstream cost: the fields of a price (token or per-call)."""
        if not isinstance(raw, dict) or not raw:
            self.problem(where, "must be a mapping with the fields of a price")
            return None
        per_call = "per_call" in raw if like is None else isinstance(like, CallPrice)
        fields = ({"per_call", "per_size"} if per_call else
                  {"input", "output", "cache_read", "cache_write", "cache_write_1h"})
        for key in sorted(set(raw) - fields, key=str):
            self.problem(f"{where}.{_field(key)}", "unknown cost field (the fields of the "
                         "price: " + ", ".join(sorted(fields)) + ")")
        values: dict[str, Decimal | None] = {}
        for key in sorted(fields - {"per_size"}):
            if raw.get(key) is None:
                if key in ("input", "output", "per_call"):
                    self.problem(f"{where}.{key}", "missing")
                values[key] = None
            else:
                values[key] = self.usd(f"{where}.{key}", raw[key])
        sizes: dict[str, Decimal] = {}
        per_size = raw.get("per_size") or {}
        if not isinstance(per_size, dict):
            self.problem(f"{where}.per_size", "must be a mapping of size to USD")
            per_size = {}
        for size, value in per_size.items():
            usd = self.usd(f"{where}.per_size.{size}", value)
            if usd is not None:
                sizes[str(size)] = usd
        if per_call:
            unit = values.get("per_call")
            return None if unit is None else CallPrice(unit, sizes)
        if values.get("input") is None or values.get("output") is None:
            return None
        return TokenPrice(values["input"], values["output"],  # type: ignore[arg-type]
                          values["cache_read"], values["cache_write"], values["cache_write_1h"])

    def protocols(self, where: str, item: dict[str, Any],
                  providers: Mapping[str, Provider]) -> dict[str, str]:
        """``provider`` serves every protocol its kind speaks; ``providers: {openai: a,
        anthropic: b}`` names (or overrides) the provider per protocol family."""
        result: dict[str, str] = {}
        main = providers.get(str(item.get("provider")))
        if main is not None:
            result.update({family: main.id for family in KIND_PROTOCOLS[main.kind]})
        raw = item.get("providers")
        if raw is None:
            return result
        if not isinstance(raw, dict) or not raw:
            self.problem(f"{where}.providers", "must be a mapping of protocol (openai, "
                         "anthropic) to provider id")
            return result
        for family, pid in raw.items():
            at = f"{where}.providers.{_field(family)}"
            if family not in TOKEN_ROUTES:
                self.problem(at, "unknown protocol (openai or anthropic)")
            elif not isinstance(pid, str) or pid not in providers:
                self.problem(at, f"unknown provider {pid!r}")
            elif family not in KIND_PROTOCOLS[providers[pid].kind]:
                self.problem(at, f"provider {pid!r} (kind "
                             f"{providers[pid].kind}) does not speak the {family} protocol")
            else:
                result[str(family)] = str(pid)
        return result

    def routes(self, where: str, item: dict[str, Any], billing_type: str,
               protocols: Mapping[str, str]) -> tuple[str, ...] | None:
        """``routes: [/v1/embeddings]`` sells a model on some of its protocols' routes only."""
        raw = item.get("routes")
        if raw is None:
            return None
        served = model_routes(billing_type, protocols)
        if not isinstance(raw, list) or not raw:
            self.problem(f"{where}.routes", "must be a list of gateway routes, e.g. "
                         "[/v1/chat/completions, /v1/messages]")
            return None
        for route in raw:
            if route not in served:
                self.problem(f"{where}.routes", f"{route!r} is not served by the model's "
                             f"providers (they serve {', '.join(served) or 'nothing'})")
        return tuple(str(route) for route in raw)

    def model(self, where: str, item: dict[str, Any], raw: dict[str, Any],
              overrides: dict[str, Decimal], effective_from: datetime | None) -> Listing | None:
        if "per_call" in raw:
            return self.image_model(where, item, raw, overrides, effective_from)
        for key in sorted(set(raw) - {"input", "output", "cache_read", "cache_write",
                                      "cache_write_1h", "tool_calls"}, key=str):
            self.problem(f"{where}.price.{_field(key)}", "unknown price field (token prices "
                         "are input, output, cache_read, cache_write, cache_write_1h, in USD "
                         "per 1M tokens, and tool_calls in USD per call; image models take "
                         "per_call, per_size and per_quality)")
        prices: dict[str, Decimal | None] = {}
        for key in ("input", "output"):
            if raw.get(key) is None:
                self.problem(f"{where}.price.{key}", "missing price (USD per 1M tokens)")
                prices[key] = None
            else:
                prices[key] = self.usd(f"{where}.price.{key}", raw[key])
        for key in ("cache_read", "cache_write", "cache_write_1h"):
            prices[key] = None if raw.get(key) is None else self.usd(f"{where}.price.{key}",
                                                                     raw[key])
        max_out = item.get("max_output_tokens", 4096)
        if not isinstance(max_out, int) or isinstance(max_out, bool) or max_out <= 0:
            self.problem(f"{where}.max_output_tokens", f"must be a positive integer, got "
                         f"{max_out!r}")
        window = item.get("context_window")
        if window is not None and (not isinstance(window, int) or isinstance(window, bool)
                                   or window <= 0):
            self.problem(f"{where}.context_window", f"must be a positive integer (input "
                         f"tokens), got {window!r}")
        upstream_model = item.get("upstream_model", item["id"])
        if not isinstance(upstream_model, str) or not upstream_model:
            self.problem(f"{where}.upstream_model", "must be a model name")
        if prices["input"] is None or prices["output"] is None:
            return None
        tools = self.usd_map(f"{where}.price.tool_calls", raw.get("tool_calls"),
                             "a mapping of server-side tool (web_search, ...) to USD per call")
        price = TokenPrice(prices["input"], prices["output"], prices["cache_read"],
                           prices["cache_write"], prices["cache_write_1h"],
                           tuple(sorted(tools.items())))
        return Listing(item["id"], str(item.get("provider")), price, overrides, effective_from,
                       ItemSpec(upstream_model=upstream_model, max_output_tokens=max_out,
                                context_window=window))

    def image_model(self, where: str, item: dict[str, Any], raw: dict[str, Any],
                    overrides: dict[str, Decimal],
                    effective_from: datetime | None) -> Listing | None:
        """A model priced per image returned (``/v1/images/generations``)."""
        for key in sorted(set(raw) - {"per_call", "per_size", "per_quality"}, key=str):
            self.problem(f"{where}.price.{_field(key)}", "unknown price field (image models "
                         "take per_call and optional per_size and per_quality, in USD per "
                         "image)")
        if "max_output_tokens" in item:
            self.problem(f"{where}.max_output_tokens", "an image model has no output tokens")
        if "context_window" in item:
            self.problem(f"{where}.context_window", "an image model has no input tokens")
        per_call = self.usd(f"{where}.price.per_call", raw["per_call"])
        sizes: dict[str, Decimal] = {}
        per_size = raw.get("per_size") or {}
        if not isinstance(per_size, dict):
            self.problem(f"{where}.price.per_size", "must be a mapping of size (e.g. "
                         "\"1024x1024\") to USD per image")
            per_size = {}
        for size, value in per_size.items():
            if not isinstance(size, str) or not size:
                self.problem(f"{where}.price.per_size", f"a size must be a string, got {size!r}")
                continue
            usd = self.usd(f"{where}.price.per_size.{size}", value)
            if usd is not None:
                sizes[size] = usd
        qualities = self.qualities(f"{where}.price.per_quality", raw.get("per_quality"))
        upstream_model = item.get("upstream_model", item["id"])
        if not isinstance(upstream_model, str) or not upstream_model:
            self.problem(f"{where}.upstream_model", "must be a model name")
        if per_call is None:
            return None
        return Listing(item["id"], str(item.get("provider")),
                       CallPrice(per_call, sizes, qualities),
                       overrides, effective_from, ItemSpec(upstream_model=upstream_model))

    def qualities(self, where: str, raw: Any) -> dict[str, Decimal]:
        """``per_quality: {high: "0.17", low: {"1024x1024": "0.011"}}``: a quality's price,
        or its price per size (kept as ``low:1024x1024``)."""
        what = "a mapping of quality (e.g. \"high\") to USD per image, or to sizes and USD"
        flat = {k: v for k, v in (raw.items() if isinstance(raw, dict) else ())
                if not isinstance(v, dict)}
        result = self.usd_map(where, flat if isinstance(raw, dict) else raw, what)
        for quality, sizes in (raw.items() if isinstance(raw, dict) else ()):
            if isinstance(sizes, dict):
                if not isinstance(quality, str) or not quality or ":" in quality:
                    self.problem(where, f"a quality must be a name, got {quality!r}")
                    continue
                for size, usd in self.usd_map(f"{where}.{_field(quality)}", sizes,
                                              what).items():
                    result[f"{quality}:{size}"] = usd
        return result

    def usd_map(self, where: str, raw: Any, what: str) -> dict[str, Decimal]:
        """``{name: USD}`` (tool fees, per-quality prices); problems name each entry."""
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.problem(where, f"must be {what}")
            return {}
        result: dict[str, Decimal] = {}
        for name, value in raw.items():
            if not isinstance(name, str) or not name:
                self.problem(where, f"a name must be a string, got {name!r}")
                continue
            usd = self.usd(f"{where}.{_field(name)}", value)
            if usd is not None:
                result[name] = usd
        return result

    def endpoint(self, where: str, item: dict[str, Any], raw: dict[str, Any],
                 overrides: dict[str, Decimal], effective_from: datetime | None) -> Listing | None:
        for key in sorted(set(raw) - {"per_call"}, key=str):
            self.problem(f"{where}.price.{_field(key)}", "unknown price field (per-call "
                         "endpoints take per_call, in USD)")
        per_call = None
        if raw.get("per_call") is None:
            self.problem(f"{where}.price.per_call", "missing price (USD per call)")
        else:
            per_call = self.usd(f"{where}.price.per_call", raw["per_call"])
        method = str(item.get("method", "GET")).upper()
        if method not in HTTP_METHODS:
            self.problem(f"{where}.method", f"must be one of {', '.join(HTTP_METHODS)}")
        path = item.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            self.problem(f"{where}.path", f"must be a path starting with '/', got {path!r}")
            path = None
        upstream_path = item.get("upstream_path", path)
        if not isinstance(upstream_path, str) or not upstream_path.startswith("/"):
            self.problem(f"{where}.upstream_path", "must be a path starting with '/'")
        elif path is not None:
            params = re.findall(r"\{([^}]*)\}", path)
            for name in params:
                if not _PARAM.match(name):
                    self.problem(f"{where}.path", f"path parameter {{{name}}} must be a name of "
                                 "letters, digits and _")
            if len(set(params)) != len(params):
                self.problem(f"{where}.path", "a path parameter appears twice")
            for name in re.findall(r"\{([^}]*)\}", upstream_path):
                if name not in params:
                    self.problem(f"{where}.upstream_path", f"{{{name}}} is not a parameter of "
                                 f"path {path}")
        name = item.get("name", item["id"])
        if per_call is None or path is None:
            return None
        return Listing(item["id"], str(item.get("provider")), CallPrice(per_call), overrides,
                       effective_from, ItemSpec(name=str(name), method=method, path=path,
                                                upstream_path=upstream_path))


def _field(key: Any) -> str:
    """A field name as a problem shows it: plain names as they are, anything else quoted
    (an empty key, one with spaces, a number)."""
    return key if isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_-]+", key) else repr(key)


def _route_shape(path: str) -> str:
    """``/twitter/user/{username}`` and ``/twitter/user/{name}`` are the same route."""
    return re.sub(r"\{[^}]*\}", "{}", path.rstrip("/") or "/")
