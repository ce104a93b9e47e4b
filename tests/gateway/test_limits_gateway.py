"""Rate limits, spend caps and IP allowlists through the real gateway, on SQLite and PostgreSQL.

The gateway runs on a :class:`FakeClock` the tests move: windows are fixed minutes, so a
request at ``hh:mm:12.300`` sees its window reset in 48 s (``47.7`` rounded up). The catalog is
the fake one plus tiers; ``twitter-user`` costs 0.002 USD a call. The gateway trusts
``127.0.0.0/8`` as reverse proxies, so a test can name the client in ``X-Forwarded-For``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import anthropic
import httpx
import openai
import pytest

from fakes import (
    GATEWAY_ENV,
    IGNORE_TOKENIZER_WARNING,
    USD,
    AnthropicScript,
    FakeClock,
    FakeUpstream,
    GatewayThread,
    Serving,
    Tollway,
    error_of,
    fake_catalog,
)
from tollway import tokens
from tollway.billing import tiers
from tollway.store import accounts as account_store
from tollway.store.accounts import KeyLimits

pytestmark = pytest.mark.filterwarnings(IGNORE_TOKENIZER_WARNING)

TIERS = """
tiers:
  free:    {rpm: 60, tpm: 2000, concurrency: 5}
  starter: {rpm: 600, tpm: 600000, concurrency: 20}
  bulk:    {rpm: 100000, tpm: 100000000, concurrency: 1000}
tier_upgrades: {starter: "25"}
default_tier: free
"""
PRICE = 2_000_000  # twitter-user, nano-USD a call
HELLO = [{"role": "user", "content": "hello there"}]
#: A minute boundary a day ahead (the server's reaper, on the real clock, must never find
#: these holds expired), plus 12.3 s.
START_MS = (int(time.time()) // 60 + 24 * 60) * 60_000 + 12_300


@pytest.fixture(scope="module")
def clock() -> FakeClock:
    return FakeClock(START_MS)


@pytest.fixture(scope="module")
def serving(upstream: FakeUpstream, clock: FakeClock) -> Serving:
    return Serving(catalog=fake_catalog(upstream) + TIERS, clock=clock,
                   env={**GATEWAY_ENV, "TOLLWAY_TRUSTED_PROXIES": "127.0.0.0/8"})


@pytest.fixture
def tw(served: Tollway, clock: FakeClock) -> Iterator[Tollway]:
    served.begin_test()
    # every test starts 12.3 s into a fresh minute
    clock.ms = (clock.ms // 60_000 + 2) * 60_000 + 12_300
    yield served
    served.close_clients()


def call(client: httpx.Client, key: str, *, user: str = "x",
         forwarded: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if forwarded is not None:
        headers["X-Forwarded-For"] = forwarded
    return client.get(f"/apis/v1/twitter/user/{user}", headers=headers)


def rate_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("x-ratelimit-")}


def assert_books_clean(tw: Tollway) -> None:
    assert tw.open_holds() == 0
    assert tw.verify() == []


def set_tier(tw: Tollway, account: int, tier: str) -> None:
    with tw.db.write() as conn:
        tiers.set_tier(conn, account, tier)


# --------------------------------------------------------------------------- RPM


def test_rpm_is_exact_at_the_boundary_and_resets_with_the_minute(tw: Tollway,
                                                                 clock: FakeClock) -> None:
    account = tw.account()  # the default tier, free: 60 requests a minute
    key = tw.key(account)
    http = tw.http()
    for i in range(1, 61):
        response = call(http, key, user=f"u{i}")
        assert response.status_code == 200, response.text
        assert rate_headers(response) == {
            "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": str(60 - i),
            "x-ratelimit-reset-requests": "48s",
            # per-call requests count no tokens
            "x-ratelimit-limit-tokens": "2000", "x-ratelimit-remaining-tokens": "2000",
            "x-ratelimit-reset-tokens": "48s"}
    refused = call(http, key, user="u61")
    assert refused.status_code == 429
    assert error_of(refused)["code"] == "rate_limited"
    assert refused.headers["retry-after"] == "48"
    assert rate_headers(refused)["x-ratelimit-remaining-requests"] == "0"
    # never forwarded, never charged, no hold, and recorded
    assert len(tw.fake.data_requests()) == 60
    assert tw.available(account) == 10 * USD - 60 * PRICE
    records = tw.records()
    assert len(records) == 61
    last = records[-1]
    assert (last["type"], last["error_code"], last["status"], last["cost_nano"],
            last["hold_id"]) == ("error", "rate_limited", 429, 0, None)
    assert_books_clean(tw)
    # Retry-After honoured: 47.7 s later (still this window) it is refused, 48 s later it passes
    clock.advance(47.699)
    assert call(http, key).status_code == 429
    clock.advance(0.001)
    response = call(http, key)
    assert response.status_code == 200
    assert rate_headers(response)["x-ratelimit-remaining-requests"] == "59"
    assert rate_headers(response)["x-ratelimit-reset-requests"] == "60s"


def test_a_key_override_lowers_the_tier_and_the_limit_is_shared_by_two_workers(
        tw: Tollway, clock: FakeClock) -> None:
    """A second gateway (its own writer, caches and process state) on the same database: the
    key's 5 requests a minute are 5 in total, not 5 per worker."""
    account = tw.account()
    key = tw.key(account, limits=KeyLimits(rpm=5))
    other = GatewayThread(tw.db.url, clock=clock)
    other.start()
    try:
        with httpx.Client(base_url=other.url, timeout=20) as second:
            http = tw.http()
            codes = [call(http if i % 2 else second, key, user=f"w{i}").status_code
                     for i in range(8)]
    finally:
        other.stop()
    assert codes == [200] * 5 + [429] * 3
    assert len(tw.fake.data_requests()) == 5
    assert tw.available(account) == 10 * USD - 5 * PRICE
    assert_books_clean(tw)


