"""gRPC channels and server options shared by every process.

One place for message-size limits, keepalive and TLS, so both ends agree:
both ends ping every 5 s on quiet connections and close one whose ping goes
unanswered for 5 s; the server accepts pings every 2.5 s at most and closes
connections that ping faster (abusive), that have no call open too long, or
that grow too old (with a grace for the calls on them).

Keepalive is how a peer that stops answering without closing its connection
(frozen, its host dead or cut off) is found: an idle worker sends nothing,
and a supervisor sends nothing to a worker it has no work for. So a worker
must find a dead leader, and reach the standby, within the lease TTL the
standby restores its attempts with (15 s): the pings take up to
KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS (10 s), the reconnect a few seconds
more. The pings are grpc's C core's, no Python; what they cost is in the
benchmark docs.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""What clients and workers accept: assignments carry their inputs."""
DEFAULT_MAX_RECEIVE_BYTES = 4 * 1024 * 1024
"""What the supervisor accepts in one message: gRPC's own default."""
KEEPALIVE_TIME_MS = 5_000
KEEPALIVE_TIMEOUT_MS = 5_000
MIN_PING_INTERVAL_MS = KEEPALIVE_TIME_MS // 2
MAX_PING_STRIKES = 2


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """What a client or worker needs for TLS: the CA bundle to trust (None: the
    system's), and for mutual TLS its own certificate chain and key (PEM)."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str = ""
    """Expect this name in the server's certificate instead of the address's host."""


@dataclass(frozen=True, slots=True)
class Keepalive:
    """Ping a connection quiet for ``time_ms``; close it if a ping goes
    unanswered for ``timeout_ms``."""

    time_ms: int = KEEPALIVE_TIME_MS
    timeout_ms: int = KEEPALIVE_TIMEOUT_MS


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Connection limits the server enforces."""

    max_receive_bytes: int = DEFAULT_MAX_RECEIVE_BYTES
    max_send_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_connection_idle_ms: int = 300_000
    max_connection_age_ms: int = 7_200_000
    max_connection_age_grace_ms: int = 300_000
    max_concurrent_streams: int = 1_000
    min_ping_interval_ms: int | None = None
    """Pings closer together than this (with no data sent between) are strikes.
    None: half the keepalive interval, at most MIN_PING_INTERVAL_MS, so peers
    pinging at the server's own interval are always accepted."""
    keepalive: Keepalive = Keepalive()
    """The server's own pings: how a dead idle worker, which sends nothing, is found."""


Options = list[tuple[str, int | str]]


def _keepalive(keepalive: Keepalive) -> Options:
    return [
        ("grpc.keepalive_time_ms", keepalive.time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.timeout_ms),
        # grpc 1.85 closes a connection for an unanswered ping only after
        # this, whatever keepalive_timeout says (measured: a frozen peer's
        # connection outlived 40 s without it).
        ("grpc.http2.ping_timeout_ms", keepalive.timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def client_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, keepalive: Keepalive | None = None
) -> Options:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        *_keepalive(keepalive or Keepalive()),
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnect quickly after a supervisor restart: the default backoff
        # grows to two minutes, far past a worker's lease. Callers add their
        # own jittered backoff on top.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1_000),
    ]


