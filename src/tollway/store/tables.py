"""SQLAlchemy Core tables. Money columns are signed 64-bit integers of nano-USD (``*_nano``);
times are integer milliseconds since the epoch (``*_ms``), identical on SQLite and PostgreSQL.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

#: Auto-increment ids: INTEGER (the rowid) on SQLite, BIGINT identity on PostgreSQL.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Nano = sa.BigInteger
Ms = sa.BigInteger


def _id() -> sa.Column[int]:
    return sa.Column("id", Id, sa.Identity(start=101), primary_key=True)


accounts = sa.Table(
    "accounts",
    metadata,
    _id(),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("kind", sa.String(16), nullable=False),  # customer | system
    sa.Column("group_name", sa.String(64), nullable=False),
    sa.Column("available_nano", Nano, nullable=False, server_default="0"),
    sa.Column("held_nano", Nano, nullable=False, server_default="0"),
    sa.Column("used_nano", Nano, nullable=False, server_default="0"),
    sa.Column("requests", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("created_at_ms", Ms, nullable=False),
    # console sign-in (migration 0003): email and password are optional, both NULL = no login
    sa.Column("email", sa.String(320)),  # stored lower-cased, unique
    sa.Column("password_hash", sa.String(255)),  # scrypt$n$r$p$salt$hash (billing/logins.py)
    sa.Column("disabled_at_ms", Ms),  # set: its keys and its console sign-in are refused
    sa.Index("uq_accounts_email", "email", unique=True),
    sa.Column("tier", sa.String(64)),  # NULL = the catalog's default tier
    # the low-balance threshold (NULL = none) and whether its next crossing is notified: the
    # ledger reads both in the RETURNING of the statement that moves the money
    sa.Column("low_balance_nano", Nano),
    sa.Column("low_balance_armed", sa.Boolean, nullable=False, server_default=sa.false()),
    # the promotional part of the wallet (available + held), spent first (0009_grants)
    sa.Column("promo_nano", Nano, nullable=False, server_default="0"),
    # auto-recharge's threshold while it can run (enabled, not paused, a card saved; NULL
    # otherwise) and whether the next debit below it queues a recharge (0013_auto_recharge):
    # read in the same RETURNING as the low-balance pair
    sa.Column("recharge_threshold_nano", Nano),
    sa.Column("recharge_armed", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.CheckConstraint("available_nano >= 0", name="ck_accounts_available_nonnegative"),
    sa.CheckConstraint("held_nano >= 0", name="ck_accounts_held_nonnegative"),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    _id(),
    sa.Column("account_id", Id, sa.ForeignKey("accounts.id"), nullable=False, index=True),
    sa.Column("prefix", sa.String(32), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("name", sa.String(200)),
    sa.Column("group_name", sa.String(64)),
    # who pinned group_name (migration 0010): only an ``operator`` pin is charged; a
    # ``customer`` pin (made through the console before 0010) is ignored
    sa.Column("group_pinned_by", sa.String(16)),
    sa.Column("models", sa.Text),  # JSON list of allowed catalog ids, NULL = all
    sa.Column("quota_nano", Nano),  # NULL = no own quota
    sa.Column("used_nano", Nano, nullable=False, server_default="0"),
    sa.Column("held_nano", Nano, nullable=False, server_default="0"),
    sa.Column("expires_at_ms", Ms),
    sa.Column("revoked_at_ms", Ms),
    sa.Column("created_at_ms", Ms, nullable=False),
    # limits that may only lower the account tier's (NULL = the tier's)
    sa.Column("rpm", sa.BigInteger),
    sa.Column("tpm", sa.BigInteger),
    sa.Column("concurrency", sa.BigInteger),
    # spend caps per calendar period in the billing time zone (NULL = none)
    sa.Column("daily_cap_nano", Nano),
    sa.Column("weekly_cap_nano", Nano),
    sa.Column("monthly_cap_nano", Nano),
    sa.Column("allowed_ips", sa.Text),  # JSON list of CIDR networks, NULL = any address
    sa.Column("open_holds", sa.BigInteger, nullable=False, server_default="0"),  # in flight
    # the key's current fixed one-minute rate-limit window, counted by the hold's statement
    sa.Column("window_start_ms", Ms, nullable=False, server_default="0"),
    sa.Column("window_requests", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("window_tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.CheckConstraint("held_nano >= 0", name="ck_api_keys_held_nonnegative"),
)

#: One row per money movement (a journal entry); its postings sum to zero.
entries = sa.Table(
    "entries",
    metadata,
    _id(),
    sa.Column("kind", sa.String(16), nullable=False),  # topup hold settle void expire adjust
    sa.Column("account_id", Id, sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("amount_nano", Nano, nullable=False),
    sa.Column("hold_id", Id),
    sa.Column("idempotency_key", sa.String(255), nullable=False, unique=True),
    sa.Column("balance_after_nano", Nano),
    sa.Column("note", sa.Text),
    sa.Column("created_at_ms", Ms, nullable=False),
    sa.Index("ix_entries_account", "account_id", "id"),
    sa.Index("ix_entries_hold", "hold_id"),
)

postings = sa.Table(
    "postings",
    metadata,
    _id(),
    sa.Column("entry_id", Id, sa.ForeignKey("entries.id"), nullable=False, index=True),
    sa.Column("account_id", Id, sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("bucket", sa.String(16), nullable=False),  # available | held
    sa.Column("amount_nano", Nano, nullable=False),
    sa.Index("ix_postings_account", "account_id", "bucket"),
)

holds = sa.Table(
    "holds",
    metadata,
    _id(),
    sa.Column("account_id", Id, sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("key_id", Id, sa.ForeignKey("api_keys.id")),
    sa.Column("amount_nano", Nano, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # open settled voided expired
    sa.Column("created_at_ms", Ms, nullable=False),
    sa.Column("expires_at_ms", Ms, nullable=False),
    sa.Column("closed_at_ms", Ms),
    sa.Column("charged_nano", Nano),
    sa.Column("from_available_nano", Nano),
    sa.Column("shortfall_nano", Nano),
    # which of the key's spend-cap periods (1 day, 2 week, 4 month) count this hold
    sa.Column("cap_periods", sa.SmallInteger, nullable=False, server_default="0"),
    sa.Index("ix_holds_open_expiry", "status", "expires_at_ms"),
    sa.Index("ix_holds_account", "account_id"),
    sa.Index("ix_holds_key_open", "key_id", "status"),
)

providers = sa.Table(
    "providers",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("config", sa.Text, nullable=False),  # JSON
)

groups = sa.Table(
    "groups",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("ratio", sa.String(40), nullable=False),  # exact decimal string
)

catalog_items = sa.Table(
    "catalog_items",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("billing_type", sa.String(16), nullable=False),  # token | per_call
    sa.Column("provider", sa.String(128), nullable=False),
    sa.Column("spec", sa.Text, nullable=False),  # JSON: upstream_model, path, method, ...
    sa.Column("active", sa.Boolean, nullable=False),
    sa.Column("updated_at_ms", Ms, nullable=False),
)

#: Prices never change in place: each change is a new version with an effective-from time.
price_versions = sa.Table(
    "price_versions",
    metadata,
    _id(),
    sa.Column("item_id", sa.String(128), sa.ForeignKey("catalog_items.id"), nullable=False),
    sa.Column("billing_type", sa.String(16), nullable=False),
    sa.Column("input_nano_per_1m", Nano),
    sa.Column("output_nano_per_1m", Nano),
    sa.Column("cache_read_nano_per_1m", Nano),
    sa.Column("cache_write_nano_per_1m", Nano),
    sa.Column("per_call_nano", Nano),
    sa.Column("group_ratios", sa.Text, nullable=False),  # JSON {group: "ratio"}
    sa.Column("effective_from_ms", Ms, nullable=False),
    sa.Column("created_at_ms", Ms, nullable=False),
    sa.Index("ix_price_versions_item", "item_id", "effective_from_ms"),
    # 0006: 1-hour cache writes; an image model's per-size prices, JSON {size: nano-USD}
    sa.Column("cache_write_1h_nano_per_1m", Nano),
    sa.Column("per_size_nano", sa.Text),
    # 0014: server-side tool fees, JSON {tool: nano-USD per call}; an image model's
    # per-quality prices, JSON {quality: nano-USD}
    sa.Column("tool_calls_nano", sa.Text),
    sa.Column("per_quality_nano", sa.Text),
)

#: The account's log: one row per gateway request (written in the same transaction as its
#: settlement or void) and one per other activity (top-ups, adjustments, key events).
usage_records = sa.Table(
    "usage_records",
    metadata,
    _id(),
    sa.Column("request_id", sa.String(40), nullable=False, unique=True),
    sa.Column("created_at_ms", Ms, nullable=False),
    sa.Column("account_id", Id, sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("key_id", Id, sa.ForeignKey("api_keys.id")),
    sa.Column("key_name", sa.String(200)),
    sa.Column("group_name", sa.String(64)),
    sa.Column("ratio", sa.String(40)),
    sa.Column("ratio_source", sa.String(16)),  # group | model
    sa.Column("type", sa.String(16), nullable=False),  # consume error topup adjustment system
    sa.Column("billing_type", sa.String(16)),  # token | per_call (requests only)
    sa.Column("product", sa.String(128)),
    sa.Column("route", sa.String(200)),
    sa.Column("status", sa.Integer),  # HTTP status the client received
    sa.Column("stream", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("duration_ms", sa.Integer),
    sa.Column("ttft_ms", sa.Integer),
    sa.Column("input_tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("cached_input_tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("cache_write_tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("output_tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("reasoning_tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("calls", sa.Integer, nullable=False, server_default="0"),
    sa.Column("input_nano_per_1m", Nano),
    sa.Column("output_nano_per_1m", Nano),
    sa.Column("cache_read_nano_per_1m", Nano),
    sa.Column("cache_write_nano_per_1m", Nano),
    sa.Column("per_call_nano", Nano),
    sa.Column("price_version_id", Id, sa.ForeignKey("price_versions.id")),
    sa.Column("cost_nano", Nano, nullable=False, server_default="0"),  # charged for a request
    sa.Column("credit_nano", Nano, nullable=False, server_default="0"),  # signed, non-requests
    sa.Column("usage_source", sa.String(16)),  # upstream | estimated | capped | none
    sa.Column("hold_id", Id, sa.ForeignKey("holds.id")),
    sa.Column("error_code", sa.String(64)),
    sa.Column("note", sa.Text),  # an error's message, why usage was estimated, an event's note
    # newest-first pages per account, optionally by product or key: keyset on (time, id)
    sa.Index("ix_usage_account_time", "account_id", "created_at_ms", "id"),
    sa.Index("ix_usage_account_product_time", "account_id", "product", "created_at_ms", "id"),
    sa.Index("ix_usage_account_key_time", "account_id", "key_id", "created_at_ms", "id"),
    sa.Index("ix_usage_account_type_time", "account_id", "type", "created_at_ms", "id"),
    sa.Index("ix_usage_time", "created_at_ms", "id"),
    # 0006: 1-hour cache writes (``cache_write_tokens`` are the 5-minute ones) and their price
    sa.Column("cache_write_1h_tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("cache_write_1h_nano_per_1m", Nano),
    # 0008: the channel that answered, every attempt (JSON: channel, status or error,
    # latency_ms), and what the operator pays upstream: computed from the channel's ``cost``,
    # reported by the upstream (OpenRouter's usage.cost), and whether the two disagree
    sa.Column("channel", sa.String(300)),
    sa.Column("attempts", sa.Text),
    sa.Column("upstream_cost_nano", Nano),
    sa.Column("upstream_reported_cost_nano", Nano),
    sa.Column("upstream_cost_mismatch", sa.Boolean),
    # 0014: server-side tool calls billed with the tokens, JSON
    # {tool: {"calls": n, "nano_per_call": p}} (NULL: none)
    sa.Column("tool_calls", sa.Text),
)

#: Requests per account x key x product x hour, maintained in the same transaction as each
#: usage record, so summaries never scan the raw log.
usage_rollups = sa.Table(
    "usage_rollups",
    metadata,
    sa.Column("account_id", Id, sa.ForeignKey("accounts.id"), primary_key=True),
    sa.Column("hour_ms", Ms, primary_key=True),
    sa.Column("key_id", Id, sa.ForeignKey("api_keys.id"), primary_key=True),
    sa.Column("product", sa.String(128), primary_key=True),
    sa.Column("billing_type", sa.String(16), nullable=False),
    sa.Column("requests", sa.BigInteger, nullable=False),
    sa.Column("errors", sa.BigInteger, nullable=False),
    sa.Column("input_tokens", sa.BigInteger, nullable=False),
    sa.Column("cached_input_tokens", sa.BigInteger, nullable=False),
    sa.Column("cache_write_tokens", sa.BigInteger, nullable=False),
    sa.Column("output_tokens", sa.BigInteger, nullable=False),
    sa.Column("reasoning_tokens", sa.BigInteger, nullable=False),
    sa.Column("calls", sa.BigInteger, nullable=False),
    sa.Column("cost_nano", Nano, nullable=False),
    sa.Column("cache_write_1h_tokens", sa.BigInteger, nullable=False,
              server_default="0"),  # 0006
)

#: A wallet's movements per UTC day, maintained by the ledger with each movement of its total
#: (available + held): a statement sums these rows, never the raw log, and `ledger verify`
#: checks that they add up to each balance.
wallet_days = sa.Table(
    "wallet_days",
    metadata,
    sa.Column("account_id", Id, sa.ForeignKey("accounts.id"), primary_key=True),
    sa.Column("day_ms", Ms, primary_key=True),
    sa.Column("topups_nano", Nano, nullable=False),
    sa.Column("adjustments_nano", Nano, nullable=False),  # signed
    sa.Column("charges_nano", Nano, nullable=False),  # paid from the wallet
    sa.Column("written_off_nano", Nano, nullable=False),  # charged but not covered
    # promotional credit (migration 0012_promo_credit): granted and expired this day (not in
    # adjustments), and the wallet's promotional part after the day's last movement
    sa.Column("grants_nano", Nano, nullable=False, server_default="0"),
    sa.Column("grants_expired_nano", Nano, nullable=False, server_default="0"),
    sa.Column("promo_end_nano", Nano, nullable=False, server_default="0"),
)

#: A client's Idempotency-Key for a gateway request (per API key): the first request's
#: response is kept so a retry gets it back without a second charge.
request_keys = sa.Table(
    "request_keys",
    metadata,
    sa.Column("key_id", Id, sa.ForeignKey("api_keys.id"), primary_key=True),
    sa.Column("idempotency_key", sa.String(255), primary_key=True),
    sa.Column("request_id", sa.String(40), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),  # sha256 of method, path, body
    sa.Column("state", sa.String(16), nullable=False),  # pending | done
    sa.Column("status", sa.Integer),
    sa.Column("content_type", sa.String(200)),
    sa.Column("body", sa.LargeBinary),
    sa.Column("cost_nano", Nano),
    sa.Column("created_at_ms", Ms, nullable=False),
    sa.Index("ix_request_keys_created", "created_at_ms"),
)

#: Rate-limit tiers from the catalog: limits per API key. An account without a tier has the
#: default one; ``upgrade_at_nano`` is the cumulative top-up that moves an account up to it.
tiers = sa.Table(
    "tiers",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),  # order in the catalog: lowest first
    sa.Column("rpm", sa.BigInteger, nullable=False),
    sa.Column("tpm", sa.BigInteger, nullable=False),
    sa.Column("concurrency", sa.BigInteger, nullable=False),
    sa.Column("upgrade_at_nano", Nano),
    sa.Column("is_default", sa.Boolean, nullable=False),
)

#: A capped key's spending per calendar period (day, week, month in the billing time zone):
#: open holds count in ``held_nano`` until settled (moved to ``spent_nano``) or released.
key_spend = sa.Table(
    "key_spend",
    metadata,
    sa.Column("key_id", Id, sa.ForeignKey("api_keys.id"), primary_key=True),
    sa.Column("period", sa.String(8), primary_key=True),  # day | week | month
    sa.Column("period_start_ms", Ms, primary_key=True),
    sa.Column("spent_nano", Nano, nullable=False),
    sa.Column("held_nano", Nano, nullable=False),
    sa.CheckConstraint("held_nano >= 0", name="ck_key_spend_held_nonnegative"),
)

#: Signed-in browsers (migration 0003). The cookie holds a random 256-bit id; only its SHA-256
#: is stored, so a copy of the database cannot be replayed as a session.
web_sessions = sa.Table(
    "web_sessions",
    metadata,
    sa.Column("id_hash", sa.String(64), primary_key=True),
    sa.Column("account_id", Id, sa.ForeignKey("accounts.id")),  # NULL for the operator
    sa.Column("operator", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("csrf_token", sa.String(64), nullable=False),
    sa.Column("created_at_ms", Ms, nullable=False),
    sa.Column("expires_at_ms", Ms, nullable=False),
    sa.Index("ix_web_sessions_account", "account_id"),
    sa.Index("ix_web_sessions_expiry", "expires_at_ms"),
)

#: Failed console sign-ins (migration 0007), one row per failure and scope (``login:<login>``,
#: ``ip:<address>``): the sign-in throttle counts them, so every worker and instance shares it.
signin_failures = sa.Table(
    "signin_failures",
    metadata,
    _id(),
    sa.Column("scope", sa.String(400), nullable=False),
    sa.Column("at_ms", Ms, nullable=False),
    sa.Index("ix_signin_failures_scope", "scope", "at_ms"),
    sa.Index("ix_signin_failures_time", "at_ms"),
)

#: Where an account's notifications go. The secret signs webhooks (HMAC-SHA256); it is kept in
#: clear because signing needs it, and shown to the account's owner on request.
notification_settings = sa.Table(
    "notification_settings",
    metadata,
    sa.Column("account_id", Id, sa.ForeignKey("accounts.id"), primary_key=True),
    sa.Column("webhook_url", sa.Text),
    sa.Column("webhook_secret", sa.String(80), nullable=False),
    sa.Column("email", sa.String(320)),
    sa.Column("updated_at_ms", Ms, nullable=False),
)

#: The outbox: an event is inserted in the same transaction as the money movement it reports,
#: with its exact JSON body; deliveries (one per channel) are attempted later by any worker.
notification_events = sa.Table(
    "notification_events",
    metadata,
    _id(),
    sa.Column("public_id", sa.String(40), nullable=False, unique=True),
    sa.Column("dedupe_key", sa.String(80), unique=True),  # e.g. topup:<entry id>
    sa.Column("account_id", Id, sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("type", sa.String(32), nullable=False),  # balance.low | balance.topup
    sa.Column("body", sa.Text, nullable=False),  # the JSON document delivered, byte for byte
    sa.Column("created_at_ms", Ms, nullable=False),
    sa.Index("ix_notification_events_account", "account_id", "id"),
    sa.Index("ix_notification_events_created", "created_at_ms"),
)

notification_deliveries = sa.Table(
    "notification_deliveries",
    metadata,
    _id(),
    sa.Column("event_id", Id, sa.ForeignKey("notification_events.id"), nullable=False,
              index=True),
    sa.Column("channel", sa.String(16), nullable=False),  # webhook | email
    sa.Column("status", sa.String(16), nullable=False),  # pending | delivered | failed
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at_ms", Ms, nullable=False),
    sa.Column("claimed_until_ms", Ms),  # a worker's lease on the current attempt
    sa.Column("claim_token", sa.String(40)),
    sa.Column("delivered_at_ms", Ms),
    sa.Index("ix_notification_deliveries_due", "status", "next_attempt_at_ms"),
)

notification_attempts = sa.Table(
    "notification_attempts",
    metadata,
    _id(),
    sa.Column("delivery_id", Id, sa.ForeignKey("notification_deliveries.id"), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("target", sa.Text),  # the URL or address tried
    sa.Column("started_at_ms", Ms, nullable=False),
    sa.Column("duration_ms", sa.Integer, nullable=False),
    sa.Column("status_code", sa.Integer),  # the receiver's HTTP status (webhooks)
    sa.Column("error", sa.Text),  # NULL = delivered
    sa.UniqueConstraint("delivery_id", "attempt", name="uq_notification_attempts"),
)

#: Redemption codes: only the SHA-256 of a code is stored, so a copy of the database is worth
#: nothing; ``hint`` (its last group) lets an operator tell codes apart.
redemption_codes = sa.Table(
    "redemption_codes",
    metadata,
    _id(),
    sa.Column("code_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("hint", sa.String(8), nullable=False),
    sa.Column("amount_nano", Nano, nullable=False),
    sa.Column("note", sa.Text),
    sa.Column("created_at_ms", Ms, nullable=False),
    sa.Column("expires_at_ms", Ms),
    sa.Column("revoked_at_ms", Ms),
    sa.Column("redeemed_by", Id, sa.ForeignKey("accounts.id")),
    sa.Column("redeemed_at_ms", Ms),
    sa.Column("entry_id", Id, sa.ForeignKey("entries.id")),
    # days the redeemed credit (a promotional grant) stays valid; NULL: it never expires
    sa.Column("credit_days", sa.Integer),
    sa.CheckConstraint("amount_nano > 0", name="ck_redemption_codes_amount_positive"),
    sa.Index("ix_redemption_codes_created", "created_at_ms", "id"),
)

#: The operator's choice per channel (``ITEM/PROVIDER[#N]``): a row with ``enabled`` false
#: takes the channel out of every worker's selection at its next catalog refresh.
channel_states = sa.Table(
    "channel_states",
    metadata,
    sa.Column("id", sa.String(300), primary_key=True),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("updated_at_ms", Ms, nullable=False),
)

# money in through a payment provider (migration 0010_payments): one row per checkout order,
# created by Tollway before the customer is sent to the provider; the webhook credits the
# row's own amount (never the webhook's), and each provider event id is recorded once
payment_orders = sa.Table(
    "payment_orders",
    metadata,
    _id(),
    sa.Column("account_id", Id, sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("provider", sa.String(16), nullable=False),  # stripe
    sa.Column("amount_nano", Nano, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),  # usd
    sa.Column("status", sa.String(16), nullable=False),  # open | paid | expired | failed
    sa.Column("session_id", sa.String(255), unique=True),  # the Checkout Session, once made
    sa.Column("payment_intent", sa.String(255)),  # set when paid: refunds name it
    sa.Column("created_at_ms", Ms, nullable=False),
    sa.Column("paid_at_ms", Ms),
    sa.Column("entry_id", Id, sa.ForeignKey("entries.id")),  # the top-up that credited it
    sa.Column("refunded_nano", Nano, nullable=False, server_default="0"),
    sa.Column("disputed_nano", Nano, nullable=False, server_default="0"),
    sa.Column("reversed_nano", Nano, nullable=False, server_default="0"),  # debited + written off
    sa.Column("written_off_nano", Nano, nullable=False, server_default="0"),
    sa.CheckConstraint("amount_nano > 0", name="ck_payment_orders_amount_positive"),
    sa.Index("ix_payment_orders_account", "account_id", "id"),
    sa.Index("ix_payment_orders_payment_intent", "payment_intent"),
)
payment_events = sa.Table(
    "payment_events",
    metadata,
    sa.Column("event_id", sa.String(255), primary_key=True),  # the provider's, e.g. evt_…
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("order_id", Id, sa.ForeignKey("payment_orders.id")),
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Column("received_at_ms", Ms, nullable=False),
)

# promotional credit (migration 0009_grants): what each grant has left is derived from the
# account's promo_nano, soonest expiry first (billing/grants.py)
promo_grants = sa.Table(
    "promo_grants",
    metadata,
    _id(),
    sa.Column("account_id", Id, sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("amount_nano", Nano, nullable=False),
    sa.Column("remaining_nano", Nano, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("created_at_ms", Ms, nullable=False),
    sa.Column("expires_at_ms", Ms),  # NULL: never
    sa.Column("closed_at_ms", Ms),  # spent in full, or expired and taken out
    sa.Column("expired_nano", Nano, nullable=False, server_default="0"),
    sa.Column("entry_id", Id, sa.ForeignKey("entries.id")),
    sa.CheckConstraint("amount_nano > 0", name="ck_promo_grants_amount_positive"),
    sa.CheckConstraint("remaining_nano >= 0", name="ck_promo_grants_remaining_nonnegative"),
    sa.Index("ix_promo_grants_account", "account_id", "closed_at_ms"),
    sa.Index("ix_promo_grants_due", "closed_at_ms", "expires_at_ms"),
)

# auto-recharge (migration 0013_auto_recharge): an account's setting and saved card, and each
# charge of that card; ``in_flight_id`` is the guarded row that allows one charge at a time
auto_recharge = sa.Table(
    "auto_recharge",
    metadata,
    sa.Column("account_id", Id, sa.ForeignKey("accounts.id"), primary_key=True),
    sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.false()),
    # NULL until first saved (a card may be saved before the amounts)
    sa.Column("threshold_nano", Nano),
    sa.Column("target_nano", Nano),
    sa.Column("monthly_cap_nano", Nano),
    sa.Column("stripe_customer", sa.String(255), unique=True),  # created by Tollway
    sa.Column("payment_method", sa.String(255)),  # from Stripe's event, never from a client
    sa.Column("card_saved_at_ms", Ms),
    sa.Column("failures", sa.Integer, nullable=False, server_default="0"),  # consecutive
    sa.Column("paused_at_ms", Ms),  # set after too many failures; saving the setting resumes
    sa.Column("in_flight_id", Id),  # the recharge_attempts row being charged, if any
    sa.Column("updated_at_ms", Ms, nullable=False),
    sa.CheckConstraint("target_nano > threshold_nano", name="ck_auto_recharge_target"),
)
recharge_attempts = sa.Table(
    "recharge_attempts",
    metadata,
    _id(),
    sa.Column("account_id", Id, sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("amount_nano", Nano, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("month_start_ms", Ms, nullable=False),  # the cap's month (billing time zone)
    sa.Column("status", sa.String(16), nullable=False),  # pending | succeeded | failed
    sa.Column("payment_intent", sa.String(255), unique=True),
    sa.Column("error", sa.Text),
    sa.Column("created_at_ms", Ms, nullable=False),
    sa.Column("completed_at_ms", Ms),
    sa.Column("entry_id", Id, sa.ForeignKey("entries.id")),  # the top-up that credited it
    sa.CheckConstraint("amount_nano > 0", name="ck_recharge_attempts_amount_positive"),
    sa.Index("ix_recharge_attempts_account", "account_id", "month_start_ms"),
)

# stateful Responses (migration 0014_usage_bounds): each relayed response id with the input +
# output tokens it billed and its account, so a request continuing it
# (``previous_response_id``) is refused from another account and holds for its history
response_memory = sa.Table(
    "response_memory",
    metadata,
    sa.Column("response_id", sa.String(255), primary_key=True),
    sa.Column("account_id", Id, sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("context_tokens", sa.BigInteger, nullable=False),
    sa.Column("created_at_ms", Ms, nullable=False),
)