def test_keys_are_limited_separately(tw: Tollway) -> None:
    account = tw.account()
    first, second = tw.key(account, limits=KeyLimits(rpm=1)), tw.key(account, name="b")
    http = tw.http()
    assert [call(http, first).status_code, call(http, first).status_code,
            call(http, second).status_code] == [200, 429, 200]


# --------------------------------------------------------------------------- TPM


def test_tpm_counts_the_estimated_prompt_then_the_actual_tokens(tw: Tollway,
                                                               clock: FakeClock) -> None:
    """The fake answers 20 prompt + 5 completion tokens. Admission counts the estimated prompt
    (E tokens); settlement replaces it by the actual 25."""
    estimate = tokens.estimate_prompt({"model": "gpt-test", "messages": HELLO,
                                       "max_tokens": 10})
    account = tw.account()
    # room for two settled requests and the third's estimate, not one token more
    key = tw.key(account, limits=KeyLimits(tpm=2 * 25 + estimate))
    client = tw.client(key)
    limit = 2 * 25 + estimate
    remaining = []
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=HELLO, max_tokens=10)
        assert raw.headers["x-ratelimit-limit-tokens"] == str(limit)
        remaining.append(int(raw.headers["x-ratelimit-remaining-tokens"]))
    assert remaining == [limit - estimate, limit - 25 - estimate, limit - 50 - estimate]
    # the window now holds 75 tokens: 75 + E > limit
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-test", messages=HELLO, max_tokens=10)
    response = caught.value.response
    assert error_of(response)["code"] == "rate_limited"
    assert response.headers["retry-after"] == "48"
    assert response.headers["x-ratelimit-remaining-tokens"] == str(max(0, limit - 75))
    assert len(tw.fake.llm_requests()) == 3
    clock.advance(48)
    client.chat.completions.create(model="gpt-test", messages=HELLO, max_tokens=10)
    assert_books_clean(tw)


