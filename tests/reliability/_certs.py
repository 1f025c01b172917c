"""Test certificates: a private CA and certificates it signs, made with ``cryptography``."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class CertFiles:
    cert: str
    key: str


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: str) -> None:
    with open(path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    os.chmod(path, 0o600)


def _write_cert(cert: x509.Certificate, path: str) -> None:
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def make_ca(
    folder: str, name: str = "corral-test-ca"
) -> tuple[CertFiles, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    files = CertFiles(os.path.join(folder, f"{name}.pem"), os.path.join(folder, f"{name}.key"))
    _write_cert(cert, files.cert)
    _write_key(key, files.key)
    return files, cert, key


def make_cert(
    folder: str, name: str, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> CertFiles:
    """A certificate for ``name`` valid for 127.0.0.1, ::1 and localhost, signed by the CA."""
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    files = CertFiles(os.path.join(folder, f"{name}.pem"), os.path.join(folder, f"{name}.key"))
    _write_cert(cert, files.cert)
    _write_key(key, files.key)
    return files


@dataclass
class PKI:
    ca: CertFiles
    node: CertFiles  # scheduler, workers and the client share it (signed by the CA)
    other_ca: CertFiles
    stranger: CertFiles  # signed by another CA


def make_pki(folder: str) -> PKI:
    ca, ca_cert, ca_key = make_ca(folder, "ca")
    other, other_cert, other_key = make_ca(folder, "other-ca")
    return PKI(
        ca=ca,
        node=make_cert(folder, "node", ca_cert, ca_key),
        other_ca=other,
        stranger=make_cert(folder, "stranger", other_cert, other_key),
    )
