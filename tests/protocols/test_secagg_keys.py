"""Pair keys and sealed payloads: RFC vectors pin the primitives, every failure is SealError."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from protocols.secagg.keys import (
    SealError,
    generate_keypair,
    hkdf_sha256,
    load_private_key,
    open_sealed,
    pair_info,
    pair_key,
    private_bytes,
    public_bytes,
    seal,
    share_associated_data,
    shared_secret,
)

# RFC 5869 appendix A.1, test case 1 (SHA-256): IKM = 0x0b * 22, salt = 0x00..0x0c,
# info = 0xf0..0xf9, L = 42
HKDF_IKM = bytes([0x0B] * 22)
HKDF_SALT = bytes(range(0x00, 0x0D))
HKDF_INFO = bytes(range(0xF0, 0xFA))
HKDF_OKM = bytes.fromhex(
    "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
)
# RFC 7748 §6.1 (X25519 Diffie–Hellman)
ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_PRIVATE = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PUBLIC = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
X25519_SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
# RFC 8439 §2.8.2 (AEAD_CHACHA20_POLY1305): key 0x80..0x9f, nonce, AAD, the "sunscreen" text
AEAD_KEY = bytes(range(0x80, 0xA0))
AEAD_NONCE = bytes.fromhex("070000004041424344454647")
AEAD_AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
AEAD_PLAINTEXT = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the "
    b"future, sunscreen would be it."
)
AEAD_CIPHERTEXT_AND_TAG = bytes.fromhex(
    "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d63dbea45e8ca9671282fafb69"
    "da92728b1a71de0a9e060b2905d6a5b67ecd3b3692ddbd7f2d778b8c9803aee328091b58fab324e4fad67594"
    "5585808b4831d7bc3ff4def08e4b7a9de576d26586cec64b6116"
    "1ae10b594f09e26a7e902ecbd0600691"
)
SALT = b"fedtune-test-salt"
Tamper = Callable[[bytes, bytes, bytes], tuple[bytes, bytes, bytes]]


def test_hkdf_rfc5869_case_1() -> None:
    assert hkdf_sha256(HKDF_IKM, salt=HKDF_SALT, info=HKDF_INFO, length=42) == HKDF_OKM


def test_x25519_rfc7748_vector_and_shared_secret_is_hkdf_of_it() -> None:
    alice = load_private_key(ALICE_PRIVATE)
    assert public_bytes(alice.public_key()) == ALICE_PUBLIC
    assert private_bytes(alice) == ALICE_PRIVATE
    assert alice.exchange(X25519PublicKey.from_public_bytes(BOB_PUBLIC)) == X25519_SHARED
    # shared_secret = HKDF-SHA256(X25519(a, B), salt, info), the same from both ends
    expected = hkdf_sha256(X25519_SHARED, salt=SALT, info=b"ctx", length=32)
    assert shared_secret(alice, BOB_PUBLIC, salt=SALT, info=b"ctx") == expected
    bob = load_private_key(BOB_PRIVATE)
    assert shared_secret(bob, ALICE_PUBLIC, salt=SALT, info=b"ctx") == expected


def test_pair_key_is_symmetric_and_bound_to_purpose_round_and_pair() -> None:
    # Prepare
    (a, a_pub), (b, b_pub), (_, c_pub) = generate_keypair(), generate_keypair(), generate_keypair()
    b_raw, c_raw = public_bytes(b_pub), public_bytes(c_pub)
    # Execute
    ab = pair_key(a, b_raw, purpose="mask", round_id=3, own_id=10, peer_id=20, salt=SALT)
    ba = pair_key(b, public_bytes(a_pub), purpose="mask", round_id=3, own_id=20, peer_id=10,
                  salt=SALT)
    others = [
        pair_key(a, b_raw, purpose="seal", round_id=3, own_id=10, peer_id=20, salt=SALT),
        pair_key(a, b_raw, purpose="mask", round_id=4, own_id=10, peer_id=20, salt=SALT),
        pair_key(a, b_raw, purpose="mask", round_id=3, own_id=10, peer_id=21, salt=SALT),
        pair_key(a, c_raw, purpose="mask", round_id=3, own_id=10, peer_id=20, salt=SALT),
        pair_key(a, b_raw, purpose="mask", round_id=3, own_id=10, peer_id=20, salt=b"other"),
    ]
    # Assert
    assert ab == ba and len(ab) == 32
    assert len({ab, *others}) == 6


def test_pair_info_layout() -> None:
    info = pair_info(purpose="mask", round_id=1, node_a=7, node_b=2)
    assert info == pair_info(purpose="mask", round_id=1, node_a=2, node_b=7)
    assert info == b"fedtune/secagg/v1|mask|" + bytes.fromhex(
        "0000000000000001" "0000000000000002" "0000000000000007"
    )
    with pytest.raises(ValueError, match=r"^a pair needs two distinct nodes, got 7 twice$"):
        pair_info(purpose="mask", round_id=1, node_a=7, node_b=7)
    with pytest.raises(ValueError, match=r"ids and rounds must be integers in \[0, 2\*\*64\)"):
        pair_info(purpose="mask", round_id=-1, node_a=1, node_b=2)
    with pytest.raises(ValueError, match="purpose must be 'mask' or 'seal', got 'x'"):
        pair_info(purpose="x", round_id=1, node_a=1, node_b=2)  # type: ignore[arg-type]


def test_shared_secret_refusals() -> None:
    private, _ = generate_keypair()
    with pytest.raises(ValueError, match=r"^peer public key must be 32 bytes, got 31$"):
        shared_secret(private, bytes(31), salt=SALT, info=b"i")
    with pytest.raises(ValueError, match=r"^info must be non-empty bytes"):
        shared_secret(private, BOB_PUBLIC, salt=SALT, info=b"")
    with pytest.raises(TypeError, match=r"^salt: expected bytes, got NoneType$"):
        shared_secret(private, BOB_PUBLIC, salt=None, info=b"i")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^peer public key is a low-order point"):
        shared_secret(private, bytes(32), salt=SALT, info=b"i")
    with pytest.raises(ValueError, match=r"^private key must be 32 bytes, got 33$"):
        load_private_key(bytes(33))


def test_seal_matches_rfc8439_with_injected_nonce() -> None:
    sealed = seal(AEAD_KEY, AEAD_PLAINTEXT, associated_data=AEAD_AAD, nonce=AEAD_NONCE)
    assert sealed == AEAD_NONCE + AEAD_CIPHERTEXT_AND_TAG
    assert open_sealed(AEAD_KEY, sealed, associated_data=AEAD_AAD) == AEAD_PLAINTEXT


def test_seal_round_trip_with_random_nonces() -> None:
    key, ad = bytes(range(32)), share_associated_data(round_id=1, sender=5, receiver=9)
    first, second = (seal(key, b"shares", associated_data=ad) for _ in range(2))
    assert first != second  # fresh nonce each time
    assert open_sealed(key, first, associated_data=ad) == b"shares"
    assert open_sealed(key, second, associated_data=ad) == b"shares"
    assert open_sealed(key, seal(key, b"", associated_data=b""), associated_data=b"") == b""


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 1]) + data[index + 1 :]


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda s, ad, k: (_flip(s, 20), ad, k), id="ciphertext"),
        pytest.param(lambda s, ad, k: (_flip(s, 0), ad, k), id="nonce"),
        pytest.param(lambda s, ad, k: (_flip(s, len(s) - 1), ad, k), id="tag"),
        pytest.param(lambda s, ad, k: (s[:-1], ad, k), id="truncated"),
        pytest.param(lambda s, ad, k: (s[:27], ad, k), id="shorter-than-nonce-and-tag"),
        pytest.param(lambda s, ad, k: (b"", ad, k), id="empty"),
        pytest.param(lambda s, ad, k: (s, _flip(ad, 3), k), id="associated-data"),
        pytest.param(
            lambda s, ad, k: (s, share_associated_data(round_id=1, sender=9, receiver=5), k),
            id="reflected-direction",
        ),
        pytest.param(lambda s, ad, k: (s, ad, _flip(k, 0)), id="wrong-key"),
    ],
)
def test_any_tampering_raises_one_silent_seal_error(tamper: Tamper) -> None:
    key, ad = bytes(range(32)), share_associated_data(round_id=1, sender=5, receiver=9)
    sealed = seal(key, b"b-share|s-share", associated_data=ad)
    data, ad2, key2 = tamper(sealed, ad, key)
    with pytest.raises(SealError) as info:
        open_sealed(key2, data, associated_data=ad2)
    assert str(info.value) == "" and info.value.__cause__ is None


def test_seal_argument_checks_are_precise() -> None:
    with pytest.raises(ValueError, match=r"^key must be 32 bytes, got 16$"):
        seal(bytes(16), b"x", associated_data=b"")
    with pytest.raises(ValueError, match=r"^nonce must be 12 bytes, got 8$"):
        seal(bytes(32), b"x", associated_data=b"", nonce=bytes(8))
    with pytest.raises(TypeError, match=re.escape("associated_data: expected bytes, got str")):
        open_sealed(bytes(32), bytes(40), associated_data="ad")  # type: ignore[arg-type]
