"""LLM backends behind one interface (``LLM``), chosen by ``TASKLOOM_LLM``.

``ollama:<model>`` (the default), ``openai:<model>`` for any OpenAI-compatible
server, and ``embedded:smollm2`` for an in-process model (the ``embedded``
extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from taskloom.core.llm.base import (
    LLM,
    ChatMessage,
    ChatReply,
    TextCallback,
    estimate_tokens,
)
from taskloom.core.settings import LLMSettings

if TYPE_CHECKING:
    from taskloom.core.llm.ollama import OllamaLLM
    from taskloom.core.llm.openai import OpenAILLM

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


def __getattr__(name: str) -> Any:
    # The backends' clients (ollama, httpx) are the server extra's: a
    # client-only install imports this package without them.
    if name == "OllamaLLM":
        from taskloom.core.llm.ollama import OllamaLLM

        return OllamaLLM
    if name == "OpenAILLM":
        from taskloom.core.llm.openai import OpenAILLM

        return OpenAILLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def create_llm(settings: LLMSettings) -> LLM:
    """The backend ``settings.llm`` names; ``ConfigError`` if it cannot be had here."""
    from taskloom.core.llm.ollama import OllamaLLM
    from taskloom.core.llm.openai import OpenAILLM

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
