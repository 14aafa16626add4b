"""Logging set-up for every taskloom process (structured output comes later)."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr at ``level``; quiet the chattiest libraries."""
    logging.basicConfig(level=level.upper(), format=FORMAT, force=True)
    for noisy in ("httpx", "httpcore", "grpc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
