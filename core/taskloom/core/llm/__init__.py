"""LLM backends behind one interface (``LLM``), chosen by settings."""

from __future__ import annotations

from taskloom.core.llm.base import LLM, ChatMessage, ChatReply, TextCallback
from taskloom.core.llm.ollama import OllamaLLM
from taskloom.core.settings import LLMSettings

__all__ = ["LLM", "ChatMessage", "ChatReply", "OllamaLLM", "TextCallback", "create_llm"]


def create_llm(settings: LLMSettings) -> LLM:
    """The backend the settings ask for (Ollama for now)."""
    return OllamaLLM(settings.ollama_host, settings.model, timeout=settings.llm_timeout)
