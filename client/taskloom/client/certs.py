"""A local certificate authority for trying TLS and mutual TLS in one command.

``taskloom certs init DIR`` writes a CA and certificates signed by it:

    ca.pem                      the CA: clients, workers and (for mTLS) the supervisor trust it
    server.pem, server-key.pem  the supervisor (localhost, 127.0.0.1, ::1 and --host names)
    worker.pem, worker-key.pem  a worker's client certificate (mutual TLS), role worker
    client.pem, client-key.pem  a client's certificate (mutual TLS), role client

A client certificate carries its holder's role and name as a subject
alternative name ``urn:taskloom:<role>:<name>``; with mutual TLS and no
token, that is who the caller is. ``taskloom certs issue DIR NAME --role R``
signs another one with the same CA.

Keys are ECDSA P-256, written readable by their owner only. For development:
production certificates come from your PKI (or cert-manager on Kubernetes).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from taskloom.core.auth import Role, role_uri
from taskloom.core.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1", "taskloom-supervisor")
LEAF_NAMES = ("server", "worker", "client")


_CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    key_cert_sign=True,
    crl_sign=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    encipher_only=False,
    decipher_only=False,
)


@dataclass(frozen=True)
class Minted:
    """Where ``init`` wrote each file."""

    directory: Path
    ca: Path
    files: dict[str, tuple[Path, Path]]
    """``server``/``worker``/``client`` → (certificate, key)."""


def init(
    directory: Path, *, hosts: Iterable[str] = (), days: int = 365, force: bool = False
) -> Minted:
    """Mint a CA and the server, worker and client certificates into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    targets = [directory / "ca.pem", directory / "ca-key.pem"] + [
        directory / f"{name}{suffix}" for name in LEAF_NAMES for suffix in (".pem", "-key.pem")
    ]
    existing = [p.name for p in targets if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"{directory} already holds {', '.join(existing)}; pass --force to replace them"
        )
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "taskloom local CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(directory / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(directory / "ca-key.pem", _key_pem(ca_key), private=True)
    names = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    files: dict[str, tuple[Path, Path]] = {}
    for leaf in LEAF_NAMES:
        role = None if leaf == "server" else Role(leaf)
        files[leaf] = _leaf(
            directory, leaf, ca_cert, ca_key, days=days, hosts=names, role=role, name=leaf
        )
    return Minted(directory, directory / "ca.pem", files)


def issue(directory: Path, name: str, *, role: str, days: int = 365) -> tuple[Path, Path]:
    """Sign a client certificate for ``name`` in ``role`` with the CA that
    ``init`` wrote to ``directory``: ``NAME.pem`` and ``NAME-key.pem``."""
    try:
        ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        ca_key = serialization.load_pem_private_key((directory / "ca-key.pem").read_bytes(), None)
    except (OSError, ValueError) as e:
        raise ConfigError(f"no CA in {directory} ({e}); run `taskloom certs init` first") from None
    if role not in Role.__members__.values():
        raise ConfigError(f"role {role!r} is not one of client, worker, admin")
    if not _NAME.match(name) or name in (*LEAF_NAMES, "ca"):
        raise ConfigError(
            f"{name!r}: a name is letters, digits and ._@- (not {', '.join(LEAF_NAMES)})"
        )
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    return _leaf(directory, name, ca_cert, ca_key, days=days, role=Role(role), name=name)


def _leaf(
    directory: Path,
    leaf: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    days: int,
    role: Role | None,
    name: str,
    hosts: Iterable[str] = (),
) -> tuple[Path, Path]:
    """One certificate signed by the CA: the server's (``role`` None) or a
    client's naming its role and name."""
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"taskloom-{leaf}")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if role is None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in hosts]), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(role_uri(role, name))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = directory / f"{leaf}.pem", directory / f"{leaf}-key.pem"
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(key_path, _key_pem(key), private=True)
    return cert_path, key_path


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, private: bool) -> None:
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