def test_streams_and_refusals_for_balance_carry_the_headers(tw: Tollway) -> None:
    # the stream costs (20 × 0.15 + 5 × 0.60) / 1e6 = 0.000006 USD; 0.00001 more stays
    account = tw.account(nano=PRICE + 6_000 + 10_000)
    key = tw.key(account)
    with tw.client(key).chat.completions.with_streaming_response.create(
            model="gpt-test", messages=HELLO, max_tokens=10, stream=True) as stream:
        assert stream.headers["x-ratelimit-remaining-requests"] == "59"
        assert stream.headers["x-ratelimit-reset-requests"] == "48s"
        list(stream.iter_lines())
    http = tw.http()
    assert call(http, key).status_code == 200
    assert tw.available(account) == 10_000
    poor = call(http, key)
    assert poor.status_code == 402
    assert error_of(poor)["code"] == "insufficient_balance"
    # the refused request was not counted: 2 of 60 used
    assert rate_headers(poor)["x-ratelimit-remaining-requests"] == "58"
    assert "retry-after" not in poor.headers


# --------------------------------------------------------------------------- concurrency


def test_concurrency_counts_requests_in_flight(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account, limits=KeyLimits(concurrency=2))
    tw.fake.llm.delay = 1.5

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=tw.url, timeout=20) as client:
            async def one() -> httpx.Response:
                return await client.post("/v1/chat/completions",
                                         headers={"Authorization": f"Bearer {key}"},
                                         json={"model": "gpt-test", "messages": HELLO,
                                               "max_tokens": 10})
            return list(await asyncio.gather(*[one() for _ in range(4)]))

    try:
        responses = asyncio.run(burst())
    finally:
        tw.fake.llm.delay = 0
    assert sorted(r.status_code for r in responses) == [200, 200, 429, 429]
    for response in responses:
        if response.status_code == 429:
            assert error_of(response)["code"] == "rate_limited"
            assert response.headers["retry-after"] == "1"
    assert len(tw.fake.llm_requests()) == 2
    # once they are done, the key may send again
    assert tw.client(key).chat.completions.create(model="gpt-test", messages=HELLO,
                                                  max_tokens=10)
    assert tw.key_record(key).held_nano == 0
    assert_books_clean(tw)


# --------------------------------------------------------------------------- spend caps


