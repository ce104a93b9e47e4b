"""Rating: from measured usage, a price and a ratio to an exact charge. Pure functions.

Token formula (OpenAI usage semantics, prompt includes cached and cache-write tokens)::

    cost = round_half_up(((prompt - cached - cache_write - cache_write_1h) * input
                          + cached * cache_read
                          + cache_write * cache_write_price
                          + cache_write_1h * cache_write_1h_price
                          + completion * output) / 1e6 * ratio, 1e-9 USD)

``cache_write`` are 5-minute cache writes, ``cache_write_1h`` 1-hour ones (Anthropic prices
them apart). A missing cache price falls back: cache_read → input, cache_write → input,
cache_write_1h → cache_write → input.

Other protocols report usage differently; :meth:`TokenUsage.from_anthropic` and
:meth:`TokenUsage.from_responses` convert explicitly, so the formula above is the only one.

Server-side tools an upstream runs and bills per call (Anthropic's ``web_search``, OpenAI's
hosted tools) add ``calls × price_per_call`` for each tool the price names (``tool_calls``)
to the token subtotal, before the ratio: still one rounding per request.

Per-call formula: ``cost = price_per_call * ratio`` for each successful call (for image
models, each image returned, at its size's or quality's price).

Every intermediate value is an exact ``Decimal`` (the context traps ``Inexact``, so a
silent rounding would raise instead); the total is rounded once, in :func:`to_nano_usd`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from decimal import (
    Context,
    Decimal,
    DivisionByZero,
    Inexact,
    InvalidOperation,
    Overflow,
    localcontext,
)
from typing import Literal

from tollway.money import to_nano_usd

RatioSource = Literal["group", "model"]


@dataclass(frozen=True, slots=True)
class TokenPrice:
    """USD per 1M tokens. A missing cache price falls back to the input price."""

    input_per_1m: Decimal
    output_per_1m: Decimal
    cache_read_per_1m: Decimal | None = None
    cache_write_per_1m: Decimal | None = None
    cache_write_1h_per_1m: Decimal | None = None
    #: USD per server-side tool call, by tool (``(("web_search", Decimal("0.01")),)``)
    tool_calls: tuple[tuple[str, Decimal], ...] = ()

    def tool_price(self, tool: str) -> Decimal | None:
        return dict(self.tool_calls).get(tool)

    @property
    def effective_cache_read_per_1m(self) -> Decimal:
        return self.input_per_1m if self.cache_read_per_1m is None else self.cache_read_per_1m

    @property
    def effective_cache_write_per_1m(self) -> Decimal:
        return self.input_per_1m if self.cache_write_per_1m is None else self.cache_write_per_1m

    @property
    def effective_cache_write_1h_per_1m(self) -> Decimal:
        if self.cache_write_1h_per_1m is not None:
            return self.cache_write_1h_per_1m
        return self.effective_cache_write_per_1m


@dataclass(frozen=True, slots=True)
class CallPrice:
    """USD per successful call (per image returned, for image models). ``per_size`` and
    ``per_quality`` price an image model's sizes and qualities apart (``{"1024x1024": 0.04}``,
    ``{"high": 0.17, "low:1024x1024": 0.011}``: a quality priced per size is keyed
    ``quality:size``); ``per_call`` is the price of a request that names neither."""

    per_call: Decimal
    per_size: Mapping[str, Decimal] = field(default_factory=dict)
    per_quality: Mapping[str, Decimal] = field(default_factory=dict)

    def for_size(self, size: str | None) -> Decimal | None:
        """The unit price of ``size``; None when the model prices sizes and this is not one."""
        if size is None or not self.per_size:
            return self.per_call
        return self.per_size.get(size)

    def _quality(self, size: str | None, quality: str) -> Decimal | None:
        """One quality's price: at ``size`` when the quality is priced per size (``high`` at
        ``1024x1024`` is ``per_quality["high:1024x1024"]``; the dearest of its sizes when
        none is named), else its one price and the size's, the higher."""
        by_size = {key.partition(":")[2]: value for key, value in self.per_quality.items()
                   if key.partition(":")[0] == quality and ":" in key}
        if by_size:
            return max(by_size.values()) if size is None else by_size.get(size)
        flat = self.per_quality.get(quality)
        sized = self.for_size(size)
        if flat is None or sized is None:
            return None
        return flat if size is None or not self.per_size else max(flat, sized)

    def for_image(self, size: str | None, quality: str | None) -> Decimal | None:
        """The unit price of an image of ``size`` and ``quality``; when the model prices
        qualities and the request names none, the dearest (the upstream chooses). None when
        the size or quality is not offered."""
        if not self.per_quality:
            return self.for_size(size)
        if quality is not None:
            return self._quality(size, quality)
        prices = [p for q in self.qualities if (p := self._quality(size, q)) is not None]
        return max(prices) if prices else None

    @property
    def qualities(self) -> list[str]:
        return sorted({key.partition(":")[0] for key in self.per_quality})


