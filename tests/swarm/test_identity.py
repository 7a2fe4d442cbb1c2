"""Identity: persistence, libp2p peer IDs, signatures, and TLS certificates that prove an ID."""

import datetime
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.peer.id import ID

from layerswarm.errors import LayerswarmError
from layerswarm.swarm.identity import (
    TLS_EXTENSION_OID,
    TLS_SIGNATURE_PREFIX,
    Identity,
    generate_identity,
    identity_from_bytes,
    load_or_create_identity,
    make_tls_certificate,
    peer_id_from_public_key,
    peer_id_from_tls_certificate,
    public_key_from_peer_id,
    verify_signature,
)


def test_identity_is_created_once_then_loaded(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "peer.key"
    first = load_or_create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = load_or_create_identity(path)
    assert second.peer_id == first.peer_id
    assert second.public_key == first.public_key
    assert [p.name for p in path.parent.iterdir()] == ["peer.key"]  # no temp file left


def test_peer_id_is_the_libp2p_peer_id_of_the_stored_key(tmp_path: Path) -> None:
    path = tmp_path / "peer.key"
    identity = load_or_create_identity(path)
    libp2p_key = deserialize_private_key(path.read_bytes())
    assert ID.from_pubkey(libp2p_key.get_public_key()).to_base58() == identity.peer_id
    assert identity.peer_id.startswith("12D3KooW")
    assert ID.from_pubkey(identity.key_pair().public_key).to_base58() == identity.peer_id


def test_a_libp2p_generated_key_loads_with_the_same_peer_id() -> None:
    pair = create_new_key_pair()
    identity = identity_from_bytes(pair.private_key.serialize())
    assert identity.peer_id == ID.from_pubkey(pair.public_key).to_base58()


def test_go_libp2p_64_byte_keys_load() -> None:
    pair = create_new_key_pair()
    seed, public = pair.private_key.to_bytes(), pair.public_key.to_bytes()
    # protobuf PrivateKey{Type: Ed25519 (1), Data: seed | public}
    blob = b"\x08\x01\x12\x40" + seed + public
    assert identity_from_bytes(blob).peer_id == ID.from_pubkey(pair.public_key).to_base58()
    with pytest.raises(LayerswarmError, match="does not match"):
        identity_from_bytes(b"\x08\x01\x12\x40" + seed + bytes(32))


@pytest.mark.parametrize(
    "blob",
    [b"", b"garbage", b"\x08\x00\x12\x20" + bytes(32), b"\x08\x01\x12\x03abc", b"\xff" * 40],
)
def test_a_corrupt_key_file_raises_layerswarm_error(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "peer.key"
    path.write_bytes(blob)
    path.chmod(0o600)
    with pytest.raises(LayerswarmError):
        load_or_create_identity(path)


def test_signatures_verify_only_for_the_right_key_and_data() -> None:
    alice, bob = generate_identity(), generate_identity()
    signature = alice.sign(b"record")
    assert Identity.verify(alice.public_key, b"record", signature)
    assert not Identity.verify(alice.public_key, b"recorD", signature)
    assert not Identity.verify(bob.public_key, b"record", signature)
    # Flip a bit: a last byte set to 0 left the signature unchanged 1 time in 256.
    assert not verify_signature(
        alice.public_key, b"record", signature[:-1] + bytes([signature[-1] ^ 1])
    )
    assert not verify_signature(b"short", b"record", signature)
    assert not verify_signature(b"\xff" * 32, b"record", signature)


def test_peer_id_and_public_key_convert_both_ways() -> None:
    identity = generate_identity()
    assert peer_id_from_public_key(identity.public_key) == identity.peer_id
    assert public_key_from_peer_id(identity.peer_id) == identity.public_key
    with pytest.raises(ValueError):
        peer_id_from_public_key(b"too short")
    for bad in ["", "not-base58-0OIl", "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"]:
        with pytest.raises(ValueError):
            public_key_from_peer_id(bad)


def test_tls_certificate_proves_its_identity() -> None:
    identity = generate_identity()
    cert_pem, key_pem = make_tls_certificate(identity)
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    assert peer_id_from_tls_certificate(der) == identity.peer_id
    assert serialization.load_pem_private_key(key_pem, None) is not None


def _certificate(tls_key: ec.EllipticCurvePrivateKey, proof: bytes | None) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    start = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(tls_key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
    )
    if proof is not None:
        extension = x509.UnrecognizedExtension(TLS_EXTENSION_OID, proof)
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(tls_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_tls_certificate_with_a_proof_for_another_key_is_refused() -> None:
    identity = generate_identity()
    key, other_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    other_spki = other_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    stolen = identity.public_key + identity.sign(TLS_SIGNATURE_PREFIX + other_spki)
    assert peer_id_from_tls_certificate(_certificate(other_key, stolen)) == identity.peer_id
    with pytest.raises(ValueError, match="signature"):
        peer_id_from_tls_certificate(_certificate(key, stolen))
    with pytest.raises(ValueError, match="no layerswarm identity proof"):
        peer_id_from_tls_certificate(_certificate(key, None))
    with pytest.raises(ValueError, match="96"):
        peer_id_from_tls_certificate(_certificate(key, b"short"))
    with pytest.raises(ValueError, match="unreadable"):
        peer_id_from_tls_certificate(b"not a certificate")