def _seconds_to_midnight(at_ms: int) -> int:
    moment = datetime.fromtimestamp(at_ms // 1000, UTC).replace(microsecond=0)
    midnight = (moment + timedelta(days=1)).replace(hour=0, minute=0, second=0)
    return -(-(int(midnight.timestamp()) * 1000 - at_ms) // 1000)


def test_200_concurrent_requests_against_a_daily_cap_of_exactly_40(tw: Tollway,
                                                                   clock: FakeClock) -> None:
    account = tw.account()
    set_tier(tw, account, "bulk")  # rate limits far above 200 requests
    key = tw.key(account, limits=KeyLimits(daily_cap_nano=40 * PRICE))

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=tw.url, timeout=60, limits=limits) as client:
            return list(await asyncio.gather(*[
                client.get(f"/apis/v1/twitter/user/c{i}",
                           headers={"Authorization": f"Bearer {key}"}) for i in range(200)]))

    responses = asyncio.run(burst())
    assert sorted(r.status_code for r in responses) == [200] * 40 + [429] * 160
    for response in responses:
        if response.status_code == 429:
            assert error_of(response)["code"] == "quota_exceeded"
            assert response.headers["retry-after"] == str(_seconds_to_midnight(clock()))
    assert len(tw.fake.data_requests()) == 40
    records = tw.records()
    charged = [r for r in records if r["type"] == "consume"]
    assert len(charged) == 40 and sum(r["cost_nano"] for r in charged) == 40 * PRICE
    assert {(r["error_code"], r["cost_nano"]) for r in records if r["type"] == "error"} == {
        ("quota_exceeded", 0)}
    assert tw.balance(account) == (10 * USD - 40 * PRICE, 0)
    assert_books_clean(tw)
    # the next day the cap starts again
    clock.advance(_seconds_to_midnight(clock()))
    assert call(tw.http(), key).status_code == 200


def test_weekly_and_monthly_caps(tw: Tollway) -> None:
    account = tw.account()
    weekly = tw.key(account, limits=KeyLimits(weekly_cap_nano=2 * PRICE))
    monthly = tw.key(account, name="m", limits=KeyLimits(monthly_cap_nano=PRICE))
    http = tw.http()
    assert [call(http, weekly).status_code for _ in range(3)] == [200, 200, 429]
    refused = call(http, monthly), call(http, monthly)
    assert [r.status_code for r in refused] == [200, 429]
    assert "monthly spending cap of 0.002000000 USD" in error_of(refused[1])["message"]
    assert_books_clean(tw)


# --------------------------------------------------------------------------- other protocols


def test_messages_are_limited_with_headers_and_anthropic_error_bodies(
        tw: Tollway, clock: FakeClock) -> None:
    """/v1/messages (the anthropic package, x-api-key): a key of 3 requests a minute in the
    free tier (2000 tokens a minute). The fake answers 20 input + 4 output tokens; admission
    counts the estimated prompt (E), settlement the actual 24."""
    account = tw.account()
    key = tw.key(account, limits=KeyLimits(rpm=3))
    client = anthropic.Anthropic(base_url=tw.url, api_key=key, max_retries=0, timeout=20)
    tw._clients.append(client)
    estimate = tokens.estimate_prompt({"model": "claude-test", "max_tokens": 10,
                                       "messages": HELLO})
    raw = client.messages.with_raw_response.create(model="claude-test", max_tokens=10,
                                                   messages=HELLO)
    assert rate_headers(raw.http_response) == {
        "x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "48s", "x-ratelimit-limit-tokens": "2000",
        "x-ratelimit-remaining-tokens": str(2000 - estimate), "x-ratelimit-reset-tokens": "48s"}
    # a stream: the headers come with its start; the window holds 24 + E tokens
    with client.messages.with_streaming_response.create(
            model="claude-test", max_tokens=10, messages=HELLO,
            stream=True) as stream:
        assert stream.http_response.headers["x-ratelimit-remaining-requests"] == "1"
        assert stream.http_response.headers["x-ratelimit-remaining-tokens"] == str(
            2000 - 24 - estimate)
        list(stream.iter_lines())
    tw.wait_records(2)
    # an upstream failure after the hold: Anthropic's shape, the headers, nothing charged
    tw.fake.anthropic = AnthropicScript(status=500)
    with pytest.raises(anthropic.InternalServerError) as failed:
        client.messages.create(model="claude-test", max_tokens=10,
                               messages=HELLO)
    response = failed.value.response
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "api_error"
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert response.headers["x-ratelimit-remaining-tokens"] == str(2000 - 48 - estimate)
    # the fourth request of the minute: 429 in Anthropic's shape, with Retry-After
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(model="claude-test", max_tokens=10,
                               messages=HELLO)
    refused = caught.value.response
    body = refused.json()
    assert body["type"] == "error"
    assert (body["error"]["type"], body["error"]["code"]) == ("rate_limit_error",
                                                             "rate_limited")
    assert body["request_id"] == refused.headers["x-request-id"]
    assert refused.headers["retry-after"] == "48"
    assert rate_headers(refused)["x-ratelimit-remaining-requests"] == "0"
    # the failed request's estimate was taken back: 48 tokens counted
    assert rate_headers(refused)["x-ratelimit-remaining-tokens"] == "1952"
    assert len(tw.fake.llm_requests()) == 3
    # 2 × (20 × 3 + 4 × 15) / 1e6 = 0.00024 USD
    assert tw.available(account) == 10 * USD - 240_000
    assert [(r["type"], r["status"], r["cost_nano"]) for r in tw.records()] == [
        ("consume", 200, 120_000), ("consume", 200, 120_000), ("error", 502, 0),
        ("error", 429, 0)]
    assert_books_clean(tw)
    tw.fake.anthropic = AnthropicScript()
    clock.advance(48)
    raw = client.messages.with_raw_response.create(model="claude-test", max_tokens=10,
                                                   messages=HELLO)
    assert raw.headers["x-ratelimit-remaining-requests"] == "2"


def test_responses_count_input_and_output_tokens(tw: Tollway) -> None:
    """/v1/responses: the fake reports 30 input + 3 output tokens."""
    account = tw.account()
    key = tw.key(account)
    client = tw.client(key)
    estimate = tokens.estimate_prompt({"model": "gpt-test", "input": "hello there"})
    remaining = []
    for _ in range(2):
        raw = client.responses.with_raw_response.create(model="gpt-test", input="hello there")
        remaining.append(int(raw.headers["x-ratelimit-remaining-tokens"]))
    assert remaining == [2000 - estimate, 2000 - 33 - estimate]
    assert_books_clean(tw)


def test_images_count_requests_and_spend_caps_but_no_tokens(tw: Tollway,
                                                            clock: FakeClock) -> None:
    """/v1/images/generations: image-test costs 0.04 USD an image at 1024x1024; the key's
    daily cap is 0.12 USD (three images). A hold counts against the cap while it is open."""
    account = tw.account()
    key = tw.key(account, limits=KeyLimits(daily_cap_nano=120_000_000))
    client = tw.client(key)
    raw = client.images.with_raw_response.generate(model="image-test", prompt="a cat", n=2,
                                                   size="1024x1024")
    assert raw.headers["x-tollway-cost-usd"] == "0.080000000"
    assert {k: v for k, v in raw.headers.items() if k.startswith("x-ratelimit-")} == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "48s", "x-ratelimit-limit-tokens": "2000",
        # an image request counts no tokens
        "x-ratelimit-remaining-tokens": "2000", "x-ratelimit-reset-tokens": "48s"}
    # 0.08 spent + 0.08 held > 0.12
    with pytest.raises(openai.RateLimitError) as caught:
        client.images.generate(model="image-test", prompt="a cat", n=2, size="1024x1024")
    refused = caught.value.response
    assert error_of(refused)["code"] == "quota_exceeded"
    assert "daily spending cap of 0.120000000 USD" in error_of(refused)["message"]
    assert refused.headers["retry-after"] == str(_seconds_to_midnight(clock()))
    assert refused.headers["x-ratelimit-remaining-requests"] == "59"
    # 0.08 + 0.04 = 0.12: exactly the cap
    one = client.images.with_raw_response.generate(model="image-test", prompt="a cat", n=1,
                                                   size="1024x1024")
    assert one.headers["x-ratelimit-remaining-requests"] == "58"
    with pytest.raises(openai.RateLimitError):
        client.images.generate(model="image-test", prompt="a cat", n=1, size="1024x1024")
    assert len([r for r in tw.fake.requests if r.path == "/v1/images/generations"]) == 2
    assert tw.available(account) == 10 * USD - 120_000_000
    assert [(r["type"], r["error_code"], r["cost_nano"]) for r in tw.records()] == [
        ("consume", None, 80_000_000), ("error", "quota_exceeded", 0),
        ("consume", None, 40_000_000), ("error", "quota_exceeded", 0)]
    assert_books_clean(tw)


