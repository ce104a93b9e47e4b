"""The gateway: OpenAI-compatible LLM routes and per-call data-API routes, metered.

The hot path is plain ASGI (no Request/Response objects, no middleware re-wrapping) and
touches the database only to place the hold and to settle it; keys and the catalog are served
from per-worker caches.
"""
