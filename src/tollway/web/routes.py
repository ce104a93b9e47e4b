"""The console's route table: static files, sign-in and the customer's pages, the public
marketplace pages and the operator's pages."""

from __future__ import annotations

from starlette.routing import BaseRoute

from tollway.web import pages
from tollway.web.billing_pages import billing_routes
from tollway.web.channels import channel_routes
from tollway.web.console import console_routes
from tollway.web.market import market_routes
from tollway.web.operator import operator_routes

web_routes: list[BaseRoute] = [
    pages.static_mount,
    # console pages (sign-in included) before any Mount("/admin") so /admin/login matches
    *console_routes,
    *billing_routes,
    *market_routes,
    *operator_routes,
    *channel_routes,
]
