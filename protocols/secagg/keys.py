"""Key agreement and sealed share payloads for secure aggregation.

Every pair of clients derives two symmetric keys without talking to each other directly
(Bonawitz et al., CCS 2017, §4, rounds 0–2): X25519 Diffie–Hellman (RFC 7748) on public keys
relayed by the coordinator, then HKDF-SHA256 (RFC 5869) with an ``info`` that binds the
purpose, the round and the two node ids in canonical order, so the same pair gets unrelated
keys per purpose and per round. Each client needs **two** key pairs per round:

* a *seal* pair ``(c_u)``: its pair keys encrypt the Shamir shares sent to each peer through
  the coordinator (:func:`seal` / :func:`open_sealed`, ChaCha20-Poly1305, RFC 8439);
* a *mask* pair ``(s_u)``: its pair keys seed the pairwise masks. Its private half is
  Shamir-shared so that the coordinator can remove a dropped client's masks.

They must differ: revealing a dropped client's mask key must not let the coordinator open the
share payloads that client exchanged, which hold shares of *other* clients' secrets.

Checks come first with exact messages; every failure to open a sealed payload is one
:class:`SealError` with no detail, as with ``cryptography.exceptions.InvalidTag``.
"""

from __future__ import annotations

import os
import struct
from typing import Final, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
#: Domain separation prefix of every HKDF ``info`` and associated data we build.
LABEL: Final = b"fedtune/secagg/v1"

Purpose = Literal["mask", "seal"]
_U64 = 1 << 64


class SealError(Exception):
    """A sealed payload did not open. Deliberately carries no detail."""


def generate_keypair() -> tuple[X25519PrivateKey, X25519PublicKey]:
    """A fresh X25519 key pair from the OS CSPRNG; generate new pairs every round."""
    private = X25519PrivateKey.generate()
    return private, private.public_key()


def public_bytes(public_key: X25519PublicKey) -> bytes:
    """The raw 32-byte public key, the form relayed by the coordinator."""
    if not isinstance(public_key, X25519PublicKey):
        raise TypeError(f"expected an X25519PublicKey, got {type(public_key).__name__}")
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(private_key: X25519PrivateKey) -> bytes:
    """The raw 32-byte private key: the secret ``s_u`` a client Shamir-shares."""
    if not isinstance(private_key, X25519PrivateKey):
        raise TypeError(f"expected an X25519PrivateKey, got {type(private_key).__name__}")
    return private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def load_private_key(raw: bytes) -> X25519PrivateKey:
    """Load a raw 32-byte private key, e.g. one reconstructed from Shamir shares."""
    _check_len("private key", raw, KEY_BYTES)
    return X25519PrivateKey.from_private_bytes(raw)


def shared_secret(
    private_key: X25519PrivateKey, peer_public_bytes: bytes, *, salt: bytes, info: bytes
) -> bytes:
    """X25519 with the peer's raw public key, then HKDF-SHA256 to 32 bytes.

    ``salt`` and ``info`` are required (HKDF, RFC 5869 §3): ``info`` must bind what the key is
    for, e.g. :func:`pair_info`. Raises ``ValueError`` for a public key that is not 32 bytes or
    is a low-order point (the raw shared secret would be all zeros).
    """
    if not isinstance(private_key, X25519PrivateKey):
        raise TypeError(f"expected an X25519PrivateKey, got {type(private_key).__name__}")
    _check_len("peer public key", peer_public_bytes, KEY_BYTES)
    _check_kdf_inputs(salt, info)
    peer = X25519PublicKey.from_public_bytes(peer_public_bytes)
    try:
        raw = private_key.exchange(peer)
    except ValueError:
        raise ValueError("peer public key is a low-order point; refusing the exchange") from None
    return hkdf_sha256(raw, salt=salt, info=info, length=KEY_BYTES)


def hkdf_sha256(ikm: bytes, *, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869) with required ``salt`` and non-empty ``info``."""
    _check_kdf_inputs(salt, info)
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def pair_info(*, purpose: Purpose, round_id: int, node_a: int, node_b: int) -> bytes:
    """HKDF ``info`` for the key of an unordered node pair: both ends derive the same bytes.

    ``LABEL | purpose | round | min(id) | max(id)``, integers as 8-byte big-endian.
    """
    if purpose not in ("mask", "seal"):
        raise ValueError(f"purpose must be 'mask' or 'seal', got {purpose!r}")
    if node_a == node_b:
        raise ValueError(f"a pair needs two distinct nodes, got {node_a} twice")
    lo, hi = sorted((node_a, node_b))
    return b"|".join((LABEL, purpose.encode(), _u64s(round_id, lo, hi)))


def pair_key(
    private_key: X25519PrivateKey,
    peer_public_bytes: bytes,
    *,
    purpose: Purpose,
    round_id: int,
    own_id: int,
    peer_id: int,
    salt: bytes,
) -> bytes:
    """The 32-byte key a node shares with one peer for ``purpose`` in round ``round_id``.

    Symmetric: ``pair_key(s_u, pk_v, own_id=u, peer_id=v)`` equals ``pair_key(s_v, pk_u,
    own_id=v, peer_id=u)``, which is how the coordinator recomputes a dropped client's mask
    seeds from its reconstructed private key.
    """
    info = pair_info(purpose=purpose, round_id=round_id, node_a=own_id, node_b=peer_id)
    return shared_secret(private_key, peer_public_bytes, salt=salt, info=info)


def share_associated_data(*, round_id: int, sender: int, receiver: int) -> bytes:
    """Associated data of a share payload: direction matters, so a reflected payload fails."""
    return b"|".join((LABEL, b"shares", _u64s(round_id, sender, receiver)))


def seal(
    key: bytes, plaintext: bytes, *, associated_data: bytes, nonce: bytes | None = None
) -> bytes:
    """ChaCha20-Poly1305: ``nonce (12) | ciphertext | tag (16)``.

    The nonce is random unless given; pass one only in tests (a repeated nonce under one key
    breaks confidentiality and authenticity).
    """
    _check_len("key", key, KEY_BYTES)
    if not isinstance(associated_data, bytes):
        raise TypeError(f"associated_data: expected bytes, got {type(associated_data).__name__}")
    if nonce is None:
        nonce = os.urandom(NONCE_BYTES)
    _check_len("nonce", nonce, NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated_data)


def open_sealed(key: bytes, data: bytes, *, associated_data: bytes) -> bytes:
    """Inverse of :func:`seal`; any truncation or tampering raises :class:`SealError`."""
    _check_len("key", key, KEY_BYTES)
    if not isinstance(associated_data, bytes):
        raise TypeError(f"associated_data: expected bytes, got {type(associated_data).__name__}")
    if not isinstance(data, bytes) or len(data) < NONCE_BYTES + TAG_BYTES:
        raise SealError()
    try:
        return ChaCha20Poly1305(key).decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:],
                                             associated_data)
    except InvalidTag:
        raise SealError() from None


def _u64s(*values: int) -> bytes:
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _U64:
            raise ValueError(f"ids and rounds must be integers in [0, 2**64), got {value!r}")
    return struct.pack(f">{len(values)}Q", *values)


def _check_kdf_inputs(salt: bytes, info: bytes) -> None:
    if not isinstance(salt, bytes):
        raise TypeError(f"salt: expected bytes, got {type(salt).__name__}")
    if not isinstance(info, bytes) or not info:
        raise ValueError("info must be non-empty bytes that bind the round and the node pair")


def _check_len(name: str, value: object, size: int) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"{name}: expected bytes, got {type(value).__name__}")
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")
