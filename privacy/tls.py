"""Key material for a deployment: a CA, the SuperLink's TLS certificate and SuperNode key pairs.

``python -m privacy.tls --out keys --hosts 127.0.0.1,localhost --nodes 3`` writes::

    ca.crt, ca.key            the certificate authority (SuperNodes and ``flwr`` trust ca.crt)
    server.pem, server.key    the SuperLink's certificate (SANs: the hosts) signed by the CA
    node0, node0.pub, ...     SuperNode authentication keys, ECDSA P-384

``python -m privacy.tls --out keys --add-nodes 2`` adds the next free node key pairs
(``node3``, ``node4``, ...) to an existing folder and touches nothing else: the CA, the
server certificate and every existing node keep working. A node key is not a certificate;
Flower admits a SuperNode because its public key is registered on the SuperLink
(``flwr supernode register nodeN.pub``) and cuts it off when it is unregistered
(``flwr supernode unregister <node-id>``). What ties a new device to the existing
deployment is the ``ca.crt`` it is given to trust the SuperLink, so ``--add-nodes``
requires the folder's ``ca.crt`` (``ca.key`` is not needed and is never read).

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
import re
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
NODE_FILE = re.compile(r"node(\d+)(\.pub)?")  # node3, node3.pub
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


def write_all(files: Sequence[tuple[Path, bytes, bool]]) -> None:
    """Write every ``(path, data, private)``; on any failure remove what this call wrote, then raise."""
    written: list[Path] = []
    try:
        for path, data, private in files:
            (write_private if private else write_public)(path, data)
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def node_files(out: Path, index: int) -> list[tuple[Path, bytes, bool]]:
    """A fresh key pair as files ``node{index}`` (private) and ``node{index}.pub``."""
    private, public = node_key_files(make_node_key())
    return [(out / f"node{index}", private, True), (out / f"node{index}.pub", public, False)]


def existing_node_indices(out: Path) -> list[int]:
    """Indices of the ``node<i>`` / ``node<i>.pub`` files in ``out``, sorted."""
    found = {int(m.group(1)) for p in out.iterdir() if (m := NODE_FILE.fullmatch(p.name))}
    return sorted(found)


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
            raise KeyMaterialError(f"{out} already holds {', '.join(existing)}; to add node keys to it "
                                   "use --add-nodes N; otherwise choose another folder, or use --force "
                                   "(a new CA: every node then needs the new ca.crt)")

    ca_key, ca_cert = make_ca(days)
    server_key, server_cert = make_server_certificate(ca_key, ca_cert, hosts, days)
    files = [(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), False),
             (out / "ca.key", pem_private_key(ca_key), True),
             (out / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM), False),
             (out / "server.key", pem_private_key(server_key), True)]
    for i in range(nodes):
        files += node_files(out, i)
    write_all(files)
    logger.info("wrote a CA, a server certificate for %s and %d node key pairs to %s", hosts, nodes, out)
    return KeyMaterial(out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key",
                       tuple(out / f"node{i}" for i in range(nodes)),
                       tuple(out / f"node{i}.pub" for i in range(nodes)))


def read_ca_certificate(out: Path) -> x509.Certificate:
    """The CA certificate ``out/ca.crt`` of an existing deployment, checked to be a CA."""
    path = out / "ca.crt"
    if not path.is_file():
        raise KeyMaterialError(f"{path} not found; --add-nodes extends existing key material: create it "
                               f"first with python -m privacy.tls --out {out} --hosts <addresses> --nodes N")
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (ValueError, x509.ExtensionNotFound):
        is_ca = False
    if not is_ca:
        raise KeyMaterialError(f"{path} is not a CA certificate written by python -m privacy.tls; "
                               "pass the --out folder of the deployment")
    return cert


def add_node_keys(out: str | Path, count: int) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """Add ``count`` node key pairs to an existing key folder, numbered after the highest existing one.

    Nothing else in ``out`` is read or changed except ``ca.crt`` (read, to check that ``out``
    holds a deployment). Indices are never reused, so a revoked node's files cannot be
    mistaken for a new node's.

    Returns
    -------
    (private keys, public keys) : tuple of tuples of Path
        ``node<i>`` and ``node<i>.pub`` for each added node, in order.
    """
    if count < 1:
        raise KeyMaterialError(f"--add-nodes must be >= 1, got {count}")
    out = Path(out)
    if not out.is_dir():
        raise KeyMaterialError(f"{out} is not a folder; --add-nodes extends existing key material: create it "
                               f"first with python -m privacy.tls --out {out} --hosts <addresses> --nodes N")
    read_ca_certificate(out)
    first = max(existing_node_indices(out), default=-1) + 1
    indices = range(first, first + count)
    write_all([f for i in indices for f in node_files(out, i)])
    logger.info("added %d node key pairs (node%d..node%d) to %s", count, first, indices[-1], out)
    return tuple(out / f"node{i}" for i in indices), tuple(out / f"node{i}.pub" for i in indices)


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags (the combinations of --add-nodes are checked by :func:`parse_args`)."""
    parser = argparse.ArgumentParser(prog="python -m privacy.tls", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write the key material into")
    parser.add_argument("--hosts",
                        help="comma-separated IPs and DNS names of the SuperLink, e.g. 127.0.0.1,localhost")
    parser.add_argument("--nodes", type=int, default=None, help="number of SuperNode key pairs (default 0)")
    parser.add_argument("--days", type=int, default=None, help="certificate validity in days (default 365)")
    parser.add_argument("--force", action="store_true", help="replace existing key material in --out")
    parser.add_argument("--add-nodes", type=int, default=None, metavar="N",
                        help="add N node key pairs to the existing key material in --out (CA untouched)")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, with the combinations of --add-nodes checked (KeyMaterialError)."""
    args = build_parser().parse_args(argv)
    if args.add_nodes is not None:
        extra = [flag for flag, value in (("--hosts", args.hosts), ("--nodes", args.nodes),
                                          ("--days", args.days), ("--force", args.force or None))
                 if value is not None]
        if extra:
            raise KeyMaterialError(f"--add-nodes adds node keys only; drop {', '.join(extra)}")
    elif args.hosts is None:
        raise KeyMaterialError("--hosts is required (the SuperLink's addresses, e.g. --hosts 127.0.0.1,"
                               "localhost); to add node keys to an existing folder use --add-nodes N")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write key material, print what was written; bad input -> exit code 2."""
    try:
        args = parse_args(argv)
        if args.add_nodes is not None:
            keys, pubs = add_node_keys(args.out, args.add_nodes)
        else:
            written = write_key_material(args.out, args.hosts, args.nodes or 0,
                                         365 if args.days is None else args.days, args.force)
            keys, pubs = written.node_keys, written.node_public_keys
            print(f"CA:      {written.ca_cert} (key {written.ca_key})")
            print(f"server:  {written.server_cert} (key {written.server_key})")
    except (KeyMaterialError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key, pub in zip(keys, pubs, strict=True):
        print(f"node:    {key} (register {pub})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
