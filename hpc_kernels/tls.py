"""Mutual TLS for the relay's ``tcp`` transport: credentials made for one kernel at submit.

Each kernel gets its own certificate authority. It signs two certificates: one for the node
side (the listener in the kernel's job) and one for the login side. Then its private key is
thrown away, so no further certificate can ever be made for that kernel. Both sides trust only
that CA:

* the node side requires a client certificate from it, so a peer without one (another user, a
  port scanner, another kernel's login side) is refused during the handshake, before any
  kernel byte flows;
* the login side checks that the node's certificate comes from it, under the fixed name
  :data:`NODE_NAME`. The node's host name does not matter: the CA is pinned.

The PEM files are 0600 in the kernel's state directory, as the HMAC key is
(:func:`write_credentials`).
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

from .paths import write_private_file

NODE_NAME = "hpc-kernels-node"
LOGIN_NAME = "hpc-kernels-login"
VALID_DAYS = 31  # longer than any kernel job; Slurm's time limits are the real bound


@dataclass(frozen=True)
class Credentials:
    """PEM text: the kernel's CA certificate, and each side's certificate followed by its key."""

    ca: bytes
    node: bytes
    login: bytes


def _name(common_name: str):  # type: ignore[no-untyped-def]
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_credentials(kernel: str) -> Credentials:
    """A fresh CA for ``kernel``, and the node's and the login side's certificates from it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"hpc-kernels CA for kernel {kernel}")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(common_name: str, usage: x509.ObjectIdentifier) -> bytes:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        return (cert.public_bytes(serialization.Encoding.PEM)
                + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))

    from cryptography.x509.oid import ExtendedKeyUsageOID

    return Credentials(
        ca=ca.public_bytes(serialization.Encoding.PEM),
        node=leaf(NODE_NAME, ExtendedKeyUsageOID.SERVER_AUTH),
        login=leaf(LOGIN_NAME, ExtendedKeyUsageOID.CLIENT_AUTH),
    )  # ca_key goes out of scope here: nothing else can be signed for this kernel


@dataclass(frozen=True)
class CredentialFiles:
    """Where a kernel's credentials live in its state directory."""

    dir: Path

    ca = property(lambda self: self.dir / "tls-ca.pem")
    node = property(lambda self: self.dir / "tls-node.pem")
    login = property(lambda self: self.dir / "tls-login.pem")


def write_credentials(files: CredentialFiles, credentials: Credentials) -> None:
    for path, pem in ((files.ca, credentials.ca), (files.node, credentials.node), (files.login, credentials.login)):
        write_private_file(path, pem)


def _context(purpose: ssl.Purpose, own: Path, ca: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(purpose, cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(str(own))
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def node_context(files: CredentialFiles) -> ssl.SSLContext:
    """The node side's: its certificate, and a client certificate from the kernel's CA required."""
    return _context(ssl.Purpose.CLIENT_AUTH, files.node, files.ca)


def login_context(files: CredentialFiles) -> ssl.SSLContext:
    """The login side's: its certificate, and the node's checked against the kernel's CA under
    :data:`NODE_NAME` (pass it as ``server_hostname``)."""
    context = _context(ssl.Purpose.SERVER_AUTH, files.login, files.ca)
    context.check_hostname = True
    return context