# --------------------------------------------------------------------------- IP allowlists


def test_ip_allowlist_with_a_trusted_proxy(tw: Tollway) -> None:
    """The test's requests come from 127.0.0.1, a trusted proxy here: the client is the
    right-most X-Forwarded-For address that is not a trusted proxy."""
    account = tw.account()
    office = tw.key(account, limits=KeyLimits(allowed_ips=("203.0.113.0/24", "2001:db8::/32")))
    http = tw.http()
    assert call(http, office, forwarded="203.0.113.9").status_code == 200
    assert call(http, office, forwarded="2001:db8::5").status_code == 200
    # a client-supplied left part is not believed: the proxy appended the real client
    assert call(http, office, forwarded="198.51.100.1, 203.0.113.9, 127.0.0.2"
                ).status_code == 200
    refused = call(http, office, forwarded="203.0.113.9, 198.51.100.1")
    assert refused.status_code == 403
    assert error_of(refused)["code"] == "ip_not_allowed"
    # no header: the client is the proxy itself, which is not in the list
    assert call(http, office).status_code == 403
    # a garbled header: only the peer is believed
    assert call(http, office, forwarded="not-an-address").status_code == 403
    assert len(tw.fake.data_requests()) == 3
    local = tw.key(account, name="local", limits=KeyLimits(allowed_ips=("127.0.0.1",)))
    assert call(http, local).status_code == 200
    # the model list too
    models = http.get("/v1/models", headers={"Authorization": f"Bearer {office}"})
    assert (models.status_code, error_of(models)["code"]) == (403, "ip_not_allowed")
    assert_books_clean(tw)


