"""The network edge: what the gateway sends upstream and what comes back.

An adapter turns an :class:`UpstreamRequest` into an :class:`UpstreamResponse`; the gateway
never knows whether bytes came over aiohttp or from the built-in sandbox, and tests swap the
far end (a fake server on 127.0.0.1) without monkeypatching. Failures surface as
:class:`~tollway.errors.UpstreamError` / :class:`~tollway.errors.UpstreamTimeout`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    method: str
    path: str  # the upstream path, appended to the provider's base_url
    body: bytes = b""
    query: Sequence[tuple[str, str]] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    stream: bool = False


class UpstreamResponse(Protocol):
    status: int
    content_type: str
    #: the upstream's ``Retry-After`` header, if any (a 429 opens the channel's circuit for it)
    retry_after: str | None

    async def read(self) -> bytes:
        """The whole body (raises UpstreamError/UpstreamTimeout if it cannot be read)."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives."""
        ...

    async def close(self) -> None:
        ...


class Upstream(Protocol):
    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        ...

    async def close(self) -> None:
        ...


class BufferedResponse:
    """A response already in memory (the sandbox, tests)."""

    def __init__(self, status: int, body: bytes | AsyncIterator[bytes],
                 content_type: str = "application/json", retry_after: str | None = None) -> None:
        self.status = status
        self.content_type = content_type
        self.retry_after = retry_after
        self._body = body

    async def read(self) -> bytes:
        if isinstance(self._body, bytes):
            return self._body
        return b"".join([chunk async for chunk in self._body])

    async def chunks(self) -> AsyncIterator[bytes]:
        if isinstance(self._body, bytes):
            yield self._body
        else:
            async for chunk in self._body:
                yield chunk

    async def close(self) -> None:
        return None
