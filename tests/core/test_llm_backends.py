"""The LLM backends against real HTTP servers speaking Ollama's and OpenAI's APIs."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from taskloom.core.errors import ConfigError, LLMError, LLMUnavailable
from taskloom.core.llm import ChatMessage, OllamaLLM, OpenAILLM, create_llm
from taskloom.core.localredis import free_port
from taskloom.core.settings import LLMSettings
from tests.fake_ollama import FakeOllama, HTTPError

SCHEMA = {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}
HELLO = [ChatMessage("system", "be brief"), ChatMessage("user", "say hi")]


@pytest.fixture
async def openai(fake_ollama: FakeOllama) -> AsyncIterator[OpenAILLM]:
    model = OpenAILLM(f"{fake_ollama.url}/v1", "llama3.2", api_key="sk-test")
    yield model
    await model.close()


async def test_openai_sends_the_schema_as_response_format_and_reads_usage(
    openai: OpenAILLM, fake_ollama: FakeOllama
) -> None:
    fake_ollama.responder = lambda call: '{"x": "hi"}'
    reply = await openai.chat(HELLO, schema=SCHEMA, max_tokens=50)

    assert reply.text == '{"x": "hi"}'
    (call,) = fake_ollama.calls
    assert (call.api, call.format, call.options) == (
        "openai",
        SCHEMA,
        {"temperature": 0.0, "max_tokens": 50},
    )
    assert reply.usage.output_tokens == 7 and reply.usage.input_tokens > 0
    assert (reply.usage.model, reply.usage.calls) == ("openai:llama3.2", 1)


async def test_openai_streams_text_and_still_gets_usage(
    openai: OpenAILLM, fake_ollama: FakeOllama
) -> None:
    text = "a reply long enough to arrive in several server-sent events"
    fake_ollama.responder = lambda call: text
    pieces: list[str] = []

    async def collect(piece: str) -> None:
        pieces.append(piece)

    reply = await openai.chat(HELLO, on_text=collect)

    assert len(pieces) > 1 and "".join(pieces) == text == reply.text
    assert fake_ollama.calls[0].stream
    assert reply.usage.output_tokens == 7


async def test_openai_without_structured_output_falls_back_to_the_prompt(
    openai: OpenAILLM, fake_ollama: FakeOllama
) -> None:
    fake_ollama.structured_output = False
    fake_ollama.responder = lambda call: '{"x": "hi"}'

    first = await openai.chat(HELLO, schema=SCHEMA)
    await openai.chat(HELLO, schema=SCHEMA)

    assert first.text == '{"x": "hi"}'
    assert openai.structured_output is False
    # The refused call was not recorded; both answered calls went without it.
    assert [c.format for c in fake_ollama.calls] == [None, None]


async def test_openai_errors_say_what_to_fix(fake_ollama: FakeOllama) -> None:
    fake_ollama.api_key = "sk-right"
    wrong = OpenAILLM(f"{fake_ollama.url}/v1", "llama3.2", api_key="sk-wrong")
    missing = OpenAILLM(f"{fake_ollama.url}/v1", "gpt-9", api_key="sk-right")
    right = OpenAILLM(f"{fake_ollama.url}/v1", "llama3.2", api_key="sk-right")
    nowhere = OpenAILLM(f"http://127.0.0.1:{free_port()}/v1", "x")
    try:
        with pytest.raises(LLMError, match="OPENAI_API_KEY"):
            await wrong.chat(HELLO)
        with pytest.raises(LLMError, match=r"no model 'gpt-9'.*offers: llama3\.2"):
            await missing.check()
        with pytest.raises(LLMError, match="gpt-9"):
            await missing.chat(HELLO)
        fake_ollama.responder = lambda call: HTTPError(500, "overloaded")
        with pytest.raises(LLMUnavailable, match="overloaded"):
            await right.chat(HELLO)
        with pytest.raises(LLMUnavailable, match="TASKLOOM_OPENAI_BASE_URL"):
            await nowhere.check()
    finally:
        for model in (wrong, missing, right, nowhere):
            await model.close()


async def test_ollama_passes_reply_and_context_limits_and_reads_the_context_length(
    fake_ollama: FakeOllama,
) -> None:
    fake_ollama.context_length = 32768
    llm = OllamaLLM(fake_ollama.url, "llama3.2")
    fake_ollama.responder = lambda call: "hi"
    reply = await llm.chat(HELLO, max_tokens=64, context_tokens=2048)
    assert await llm.context_length() == 32768
    await llm.close()

    (call,) = fake_ollama.calls
    assert (call.options["num_predict"], call.options["num_ctx"]) == (64, 2048)
    assert (reply.usage.model, reply.usage.calls, reply.usage.output_tokens) == (
        "ollama:llama3.2",
        1,
        7,
    )
    assert reply.usage.seconds > 0


def test_the_llm_setting_picks_the_backend(fake_ollama: FakeOllama) -> None:
    assert isinstance(create_llm(LLMSettings.load(llm="ollama:qwen2.5:3b")), OllamaLLM)
    assert create_llm(LLMSettings.load(llm="ollama:qwen2.5:3b")).model == "qwen2.5:3b"
    assert create_llm(LLMSettings.load(llm="mistral")).describe() == "ollama:mistral"
    assert create_llm(LLMSettings.load(model="phi3")).describe() == "ollama:phi3"
    openai = create_llm(LLMSettings.load(llm="openai:gpt-4o-mini", openai_base_url="http://x/v1"))
    assert isinstance(openai, OpenAILLM) and openai.base_url == "http://x/v1"
    with pytest.raises(ConfigError, match="unknown embedded model 'gpt'"):
        create_llm(LLMSettings.load(llm="embedded:gpt"))
    with pytest.raises(ConfigError, match="names no model"):
        LLMSettings.load(llm="openai:")
