"""How prices read to people: ``$0.150000 / 1M input tokens``, ``$0.020000 / per call``."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from tollway.money import format_usd, to_nano_usd
from tollway.pricing.rating import CallPrice, Price, TokenPrice


def unit_price(value: Decimal) -> str:
    """At least 6 decimal places, more when the price has them (never rounds a list price)."""
    text = format_usd(to_nano_usd(value))
    whole, frac = text.split(".")
    return f"${whole}.{frac[:6]}{frac[6:].rstrip('0')}"


def price_lines(price: Price, ratio: Decimal = Decimal(1), *, per: str = "call") -> list[str]:
    """The list price, or a group's price after ``ratio`` (rounded half-up to nano-USD, as
    :func:`price_fields` shows it). ``per`` names what a per-call price is paid for: ``call``
    (data APIs) or ``image``."""
    def show(value: Decimal) -> str:
        return unit_price(value * ratio)

    if isinstance(price, CallPrice):
        return [f"{show(price.per_call)} / per {per}"] + [
            f"{show(value)} / per {per} ({size})" for size, value in price.per_size.items()] + [
            f"{show(value)} / per {per} ({_quality_label(key)})"
            for key, value in price.per_quality.items()]
    lines = [f"{show(price.input_per_1m)} / 1M input tokens",
             f"{show(price.output_per_1m)} / 1M output tokens"]
    if price.cache_read_per_1m is not None:
        lines.append(f"{show(price.cache_read_per_1m)} / 1M cached input tokens")
    if price.cache_write_per_1m is not None:
        lines.append(f"{show(price.cache_write_per_1m)} / 1M cache-write tokens")
    if price.cache_write_1h_per_1m is not None:
        lines.append(f"{show(price.cache_write_1h_per_1m)} / 1M cache-write (1h) tokens")
    lines.extend(f"{show(value)} / {tool} call" for tool, value in price.tool_calls)
    return lines


def price_fields(price: Price, ratio: Decimal = Decimal(1)) -> dict[str, Any]:
    """Prices as API decimal strings (9 places), after ``ratio``.

    A unit price times a ratio can have more than 9 decimals (it is not a charge, which is
    rounded once per request from the exact price); it is shown rounded half-up.
    """
    def usd(value: Decimal | None) -> str | None:
        return None if value is None else format_usd(to_nano_usd(value * ratio))

    if isinstance(price, CallPrice):
        fields: dict[str, Any] = {"per_call_usd": usd(price.per_call)}
        if price.per_size:
            fields["per_size"] = {size: {"per_call_usd": usd(value)}
                                  for size, value in price.per_size.items()}
        if price.per_quality:
            fields["per_quality"] = {quality: {"per_call_usd": usd(value)}
                                     for quality, value in price.per_quality.items()}
        return fields
    assert isinstance(price, TokenPrice)
    token: dict[str, Any] = {
        "input_per_1m_usd": usd(price.input_per_1m),
        "output_per_1m_usd": usd(price.output_per_1m),
        "cache_read_per_1m_usd": usd(price.effective_cache_read_per_1m),
        "cache_write_per_1m_usd": usd(price.effective_cache_write_per_1m),
        "cache_write_1h_per_1m_usd": usd(price.effective_cache_write_1h_per_1m)}
    if price.tool_calls:
        token["tool_calls"] = {tool: {"per_call_usd": usd(value)}
                               for tool, value in price.tool_calls}
    return token


def _quality_label(key: str) -> str:
    """``high`` → ``high quality``; ``low:1024x1024`` → ``low quality, 1024x1024``."""
    quality, _, size = key.partition(":")
    return f"{quality} quality" + (f", {size}" if size else "")
