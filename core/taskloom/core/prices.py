"""What LLM calls cost in money: a price per million input and output tokens
for each model.

A model is named as usage names it, ``provider:model`` (``openai:gpt-4o``); a
table entry may be a pattern (``ollama:*``). Local models (``ollama:*``,
``embedded:*``) cost nothing unless the table says otherwise; the built-in
table also has the list prices of a few hosted models, which change: put
yours in a file (``TASKLOOM_PRICES_FILE``, TOML or JSON) whose entries replace
the built-in ones::

    ["openai:gpt-4o"]
    input = 2.50    # per million input tokens
    output = 10.00  # per million output tokens

The currency is whatever the table is in (the built-in one is US dollars).
A model with no price has no cost: its calls count as free, said once in
the log, and a task with a ``max_cost`` may not use it (a budget that cannot
see a cost does not bound it).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from taskloom.core.errors import ConfigError
from taskloom.core.model import Usage

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Price:
    """Per million tokens."""

    input: float
    output: float

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input + output_tokens * self.output) / 1_000_000


FREE = Price(0.0, 0.0)

BUILTIN_PRICES: Mapping[str, Price] = {
    "ollama:*": FREE,
    "embedded:*": FREE,
    # OpenAI list prices per million tokens (standard tier, late 2025).
    "openai:gpt-4o": Price(2.50, 10.00),
    "openai:gpt-4o-mini": Price(0.15, 0.60),
    "openai:gpt-4.1": Price(2.00, 8.00),
    "openai:gpt-4.1-mini": Price(0.40, 1.60),
    "openai:gpt-4.1-nano": Price(0.10, 0.40),
}


def patterns_of(keys: Iterable[str]) -> list[str]:
    """The keys of a model table that are patterns, longest (most specific) first."""
    return sorted((k for k in keys if any(c in k for c in "*?[")), key=len, reverse=True)


def entry_for(model: str, entries: Mapping[str, object], patterns: list[str]) -> str | None:
    """Which key of a model table ``model`` falls under: its exact name, else
    the longest pattern it matches (``patterns_of``); None for none."""
    if model in entries:
        return model
    return next((p for p in patterns if fnmatch.fnmatchcase(model, p)), None)


class PriceTable:
    """Model → price: an exact name first, else the longest matching pattern."""

    def __init__(self, prices: Mapping[str, Price] = BUILTIN_PRICES) -> None:
        self.prices = dict(prices)
        self._patterns = patterns_of(self.prices)
        self._warned: set[str] = set()

    def price(self, model: str) -> Price | None:
        """The price of ``model`` (``provider:model``), None if the table has none."""
        key = entry_for(model, self.prices, self._patterns)
        if key is not None:
            return self.prices[key]
        if model not in self._warned:
            self._warned.add(model)
            logger.warning(
                "no price for %s: its calls count as free (add it to TASKLOOM_PRICES_FILE)",
                model,
            )
        return None

    def cost(self, model: str, input_tokens: int, output_tokens: int) -> float:
        price = self.price(model)
        return price.cost(input_tokens, output_tokens) if price is not None else 0.0

    def costed(self, usage: Usage) -> Usage:
        """``usage`` (of one model's calls) with what it cost (unchanged when free)."""
        cost = self.cost(usage.model, usage.input_tokens, usage.output_tokens)
        return replace(usage, costs={usage.model: cost}) if cost else usage


def parse_prices(document: Any, source: str) -> dict[str, Price]:
    """``{model: {"input": n, "output": n}}`` → prices, or ``ConfigError``."""
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: a price table maps model names to {{input, output}}")
    prices = {}
    for model, entry in document.items():
        if not isinstance(entry, dict) or set(entry) - {"input", "output"}:
            raise ConfigError(
                f"{source}: {model} needs input and output, each a price per million tokens"
            )
        values = [entry.get("input", 0), entry.get("output", 0)]
        if (
            not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
            or min(values) < 0
        ):
            raise ConfigError(f"{source}: {model}'s prices must be numbers of at least 0")
        prices[str(model)] = Price(float(values[0]), float(values[1]))
    return prices


def load_prices(path: str | None) -> PriceTable:
    """The built-in table with the file's entries (TOML or JSON) over it."""
    if not path:
        return PriceTable()
    file = Path(path)
    try:
        text = file.read_text()
        document = json.loads(text) if file.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the price table {path}: {e}") from None
    return PriceTable({**BUILTIN_PRICES, **parse_prices(document, path)})
