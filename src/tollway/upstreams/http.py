"""HTTP upstreams over one shared aiohttp session per worker (httpx's pool costs too much
CPU under concurrency: encode/httpx #3215). Used by the ``openai`` and ``http`` kinds."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import aiohttp

from tollway.errors import UpstreamError, UpstreamTimeout
from tollway.upstreams.base import UpstreamRequest


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float
    read_s: float  # longest silence between two chunks of a response


class AiohttpResponse:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.content_type = response.headers.get("Content-Type", "application/octet-stream")

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except TimeoutError:
            raise UpstreamTimeout("the upstream stopped answering mid-response") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"the upstream response broke off: {exc}") from None
        finally:
            self._response.release()

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except TimeoutError:
            raise UpstreamTimeout("the upstream stopped answering mid-stream") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"the upstream stream broke off: {exc}") from None

    async def close(self) -> None:
        self._response.release()


class HttpUpstream:
    """Forwards to ``base_url + request.path`` with the operator's credential injected."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, *, timeouts: Timeouts,
                 headers: Mapping[str, str] | None = None,
                 query: Mapping[str, str] | None = None) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.headers = dict(headers or {})
        self.query = list((query or {}).items())
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect_s,
                                             sock_read=timeouts.read_s)

    async def send(self, request: UpstreamRequest) -> AiohttpResponse:
        headers = {**request.headers, **self.headers}
        try:
            response = await self.session.request(
                request.method, self.base_url + request.path,
                params=[*request.query, *self.query] or None, data=request.body or None,
                headers=headers, timeout=self.timeout, allow_redirects=False)
        except TimeoutError:
            raise UpstreamTimeout("the upstream did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"cannot reach the upstream: {exc}") from None
        return AiohttpResponse(response)

    async def close(self) -> None:
        return None  # the session belongs to the registry
