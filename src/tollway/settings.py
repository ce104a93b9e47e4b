"""Every setting, declared once: name, default, environment variable and what it is for."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    default: str
    help: str

    @property
    def env(self) -> str:
        return "TOLLWAY_" + self.name.upper()


SETTINGS = (
    Setting("database_url", "sqlite:///var/tollway.db",
            "SQLAlchemy URL: sqlite:///PATH (embedded) or postgresql://USER@HOST/DB"),
    Setting("sqlite_synchronous", "normal",
            "SQLite only (WAL mode): normal = a commit survives a crash of Tollway's process, "
            "but a power loss or OS crash may lose the last commits (acknowledged charges and "
            "top-ups included; the database is never corrupted); full = a commit is on disk "
            "before it is acknowledged (survives a power loss or OS crash)"),
    Setting("data_dir", "var",
            "where the generated admin token, demo key and demo console password are kept"),
    Setting("admin_token", "", "token for /admin/v1 routes; generated into DATA_DIR if empty"),
    Setting("hold_ttl_seconds", "3600",
            "a hold nobody settles within this time is released by the reaper; keep it longer "
            "than the longest request"),
    Setting("reaper_interval_seconds", "30", "how often the server releases expired holds"),
    Setting("upstream_connect_timeout_seconds", "10", "time to connect to an upstream"),
    Setting("upstream_read_timeout_seconds", "600",
            "longest silence from an upstream (between stream chunks, or before a whole answer)"),
    Setting("max_body_bytes", "10485760",
            "largest request body the gateway accepts (413 payload_too_large beyond it), on "
            "every route that reads one"),
    Setting("upstream_headers_timeout_seconds", "30",
            "longest wait for an upstream's response headers; past it the request fails over "
            "to the next channel (the read timeout still bounds the whole answer)"),
    Setting("channel_max_attempts", "3",
            "channels one request may try (failover), within the upstream read timeout"),
    Setting("channel_retry_statuses", "408,429,5xx",
            "upstream statuses that fail over to the next channel (comma-separated; 5xx = "
            "500-599); other answers go to the client"),
    Setting("channel_failures", "5",
            "consecutive failures that open a channel's circuit (this worker stops using it)"),
    Setting("channel_cooldown_seconds", "30",
            "how long an open circuit waits before one probe request is let through"),
    Setting("channel_health_interval_seconds", "0",
            "how often each worker checks every channel with a free request (GET /models or "
            "the provider's health_path); 0: never (run `tollway channels test`)"),
    Setting("upstream_cost_tolerance", "0.05",
            "relative difference between an upstream's reported cost (usage.cost) and the "
            "cost computed from the channel's `cost` beyond which a record is flagged"),
    Setting("stream_disconnect", "cancel",
            "when a client leaves a stream: cancel (stop the upstream, bill the prompt and what "
            "was delivered, marked estimated) or finish (read the upstream on to its usage, "
            "within the upstream read timeout, and bill exactly that)"),
    Setting("max_upstream_body_bytes", "33554432",
            "largest upstream answer (a whole body, or a whole stream) the gateway reads; "
            "beyond it the request fails with 502 upstream_error and charges nothing it did "
            "not deliver"),
    Setting("key_cache_seconds", "5",
            "how long a worker trusts a looked-up API key (revocations made through another "
            "process take effect within this time; a key in use is refreshed in the background "
            "during the last quarter of it)"),
    Setting("usage_retention_days", "400",
            "raw usage records older than this are deleted by `tollway usage prune` (rollups, "
            "statements and the ledger are kept)"),
    Setting("billing_timezone", "UTC",
            "IANA time zone of the calendar days, weeks (from Monday) and months of key spend "
            "caps"),
    Setting("trusted_proxies", "",
            "comma-separated CIDR networks of reverse proxies whose X-Forwarded-For is "
            "believed (the client is the right-most address not in them); empty = none"),
    Setting("catalog_refresh_seconds", "5",
            "how often a worker re-reads the catalog and prices from the database"),
    Setting("max_inflight_requests", "512",
            "requests one worker serves at once; beyond it a request is refused at once with "
            "503 overloaded and Retry-After (nothing read, nothing charged)"),
    Setting("log_format", "text",
            "text (one readable line per event) or json (one JSON object per line, for log "
            "collectors)"),
    Setting("log_requests", "errors",
            "access log: all (one line per request: request id, route, status, duration, "
            "account, product, cost; never keys or headers), errors (only answers >= 400: no "
            "logging cost on the successful hot path) or none"),
    Setting("cors_origins", "",
            "comma-separated origins (https://app.example.com, or *) whose browser pages may "
            "call the API; empty = CORS off (no headers, preflights not answered)"),
    Setting("metrics_token", "",
            "bearer token for GET /metrics; empty: the admin token (either is accepted)"),
    Setting("instance", "",
            "the `instance` label on every /metrics series (and the traces' service instance): "
            "what tells this server from the others; empty: HOSTNAME:PORT under `tollway serve`"),
    Setting("metrics_dir", "",
            "where `tollway serve` keeps its workers' shared metric files (emptied at start); "
            "empty: DATA_DIR/metrics/PORT"),
    Setting("otlp_traces_endpoint", "",
            "OTLP/HTTP endpoint for OpenTelemetry traces of gateway requests, e.g. "
            "http://collector:4318/v1/traces (needs `pip install 'tollway[otel]'`); empty: "
            "no tracing, and OpenTelemetry is never imported"),
    Setting("session_hours", "12", "how long a web console sign-in lasts"),
    Setting("signin_max_failures", "5",
            "failed console sign-ins per login or client address within the window before "
            "further attempts are refused (HTTP 429) without checking the password"),
    Setting("signin_window_seconds", "900",
            "how long a failed console sign-in counts against its login and address"),
    Setting("signup_max_per_address", "5",
            "sign-ups (every POST to /signup) one client address may make per window; more "
            "are refused with 429 and Retry-After"),
    Setting("signup_window_seconds", "3600", "the window of signup_max_per_address"),
    Setting("signup_enabled", "false",
            "true: anyone may create a customer account with a console login at /signup"),
    Setting("signup_credit_usd", "0",
            "a decimal USD amount of promotional credit granted once to each account created "
            "at /signup"),
    Setting("signup_credit_days", "0",
            "days the sign-up credit stays valid (0: it never expires)"),
    Setting("notify_interval_seconds", "5",
            "how often the server looks for notifications to deliver (0: never; then run "
            "`tollway notify deliver`)"),
    Setting("notify_retry_base_seconds", "30",
            "wait before the first retry of a failed delivery; doubled after each attempt"),
    Setting("notify_max_attempts", "8", "attempts per delivery before it is marked failed"),
    Setting("notify_timeout_seconds", "10", "longest wait for a webhook receiver's answer"),
    Setting("notify_allow_private_targets", "false",
            "deliver webhooks to loopback, private and link-local addresses (off: a customer "
            "cannot make the server call into the operator's network)"),
    Setting("notify_retention_days", "90",
            "notification events (with their deliveries and attempts) older than this are "
            "deleted by the server's deliverer and `tollway notify prune`; pending ones stay"),
    Setting("pg_bin_dir", "",
            "where `tollway backup`/`restore` find pg_dump and pg_restore for PostgreSQL "
            "(empty: the PATH, then Debian's /usr/lib/postgresql/<newest>/bin)"),
    Setting("smtp_url", "",
            "smtp://USER:PASS@HOST:PORT (STARTTLS when offered) or smtps://…; empty: no email"),
    Setting("notify_email_from", "tollway@localhost", "From: address of notification email"),
    Setting("public_url", "http://127.0.0.1:8080",
            "the address customers reach this server at (the payment provider sends them back "
            "to pages under it)"),
    Setting("stripe_secret_key", "",
            "Stripe secret API key (sk_live_… or sk_test_…); empty: card top-ups are off"),
    Setting("stripe_webhook_secret", "",
            "signing secret of the Stripe webhook endpoint /webhooks/stripe (whsec_…)"),
    Setting("stripe_api_base", "https://api.stripe.com",
            "Stripe API address (tests point it at a local fake)"),
    Setting("topup_min_usd", "5", "smallest card top-up, USD (at most 2 decimals)"),
    Setting("topup_max_usd", "1000", "largest card top-up, USD (at most 2 decimals)"),
    Setting("receipt_business_name", "Tollway", "the seller's name printed on receipts"),
    Setting("receipt_business_address", "",
            "the seller's address and tax id printed on receipts (\\n separates lines)"),
    Setting("topup_presets_usd", "10,20,50,100",
            "comma-separated top-up amounts the console offers as buttons (each within the "
            "bounds)"),
    Setting("auto_recharge_max_failures", "3",
            "consecutive failed auto-recharge charges after which an account's auto-recharge "
            "is paused (saving the setting again resumes it)"),
)


def get(name: str) -> str:
    """The value of a setting: its environment variable if set, else its default."""
    for setting in SETTINGS:
        if setting.name == name:
            return os.environ.get(setting.env, setting.default)
    raise KeyError(name)
