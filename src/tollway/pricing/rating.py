"""Rating: from measured usage, a price and a ratio to an exact charge. Pure functions.

Token formula (OpenAI usage semantics, prompt includes cached and cache-write tokens)::

    cost = round_half_up(((prompt - cached - cache_write) * input
                          + cached * cache_read
                          + cache_write * cache_write_price
                          + completion * output) / 1e6 * ratio, 1e-9 USD)

Per-call formula: ``cost = price_per_call * ratio`` for each successful call.

Every intermediate value is an exact ``Decimal`` (the context traps ``Inexact``, so a
silent rounding would raise instead); the total is rounded once, in :func:`to_nano_usd`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, Inexact, localcontext
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

    @property
    def effective_cache_read_per_1m(self) -> Decimal:
        return self.input_per_1m if self.cache_read_per_1m is None else self.cache_read_per_1m

    @property
    def effective_cache_write_per_1m(self) -> Decimal:
        return self.input_per_1m if self.cache_write_per_1m is None else self.cache_write_per_1m


@dataclass(frozen=True, slots=True)
class CallPrice:
    """USD per successful call."""

    per_call: Decimal


Price = TokenPrice | CallPrice


class InvalidUsage(ValueError):
    """Usage that cannot be real (negative counts, more cached tokens than prompt tokens)."""


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Token counts in OpenAI semantics: ``prompt_tokens`` includes ``cached_tokens`` and
    ``cache_write_tokens``; ``completion_tokens`` includes reasoning tokens."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    cache_write_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidUsage(f"{name} must be a non-negative integer, got {value!r}")
        if self.cached_tokens + self.cache_write_tokens > self.prompt_tokens:
            raise InvalidUsage(
                f"cached ({self.cached_tokens}) + cache-write ({self.cache_write_tokens}) tokens "
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
    ) -> TokenUsage:
        """Anthropic's ``input_tokens`` excludes cache reads and writes; add them back."""
        return cls(
            prompt_tokens=input_tokens + cache_read_input_tokens + cache_creation_input_tokens,
            completion_tokens=output_tokens,
            cached_tokens=cache_read_input_tokens,
            cache_write_tokens=cache_creation_input_tokens,
        )

    @property
    def uncached_prompt_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens - self.cache_write_tokens


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


@dataclass(frozen=True, slots=True)
class Charge:
    components: tuple[Component, ...]
    subtotal_usd: Decimal
    ratio: AppliedRatio
    exact_usd: Decimal
    cost_nano_usd: int


def resolve_ratio(
    group: str, group_ratios: Mapping[str, Decimal], overrides: Mapping[str, Decimal]
) -> AppliedRatio:
    """The item's override for the group if it has one, else the group's own ratio."""
    if group in overrides:
        return AppliedRatio(overrides[group], "model")
    return AppliedRatio(group_ratios[group], "group")


_PER_1M_SCALE = -6


def rate_tokens(usage: TokenUsage, price: TokenPrice, ratio: AppliedRatio) -> Charge:
    with localcontext() as ctx:
        ctx.prec = 80
        ctx.traps[Inexact] = True
        lines = (
            ("input", usage.uncached_prompt_tokens, price.input_per_1m),
            ("cache_read", usage.cached_tokens, price.effective_cache_read_per_1m),
            ("cache_write", usage.cache_write_tokens, price.effective_cache_write_per_1m),
            ("output", usage.completion_tokens, price.output_per_1m),
        )
        components = tuple(Component(name, qty, unit, (qty * unit).scaleb(_PER_1M_SCALE))
                           for name, qty, unit in lines)
        return _total(components, ratio)


def rate_calls(usage: CallUsage, price: CallPrice, ratio: AppliedRatio) -> Charge:
    with localcontext() as ctx:
        ctx.prec = 80
        ctx.traps[Inexact] = True
        component = Component("calls", usage.calls, price.per_call, usage.calls * price.per_call)
        return _total((component,), ratio)


def _total(components: tuple[Component, ...], ratio: AppliedRatio) -> Charge:
    subtotal = sum((c.amount_usd for c in components), Decimal(0))
    exact = subtotal * ratio.value
    return Charge(components, subtotal, ratio, exact, to_nano_usd(exact))