Price = TokenPrice | CallPrice


class InvalidUsage(ValueError):
    """Usage that cannot be real (negative counts, more cached tokens than prompt tokens)."""


_TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens",
                 "cache_write_1h_tokens")


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Token counts in OpenAI semantics, the rating inputs: ``prompt_tokens`` includes
    ``cached_tokens`` (cache reads), ``cache_write_tokens`` (5-minute cache writes) and
    ``cache_write_1h_tokens`` (1-hour cache writes); ``completion_tokens`` includes reasoning
    tokens."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    #: calls of server-side tools the upstream ran and bills apart, by tool
    tool_calls: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        for tool, calls in self.tool_calls:
            if not isinstance(calls, int) or isinstance(calls, bool) or calls < 0:
                raise InvalidUsage(f"{tool} calls must be a non-negative integer, got "
                                   f"{calls!r}")
        for name in _TOKEN_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidUsage(f"{name} must be a non-negative integer, got {value!r}")
        if self.cached_tokens + self.cache_writes > self.prompt_tokens:
            raise InvalidUsage(
                f"cached ({self.cached_tokens}) + cache-write ({self.cache_writes}) tokens "
                f"exceed prompt tokens ({self.prompt_tokens})"
            )

    @classmethod
    def from_anthropic(
        cls,
        *,
        input_tokens: int,
        output_tokens: int,
        cache_read_input_tokens: int = 0,
        cache_creation_input_tokens: int = 0,
        ephemeral_5m_input_tokens: int | None = None,
        ephemeral_1h_input_tokens: int | None = None,
    ) -> TokenUsage:
        """Anthropic Messages usage → rating inputs.

        Anthropic's ``input_tokens`` EXCLUDES ``cache_read_input_tokens`` and
        ``cache_creation_input_tokens``: they are added back to make the prompt. Cache writes
        are split by ``cache_creation.ephemeral_5m_input_tokens`` /
        ``ephemeral_1h_input_tokens`` when the upstream reports the split; without it every
        creation token is a 5-minute write (Anthropic's default TTL). Where the split and the
        total disagree, the larger wins (creation tokens beyond the itemised 1-hour ones are
        5-minute writes), so no itemised token goes unbilled.
        """
        for name, value in (("input_tokens", input_tokens), ("output_tokens", output_tokens),
                            ("cache_read_input_tokens", cache_read_input_tokens),
                            ("cache_creation_input_tokens", cache_creation_input_tokens),
                            ("ephemeral_5m_input_tokens", ephemeral_5m_input_tokens or 0),
                            ("ephemeral_1h_input_tokens", ephemeral_1h_input_tokens or 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidUsage(f"{name} must be a non-negative integer, got {value!r}")
        write_1h = ephemeral_1h_input_tokens or 0
        write_5m = max(cache_creation_input_tokens - write_1h, ephemeral_5m_input_tokens or 0)
        return cls(
            prompt_tokens=input_tokens + cache_read_input_tokens + write_5m + write_1h,
            completion_tokens=output_tokens,
            cached_tokens=cache_read_input_tokens,
            cache_write_tokens=write_5m,
            cache_write_1h_tokens=write_1h,
        )

    @classmethod
    def from_responses(cls, *, input_tokens: int, output_tokens: int,
                       cached_tokens: int = 0) -> TokenUsage:
        """OpenAI Responses usage → rating inputs: ``input_tokens`` INCLUDES
        ``input_tokens_details.cached_tokens`` and ``output_tokens`` includes
        ``output_tokens_details.reasoning_tokens`` — the same semantics as Chat Completions'
        prompt/completion, under other names (reasoning is reported beside, not billed apart).
        """
        return cls(prompt_tokens=input_tokens, completion_tokens=output_tokens,
                   cached_tokens=cached_tokens)

    def with_tools(self, calls: Mapping[str, int]) -> TokenUsage:
        """These counts with ``calls`` of server-side tools (sorted by tool)."""
        if not calls:
            return self
        return TokenUsage(self.prompt_tokens, self.completion_tokens, self.cached_tokens,
                          self.cache_write_tokens, self.cache_write_1h_tokens,
                          tuple(sorted(calls.items())))

    @property
    def cache_writes(self) -> int:
        return self.cache_write_tokens + self.cache_write_1h_tokens

    @property
    def uncached_prompt_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens - self.cache_writes


@dataclass(frozen=True, slots=True)
class CallUsage:
    calls: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.calls, int) or isinstance(self.calls, bool) or self.calls < 0:
            raise InvalidUsage(f"calls must be a non-negative integer, got {self.calls!r}")


@dataclass(frozen=True, slots=True)
class AppliedRatio:
    value: Decimal
    source: RatioSource


@dataclass(frozen=True, slots=True)
class Component:
    """One line of a charge: ``quantity`` units at ``unit_price_usd`` (per 1M tokens or per
    call), ``amount_usd`` exact and before the ratio."""

    name: str
    quantity: int
    unit_price_usd: Decimal
    amount_usd: Decimal


class Charge:
    """A request's charge: ``cost_nano_usd``, the exact amount rounded once, and the ratio
    applied. Its lines — ``components`` (each before the ratio), ``subtotal_usd`` and
    ``exact_usd`` — are what an explanation or an invoice shows; they are worked out in exact
    ``Decimal`` from ``lines`` when first read, so the request path, which books only the cost
    (computed in integers by ``billing.metering.rate``), never builds them."""

    __slots__ = ("cost_nano_usd", "ratio", "_lines", "_components")

    def __init__(self, cost_nano_usd: int, ratio: AppliedRatio,
                 lines: Callable[[], tuple[Component, ...]]) -> None:
        self.cost_nano_usd = cost_nano_usd
        self.ratio = ratio
        self._lines = lines
        self._components: tuple[Component, ...] | None = None

    @property
    def components(self) -> tuple[Component, ...]:
        if self._components is None:
            self._components = self._lines()
        return self._components

    @property
    def subtotal_usd(self) -> Decimal:
        with _exact():
            return sum((c.amount_usd for c in self.components), Decimal(0))

    @property
    def exact_usd(self) -> Decimal:
        with _exact():
            return self.subtotal_usd * self.ratio.value

    def __repr__(self) -> str:
        return f"Charge(cost_nano_usd={self.cost_nano_usd}, ratio={self.ratio!r})"


def resolve_ratio(
    group: str, group_ratios: Mapping[str, Decimal], overrides: Mapping[str, Decimal]
) -> AppliedRatio:
    """The item's override for the group if it has one, else the group's own ratio."""
    if group in overrides:
        return AppliedRatio(overrides[group], "model")
    return AppliedRatio(group_ratios[group], "group")


_PER_1M_SCALE = -6


#: Python's default traps, and ``Inexact``: a silent rounding raises instead.
_EXACT = Context(prec=80, traps=[InvalidOperation, DivisionByZero, Overflow, Inexact])


def _exact() -> AbstractContextManager[Context]:
    """A context in which every operation is exact."""
    return localcontext(_EXACT)


def token_lines(usage: TokenUsage, price: TokenPrice) -> tuple[Component, ...]:
    """The token formula's lines, exact, before the ratio; a server-side tool the price names
    no fee for is not a line (it is not billed)."""
    with _exact():
        lines = (
            ("input", usage.uncached_prompt_tokens, price.input_per_1m),
            ("cache_read", usage.cached_tokens, price.effective_cache_read_per_1m),
            ("cache_write", usage.cache_write_tokens, price.effective_cache_write_per_1m),
            ("cache_write_1h", usage.cache_write_1h_tokens,
             price.effective_cache_write_1h_per_1m),
            ("output", usage.completion_tokens, price.output_per_1m),
        )
        components = tuple(Component(name, qty, unit, (qty * unit).scaleb(_PER_1M_SCALE))
                           for name, qty, unit in lines)
        tools = tuple(Component(f"tool:{tool}", calls, unit, calls * unit)
                      for tool, calls in usage.tool_calls
                      if (unit := price.tool_price(tool)) is not None)
        return components + tools


def call_lines(usage: CallUsage, unit_price: Decimal) -> tuple[Component, ...]:
    """The per-call formula's one line: ``calls`` × the unit price, before the ratio."""
    with _exact():
        return (Component("calls", usage.calls, unit_price, usage.calls * unit_price),)


def rate_tokens(usage: TokenUsage, price: TokenPrice, ratio: AppliedRatio) -> Charge:
    """The token formula in exact ``Decimal``, rounded once: the reference the request path's
    integer rating (``billing.metering.rate``) is proven equal to, and the explanation of a
    stored record (``billing.reports``)."""
    return _total(token_lines(usage, price), ratio)


def rate_calls(usage: CallUsage, price: CallPrice, ratio: AppliedRatio, *,
               unit_price: Decimal | None = None) -> Charge:
    """``calls`` × the per-call price (or ``unit_price``: an image size's) × ratio, in exact
    ``Decimal``, rounded once."""
    return _total(call_lines(usage, price.per_call if unit_price is None else unit_price), ratio)


def _total(components: tuple[Component, ...], ratio: AppliedRatio) -> Charge:
    with _exact():  # the one rounding too: to_nano_usd rounds on purpose, never silently
        exact = sum((c.amount_usd for c in components), Decimal(0)) * ratio.value
        return Charge(to_nano_usd(exact), ratio, lambda: components)
