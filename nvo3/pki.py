"""A throwaway certificate authority for the secured local stack (demo, tests).

Everything is generated at start-up with ``cryptography`` and written under a work
directory that the caller owns; nothing here is ever meant to be committed. Keys are
ECDSA P-256 (fast to generate, supported by nats-server, etcd and gRPC) and are written
with mode 0600.

Two kinds of leaf certificates:

* the **server** certificate, shared by nats-server and etcd: SANs for the loopback
  names and addresses, ``serverAuth`` and ``clientAuth`` (etcd peers and NATS routes
  dial each other with it);
* one **client** certificate per identity, whose Common Name is the identity's name.
  etcd maps that CN to its RBAC user (``--client-cert-auth``); NATS only checks that the
  chain ends at our CA and authenticates the user by its NKey.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "DEFAULT_VALIDITY",
    "LOOPBACK_HOSTS",
    "CertificateAuthority",
    "Issued",
    "client_context",
    "write_public",
    "write_secret",
]

#: Long enough for a held demo, short enough that a leaked test key soon means nothing.
DEFAULT_VALIDITY = dt.timedelta(days=30)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
#: Clock skew between the generating process and the servers.
_BACKDATE = dt.timedelta(minutes=5)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    """``O=nvo3``, plus ``CN`` unless empty (etcd's HTTP gateway refuses a client CN)."""
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nvo3")]
    if common_name:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _san(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


@dataclass(frozen=True)
class Issued:
    """A leaf certificate and its private key, both PEM."""

    common_name: str
    cert_pem: bytes
    key_pem: bytes

    def write(self, cert_path: Path, key_path: Path) -> None:
        write_public(cert_path, self.cert_pem)
        write_secret(key_path, self.key_pem)


class CertificateAuthority:
    """A self-signed root that issues the stack's server and client certificates."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self._key = key

    @classmethod
    def generate(
        cls, common_name: str = "nvo3 local CA", *, validity: dt.timedelta = DEFAULT_VALIDITY
    ) -> Self:
        key = _new_key()
        now = dt.datetime.now(dt.UTC)
        name = _name(common_name)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_pem: bytes, key_pem: bytes) -> Self:
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError("the CA key must be an EC private key")
        return cls(x509.load_pem_x509_certificate(cert_pem), key)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self._key)

    def write(self, cert_path: Path, key_path: Path) -> None:
        write_public(cert_path, self.cert_pem)
        write_secret(key_path, self.key_pem)

    def _issue(
        self,
        common_name: str,
        usages: list[x509.ObjectIdentifier],
        hosts: Sequence[str],
        validity: dt.timedelta,
    ) -> Issued:
        key = _new_key()
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(min(now + validity, self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName(_san(hosts)), False)
        cert = builder.sign(self._key, hashes.SHA256())
        return Issued(
            common_name,
            cert.public_bytes(serialization.Encoding.PEM),
            _key_pem(key),
        )

    def issue_server(
        self,
        common_name: str,
        hosts: Sequence[str] = LOOPBACK_HOSTS,
        *,
        validity: dt.timedelta = DEFAULT_VALIDITY,
    ) -> Issued:
        """Server *and* client usage: etcd peers and NATS routes dial each other with it."""
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        return self._issue(common_name, usages, hosts, validity)

    def issue_client(
        self, common_name: str, *, validity: dt.timedelta = DEFAULT_VALIDITY
    ) -> Issued:
        """``common_name`` "" gives a certificate without CN: no etcd user, gateway-safe."""
        return self._issue(common_name, [ExtendedKeyUsageOID.CLIENT_AUTH], (), validity)


def write_secret(path: Path, data: bytes) -> None:
    """Create or replace a file readable by its owner only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def client_context(
    ca_file: Path | str, cert_file: Path | str | None = None, key_file: Path | str | None = None
) -> ssl.SSLContext:
    """A TLS client context trusting only ``ca_file``, optionally presenting a client cert."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), None if key_file is None else str(key_file))
    return ctx
