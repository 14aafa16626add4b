"""LLM backends behind one interface (``LLM``), chosen by ``TASKLOOM_LLM``.

``ollama:<model>`` (the default), ``openai:<model>`` for any OpenAI-compatible
server, and ``embedded:smollm2`` for an in-process model (the ``embedded``
extra).
"""

from __future__ import annotations

from taskloom.core.llm.base import (
    LLM,
    ChatMessage,
    ChatReply,
    TextCallback,
    estimate_tokens,
)
from taskloom.core.llm.ollama import OllamaLLM
from taskloom.core.llm.openai import OpenAILLM
from taskloom.core.settings import LLMSettings

__all__ = [
    "LLM",
    "ChatMessage",
    "ChatReply",
    "OllamaLLM",
    "OpenAILLM",
    "TextCallback",
    "create_llm",
    "estimate_tokens",
]


def create_llm(settings: LLMSettings) -> LLM:
    """The backend ``settings.llm`` names; ``ConfigError`` if it cannot be had here."""
    provider, model = settings.llm_spec
    if provider == "openai":
        return OpenAILLM(
            settings.openai_base_url,
            model,
            api_key=settings.openai_api_key,
            timeout=settings.llm_timeout,
        )
    if provider == "embedded":
        from taskloom.core.llm.embedded import EmbeddedLLM  # needs the embedded extra

        return EmbeddedLLM(model, context_tokens=settings.context_tokens)
    return OllamaLLM(settings.ollama_host, model, timeout=settings.llm_timeout)
