"""OpenTelemetry traces (``TOLLWAY_OTLP_TRACES_ENDPOINT``), read back through the SDK's
in-memory exporter: one span per metered request with the GenAI attributes and Tollway's cost,
account and key ids, its upstream call and settlement as children, never a secret; and with
tracing off, OpenTelemetry is not even imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from fakes import (
    ADMIN_TOKEN,
    DATA_KEY,
    IGNORE_TOKENIZER_WARNING,
    UPSTREAM_KEY,
    DataReply,
    FakeUpstream,
    Tollway,
    fake_catalog,
    fresh_database,
    running_tollway,
)
from tollway import tracing

pytestmark = pytest.mark.filterwarnings(IGNORE_TOKENIZER_WARNING)
HELLO = [{"role": "user", "content": "hello"}]
CHAT_COST = 6_000  # 20 prompt × $0.15 + 5 output × $0.60, per 1M tokens
ROOT = Path(__file__).resolve().parents[2]


EXPORTERS: list[InMemorySpanExporter] = []


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(request: pytest.FixtureRequest, upstream: FakeUpstream) -> Iterator[Tollway]:
    with fresh_database(request) as db, running_tollway(db, fake_catalog(upstream),
                                                        upstream) as tollway:
        EXPORTERS.append(InMemorySpanExporter())
        tracing.install(EXPORTERS[-1], batch=False)  # the server's shutdown ends it
        yield tollway
    assert not tracing.enabled()


@pytest.fixture
def exporter(served: Tollway) -> InMemorySpanExporter:
    return EXPORTERS[-1]


def spans_of(exporter: InMemorySpanExporter, request_id: str) -> tuple[Any, dict[str, Any]]:
    """The request's span and its children by name."""
    spans = exporter.get_finished_spans()
    [root] = [s for s in spans if s.attributes.get("tollway.request_id") == request_id]
    children = {s.name: s for s in spans
                if s.parent is not None and s.parent.span_id == root.context.span_id}
    assert all(s.context.trace_id == root.context.trace_id for s in children.values())
    return root, children


def no_secrets(spans: Any, *secrets: str) -> None:
    for span in spans:
        for value in span.attributes.values():
            assert not any(secret in str(value) for secret in secrets), (span.name, value)


def test_a_chat_completion_is_one_span_with_genai_usage_and_its_cost(
        tw: Tollway, exporter: InMemorySpanExporter) -> None:
    account = tw.account()
    key = tw.key(account)
    record = tw.key_record(key)
    raw = tw.client(key).chat.completions.with_raw_response.create(model="gpt-test",
                                                                   messages=HELLO)
    request_id = raw.headers["x-request-id"]
    root, children = spans_of(exporter, request_id)
    assert root.name == "chat gpt-test" and root.kind == SpanKind.SERVER
    assert dict(root.attributes) == {
        "gen_ai.operation.name": "chat", "gen_ai.system": "openai",
        "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-test",
        "gen_ai.usage.input_tokens": 20, "gen_ai.usage.output_tokens": 5,
        "tollway.request_id": request_id, "tollway.account_id": account,
        "tollway.key_id": record.id, "tollway.product": "gpt-test",
        "tollway.billing_type": "token", "tollway.group": "default", "tollway.ratio": "1",
        "tollway.cost_nano_usd": CHAT_COST, "tollway.cost_usd": "0.000006000",
        "tollway.usage_source": "upstream", "tollway.calls": 0,
        "http.request.method": "POST", "http.route": "/v1/chat/completions",
        "http.response.status_code": 200}
    assert sorted(children) == ["tollway.settle", "upstream fakeai"]
    upstream, settle = children["upstream fakeai"], children["tollway.settle"]
    assert upstream.kind == SpanKind.CLIENT and upstream.status.status_code == StatusCode.UNSET
    assert settle.attributes["tollway.cost_nano_usd"] == CHAT_COST
    assert upstream.end_time <= settle.start_time  # the answer was in before it was settled
    assert root.start_time <= upstream.start_time and settle.end_time <= root.end_time
    no_secrets([root, *children.values()], key, UPSTREAM_KEY, ADMIN_TOKEN)


