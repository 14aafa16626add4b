"""The client's settings: where the supervisor is."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from taskloom.core.channel import DEFAULT_MAX_MESSAGE_BYTES
from taskloom.core.settings import Addresses, ConnectionSettings, Seconds


class ClientSettings(ConnectionSettings):
    """What the SDK and the CLI read. Each field is ``TASKLOOM_<NAME>``."""

    flag_names: ClassVar[dict[str, str]] = {
        "supervisor": "--supervisor",
        "token": "--token",
        "token_file": "--token-file",
        "tls_ca": "--tls-ca",
        "tls_cert": "--tls-cert",
        "tls_key": "--tls-key",
    }

    supervisor: Addresses = ("127.0.0.1:50051",)
    """The supervisor's HOST:PORT; several, comma-separated, when standbys run
    (calls go to whichever leads)."""
    timeout: Seconds = 30.0
    """Deadline for each unary call."""
    unavailable_grace: float = Field(default=10.0, ge=0)
    """How long a call keeps trying while no supervisor answers (one is
    restarting, or a standby is taking over) before it reports unavailable,
    counted from its first failed try. A standby takes over within the
    supervisors' TASKLOOM_LEADER_TTL (5 s by default) and a third of it."""
    reconnect_timeout: Seconds = 60.0
    """How long ``watch`` keeps trying to resume after losing the supervisor."""
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, ge=1024 * 1024)
    """Largest message accepted from the supervisor (a task with its subtasks)."""
