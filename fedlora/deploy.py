"""Credentials for a deployment: a CA, the SuperLink's TLS certificate, SuperNode keys.

``fedlora certs DIR --host HOST ...`` writes, into ``DIR``:

- ``ca.key`` / ``ca.crt``: a certificate authority (keep ``ca.key`` off the network;
  every SuperNode and every ``flwr`` user gets ``ca.crt``);
- ``server.key`` / ``server.crt``: the SuperLink's TLS key and certificate, signed by the
  CA, valid for every ``--host`` given (DNS names or IP addresses).

``fedlora node-key PATH`` writes a SuperNode's authentication key pair: ``PATH`` (private,
OpenSSH format, ECDSA P-384; it never leaves the site) and ``PATH.pub`` (the public key
that the federation's operator registers with ``flwr supernode register PATH.pub``).

Private keys are written with mode 0600 and never overwritten unless ``force`` is set.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .results import atomic_write_bytes

__all__ = ["CertPaths", "make_certificates", "make_node_key", "DeployError"]


class DeployError(ValueError):
    """Bad input for a credential (an empty host list, a file that would be overwritten)."""


@dataclass(frozen=True)
class CertPaths:
    """Where :func:`make_certificates` wrote each file."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _write(path: Path, data: bytes, *, private: bool, force: bool) -> None:
    if path.exists() and not force:
        raise DeployError(f"{path} exists; refusing to overwrite it (use --force to replace it)")
    atomic_write_bytes(path, data, mode=0o600 if private else 0o644)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        if not host or any(c.isspace() for c in host) or "/" in host:
            raise DeployError(f"bad host name {host!r}: expected a DNS name or an IP address") \
                from None
        return x509.DNSName(host)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certificates(out_dir: str | Path, hosts: Sequence[str], *, days: int = 365,
                      force: bool = False) -> CertPaths:
    """Create a CA and a SuperLink certificate for ``hosts``; return the file paths."""
    hosts = [h.strip() for h in hosts if h.strip()]
    if not hosts:
        raise DeployError("no host given: the SuperLink certificate must name the address "
                          "SuperNodes connect to (e.g. --host 127.0.0.1 --host link.example.org)")
    if days < 1:
        raise DeployError(f"days must be >= 1, got {days}")
    out = Path(out_dir).expanduser()
    paths = CertPaths(out / "ca.crt", out / "ca.key", out / "server.crt", out / "server.key")
    if not force:
        for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key):
            if p.exists():
                raise DeployError(f"{p} exists; refusing to overwrite it (use --force)")
    now = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=5)
    until = now + _dt.timedelta(days=days)

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    _write(paths.ca_key, _pem_key(ca_key), private=True, force=force)
    _write(paths.ca_cert, ca_cert.public_bytes(pem), private=False, force=force)
    _write(paths.server_key, _pem_key(server_key), private=True, force=force)
    _write(paths.server_cert, server_cert.public_bytes(pem), private=False, force=force)
    return paths


def make_node_key(path: str | Path, *, comment: str = "", force: bool = False) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format: ``path`` (private) and ``path.pub``."""
    private_path = Path(path).expanduser()
    public_path = private_path.with_name(private_path.name + ".pub")
    if not force:
        for p in (private_path, public_path):
            if p.exists():
                raise DeployError(f"{p} exists; refusing to overwrite it (use --force)")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    if comment:
        public += b" " + comment.encode()
    _write(private_path, private, private=True, force=force)
    _write(public_path, public + b"\n", private=False, force=force)
    return private_path, public_path
