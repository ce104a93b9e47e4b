"""HTTP upstreams over one shared aiohttp session per worker (httpx's pool costs too much
CPU under concurrency: encode/httpx #3215). Used by the ``openai`` and ``http`` kinds.

An upstream is not trusted: what the gateway buffers of an answer is bounded
(``max_upstream_body_bytes``, a whole answer or a whole stream), and the operator's credential
is removed from anything of the upstream's that may reach a client, a log or a usage record
(error messages, non-2xx bodies), since providers echo the key they were sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

import aiohttp

from tollway.errors import UpstreamError, UpstreamTimeout
from tollway.upstreams.base import UpstreamRequest

REDACTED = "[redacted]"


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float
    read_s: float  # longest silence between two chunks of a response


@dataclass(frozen=True, slots=True)
class Redactor:
    """Replaces the operator's credentials in text and bytes that came from an upstream."""

    secrets: Sequence[str] = ()

    def text(self, value: str) -> str:
        for secret in self.secrets:
            value = value.replace(secret, REDACTED)
        return value

    def bytes(self, value: bytes) -> bytes:
        for secret in self.secrets:
            value = value.replace(secret.encode(), REDACTED.encode())
        return value


class AiohttpResponse:
    def __init__(self, response: aiohttp.ClientResponse, *, limit: int,
                 redactor: Redactor) -> None:
        self._response = response
        self._limit = limit
        self._redactor = redactor
        self.status = response.status
        self.content_type = response.headers.get("Content-Type", "application/octet-stream")
        self.retry_after = response.headers.get("Retry-After")

    def _too_large(self) -> UpstreamError:
        return UpstreamError(f"the upstream answer is larger than {self._limit} bytes")

    async def read(self) -> bytes:
        """The whole body, at most ``limit`` bytes; a non-2xx body without the credential."""
        if (self._response.content_length or 0) > self._limit:
            self._response.close()
            raise self._too_large()
        try:
            body = b"".join([chunk async for chunk in self._chunks()])
        finally:
            self._response.release()
        return body if 200 <= self.status < 300 else self._redactor.bytes(body)

    def chunks(self) -> AsyncIterator[bytes]:
        return self._chunks()  # not wrapped in another generator: one resumption per read

    async def _chunks(self) -> AsyncIterator[bytes]:
        size = 0
        try:
            async for chunk in self._response.content.iter_any():
                size += len(chunk)
                if size > self._limit:
                    self._response.close()  # stop reading: the connection is not reused
                    raise self._too_large()
                yield chunk
        except TimeoutError:
            raise UpstreamTimeout("the upstream stopped answering mid-response") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(self._redactor.text(
                f"the upstream response broke off: {exc}")) from None

    async def close(self) -> None:
        self._response.release()


class HttpUpstream:
    """Forwards to ``base_url + request.path`` with the operator's credential injected."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, *, timeouts: Timeouts,
                 max_body_bytes: int, headers: Mapping[str, str] | None = None,
                 query: Mapping[str, str] | None = None, secret: str | None = None) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.headers = dict(headers or {})
        self.query = list((query or {}).items())
        self.max_body_bytes = max_body_bytes
        self.redactor = Redactor((secret,) if secret else ())
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
        except (aiohttp.ClientError, ValueError) as exc:  # ValueError: aiohttp's bad URLs
            raise UpstreamError(self.redactor.text(f"cannot reach the upstream: {exc}")) from None
        return AiohttpResponse(response, limit=self.max_body_bytes, redactor=self.redactor)

    async def close(self) -> None:
        return None  # the session belongs to the registry