def test_ip_allowlist_without_trusted_proxies() -> None:
    """Without trusted proxies X-Forwarded-For is ignored: the peer is the client."""
    from tollway.billing.keys import Network, networks, parse_networks
    from tollway.runtime.http import client_address

    def client(trusted: tuple[Network, ...], peer: str, forwarded: str | None) -> str:
        headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
        return str(client_address({"client": (peer, 5000), "headers": headers}, trusted))

    bare: tuple[Network, ...] = ()
    assert client(bare, "198.51.100.4", "203.0.113.9") == "198.51.100.4"
    assert client(bare, "::ffff:198.51.100.4", None) == "198.51.100.4"
    proxied = networks(parse_networks(["10.0.0.0/8", "fd00::/8"]))
    assert client(proxied, "10.0.0.1", "203.0.113.9, 10.2.3.4") == "203.0.113.9"
    assert client(proxied, "fd00::1", "2001:db8::1, fd00::2") == "2001:db8::1"
    assert client(proxied, "198.51.100.4", "203.0.113.9") == "198.51.100.4"
    assert client(proxied, "10.0.0.1", "10.0.0.2") == "10.0.0.2"


# --------------------------------------------------------------------------- tiers


def test_a_top_up_moves_the_account_up_a_tier_never_down(tw: Tollway) -> None:
    from tollway.billing import credits
    from tollway.clock import now_ms

    account = tw.account(usd="10")  # cumulative top-ups: 10 USD, below starter's 25
    key = tw.key(account)
    assert call(tw.http(), key).headers["x-ratelimit-limit-requests"] == "60"
    with tw.db.write() as conn:
        credits.topup(conn, account, 15 * USD, idempotency_key="to-starter", at_ms=now_ms())
        assert account_store.get_account(conn, account).tier == "starter"
    assert call(tw.http(), key).headers["x-ratelimit-limit-requests"] == "600"
    with tw.db.write() as conn:
        tiers.set_tier(conn, account, "bulk")
        credits.topup(conn, account, USD, idempotency_key="stay", at_ms=now_ms())
        assert account_store.get_account(conn, account).tier == "bulk"


def test_key_limits_may_only_lower_the_tier(tw: Tollway) -> None:
    from tollway.errors import InvalidRequest

    account = tw.account()
    with pytest.raises(InvalidRequest, match="rpm 61 is above the 60 of the account's tier"):
        tw.key(account, limits=KeyLimits(rpm=61))
    with pytest.raises(InvalidRequest, match="concurrency must be a positive integer"):
        tw.key(account, limits=KeyLimits(concurrency=0))