def test_a_stream_is_traced_to_its_end(tw: Tollway, exporter: InMemorySpanExporter) -> None:
    key = tw.key(tw.account())
    stream = tw.client(key).chat.completions.create(
        model="gpt-test", messages=HELLO, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    request_id = chunks[-1].model_extra["tollway"]["request_id"]  # type: ignore[index]
    root, children = spans_of(exporter, request_id)
    assert (root.attributes["gen_ai.usage.input_tokens"],
            root.attributes["gen_ai.usage.output_tokens"],
            root.attributes["tollway.cost_usd"]) == (20, 5, "0.000006000")
    assert sorted(children) == ["tollway.settle", "upstream fakeai"]


def test_a_data_api_call_has_no_genai_attributes(tw: Tollway, upstream: FakeUpstream,
                                                 exporter: InMemorySpanExporter) -> None:
    key = tw.key(tw.account())
    response = tw.http().get("/apis/v1/twitter/user/alice",
                             headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200
    root, children = spans_of(exporter, response.headers["x-request-id"])
    assert root.name == "GET twitter-user"
    assert root.attributes["http.route"] == "/apis/v1/twitter/user/{username}"  # not the path
    assert not any(name.startswith("gen_ai.") for name in root.attributes)
    assert (root.attributes["tollway.product"], root.attributes["tollway.cost_nano_usd"],
            root.attributes["tollway.cost_usd"], root.attributes["tollway.calls"]) == (
        "twitter-user", 2_000_000, "0.002000000", 1)
    assert sorted(children) == ["tollway.settle", "upstream data"]
    no_secrets([root, *children.values()], key, DATA_KEY)


def test_an_upstream_failure_is_an_error_span_and_no_settlement(
        tw: Tollway, upstream: FakeUpstream, exporter: InMemorySpanExporter) -> None:
    key = tw.key(tw.account())
    upstream.data_replies["/data/users/down"] = DataReply(status=503, body=b"{}")
    response = tw.http().get("/apis/v1/twitter/user/down",
                             headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 503
    root, children = spans_of(exporter, response.headers["x-request-id"])
    assert (root.attributes["error.type"], root.attributes["tollway.cost_nano_usd"],
            root.attributes["http.response.status_code"]) == ("upstream_error", 0, 503)
    assert root.status.status_code == StatusCode.ERROR
    assert sorted(children) == ["upstream data"]
    assert children["upstream data"].status.status_code == StatusCode.ERROR


def test_tracing_off_never_imports_opentelemetry(tmp_path: Path) -> None:
    """A whole request served with tracing off (the default), in a fresh interpreter."""
    script = textwrap.dedent(f"""
        import os, sys
        os.environ.pop("TOLLWAY_OTLP_TRACES_ENDPOINT", None)
        from starlette.testclient import TestClient
        from tollway.billing.keys import create_key
        from tollway.clock import now_ms
        from tollway.ledger import ledger
        from tollway.pricing.catalog import load_catalog
        from tollway.store.accounts import create_account
        from tollway.store.catalog import apply_catalog
        from tollway.store.db import Database
        from tollway.store.migrate import upgrade
        from tollway.app import create_app
        url = "sqlite:///{tmp_path}/t.db"
        db = Database(url)
        upgrade(db)
        with db.write() as conn:
            apply_catalog(conn, load_catalog("{ROOT}/examples/catalog.yaml"),
                          now_ms=now_ms())
            account = create_account(conn, "a", "default", at_ms=now_ms()).id
            ledger.topup(conn, account, 10**9, idempotency_key="t", at_ms=now_ms())
            key = create_key(conn, account, at_ms=now_ms()).secret
        db.dispose()
        with TestClient(create_app(database_url=url, admin_token="t")) as client:
            response = client.post("/v1/chat/completions",
                                   headers={{"Authorization": "Bearer " + key}},
                                   json={{"model": "sandbox-chat",
                                         "messages": [{{"role": "user", "content": "hi"}}]}})
            assert response.status_code == 200, response.text
        loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        assert not loaded, loaded
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
