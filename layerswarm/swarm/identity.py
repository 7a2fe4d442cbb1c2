"""Who a peer is: its persistent Ed25519 key, its libp2p peer ID, and the proofs of both.

The key is stored in py-libp2p's protobuf format and the peer ID is computed by py-libp2p, so
a peer has the same ID on the DHT and on the data plane. This is the only module of ours that
imports libp2p.

A TLS certificate made here carries the peer's Ed25519 public key and its signature over the
certificate's own public key (the libp2p-TLS idea); `peer_id_from_tls_certificate` checks that
proof on the other side of a handshake.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey, create_new_key_pair
from libp2p.crypto.keys import KeyPair, KeyType, PrivateKey
from libp2p.peer.id import ID

from layerswarm.errors import LayerswarmError

log = logging.getLogger(__name__)

PUBLIC_KEY_BYTES = 32  # bytes: a raw Ed25519 public key
SIGNATURE_BYTES = 64  # bytes: an Ed25519 signature
TLS_SIGNATURE_PREFIX = b"layerswarm-tls:"

# A private OID of our own, 2.25.<UUID> (ITU-T X.667), naming the certificate extension that
# holds `public key (32 bytes) | signature (64 bytes)` over TLS_SIGNATURE_PREFIX + SPKI DER.
TLS_EXTENSION_OID = x509.ObjectIdentifier("2.25.311645816450437529841049009435150650079")


@dataclass(frozen=True, eq=False)
class Identity:
    """A peer's key pair and the libp2p peer ID derived from it."""

    private_key: PrivateKey = field(repr=False)  # py-libp2p Ed25519 private key
    public_key: bytes  # raw 32-byte Ed25519 public key
    peer_id: str  # base58 libp2p peer ID, "12D3KooW..."

    def sign(self, data: bytes) -> bytes:
        """Sign `data`; returns a 64-byte Ed25519 signature."""
        return self.private_key.sign(data)

    @staticmethod
    def verify(public_key: bytes, data: bytes, signature: bytes) -> bool:
        """Whether `signature` is `public_key`'s signature of `data`; never raises."""
        return verify_signature(public_key, data, signature)

    def key_pair(self) -> KeyPair:
        """The libp2p key pair, for starting a libp2p host with this identity."""
        return KeyPair(self.private_key, self.private_key.get_public_key())

    def serialize(self) -> bytes:
        """The private key in libp2p's protobuf format (what the key file holds)."""
        return self.private_key.serialize()


def generate_identity() -> Identity:
    """A new random identity, not stored anywhere."""
    return _identity_from_private_key(create_new_key_pair().private_key)


def identity_from_bytes(data: bytes) -> Identity:
    """Read an identity from libp2p's protobuf private-key format.

    Args:
        data: a serialized libp2p Ed25519 private key; a 32-byte seed (py-libp2p) or a 64-byte
            seed-and-public-key (go-libp2p) inside.

    Raises:
        LayerswarmError: `data` is not a libp2p Ed25519 private key.
    """
    try:
        proto = PrivateKey.deserialize_from_protobuf(data)
    except Exception as exc:  # protobuf raises its own DecodeError and others
        raise LayerswarmError(f"not a libp2p private key: {exc}") from exc
    if proto.key_type != KeyType.Ed25519.value:
        raise LayerswarmError(f"key type {proto.key_type} is not Ed25519")
    seed = bytes(proto.data)
    if len(seed) == 2 * PUBLIC_KEY_BYTES:  # go-libp2p keeps seed | public key
        seed, public = seed[:PUBLIC_KEY_BYTES], seed[PUBLIC_KEY_BYTES:]
    else:
        public = None
    if len(seed) != PUBLIC_KEY_BYTES:
        raise LayerswarmError(f"Ed25519 private key has {len(seed)} bytes, expected 32 or 64")
    identity = _identity_from_private_key(Ed25519PrivateKey.from_bytes(seed))
    if public is not None and public != identity.public_key:
        raise LayerswarmError("Ed25519 private key does not match its stored public key")
    return identity


def load_or_create_identity(path: Path) -> Identity:
    """Load the identity stored at `path`, creating it (mode 0600, parent dirs) if absent.

    Two processes racing to create the same file end up with the same identity: the file is
    written aside and hard-linked into place, and the loser loads the winner's key.

    Raises:
        LayerswarmError: the file exists but holds no valid key.
        OSError: the file or its folder cannot be read or written.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        identity = generate_identity()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(identity.serialize())
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)
            log.info("created identity %s at %s", identity.peer_id, path)
            return identity
        except FileExistsError:
            pass  # another process won the race: load its key below
        finally:
            tmp.unlink(missing_ok=True)
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("identity file %s is readable by others (mode %o)", path, mode & 0o777)
    try:
        return identity_from_bytes(path.read_bytes())
    except LayerswarmError as exc:
        raise LayerswarmError(f"{path}: {exc}") from exc


def verify_signature(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """Whether `signature` is the Ed25519 signature of `data` by `public_key`; never raises."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        return Ed25519PublicKey.from_bytes(public_key).verify(data, signature)
    except ValueError:  # not a point on the curve, and the like
        return False


