"""Real client libraries against ``tollway serve`` on the sandbox, as their users call them:
openai (``.parse()``, tools, Responses with ``text.format``, ``models.retrieve``), anthropic
(``count_tokens``, the tool runner, ``models.retrieve``), LangChain (``with_structured_output``,
``bind_tools``), instructor and pydantic-ai. Each succeeds on its first attempt (retries are
off, and the meter sees every request: no answer but 200), and the balance changes by exactly
the sum of the costs Tollway reported (``X-Tollway-Cost-USD``)."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import anthropic
import openai
import pytest
from pydantic import BaseModel, Field

from clients.conftest import Meter
from fakes import IGNORE_TOKENIZER_WARNING, Tollway

pytestmark = pytest.mark.filterwarnings(IGNORE_TOKENIZER_WARNING,
                                        "ignore::DeprecationWarning",
                                        "ignore::PendingDeprecationWarning")


class City(BaseModel):
    name: str
    country: str = Field(max_length=40)
    population: int = Field(ge=1000)
    kind: Literal["capital", "town"]
    districts: list[str]


def check_books(tw: Tollway, account: int, before: int, meter: Meter, requests: int) -> None:
    assert meter.answers and all(status == 200 for _, _, status in meter.answers), meter.answers
    assert len(meter.answers) == requests, meter.answers  # first attempt, no retry
    assert tw.available(account) == before - meter.cost_nano
    billed = [r for r in tw.records() if r["status"] == 200]
    assert sum(r["cost_nano"] for r in billed) == meter.cost_nano


def openai_client(tw: Tollway, key: str, meter: Meter) -> openai.OpenAI:
    return openai.OpenAI(base_url=tw.url + "/v1", api_key=key, max_retries=0,
                         http_client=meter.sync_client())


def claude_client(tw: Tollway, key: str, meter: Meter) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=tw.url, api_key=key, max_retries=0,
                               http_client=meter.sync_client())


def test_openai_parse_tools_responses_and_models(tw: Tollway, meter: Meter) -> None:
    account = tw.account()
    key = tw.key(account)
    before = tw.available(account)
    client = openai_client(tw, key, meter)

    parsed = client.chat.completions.parse(
        model="sandbox-chat", response_format=City,
        messages=[{"role": "user", "content": "Tell me about Paris"}])
    city = parsed.choices[0].message.parsed
    assert city == City(name="Tell me about Paris", country="country", population=1000,
                        kind="capital", districts=["districts"])

    tools = [{"type": "function", "function": {
        "name": "get_weather", "strict": True,
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city", "unit"], "additionalProperties": False}}}]
    called = client.chat.completions.create(
        model="sandbox-chat", tools=tools,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "Weather in Oslo?"}])
    call = called.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert called.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, json.loads(call.function.arguments)) == (  # type: ignore[union-attr]
        "get_weather", {"city": "Weather in Oslo?", "unit": "c"})
    answered = client.chat.completions.create(
        model="sandbox-chat", tools=tools,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "Weather in Oslo?"},
                  called.choices[0].message.model_dump(exclude_none=True),  # type: ignore[list-item]
                  {"role": "tool", "tool_call_id": call.id, "content": "12 degrees"}])
    assert answered.choices[0].message.content == "Tool result: 12 degrees"

    response = client.responses.parse(model="sandbox-chat", input="Tell me about Rome",
                                      text_format=City)
    assert response.output_parsed is not None
    assert response.output_parsed.name == "Tell me about Rome"

    model = client.models.retrieve("sandbox-chat")
    assert model.id == "sandbox-chat"
    check_books(tw, account, before, meter, requests=5)
    assert len(meter.costs) == 4  # models.retrieve is free


def test_anthropic_count_tokens_tool_runner_and_models(tw: Tollway, meter: Meter) -> None:
    account = tw.account()
    key = tw.key(account)
    before = tw.available(account)
    client = claude_client(tw, key, meter)
    messages = [{"role": "user", "content": "What is the weather in Lima?"}]
    counted = client.messages.count_tokens(model="sandbox-claude",
                                           messages=messages)  # type: ignore[arg-type]
    assert counted.input_tokens > 0

    seen: list[tuple[str, str]] = []

    @anthropic.beta_tool
    def get_weather(city: str, unit: Literal["c", "f"]) -> str:
        """The weather in a city."""
        seen.append((city, unit))
        return f"sunny in {city}"

    runner = client.beta.messages.tool_runner(model="sandbox-claude", max_tokens=200,
                                              tools=[get_weather],
                                              messages=messages)  # type: ignore[arg-type]
    final = runner.until_done()
    assert seen == [("What is the weather in Lima?", "c")]
    assert final.stop_reason == "end_turn"
    assert final.content[0].text == "Tool result: sunny in What is the weather in Lima?"  # type: ignore[union-attr]

    model = client.models.retrieve("sandbox-claude")
    assert (model.id, model.type) == ("sandbox-claude", "model")
    check_books(tw, account, before, meter, requests=4)
    assert len(meter.costs) == 2  # the two messages; counting and the model are free


def test_langchain_structured_output_and_bind_tools(tw: Tollway, meter: Meter) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    account = tw.account()
    key = tw.key(account)
    before = tw.available(account)
    chat = ChatOpenAI(model="sandbox-chat", base_url=tw.url + "/v1",
                      api_key=key, max_retries=0,  # type: ignore[arg-type]
                      http_client=meter.sync_client())
    city = chat.with_structured_output(City).invoke("Tell me about Lisbon")
    assert isinstance(city, City) and city.name == "Tell me about Lisbon"

    @tool
    def lookup(query: str, limit: int) -> str:
        """Look something up."""
        return query * limit

    message = chat.bind_tools([lookup]).invoke("find cats")
    assert message.tool_calls == [{"name": "lookup", "args": {"query": "find cats", "limit": 1},
                                   "id": message.tool_calls[0]["id"], "type": "tool_call"}]
    check_books(tw, account, before, meter, requests=2)


def test_instructor(tw: Tollway, meter: Meter) -> None:
    import instructor

    account = tw.account()
    key = tw.key(account)
    before = tw.available(account)
    client = instructor.from_openai(openai_client(tw, key, meter))
    city = client.chat.completions.create(
        model="sandbox-chat", response_model=City, max_retries=1,
        messages=[{"role": "user", "content": "Tell me about Oslo"}])
    assert city.name == "Tell me about Oslo" and city.population == 1000
    check_books(tw, account, before, meter, requests=1)


def test_pydantic_ai_agent_with_a_tool_and_structured_output(tw: Tollway, meter: Meter) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    account = tw.account()
    key = tw.key(account)
    before = tw.available(account)
    calls: list[str] = []

    async def run() -> City:
        client = openai.AsyncOpenAI(base_url=tw.url + "/v1", api_key=key, max_retries=0,
                                    http_client=meter.async_client())
        model = OpenAIChatModel("sandbox-chat", provider=OpenAIProvider(openai_client=client))
        agent = Agent(model, output_type=City, retries=0)

        @agent.tool_plain
        def population(city: str) -> int:
            """The population of a city."""
            calls.append(city)
            return 700_000

        result = await agent.run("Tell me about Bergen")
        await client.close()
        return result.output

    city = asyncio.run(run())
    assert calls == ["Tell me about Bergen"]
    assert city.kind == "capital"
    check_books(tw, account, before, meter, requests=2)  # the tool, then the output tool
