"""Bearer tokens, principals and roles.

A token is a random string a principal presents in gRPC metadata
(``authorization: Bearer <token>``). The supervisor never stores tokens, only
their SHA-256 hashes, in a tokens table: one entry per line,

    sha256:<hex digest>  <principal>  <role>  [expires=<ISO time>]  [capabilities=<a,b>]

read from ``TASKLOOM_TOKENS_FILE`` and/or ``TASKLOOM_TOKENS`` (entries
separated by newlines or ``;``). ``taskloom tokens add FILE NAME ROLE`` mints a
token, appends its hash and prints the token once. A token with ``expires``
is refused after that time; one with ``capabilities`` may use only those
(a client's tasks run only on them, a worker may offer only them).

Roles: ``client`` submits and follows its own tasks; ``worker`` may only
open the worker stream; ``admin`` may do everything, to every task.

With mutual TLS, a client certificate may stand for a principal instead of a
token: a subject alternative name ``urn:taskloom:<role>:<name>`` (what
``taskloom certs`` writes) gives its holder that role and name. A
certificate without one gives no role at all.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from taskloom.core.errors import ConfigError
from taskloom.core.plan import CAPABILITY_RE

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
    capabilities: frozenset[str] | None = None
    """The capabilities it may use (None: every one)."""

    def may_use(self, capability: str) -> bool:
        return self.capabilities is None or capability in self.capabilities

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


ROLE_URI = "urn:taskloom:"
"""Certificates name their holder's role and name as ``urn:taskloom:<role>:<name>``."""


def role_uri(role: Role, name: str) -> str:
    return f"{ROLE_URI}{role}:{name}"


def principal_of_uris(uris: Iterable[str]) -> Principal | None:
    """The principal a certificate's URI names, or None if it names none."""
    for uri in uris:
        if not uri.startswith(ROLE_URI):
            continue
        role, _, name = uri[len(ROLE_URI) :].partition(":")
        if role in Role.__members__.values() and _NAME_RE.match(name):
            return Principal(name, Role(role))
    return None


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of the tokens table."""

    digest: bytes
    principal: Principal
    expires: float = 0.0
    """Epoch seconds after which the token is refused (0: never)."""

    def expired(self, now: float) -> bool:
        return bool(self.expires) and now >= self.expires


class TokenTable:
    """Token hashes → principals, looked up in constant time."""

    def __init__(self, entries: Iterable[tuple[str, Principal]] = ()) -> None:
        self._entries: list[Entry] = [Entry(h.encode(), p) for h, p in entries]

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, token: str) -> Principal | None:
        """The principal holding ``token`` (if it has not expired), or None."""
        entry = self.entry(token)
        return None if entry is None or entry.expired(_now()) else entry.principal

    def entry(self, token: str) -> Entry | None:
        """The table's entry for ``token``, expired or not, or None.

        Every entry is compared with ``hmac.compare_digest``, whether or not
        an earlier one matched, so the time taken says nothing about the token.
        """
        digest = hash_token(token).encode()
        found: Entry | None = None
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        return found

    def rights(self, name: str) -> frozenset[str] | None:
        """The capabilities ``name`` may use (None: every one, also for a name
        the table does not know, such as a certificate's)."""
        found: set[str] = set()
        for entry in self._entries:
            if entry.principal.name == name:
                if entry.principal.capabilities is None:
                    return None
                found |= entry.principal.capabilities
        return frozenset(found) if found else None

    def valid(self, digest: bytes, now: float) -> bool:
        """Whether a token of this hash is in the table and has not expired."""
        return any(e.digest == digest and not e.expired(now) for e in self._entries)

    @classmethod
    def parse(cls, text: str, *, source: str) -> TokenTable:
        """Entries from ``text`` (lines or ``;``-separated); ``#`` starts a comment."""
        entries: list[Entry] = []
        for number, raw in enumerate(re.split(r"[\n;]", text), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            where = f"{source}, entry {number}"
            if len(parts) < 3:
                raise ConfigError(
                    f"{where}: write 'sha256:<hex> NAME ROLE [expires=TIME] [capabilities=A,B]'"
                )
            digest, name, role = parts[:3]
            options = _options(parts[3:], where)
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
            capabilities = options.get("capabilities")
            principal = Principal(
                name,
                Role(role),
                frozenset(c for c in capabilities.split(",") if c)
                if capabilities is not None
                else None,
            )
            entries.append(Entry(digest.encode(), principal, _expiry(options, where)))
        table = cls()
        table._entries = entries
        return table

    @classmethod
    def load(cls, path: Path | None, inline: str = "") -> TokenTable:
        """The table from a file and/or inline entries (both may be empty)."""
        entries: list[Entry] = []
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


def _options(fields: list[str], where: str) -> dict[str, str]:
    options = {}
    for field in fields:
        key, sep, value = field.partition("=")
        if not sep or key not in ("expires", "capabilities"):
            raise ConfigError(
                f"{where}: {field!r}: after the role come expires=... and capabilities=..."
            )
        options[key] = value
    named = options.get("capabilities", "").split(",")
    bad = [c for c in named if c and not CAPABILITY_RE.match(c)]
    if bad:
        raise ConfigError(f"{where}: capability {bad[0][:64]!r} is not a capability name")
    return options


def _expiry(options: dict[str, str], where: str) -> float:
    text = options.get("expires", "")
    if not text:
        return 0.0
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"{where}: expires={text!r} is not a time like 2027-01-31T00:00Z"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def _now() -> float:
    return datetime.datetime.now(datetime.UTC).timestamp()


def bearer(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The token in call metadata, '' if the header is malformed, None if absent."""
    for key, value in metadata:
        if key == METADATA_KEY:
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            if text[: len(SCHEME)].lower() == SCHEME.lower():
                return text[len(SCHEME) :].strip()
            return ""
    return None
