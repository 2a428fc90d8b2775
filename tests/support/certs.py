"""Certificates made by the tests: a CA, server and client certificates it signs, and a second,
untrusted CA. Made with the ``cryptography`` package, in memory, then written as PEM files.

RSA keys (2048 bits): DCMTK's TLS profiles (Orthanc's DICOM TLS) are built around RSA cipher suites.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dicomweb-gateway tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM; ``serial`` tells two certificates for the same name apart."""

    cert_pem: bytes
    key_pem: bytes
    serial: int

    @property
    def der(self) -> bytes:
        return x509.load_pem_x509_certificate(self.cert_pem).public_bytes(serialization.Encoding.DER)

    def write(self, directory: Path, stem: str) -> tuple[str, str]:
        """Write ``<stem>.crt`` and ``<stem>.key`` (mode 0600); returns their paths."""
        cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert_path.write_bytes(self.cert_pem)
        key_path.write_bytes(self.key_pem)
        key_path.chmod(0o600)
        return str(cert_path), str(key_path)


class CertificateAuthority:
    """A self-signed CA that issues server and client certificates."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: Path, stem: str) -> str:
        path = directory / f"{stem}.crt"
        path.write_bytes(self.cert_pem)
        return str(path)

    def issue(self, common_name: str, *, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (),
              server: bool = True, client: bool = True) -> Issued:
        """A leaf certificate for ``common_name`` with these subject alternative names."""
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        serial = x509.random_serial_number()
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key), serial)


@dataclass(frozen=True)
class TestPki:
    """Everything one test module needs, written to ``directory``:

    - ``ca``: the CA both sides trust; ``server``: its certificate for 127.0.0.1 and localhost
      (valid for TLS clients too); ``client``: its client certificate;
    - ``rogue_ca``: a CA nobody trusts; ``rogue_client``: a client certificate it issued.
    """

    __test__ = False  # not a test class, whatever its name

    directory: Path
    ca: CertificateAuthority
    rogue_ca: CertificateAuthority
    ca_file: str
    rogue_ca_file: str
    server: Issued
    server_cert: str
    server_key: str
    client: Issued
    client_cert: str
    client_key: str
    rogue_client_cert: str
    rogue_client_key: str


def make_pki(directory: Path) -> TestPki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority("dicomweb-gateway test CA")
    rogue = CertificateAuthority("untrusted test CA")
    # for servers that are clients too: a PACS opens C-MOVE associations with its own certificate
    server = ca.issue("localhost", dns=("localhost",), ips=("127.0.0.1",))
    client = ca.issue("DICOMWEB-GW", server=False)
    rogue_client = rogue.issue("DICOMWEB-GW", server=False)
    server_cert, server_key = server.write(directory, "server")
    client_cert, client_key = client.write(directory, "client")
    rogue_cert, rogue_key = rogue_client.write(directory, "rogue-client")
    return TestPki(
        directory=directory, ca=ca, rogue_ca=rogue, ca_file=ca.write(directory, "ca"),
        rogue_ca_file=rogue.write(directory, "rogue-ca"), server=server, server_cert=server_cert,
        server_key=server_key, client=client, client_cert=client_cert, client_key=client_key,
        rogue_client_cert=rogue_cert, rogue_client_key=rogue_key,
    )
