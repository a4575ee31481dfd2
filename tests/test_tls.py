"""Key material: a CA-signed server certificate, node keys Flower accepts, 0600 keys, nodes added later."""

from __future__ import annotations

import ipaddress
import re
import stat

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from flwr.cli.supernode.register import try_load_public_key

from privacy.tls import KeyMaterialError, add_node_keys, main, write_all, write_key_material


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return write_key_material(tmp_path_factory.mktemp("keys"), "127.0.0.1,localhost,::1", nodes=2)


def test_server_certificate_verifies_against_the_ca_with_the_right_sans(material) -> None:
    ca = x509.load_pem_x509_certificate(material.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(material.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    other_ca = write_key_material(material.ca_cert.parent / "other", "127.0.0.1", nodes=0)
    with pytest.raises(InvalidSignature):  # same CA name, different key
        server.verify_directly_issued_by(x509.load_pem_x509_certificate(other_ca.ca_cert.read_bytes()))
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                         ipaddress.ip_address("::1")]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage
    key = serialization.load_pem_private_key(material.server_key.read_bytes(), None)
    assert key.public_key() == server.public_key()


def test_private_keys_are_0600_and_public_files_are_not_secret(material) -> None:
    for path in (material.ca_key, material.server_key, *material.node_keys):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in (material.ca_cert, material.server_cert, *material.node_public_keys):
        assert stat.S_IMODE(path.stat().st_mode) & 0o044, path  # readable by others (umask allowing)


def test_node_keys_are_p384_pairs_in_the_formats_flower_reads(material) -> None:
    assert [p.name for p in material.node_keys] == ["node0", "node1"]
    for key_path, pub_path in zip(material.node_keys, material.node_public_keys, strict=True):
        private = serialization.load_ssh_private_key(key_path.read_bytes(), None)  # as flower-supernode
        public = serialization.load_ssh_public_key(pub_path.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
        assert private.public_key() == public
        assert try_load_public_key(pub_path)  # what `flwr supernode register` calls
    assert material.node_keys[0].read_bytes() != material.node_keys[1].read_bytes()


def test_existing_material_is_not_overwritten_unless_forced(material, tmp_path) -> None:
    first = write_key_material(tmp_path, "127.0.0.1", nodes=1)
    old = first.ca_key.read_bytes()
    with pytest.raises(KeyMaterialError, match=r"already holds ca\.crt.*--force"):
        write_key_material(tmp_path, "127.0.0.1", nodes=1)
    again = write_key_material(tmp_path, "127.0.0.1", nodes=1, force=True)
    assert again.ca_key.read_bytes() != old and stat.S_IMODE(again.ca_key.stat().st_mode) == 0o600


@pytest.mark.parametrize(("argv", "message"), [
    (["--hosts", " , "], "no hosts given"),
    (["--hosts", "127.0.0.1", "--nodes", "-1"], "--nodes must be >= 0"),
    (["--hosts", "127.0.0.1", "--days", "0"], "at least 1 day"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message) -> None:
    assert main(["--out", str(tmp_path / "k"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "k" / "ca.key").exists()


def test_cli_refuses_a_file_as_out_dir_and_writes_a_folder_otherwise(tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    assert main(["--out", str(tmp_path / "file"), "--hosts", "127.0.0.1"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "k"), "--hosts", "127.0.0.1,example.org", "--nodes", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [
        "ca.crt", "ca.key", "node0", "node0.pub", "node1", "node1.pub", "node2", "node2.pub",
        "server.key", "server.pem"]


def _snapshot(folder) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_add_nodes_extends_a_deployment_without_touching_the_ca_or_other_keys(tmp_path, capsys) -> None:
    keys = tmp_path / "keys"
    write_key_material(keys, "127.0.0.1", nodes=3)
    before = _snapshot(keys)
    assert main(["--out", str(keys), "--add-nodes", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"node:    {keys / n} (register {keys / n}.pub)" for n in ("node3", "node4")]
    after = _snapshot(keys)
    assert {n: after[n] for n in before} == before  # ca.*, server.*, node0..2 byte- and mtime-identical
    assert sorted(set(after) - set(before)) == ["node3", "node3.pub", "node4", "node4.pub"]
    for name in ("node3", "node4"):
        private = serialization.load_ssh_private_key((keys / name).read_bytes(), None)
        assert isinstance(private.curve, ec.SECP384R1) and stat.S_IMODE((keys / name).stat().st_mode) == 0o600
        assert private.public_key() == serialization.load_ssh_public_key((keys / f"{name}.pub").read_bytes())
        assert try_load_public_key(keys / f"{name}.pub")
    assert len({(keys / f"node{i}.pub").read_bytes() for i in range(5)}) == 5


def test_add_nodes_never_reuses_a_revoked_nodes_number(tmp_path) -> None:
    write_key_material(tmp_path, "127.0.0.1", nodes=3)
    (tmp_path / "node2").unlink()  # node2 revoked and its private key deleted; node2.pub kept
    (tmp_path / "node1.pub").unlink()
    keys, pubs = add_node_keys(tmp_path, 1)
    assert [p.name for p in keys] == ["node3"] and [p.name for p in pubs] == ["node3.pub"]


@pytest.mark.parametrize(("setup", "argv", "message"), [
    ("empty", ["--add-nodes", "1"], r"ca\.crt not found; --add-nodes extends existing key material"),
    ("missing", ["--add-nodes", "1"], "is not a folder"),
    ("not-a-ca", ["--add-nodes", "1"], "is not a CA certificate"),
    ("keys", ["--add-nodes", "0"], "--add-nodes must be >= 1"),
    ("keys", ["--add-nodes", "1", "--hosts", "127.0.0.1", "--force"], "drop --hosts, --force"),
    ("keys", [], "--hosts is required.*--add-nodes N"),
])
def test_add_nodes_refuses_clearly_and_writes_nothing(tmp_path, capsys, setup, argv, message) -> None:
    out = tmp_path / "k"
    if setup != "missing":
        out.mkdir()
    if setup == "keys":
        write_key_material(out, "127.0.0.1", nodes=1)
    if setup == "not-a-ca":
        server = write_key_material(tmp_path / "other", "127.0.0.1", nodes=0).server_cert
        (out / "ca.crt").write_bytes(server.read_bytes())  # a certificate, but not a CA
    before = _snapshot(out) if out.exists() else {}
    assert main(["--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err
    assert (_snapshot(out) if out.exists() else {}) == before


def test_existing_folder_error_points_to_add_nodes(tmp_path, capsys) -> None:
    write_key_material(tmp_path, "127.0.0.1", nodes=1)
    assert main(["--out", str(tmp_path), "--hosts", "127.0.0.1", "--nodes", "4"]) == 2
    assert "use --add-nodes N" in capsys.readouterr().err


def test_a_failed_write_removes_what_it_wrote(tmp_path) -> None:
    (tmp_path / "b").write_bytes(b"old")
    with pytest.raises(KeyMaterialError, match="already exists"):
        write_all([(tmp_path / "a", b"new", True), (tmp_path / "b", b"new", False)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"] and (tmp_path / "b").read_bytes() == b"old"
