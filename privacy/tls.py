"""Key material for a deployment: a CA, the SuperLink's TLS certificate and SuperNode key pairs.

``python -m privacy.tls --out keys --hosts 127.0.0.1,localhost --nodes 3`` writes::

    ca.crt, ca.key            the certificate authority (SuperNodes and ``flwr`` trust ca.crt)
    server.pem, server.key    the SuperLink's certificate (SANs: the hosts) signed by the CA
    node0, node0.pub, ...     SuperNode authentication keys, ECDSA P-384

Formats are those Flower 1.42 reads: certificates and the CA/server keys as PEM
(``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key``);
node private keys in OpenSSH format (``flower-supernode --auth-supernode-private-key node0``,
read with ``load_ssh_private_key``) and node public keys as OpenSSH lines
(``flwr supernode register node0.pub``, read with ``load_ssh_public_key``; NIST curves only).
Private key files are created with mode 0600 and never exist with wider permissions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from privacy.errors import PrivacyError

logger = logging.getLogger(__name__)

CURVE = ec.SECP384R1  # ECDSA P-384: a NIST curve, as Flower's node authentication requires
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class KeyMaterialError(PrivacyError):
    """Key material could not be generated or written as asked."""


@dataclass(frozen=True)
class KeyMaterial:
    """Paths of everything :func:`write_key_material` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]  # OpenSSH private keys (node0, node1, ...)
    node_public_keys: tuple[Path, ...]  # OpenSSH public keys (node0.pub, ...)


def parse_hosts(hosts: str | Sequence[str]) -> list[str]:
    """``"127.0.0.1,localhost"`` (or a list) as a list of non-empty, de-duplicated names."""
    items = hosts.split(",") if isinstance(hosts, str) else list(hosts)
    names = list(dict.fromkeys(h.strip() for h in items if h.strip()))
    if not names:
        raise KeyMaterialError("no hosts given; pass the SuperLink's addresses, "
                               "e.g. --hosts 127.0.0.1,localhost")
    return names


def subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """IP SANs for IP addresses, DNS SANs for names."""
    names: list[x509.GeneralName] = []
    for host in parse_hosts(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "feddistill"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    if days < 1:
        raise KeyMaterialError(f"certificates must be valid for at least 1 day, got {days}")
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)


def make_ca(days: int = 365, common_name: str = "feddistill CA") -> tuple[ec.EllipticCurvePrivateKey,
                                                                           x509.Certificate]:
    """A self-signed certificate authority (P-384 key) that may sign end-entity certificates only."""
    key = ec.generate_private_key(CURVE())
    start, end = _validity(days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str],
    days: int = 365,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for ``hosts`` (the SuperLink's addresses), signed by the CA."""
    sans = subject_alt_names(hosts)
    key = ec.generate_private_key(CURVE())
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(parse_hosts(hosts)[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_node_key() -> ec.EllipticCurvePrivateKey:
    """A SuperNode authentication key (ECDSA P-384)."""
    return ec.generate_private_key(CURVE())


def node_key_files(key: ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
    """(OpenSSH private key, OpenSSH public key line) - what ``flower-supernode`` / ``flwr`` read."""
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (the SuperLink reads its key without a passphrase)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 and write ``data``; an existing file is an error."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyMaterialError(f"{path} already exists; delete the old key material or use --force") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_public(path: Path, data: bytes) -> None:
    """Write a certificate or public key (default permissions); an existing file is an error."""
    try:
        with open(path, "xb") as f:
            f.write(data)
    except FileExistsError:
        raise KeyMaterialError(f"{path} already exists; delete the old key material or use --force") from None


def write_key_material(out: str | Path, hosts: str | Sequence[str], nodes: int, days: int = 365,
                       force: bool = False) -> KeyMaterial:
    """Generate and write the CA, the server certificate for ``hosts`` and ``nodes`` node key pairs.

    Parameters
    ----------
    out : str or Path
        Folder to write into (created if missing; must not be a file).
    hosts : str or sequence of str
        The SuperLink's IP addresses and DNS names (comma-separated string or a list).
    nodes : int
        Number of SuperNode key pairs (``node0`` .. ``node{nodes-1}`` plus ``.pub``); >= 0.
    days : int
        Validity of both certificates.
    force : bool
        Replace existing files (they are deleted first, so keys are still created 0600).
    """
    hosts = parse_hosts(hosts)
    if nodes < 0:
        raise KeyMaterialError(f"--nodes must be >= 0, got {nodes}")
    _validity(days)  # fail before anything is written
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KeyMaterialError(f"{out} is a file; pass a folder to --out")
    out.mkdir(parents=True, exist_ok=True)
    names = ["ca.crt", "ca.key", "server.pem", "server.key"]
    names += [n for i in range(nodes) for n in (f"node{i}", f"node{i}.pub")]
    if force:
        for name in names:
            (out / name).unlink(missing_ok=True)
    else:
        existing = [n for n in names if (out / n).exists()]
        if existing:
            raise KeyMaterialError(f"{out} already holds {', '.join(existing)}; "
                                   "choose another folder or use --force")

    ca_key, ca_cert = make_ca(days)
    server_key, server_cert = make_server_certificate(ca_key, ca_cert, hosts, days)
    write_public(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    write_private(out / "ca.key", pem_private_key(ca_key))
    write_public(out / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM))
    write_private(out / "server.key", pem_private_key(server_key))
    node_keys, node_pubs = [], []
    for i in range(nodes):
        private, public = node_key_files(make_node_key())
        write_private(out / f"node{i}", private)
        write_public(out / f"node{i}.pub", public)
        node_keys.append(out / f"node{i}")
        node_pubs.append(out / f"node{i}.pub")
    logger.info("wrote a CA, a server certificate for %s and %d node key pairs to %s", hosts, nodes, out)
    return KeyMaterial(out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key",
                       tuple(node_keys), tuple(node_pubs))


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write key material, print what was written; bad input -> exit code 2."""
    parser = argparse.ArgumentParser(prog="python -m privacy.tls", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write the key material into")
    parser.add_argument("--hosts", required=True,
                        help="comma-separated IPs and DNS names of the SuperLink, e.g. 127.0.0.1,localhost")
    parser.add_argument("--nodes", type=int, default=0, help="number of SuperNode key pairs (default 0)")
    parser.add_argument("--days", type=int, default=365, help="certificate validity in days (default 365)")
    parser.add_argument("--force", action="store_true", help="replace existing key material in --out")
    args = parser.parse_args(argv)
    try:
        written = write_key_material(args.out, args.hosts, args.nodes, args.days, args.force)
    except (KeyMaterialError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"CA:      {written.ca_cert} (key {written.ca_key})")
    print(f"server:  {written.server_cert} (key {written.server_key})")
    for key, pub in zip(written.node_keys, written.node_public_keys, strict=True):
        print(f"node:    {key} (register {pub})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