def server_options(limits: ServerLimits | None = None) -> Options:
    limits = limits or ServerLimits()
    min_ping_interval_ms = limits.min_ping_interval_ms
    if min_ping_interval_ms is None:
        min_ping_interval_ms = min(MIN_PING_INTERVAL_MS, limits.keepalive.time_ms // 2)
    return [
        # One process per address: a supervisor's address is part of its
        # identity in the leader lease (see SupervisorSettings.supervisor_id).
        ("grpc.so_reuseport", 0),
        ("grpc.max_send_message_length", limits.max_send_bytes),
        ("grpc.max_receive_message_length", limits.max_receive_bytes),
        *_keepalive(limits.keepalive),
        # Keep pinging a stream that carries no data: an idle worker is silent
        # (it sends no heartbeats), and these pings are how a dead one is found.
        # By default grpc stops after two pings without data.
        ("grpc.http2.max_pings_without_data", 0),
        # A peer pinging more often than this (without data) gets a strike;
        # past MAX_PING_STRIKES its connection is closed with GOAWAY.
        # (The C name is ..._MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS; its key
        # is this one. A key grpc does not know is ignored without a word,
        # which left the 5-minute default in force until it was fixed.)
        ("grpc.http2.min_ping_interval_without_data_ms", min_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
        ("grpc.max_connection_idle_ms", limits.max_connection_idle_ms),
        ("grpc.max_connection_age_ms", limits.max_connection_age_ms),
        ("grpc.max_connection_age_grace_ms", limits.max_connection_age_grace_ms),
        ("grpc.max_concurrent_streams", limits.max_concurrent_streams),
    ]


class CertificateFiles:
    """A server's certificate chain, key and (for mutual TLS) client CA, as
    files that may be replaced while it runs (a Kubernetes Secret, cert-manager
    renewing it). ``changed()`` reads them again when they differ on disk and
    hold a matching pair; a half-written or mismatched pair is ignored (the
    one in use stays) until it is whole."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._stamp = self._stat()
        self.pem = self._read()
        """(chain, key, client CA) as last read and checked."""

    def _paths(self) -> list[Path]:
        return [p for p in (self.cert, self.key, self.client_ca) if p is not None]

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        # Through the symlink a Secret volume swaps: inode, size and time.
        return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in map(os.stat, self._paths()))

    def _read(self) -> tuple[bytes, bytes, bytes | None]:
        check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        check.load_cert_chain(self.cert, self.key)  # refuses a key that is not the chain's
        ca = self.client_ca.read_bytes() if self.client_ca is not None else None
        return self.cert.read_bytes(), self.key.read_bytes(), ca

    def changed(self) -> bool:
        """Read the files again if they changed on disk; True if that gave a
        new, whole certificate and key."""
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return False
            pem = self._read()
        except (OSError, ssl.SSLError, ValueError) as e:
            logger.warning("TLS files changed but cannot be used yet (%s); keeping the old ones", e)
            return False
        self._stamp, changed = stamp, pem != self.pem
        self.pem = pem
        if changed:
            logger.info("TLS certificate reloaded from %s", self.cert)
        return changed

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that take the files again for new connections
        once they change (gRPC asks before each handshake). This object then
        tracks the files for gRPC: give other servers one of their own."""

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            return self._configuration() if self.changed() else None

        # The stubs say the fetcher must return a configuration; gRPC's own
        # documentation says None keeps the one in use.
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(),
            fetch,  # type: ignore[arg-type]
            require_client_authentication=self.client_ca is not None,
        )

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        chain, key, ca = self.pem
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)


def open_channel(
    address: str,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    tls: ClientTLS | None = None,
    keepalive: Keepalive | None = None,
) -> grpc.aio.Channel:
    """A channel to a supervisor: TLS when ``tls`` is given, else plaintext."""
    options = client_options(max_message_bytes, keepalive)
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=_interceptors())
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
    )
    return grpc.aio.secure_channel(
        address, credentials, options=options, interceptors=_interceptors()
    )


def followed_tls(tls: ClientTLS | None, referrer: str) -> ClientTLS | None:
    """TLS for a channel to the leader a standby named: its certificate must
    carry the name the caller expected at ``referrer`` (the address it was
    given, or ``server_name``), not the leader's bare address -- so a
    redirect can never take a caller to a server it would not have trusted."""
    if tls is None or tls.server_name:
        return tls
    host = referrer.rpartition(":")[0].strip("[]")
    return replace(tls, server_name=host)


def is_loopback(address: str) -> bool:
    """Whether HOST:PORT names this machine only."""
    host = address.rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _interceptors() -> list[grpc.aio.ClientInterceptor]:
    try:  # the otel extra (a client-only install goes without)
        from opentelemetry.instrumentation.grpc import aio_client_interceptors
    except ImportError:
        return []
    return [
        # OpenTelemetry client spans for unary calls (a no-op unless tracing is
        # set up). Its stream interceptors change how a call behaves when
        # cancelled, which the worker's Connect stream depends on.
        i
        for i in aio_client_interceptors()  # type: ignore[no-untyped-call]
        if isinstance(i, grpc.aio.UnaryUnaryClientInterceptor)
    ]