def peer_id_from_public_key(public_key: bytes) -> str:
    """The base58 libp2p peer ID of a raw 32-byte Ed25519 public key.

    Raises:
        ValueError: `public_key` is not 32 bytes.
    """
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"Ed25519 public key has {len(public_key)} bytes, expected 32")
    return ID.from_pubkey(Ed25519PublicKey.from_bytes(public_key)).to_base58()


def public_key_from_peer_id(peer_id: str) -> bytes:
    """The raw Ed25519 public key that a peer ID embeds (Ed25519 IDs inline their key).

    Raises:
        ValueError: `peer_id` is not the base58 libp2p ID of an Ed25519 key.
    """
    try:
        key = ID.from_base58(peer_id).extract_public_key()
    except Exception as exc:  # base58 raises ValueError; be safe with any input
        raise ValueError(f"not a peer ID: {peer_id!r}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"not the peer ID of an Ed25519 key: {peer_id!r}")
    return key.to_bytes()


def _identity_from_private_key(private_key: PrivateKey) -> Identity:
    public = private_key.get_public_key()
    return Identity(
        private_key=private_key,
        public_key=public.to_bytes(),
        peer_id=ID.from_pubkey(public).to_base58(),
    )


# --- TLS certificates that prove a peer ID ---------------------------------------------------
#
# Python's ssl module has no certificate-verify callback, so a server that asks for client
# certificates (mutual TLS) must verify their chain against a trusted issuer. Every layerswarm
# certificate is therefore issued by one shared issuer whose key is derived from a public
# constant: the chain proves nothing, anyone can issue such a certificate. The proof of identity
# is the extension, checked after the handshake, which is libp2p-TLS's trust model (it accepts
# any self-signed certificate and checks its extension).

_FOREVER_START = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
_FOREVER_END = datetime.datetime(9999, 12, 31, tzinfo=datetime.timezone.utc)
_ISSUER_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "layerswarm shared issuer")])

_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _issuer_key() -> ed25519.Ed25519PrivateKey:
    seed = hashlib.sha256(b"layerswarm shared TLS issuer: a public constant, not a secret").digest()
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)


def shared_issuer_certificate_pem() -> bytes:
    """The certificate of the public issuer of every layerswarm TLS certificate (PEM)."""
    key = _issuer_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_ISSUER_NAME)
        .issuer_name(_ISSUER_NAME)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(_FOREVER_START)
        .not_valid_after(_FOREVER_END)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def make_tls_certificate(identity: Identity) -> tuple[bytes, bytes]:
    """A fresh P-256 TLS key and a certificate that proves `identity` holds it.

    Returns:
        (certificate PEM, private key PEM), ready for `ssl.SSLContext.load_cert_chain`.
    """
    tls_key = ec.generate_private_key(ec.SECP256R1())
    spki = tls_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    proof = identity.public_key + identity.sign(TLS_SIGNATURE_PREFIX + spki)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.peer_id)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(_ISSUER_NAME)
        .public_key(tls_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_FOREVER_START)
        .not_valid_after(_FOREVER_END)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.UnrecognizedExtension(TLS_EXTENSION_OID, proof), critical=False)
        .sign(_issuer_key(), None)
    )
    key_pem = tls_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def peer_id_from_tls_certificate(der: bytes) -> str:
    """Check the identity proof in a peer's TLS certificate and return the proven peer ID.

    The TLS handshake has already shown that the peer holds the certificate's key; the
    extension shows that the holder of an Ed25519 identity key vouched for that key.

    Raises:
        ValueError: the certificate is unreadable, has no proof, or the proof is wrong.
    """
    try:
        cert = x509.load_der_x509_certificate(der)
        proof = cert.extensions.get_extension_for_oid(TLS_EXTENSION_OID).value
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except x509.ExtensionNotFound as exc:
        raise ValueError("TLS certificate carries no layerswarm identity proof") from exc
    except Exception as exc:  # cryptography raises ValueError and others on bad DER
        raise ValueError(f"unreadable TLS certificate: {exc}") from exc
    if not isinstance(proof, x509.UnrecognizedExtension):
        raise ValueError("TLS certificate's identity proof has an unexpected form")
    blob = proof.value
    if len(blob) != PUBLIC_KEY_BYTES + SIGNATURE_BYTES:
        raise ValueError(f"TLS identity proof has {len(blob)} bytes, expected 96")
    public_key, signature = blob[:PUBLIC_KEY_BYTES], blob[PUBLIC_KEY_BYTES:]
    if not verify_signature(public_key, TLS_SIGNATURE_PREFIX + spki, signature):
        raise ValueError("TLS identity proof: the signature does not match the certificate key")
    return peer_id_from_public_key(public_key)
