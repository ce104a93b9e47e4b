"""Which webhook targets may be called: customers choose webhook URLs, so unless the operator
allows it (``TOLLWAY_NOTIFY_ALLOW_PRIVATE_TARGETS``) none may reach a loopback, private,
link-local, multicast or otherwise non-public address.

Checked twice: when the URL is saved (an address literal, or a name that resolves to a
non-public address, is refused with 400) and when the deliverer connects (``PublicResolver``
judges every address the name resolves to at that moment, and the connection is made only to
addresses it passed: a name re-pointed at 127.0.0.1 after saving — DNS rebinding — is refused).

IPv6 forms that carry an IPv4 address are judged by that IPv4 address: IPv4-mapped
(``::ffff:127.0.0.1``), IPv4-compatible (``::127.0.0.1``), 6to4 (``2002:7f00:1::``), NAT64
(``64:ff9b::7f00:1``, and the local-use ``64:ff9b:1::/48`` refused outright) and Teredo (its
client address). ``ipaddress`` alone calls some of them global.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Mapping
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from tollway import settings
from tollway.errors import InvalidRequest

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_COMPATIBLE = ipaddress.ip_network("::/96")
#: the short reason a customer sees in the attempt log
REFUSED = "the webhook address is not a public address"


class TargetRefused(OSError):
    """A webhook host resolved to an address the deliverer may not call."""


def private_allowed() -> bool:
    return settings.get("notify_allow_private_targets").strip().lower() in (
        "1", "true", "yes", "on")


def embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, 6to4, NAT64, Teredo)."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64 or (address in _COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id or address in _NAT64_LOCAL:
            return False
        if (inner := embedded_ipv4(address)) is not None:
            return is_public(inner)
    return address.is_global and not address.is_multicast


def parse_address(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None


def literal_refusal(url: str, *, allow_private: bool) -> str | None:
    """Why this URL may not be a webhook target, judging only what it says (no lookup)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "not an http(s) URL"
    if allow_private:
        return None
    address = parse_address(parts.hostname)
    if address is not None and not is_public(address):
        return REFUSED
    if parts.hostname.rstrip(".").lower() in ("localhost", "localhost.localdomain") or \
            parts.hostname.rstrip(".").lower().endswith(".localhost"):
        return REFUSED
    return None


def _judge(host: str, addresses: list[str]) -> None:
    for text in addresses:
        address = parse_address(text)
        if address is None or not is_public(address):
            raise TargetRefused(f"{host} resolves to a non-public address ({text})")


async def save_refusal(url: str) -> str | None:
    """The check when a URL is saved: its literal, then what its name resolves to now. A name
    that does not resolve yet is accepted (it is judged again at every delivery)."""
    allow = private_allowed()
    if (why := literal_refusal(url, allow_private=allow)) is not None or allow:
        return why
    host = urlsplit(url).hostname or ""
    if parse_address(host) is not None:
        return None
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None,
                                                             type=socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        _judge(host, [str(info[4][0]) for info in infos])
    except TargetRefused:
        return REFUSED
    return None


def check_saved_sync(body: Mapping[str, object]) -> None:
    """``check_saved`` for the CLI (no event loop)."""
    asyncio.run(check_saved(body))


class PublicResolver(AbstractResolver):
    """aiohttp's resolver, refusing a host when any address it resolves to is not public:
    the connector connects only to addresses this returned, so the check holds at connect
    time whatever the name resolved to when it was saved."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        _judge(host, [str(r["host"]) for r in results])
        return results

    async def close(self) -> None:
        await self._inner.close()


async def check_saved(body: Mapping[str, object]) -> None:
    """Refuse a settings change whose ``webhook_url`` may not be called (400)."""
    url = body.get("webhook_url")
    if isinstance(url, str) and url and (why := await save_refusal(url)) is not None:
        raise InvalidRequest(f"webhook_url is refused: {why} (loopback, private, link-local "
                             "and other non-public addresses cannot receive webhooks)")
