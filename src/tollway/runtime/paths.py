"""Which paths are pages (HTML) and which are APIs (JSON): shared by the error handlers
(``pages.is_page``) and the load shedder (``observe``), which answers before any route ran."""

from __future__ import annotations

#: Paths answered with JSON (APIs); everything else is a page.
API_PREFIXES = ("/v1/", "/admin/v1/", "/apis/", "/webhooks/", "/healthz", "/metrics",
                "/openapi.json", "/static/")


def is_page_path(path: str) -> bool:
    return not (path.startswith(API_PREFIXES) or path in ("/v1", "/admin/v1"))
