"""Builds one adapter per catalog provider, sharing one aiohttp session (one per worker)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import aiohttp

from tollway.errors import UpstreamError
from tollway.upstreams.base import Upstream, UpstreamRequest, UpstreamResponse
from tollway.upstreams.http import HttpUpstream, Timeouts
from tollway.upstreams.sandbox import SandboxUpstream


class Unsupported:
    def __init__(self, kind: str) -> None:
        self.kind = kind

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        raise UpstreamError(f"provider kind {self.kind!r} is not supported by this gateway yet")

    async def close(self) -> None:
        return None


def credential(config: Mapping[str, Any]) -> str | None:
    env = config.get("api_key_env")
    return os.environ.get(env) if env else None


class Registry:
    def __init__(self, *, timeouts: Timeouts, max_body_bytes: int,
                 max_connections: int = 512) -> None:
        self.timeouts = timeouts
        self.max_body_bytes = max_body_bytes
        # aiohttp asks every upstream for gzip/deflate (its default Accept-Encoding), so it
        # must also decode: the gateway parses LLM answers and hands data-API bodies on without
        # their Content-Encoding header.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, limit_per_host=0,
                                           ttl_dns_cache=300),
            auto_decompress=True, skip_auto_headers=("User-Agent",))
        self._upstreams: dict[str, Upstream] = {}
        self._configs: dict[str, tuple[str, str]] = {}

    def configure(self, providers: Mapping[str, tuple[str, Mapping[str, Any]]]) -> None:
        """(Re)build adapters for ``{provider id: (kind, config)}``; unchanged ones are kept.
        A provider with a key pool (``api_key_envs``) also gets one adapter per key,
        ``PROVIDER#N`` (N from 1), each with its own credential."""
        providers = dict(providers)
        for pid, (kind, config) in list(providers.items()):
            for n, env in enumerate(config.get("api_key_envs") or (), start=1):
                providers[f"{pid}#{n}"] = (kind, {**config, "api_key_env": env,
                                                  "api_key_envs": None})
        for pid, (kind, config) in providers.items():
            fingerprint = (kind, repr(sorted(config.items())) + str(credential(config)))
            if self._configs.get(pid) == fingerprint:
                continue
            self._configs[pid] = fingerprint
            self._upstreams[pid] = self._build(kind, config)
        for pid in set(self._upstreams) - set(providers):
            del self._upstreams[pid]
            del self._configs[pid]

    def kind(self, pid: str) -> str:
        """The provider's kind (``openai``, ``anthropic``, ``http``, ``sandbox``)."""
        found = self._configs.get(pid)
        return found[0] if found else ""

    def _build(self, kind: str, config: Mapping[str, Any]) -> Upstream:
        if kind == "sandbox":
            return SandboxUpstream()
        key = credential(config)
        if kind == "openai":
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return HttpUpstream(self.session, config["base_url"], timeouts=self.timeouts,
                                max_body_bytes=self.max_body_bytes, headers=headers, secret=key)
        if kind == "anthropic":
            # base_url as for openai, e.g. https://api.anthropic.com/v1; anthropic-version
            # comes from the client's request (the route forwards it)
            headers = {"x-api-key": key} if key else {}
            return HttpUpstream(self.session, config["base_url"], timeouts=self.timeouts,
                                max_body_bytes=self.max_body_bytes, headers=headers, secret=key)
        if kind == "http":
            auth = config.get("auth") or {}
            headers, query = {}, {}
            if key and auth.get("header"):
                scheme = auth.get("scheme")
                headers[auth["header"]] = f"{scheme} {key}" if scheme else key
            if key and auth.get("query"):
                query[auth["query"]] = key
            return HttpUpstream(self.session, config["base_url"], timeouts=self.timeouts,
                                max_body_bytes=self.max_body_bytes, headers=headers,
                                query=query, secret=key)
        return Unsupported(kind)

    def get(self, provider: str) -> Upstream:
        upstream = self._upstreams.get(provider)
        if upstream is None:
            raise UpstreamError(f"provider {provider!r} is not configured")
        return upstream

    async def close(self) -> None:
        await self.session.close()
