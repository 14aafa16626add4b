"""The client's settings: where the supervisor is."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator

from taskloom.core.channel import DEFAULT_MAX_MESSAGE_BYTES, parse_address
from taskloom.core.settings import Seconds, TaskloomSettings


class ClientSettings(TaskloomSettings):
    """What the SDK and the CLI read. Each field is ``TASKLOOM_<NAME>``."""

    flag_names: ClassVar[dict[str, str]] = {"supervisor": "--supervisor"}

    supervisor: str = "127.0.0.1:50051"
    """The supervisor's HOST:PORT."""
    timeout: Seconds = 30.0
    """Deadline for each unary call."""
    reconnect_timeout: Seconds = 60.0
    """How long ``watch`` keeps trying to resume after losing the supervisor."""
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, ge=1024 * 1024)

    @field_validator("supervisor")
    @classmethod
    def _address(cls, value: str) -> str:
        return parse_address(value, setting="TASKLOOM_SUPERVISOR")
