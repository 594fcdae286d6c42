"""Throwaway X.509 material for TLS tests, generated at test time with `cryptography`.

Nothing here is committed: a `TestCA` lives in a temporary directory and issues server
certificates for given host names (valid, expired, not yet valid, or paired with a key that
does not match). Keys are small EC P-256 keys unless RSA is asked for, so generation is fast.

    ca = TestCA(tmp_path)
    files = ca.issue("gw", ["test.local", "*.example.com"])
    ssl_ctx = ca.client_context()            # trusts the CA, checks host names
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ec", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class CertFiles:
    """A certificate and its key on disk, and the certificate's serial number."""

    cert: Path
    key: Path
    serial: int


def new_key(kind: KeyType = "ec") -> PrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` in one step, as a certificate renewal tool does."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


class TestCA:
    """A certificate authority in `directory`; `cert_path` is what clients trust."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, name: str = "apigate test CA") -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = new_key("ec")
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 30 * _DAY)
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
            .add_extension(ski, critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = self.dir / "ca.pem"
        self.cert_path.write_bytes(cert_pem(self.cert))

    def certificate(
        self,
        hosts: Sequence[str],
        key: PrivateKey,
        *,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        serial: int | None = None,
    ) -> x509.Certificate:
        now = dt.datetime.now(dt.UTC)
        cn = hosts[0] if hosts else "apigate test server"
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial if serial is not None else x509.random_serial_number())
            .not_valid_before(not_before or now - _DAY)
            .not_valid_after(not_after or now + 7 * _DAY)
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self,
        name: str,
        hosts: Sequence[str],
        *,
        key_type: KeyType = "ec",
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        serial: int | None = None,
        cert_path: Path | None = None,
        key_path: Path | None = None,
        mismatched_key: bool = False,
    ) -> CertFiles:
        """Write `<name>.pem` and `<name>.key` (or the given paths, replaced atomically).

        `mismatched_key=True` writes the key of a different key pair next to the certificate.
        """
        key = new_key(key_type)
        cert = self.certificate(
            hosts, key, not_before=not_before, not_after=not_after, serial=serial
        )
        if mismatched_key:
            key = new_key(key_type)
        cert_path = cert_path or self.dir / f"{name}.pem"
        key_path = key_path or self.dir / f"{name}.key"
        write_atomic(cert_path, cert_pem(cert))
        write_atomic(key_path, key_pem(key), mode=0o600)
        return CertFiles(cert_path, key_path, cert.serial_number)

    def expired(self, name: str, hosts: Sequence[str]) -> CertFiles:
        now = dt.datetime.now(dt.UTC)
        return self.issue(name, hosts, not_before=now - 10 * _DAY, not_after=now - _DAY)

    def not_yet_valid(self, name: str, hosts: Sequence[str]) -> CertFiles:
        now = dt.datetime.now(dt.UTC)
        return self.issue(name, hosts, not_before=now + _DAY, not_after=now + 10 * _DAY)

    def mismatched(self, name: str, hosts: Sequence[str]) -> CertFiles:
        return self.issue(name, hosts, mismatched_key=True)

    def client_context(
        self,
        *,
        minimum: ssl.TLSVersion | None = None,
        maximum: ssl.TLSVersion | None = None,
    ) -> ssl.SSLContext:
        """A client context that trusts only this CA and checks host names."""
        ctx = ssl.create_default_context(cafile=str(self.cert_path))
        if minimum is not None:
            ctx.minimum_version = minimum
        if maximum is not None:
            ctx.maximum_version = maximum
        return ctx


def peer_serial(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> int:
    """The serial number of the certificate the server presented."""
    der = ssl_object.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number
