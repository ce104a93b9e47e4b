"""``TOLLWAY_STREAM_DISCONNECT=finish``: a client that leaves a stream is billed exactly what
the upstream reports, read on to its usage after the client left (``cancel``, the default, is
``test_gateway.test_client_that_disconnects_mid_stream_pays_for_what_was_delivered``: the
upstream is stopped and the prompt and the delivered output are billed, marked estimated).

``gpt-test``: input 0.15, output 0.60 USD per 1M tokens.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from fakes import (
    GATEWAY_ENV,
    IGNORE_TOKENIZER_WARNING,
    USD,
    LLMScript,
    Serving,
    Tollway,
    read_then_leave,
)
from tollway.gateway.state import Gateway

pytestmark = pytest.mark.filterwarnings(IGNORE_TOKENIZER_WARNING)


@pytest.fixture(scope="module")
def serving() -> Serving:
    return Serving(env={**GATEWAY_ENV, "TOLLWAY_STREAM_DISCONNECT": "finish"})


def test_finish_reads_the_upstream_to_its_usage_and_bills_exactly_that(tw: Tollway) -> None:
    account = tw.account(usd="1")
    key = tw.key(account)
    pieces = ["One", " two", " three", " four", " five", " six"]
    # the upstream reports 20 input and 40 output tokens (reasoning it spent before the text,
    # say) once the stream ends: (20 × 0.15 + 40 × 0.60) / 1e6 = 27e-6 USD
    tw.fake.llm = LLMScript(content=pieces, chunk_delay=0.3, prompt_tokens=20,
                            completion_tokens=40)

    events = asyncio.run(read_then_leave(tw.url + "/v1/chat/completions", key, {
        "model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "count"}]}))
    assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:2]] == [
        "One", " two"]
    (record,) = tw.wait_records(1)
    assert (record["usage_source"], record["input_tokens"], record["output_tokens"],
            record["cost_nano"], record["status"]) == ("upstream", 20, 40, 27_000, 200)
    assert record["note"] == ("the client disconnected mid-stream; the upstream was read to "
                              "its end (TOLLWAY_STREAM_DISCONNECT=finish)")
    # the upstream was read to the end, not dropped
    time.sleep(0.2)
    assert tw.fake.aborted_streams == 0
    assert tw.balance(account) == (USD - 27_000, 0)
    assert tw.open_holds() == 0 and tw.verify() == []


def test_an_unknown_disconnect_policy_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="TOLLWAY_STREAM_DISCONNECT must be cancel or finish"):
        Gateway(None, None, catalog_refresh_s=1, key_cache_s=1,  # type: ignore[arg-type]
                max_body_bytes=1, stream_disconnect="wait")
