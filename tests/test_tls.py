"""Key material for deployments: a CA-signed server certificate, node keys Flower accepts, 0600 keys."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from flwr.cli.supernode.register import try_load_public_key

from privacy.tls import KeyMaterialError, main, write_key_material


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
