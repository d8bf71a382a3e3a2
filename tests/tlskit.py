"""Certificates for TLS tests (made with ``cryptography``) and a Kubernetes-like secret dir.

A :class:`SecretDir` lays its files out as the kubelet does for a mounted Secret:
``tls.crt -> ..data/tls.crt`` and ``..data -> ..<version>/``; :meth:`SecretDir.update`
writes a new version directory and swaps the ``..data`` symlink atomically, so a reader
sees the old files or the new ones, never a mix (as in a real Secret update).
"""

from __future__ import annotations

import datetime
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class Ca:
    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Leaf:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)


def _window() -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)


def make_ca(name: str = "dstream-test-ca") -> Ca:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start, end = _window()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Ca(name, key, cert)


def make_leaf(ca: Ca, name: str = "dstream-worker") -> Leaf:
    """A fleet member's certificate signed by *ca*: usable as server and as client."""
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _window()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Leaf(cert, key)


class SecretDir:
    """A directory laid out like a mounted Kubernetes Secret: tls.crt, tls.key, ca.crt."""

    def __init__(self, root: Path, leaf: Leaf, ca_pem: bytes) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._version = 0
        self.update(leaf, ca_pem)
        for name in ("tls.crt", "tls.key", "ca.crt"):
            os.symlink(f"..data/{name}", root / name)

    @property
    def cert(self) -> str:
        return str(self.root / "tls.crt")

    @property
    def key(self) -> str:
        return str(self.root / "tls.key")

    @property
    def ca(self) -> str:
        return str(self.root / "ca.crt")

    def env(self) -> dict[str, str]:
        return {
            "DSTREAM_TLS_CERT": self.cert,
            "DSTREAM_TLS_KEY": self.key,
            "DSTREAM_TLS_CA": self.ca,
        }

    def update(self, leaf: Leaf, ca_pem: bytes) -> None:
        """Write a new version and swap ``..data`` to it atomically (the kubelet's way)."""
        self._version += 1
        version = self.root / f"..v{self._version}"
        version.mkdir()
        (version / "tls.crt").write_bytes(leaf.pem)
        (version / "tls.key").write_bytes(leaf.key_pem)
        (version / "ca.crt").write_bytes(ca_pem)
        tmp = self.root / "..data_tmp"
        os.symlink(version.name, tmp)
        os.replace(tmp, self.root / "..data")


def write_files(directory: Path, leaf: Leaf | None, ca_pem: bytes) -> tuple[str, str, str]:
    """Plain PEM files ``cert.pem``, ``key.pem``, ``ca.pem`` in *directory* (no leaf: '')."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.pem").write_bytes(ca_pem)
    if leaf is None:
        return "", "", str(directory / "ca.pem")
    (directory / "cert.pem").write_bytes(leaf.pem)
    (directory / "key.pem").write_bytes(leaf.key_pem)
    return str(directory / "cert.pem"), str(directory / "key.pem"), str(directory / "ca.pem")


def server_cert(address: tuple[str, int], ca_pem: bytes, leaf: Leaf, timeout: float = 5.0) -> bytes:
    """The DER certificate the TLS server at *address* presents, seen by a raw ``ssl`` client.

    The client presents *leaf* and does not verify the server (it only reports what the
    server presents, so that a test can wait for a rotation).
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cert, key, ca = write_files(Path(tmp), leaf, ca_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.load_verify_locations(ca)
        ctx.load_cert_chain(cert, key)
    with (
        socket.create_connection(address, timeout=timeout) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der
