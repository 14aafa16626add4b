"""Bearer tokens, principals and roles.

A token is a random string a principal presents in gRPC metadata
(``authorization: Bearer <token>``). The supervisor never stores tokens, only
their SHA-256 hashes, in a tokens table: one entry per line,

    sha256:<hex digest>  <principal>  <role>

read from ``TASKLOOM_TOKENS_FILE`` and/or ``TASKLOOM_TOKENS`` (entries
separated by newlines or ``;``). ``taskloom tokens add FILE NAME ROLE`` mints a
token, appends its hash and prints the token once.

Roles: ``client`` submits and follows its own tasks; ``worker`` may only
open the worker stream; ``admin`` may do everything, to every task.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from taskloom.core.errors import ConfigError

METADATA_KEY = "authorization"
SCHEME = "Bearer "
_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class Role(enum.StrEnum):
    CLIENT = "client"
    WORKER = "worker"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, and in what role."""

    name: str
    role: Role

    @property
    def admin(self) -> bool:
        return self.role is Role.ADMIN


LOCAL_ADMIN = Principal("local", Role.ADMIN)
"""The caller when authentication is off (no tokens configured)."""


def hash_token(token: str) -> str:
    """``sha256:<hex>``: what the tokens table stores instead of the token."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits), prefixed so a leaked one is recognisable."""
    return "tl_" + secrets.token_urlsafe(32)


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that presents ``token`` (none for an empty token)."""
    return ((METADATA_KEY, SCHEME + token),) if token else ()


class TokenTable:
    """Token hashes → principals, looked up in constant time."""

    def __init__(self, entries: Iterable[tuple[str, Principal]] = ()) -> None:
        self._entries: list[tuple[bytes, Principal]] = [(h.encode(), p) for h, p in entries]

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, token: str) -> Principal | None:
        """The principal holding ``token``, or None.

        Every entry is compared with ``hmac.compare_digest``, whether or not
        an earlier one matched, so the time taken says nothing about the token.
        """
        digest = hash_token(token).encode()
        found: Principal | None = None
        for stored, principal in self._entries:
            if hmac.compare_digest(stored, digest):
                found = principal
        return found

    @classmethod
    def parse(cls, text: str, *, source: str) -> TokenTable:
        """Entries from ``text`` (lines or ``;``-separated); ``#`` starts a comment."""
        entries: list[tuple[str, Principal]] = []
        for number, raw in enumerate(re.split(r"[\n;]", text), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            where = f"{source}, entry {number}"
            if len(parts) != 3:
                raise ConfigError(f"{where}: write 'sha256:<hex> NAME ROLE'")
            digest, name, role = parts
            if not _HASH_RE.match(digest):
                raise ConfigError(
                    f"{where}: the first field must be a token hash (sha256:<64 hex digits>), "
                    "never the token itself; `taskloom tokens add` writes entries"
                )
            if not _NAME_RE.match(name):
                raise ConfigError(
                    f"{where}: {name!r} is not a principal name (letters, digits, ._@-)"
                )
            if role not in Role.__members__.values():
                raise ConfigError(f"{where}: role {role!r} is not one of client, worker, admin")
            entries.append((digest, Principal(name, Role(role))))
        return cls(entries)

    @classmethod
    def load(cls, path: Path | None, inline: str = "") -> TokenTable:
        """The table from a file and/or inline entries (both may be empty)."""
        entries: list[tuple[bytes, Principal]] = []
        if path is not None:
            try:
                text = path.read_text()
            except OSError as e:
                raise ConfigError(
                    f"TASKLOOM_TOKENS_FILE: cannot read {path}: {e.strerror}"
                ) from None
            entries += cls.parse(text, source=str(path))._entries
        if inline.strip():
            entries += cls.parse(inline, source="TASKLOOM_TOKENS")._entries
        table = cls()
        table._entries = entries
        return table


def bearer(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The token in call metadata, '' if the header is malformed, None if absent."""
    for key, value in metadata:
        if key == METADATA_KEY:
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            if text[: len(SCHEME)].lower() == SCHEME.lower():
                return text[len(SCHEME) :].strip()
            return ""
    return None
