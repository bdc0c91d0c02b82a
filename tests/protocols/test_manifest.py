"""Signed base-model manifest: round trip, each tampering refused with its reason, RFC 8032."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    FileEntry,
    Manifest,
    ManifestError,
    ManifestMismatch,
    ManifestSignatureError,
    SignedManifest,
    build_manifest,
    generate_signing_key,
    key_fingerprint,
    load_private_key,
    load_public_key,
    public_key_bytes,
    save_private_key,
    sign_directory,
    sign_manifest,
    verify_directory,
    verify_manifest,
    write_signed_manifest,
)

CREATED = "2026-11-01T00:00:00+00:00"
REFUSAL = (
    "refusing to train on a base model that does not match the coordinator's signed manifest; "
    "re-fetch the model from the coordinator"
)
# FIPS 180-2, appendix B.1: sha256("abc")
SHA256_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
# RFC 8032 §7.1, TEST 1 (empty message)
RFC_SECRET = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
RFC_PUBLIC = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
RFC_SIGNATURE = (
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555"
    "fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)

TREE = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": bytes(range(256)) * 8,
    "tokenizer/vocab.txt": b"a\nb\nc\n",
    "abc.txt": b"abc",
}


def exactly(message: str) -> str:
    """A ``pytest.raises(match=...)`` pattern that accepts only ``message`` itself."""
    return f"^{re.escape(message)}$"


def make_tree(root: Path, files: dict[str, bytes] = TREE) -> Path:
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    return root


@pytest.fixture()
def key() -> Ed25519PrivateKey:
    return generate_signing_key()


@pytest.fixture()
def signed(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    root = make_tree(tmp_path / "model")
    write_signed_manifest(root, key, created=CREATED, label="tiny")
    return root


# --- round trip and canonical form -------------------------------------------------------


def test_round_trip_returns_the_signed_manifest(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    root = make_tree(tmp_path / "model")
    written = write_signed_manifest(root, key, created=CREATED, label="tiny")
    assert verify_directory(root, key.public_key()) == written
    assert written == build_manifest(root, created=CREATED, label="tiny")
    assert sorted(written.files) == ["abc.txt", "config.json", "model.safetensors",
                                     "tokenizer/vocab.txt"]
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["abc.txt", "config.json", "model.safetensors", "tokenizer", MANIFEST_NAME,
         SIGNATURE_NAME])  # no temporary file left behind


def test_file_entries_are_sha256_and_size(signed: Path) -> None:
    manifest = build_manifest(signed, created=CREATED)
    assert manifest.files["abc.txt"] == FileEntry(sha256=SHA256_ABC, size=3)
    content = TREE["model.safetensors"]
    assert manifest.files["model.safetensors"] == FileEntry(
        sha256=hashlib.sha256(content).hexdigest(), size=len(content))


def test_canonical_bytes_golden() -> None:
    manifest = Manifest(files={"a.bin": FileEntry(SHA256_ABC, 3)}, created=CREATED, label="tiny")
    assert manifest.canonical_bytes() == (
        b'{"created":"2026-11-01T00:00:00+00:00","files":{"a.bin":{"sha256":"'
        + SHA256_ABC.encode() + b'","size":3}},"format":"fedtune-manifest/1","label":"tiny"}'
    )


def test_canonical_bytes_do_not_depend_on_creation_order(tmp_path: Path) -> None:
    first = make_tree(tmp_path / "a")
    second = make_tree(tmp_path / "b", dict(reversed(TREE.items())))
    one, two = build_manifest(first, created=CREATED), build_manifest(second, created=CREATED)
    assert one.canonical_bytes() == two.canonical_bytes()
    assert build_manifest(first, created=CREATED).canonical_bytes() == one.canonical_bytes()


def test_rewriting_the_manifest_ignores_the_old_one(signed: Path, key: Ed25519PrivateKey) -> None:
    before = (signed / MANIFEST_NAME).read_bytes()
    write_signed_manifest(signed, key, created=CREATED, label="tiny")
    assert (signed / MANIFEST_NAME).read_bytes() == before


def test_default_created_is_an_iso_utc_time(tmp_path: Path) -> None:
    created = build_manifest(make_tree(tmp_path)).created
    assert created.endswith("+00:00") and "T" in created


def test_large_file_is_hashed_in_full(tmp_path: Path) -> None:
    content = np.random.default_rng(0).bytes(5 * 2**20 + 123)  # 5 MB, not a multiple of 1 MiB
    (tmp_path / "model.safetensors").write_bytes(content)
    entry = build_manifest(tmp_path, created=CREATED).files["model.safetensors"]
    assert entry == FileEntry(sha256=hashlib.sha256(content).hexdigest(), size=len(content))


def test_signature_is_plain_ed25519_over_canonical_bytes(key: Ed25519PrivateKey) -> None:
    manifest = Manifest(files={"a.bin": FileEntry(SHA256_ABC, 3)}, created=CREATED)
    signature = sign_manifest(manifest, key)
    assert len(signature) == 64
    key.public_key().verify(signature, manifest.canonical_bytes())  # raises if not


# --- tampering with the files -------------------------------------------------------------


def _flip_byte(root: Path) -> None:
    path = root / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))


def _add_shard(root: Path) -> None:
    (root / "model-00002-of-00002.safetensors").write_bytes(b"evil")


def _swap_same_size(root: Path) -> None:
    (root / "abc.txt").write_bytes(b"abd")


def _grow(root: Path) -> None:
    with open(root / "config.json", "ab") as fh:
        fh.write(b" ")


TAMPERED_FILES = [
    (_flip_byte, "changed files `model.safetensors`"),
    (_swap_same_size, "changed files `abc.txt`"),
    (_grow, "changed files `config.json`"),
    (lambda root: (root / "tokenizer" / "vocab.txt").unlink(),
     "missing files `tokenizer/vocab.txt`"),
    (_add_shard, "unexpected files `model-00002-of-00002.safetensors`"),
    (lambda root: (root / "tokenizer" / "extra.json").write_bytes(b"{}"),
     "unexpected files `tokenizer/extra.json`"),
]


@pytest.mark.parametrize(("tamper", "detail"), TAMPERED_FILES)
def test_tampered_files_are_refused_with_reason(
    signed: Path, key: Ed25519PrivateKey, tamper: Callable[[Path], None], detail: str
) -> None:
    tamper(signed)
    with pytest.raises(ManifestMismatch) as err:
        verify_directory(signed, key.public_key())
    assert str(err.value) == f"{signed}: {detail}; {REFUSAL}"


def test_all_differences_are_reported_together(signed: Path, key: Ed25519PrivateKey) -> None:
    (signed / "abc.txt").unlink()
    _flip_byte(signed)
    _add_shard(signed)
    with pytest.raises(ManifestMismatch) as err:
        verify_directory(signed, key.public_key())
    assert str(err.value) == (
        f"{signed}: missing files `abc.txt`; changed files `model.safetensors`; "
        f"unexpected files `model-00002-of-00002.safetensors`; {REFUSAL}"
    )
    assert err.value.missing == ("abc.txt",)
    assert err.value.changed == ("model.safetensors",)
    assert err.value.unexpected == ("model-00002-of-00002.safetensors",)


def test_long_lists_are_shortened(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    root = make_tree(tmp_path, {f"shard-{i}.bin": b"x" for i in range(5)})
    write_signed_manifest(root, key, created=CREATED)
    for i in range(5):
        (root / f"shard-{i}.bin").unlink()
    with pytest.raises(ManifestMismatch) as err:
        verify_directory(root, key.public_key())
    assert str(err.value) == (
        f"{root}: missing files `shard-0.bin`, `shard-1.bin`, `shard-2.bin` and 2 more; {REFUSAL}"
    )


# --- tampering with the manifest or the signature ---------------------------------------


def _swap_two_hashes(root: Path) -> None:
    path = root / MANIFEST_NAME
    doc = json.loads(path.read_bytes())
    files = doc["files"]
    files["abc.txt"]["sha256"], files["config.json"]["sha256"] = (
        files["config.json"]["sha256"], files["abc.txt"]["sha256"])
    path.write_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())


def _flip_signature(root: Path) -> None:
    path = root / SIGNATURE_NAME
    data = bytearray(path.read_bytes())
    data[0] ^= 0x80
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "tamper",
    [
        _swap_two_hashes,
        _flip_signature,
        lambda root: (root / SIGNATURE_NAME).write_bytes((root / SIGNATURE_NAME).read_bytes()[:63]),
        lambda root: (root / SIGNATURE_NAME).write_bytes(b""),
        lambda root: write_signed_manifest(root, generate_signing_key(), created=CREATED),
    ],
    ids=["hash-swapped", "signature-flipped", "signature-short", "signature-empty", "other-key"],
)
def test_bad_signatures_are_one_silent_error(
    signed: Path, key: Ed25519PrivateKey, tamper: Callable[[Path], object]
) -> None:
    tamper(signed)
    with pytest.raises(ManifestSignatureError) as err:
        verify_directory(signed, key.public_key())
    assert str(err.value) == ""
    assert err.value.__cause__ is None and err.value.__suppress_context__


def _canonical(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _doc(**changes: object) -> dict[str, object]:
    doc: dict[str, object] = {"created": CREATED, "format": "fedtune-manifest/1", "label": "",
                              "files": {"a.bin": {"sha256": SHA256_ABC, "size": 3}}}
    doc.update(changes)
    return doc


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff\xfe{}", "manifest is not UTF-8; re-fetch it from the coordinator"),
        (_canonical(_doc())[:-7], "manifest is not valid JSON (Unterminated string starting at: "
         "line 1 column 175 (char 174)); it may be truncated, re-fetch it from the coordinator"),
        (b"", "manifest is not valid JSON (Expecting value: line 1 column 1 (char 0)); "
         "it may be truncated, re-fetch it from the coordinator"),
        (b"[]", "manifest: expected a JSON object, got list"),
        (_canonical({"files": {}}),
         "manifest: missing keys ['created', 'format', 'label'], unexpected keys []"),
        (_canonical(_doc(extra=1)), "manifest: missing keys [], unexpected keys ['extra']"),
        (_canonical(_doc(format="fedtune-manifest/2")),
         "format: expected 'fedtune-manifest/1', got 'fedtune-manifest/2'; update fedtune"),
        (_canonical(_doc(created="yesterday")), "created: expected ISO 8601, got 'yesterday'"),
        (_canonical(_doc(files={"../etc/passwd": {"sha256": SHA256_ABC, "size": 3}})),
         "`../etc/passwd`: expected a relative path without '', '.' or '..' parts"),
        (_canonical(_doc(files={"/etc/passwd": {"sha256": SHA256_ABC, "size": 3}})),
         "`/etc/passwd`: expected a relative path without '', '.' or '..' parts"),
        (_canonical(_doc(files={"a\nb.bin": {"sha256": SHA256_ABC, "size": 3}})),
         "'a\\nb.bin': expected a printable POSIX path without '\\'"),
        (_canonical(_doc(files={MANIFEST_NAME: {"sha256": SHA256_ABC, "size": 3}})),
         f"`{MANIFEST_NAME}`: the manifest cannot list itself"),
        (_canonical(_doc(files={"a.bin": {"sha256": "ABC", "size": 3}})),
         "`a.bin`: sha256: expected 64 lowercase hex digits, got 'ABC'"),
        (_canonical(_doc(files={"a.bin": {"sha256": SHA256_ABC, "size": -1}})),
         "`a.bin`: size: expected a non-negative integer, got -1"),
        (_canonical(_doc(files={"a.bin": {"sha256": SHA256_ABC}})),
         "`a.bin`: missing keys ['size'], unexpected keys []"),
        (json.dumps(_doc(), indent=2).encode(),
         "manifest is not in canonical form (sorted keys, no spaces); "
         "it was not written by fedtune, re-fetch it from the coordinator"),
    ],
)
def test_malformed_manifests_are_refused_with_reason(
    key: Ed25519PrivateKey, data: bytes, message: str
) -> None:
    # signed with the right key: a parse error must not hide behind a valid signature
    with pytest.raises(ManifestError) as err:
        verify_manifest(data, key.sign(data), key.public_key())
    assert str(err.value) == message


def test_missing_manifest_files_are_reported(signed: Path, key: Ed25519PrivateKey) -> None:
    (signed / SIGNATURE_NAME).unlink()
    with pytest.raises(ManifestError) as err:
        verify_directory(signed, key.public_key())
    assert str(err.value) == (
        f"{signed}: no {SIGNATURE_NAME}; fetch the signed manifest from the coordinator"
    )


def test_wrong_key_types_are_type_errors(key: Ed25519PrivateKey) -> None:
    manifest = Manifest(files={}, created=CREATED)
    with pytest.raises(TypeError,
                       match=exactly("expected an Ed25519PrivateKey, got Ed25519PublicKey")):
        sign_manifest(manifest, key.public_key())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=exactly("expected an Ed25519PublicKey, got bytes")):
        verify_manifest(manifest.canonical_bytes(), b"", b"")  # type: ignore[arg-type]


# --- symlinks and special files -----------------------------------------------------------


def test_symlink_outside_root_is_refused(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    root = make_tree(tmp_path / "model")
    (tmp_path / "elsewhere.bin").write_bytes(b"outside")
    (root / "link.bin").symlink_to(tmp_path / "elsewhere.bin")
    with pytest.raises(ValueError) as err:
        build_manifest(root, created=CREATED)
    assert str(err.value) == (
        f"`link.bin`: symlink points outside {root} (to {tmp_path / 'elsewhere.bin'})"
    )
    (root / "link.bin").unlink()
    write_signed_manifest(root, key, created=CREATED)
    (root / "link.bin").symlink_to(tmp_path / "elsewhere.bin")
    with pytest.raises(ManifestMismatch) as mismatch:
        verify_directory(root, key.public_key())
    assert str(mismatch.value) == f"{err.value}; {REFUSAL}"


def test_symlink_inside_root_is_hashed_as_its_target(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    (root / "alias.txt").symlink_to("abc.txt")
    assert build_manifest(root, created=CREATED).files["alias.txt"] == FileEntry(SHA256_ABC, 3)


def test_symlinked_directory_is_refused(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    (root / "tok").symlink_to("tokenizer", target_is_directory=True)
    with pytest.raises(ValueError,
                       match=exactly("`tok`: symlink to a non-file; replace it with a copy")):
        build_manifest(root, created=CREATED)


@pytest.mark.parametrize("target", ["nowhere.bin", "loop.bin"])
def test_broken_or_looping_symlink_is_refused(tmp_path: Path, target: str) -> None:
    (make_tree(tmp_path) / "loop.bin").symlink_to(target)
    with pytest.raises(ValueError, match=exactly("`loop.bin`: broken or looping symlink")):
        build_manifest(tmp_path, created=CREATED)


def test_fifo_is_refused(tmp_path: Path) -> None:
    os.mkfifo(make_tree(tmp_path) / "pipe")
    with pytest.raises(ValueError, match=exactly("`pipe`: not a regular file or directory")):
        build_manifest(tmp_path, created=CREATED)


# --- property: any single flipped byte is caught ---------------------------------------------

file_path = st.builds(
    lambda folder, name: folder + name + ".bin",
    st.sampled_from(["", "sub/", "sub/deep/", "other/"]),
    st.text("abcxyz019_-", min_size=1, max_size=6),
)
trees = st.dictionaries(file_path, st.binary(min_size=1, max_size=64), min_size=1, max_size=5)


@settings(max_examples=40, deadline=None)
@given(files=trees, data=st.data())
def test_any_flipped_byte_is_refused(files: dict[str, bytes], data: st.DataObject) -> None:
    key = generate_signing_key()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_tree(Path(tmp), files)
        written = write_signed_manifest(root, key, created=CREATED)
        assert verify_directory(root, key.public_key()) == written
        victim = data.draw(st.sampled_from(sorted(files)), label="file")
        index = data.draw(st.integers(0, len(files[victim]) - 1), label="byte")
        flip = data.draw(st.integers(1, 255), label="xor")
        content = bytearray(files[victim])
        content[index] ^= flip
        (root / victim).write_bytes(bytes(content))
        with pytest.raises(ManifestMismatch) as err:
            verify_directory(root, key.public_key())
        assert err.value.changed == (victim,)
        assert err.value.missing == err.value.unexpected == ()


# --- keys --------------------------------------------------------------------------------


def test_private_key_round_trip_with_mode_0600(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "coordinator.pem"
    save_private_key(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8
    loaded = load_private_key(path)
    assert public_key_bytes(loaded.public_key()) == public_key_bytes(key.public_key())
    with pytest.raises(FileExistsError):
        save_private_key(generate_signing_key(), path)  # never overwrite a signing key


def test_public_key_round_trips_raw_and_pem(key: Ed25519PrivateKey) -> None:
    raw = public_key_bytes(key.public_key())
    assert len(raw) == 32
    assert public_key_bytes(load_public_key(raw)) == raw
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert public_key_bytes(load_public_key(pem)) == raw
    with pytest.raises(ValueError,
                       match=exactly("expected 32 raw bytes or a PEM block, got 31 bytes")):
        load_public_key(raw[:31])


def test_fingerprint_is_stable() -> None:
    public = load_public_key(bytes.fromhex(RFC_PUBLIC))
    expected = hashlib.sha256(bytes.fromhex(RFC_PUBLIC)).hexdigest()[:16]
    assert key_fingerprint(public) == expected
    assert key_fingerprint(load_public_key(bytes.fromhex(RFC_PUBLIC))) == expected
    assert len(expected) == 16


def test_rfc8032_test_1() -> None:
    """RFC 8032 §7.1 TEST 1: pins that signing is standard Ed25519 (pure, no prehash)."""
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(RFC_SECRET))
    assert public_key_bytes(key.public_key()).hex() == RFC_PUBLIC
    assert key.sign(b"").hex() == RFC_SIGNATURE
    load_public_key(bytes.fromhex(RFC_PUBLIC)).verify(bytes.fromhex(RFC_SIGNATURE), b"")


# --- the signed manifest as it travels with a run (never written into the model folder) -----


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``root`` (and ``root`` itself) with its size and mtime in ns."""
    entries = {".": root.stat()}
    entries.update({p.relative_to(root).as_posix(): p.lstat() for p in root.rglob("*")})
    return {rel: (st.st_size, st.st_mtime_ns) for rel, st in entries.items()}


@pytest.fixture()
def transported(tmp_path: Path, key: Ed25519PrivateKey) -> tuple[Path, SignedManifest]:
    root = make_tree(tmp_path / "model")
    return root, sign_directory(root, key, created=CREATED, label="tiny")


def test_signing_a_folder_writes_nothing_into_it(tmp_path: Path,
                                                  key: Ed25519PrivateKey) -> None:
    root = make_tree(tmp_path / "model")
    before = _snapshot(root)
    signed = sign_directory(root, key, created=CREATED, label="tiny")
    assert _snapshot(root) == before
    assert signed.manifest_bytes == build_manifest(root, created=CREATED,
                                                   label="tiny").canonical_bytes()


def test_signed_manifest_round_trips_through_text(
        transported: tuple[Path, SignedManifest], key: Ed25519PrivateKey) -> None:
    root, signed = transported
    text = signed.to_text()
    assert text.isascii() and "\n" not in text and " " not in text
    assert SignedManifest.from_text(text) == signed
    assert json.loads(text) == {"format": "fedtune-signed-manifest/1",
                                "manifest": signed.manifest_bytes.decode(),
                                "signature": signed.signature.hex()}
    key.public_key().verify(signed.signature, signed.manifest_bytes)  # plain Ed25519
    before = _snapshot(root)
    verified = verify_directory(root, key.public_key(), signed=SignedManifest.from_text(text))
    assert verified == build_manifest(root, created=CREATED, label="tiny")
    assert _snapshot(root) == before, "verifying reads the folder, never writes it"


def test_non_ascii_names_round_trip(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    root = make_tree(tmp_path / "modèle", {"tokenizer/vocabulaire-é.txt": b"x"})
    signed = sign_directory(root, key, created=CREATED, label="modèle")
    assert SignedManifest.from_text(signed.to_text()) == signed
    assert verify_directory(root, key.public_key(), signed=signed).label == "modèle"


def test_about_ten_files_fit_in_a_few_kilobytes(tmp_path: Path,
                                                key: Ed25519PrivateKey) -> None:
    names = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
             "README.md", ".gitattributes"]
    root = make_tree(tmp_path, {name: b"x" for name in names})
    assert len(sign_directory(root, key).to_text()) < 2_500


@pytest.mark.parametrize(("tamper", "detail"), TAMPERED_FILES)
def test_tampered_files_are_refused_against_the_transported_manifest(
    transported: tuple[Path, SignedManifest], key: Ed25519PrivateKey,
    tamper: Callable[[Path], None], detail: str
) -> None:
    root, signed = transported
    tamper(root)
    with pytest.raises(ManifestMismatch) as err:
        verify_directory(root, key.public_key(), signed=signed)
    assert str(err.value) == f"{root}: {detail}; {REFUSAL}"
    assert err.value.detail == detail


def _swap_hashes(signed: SignedManifest) -> SignedManifest:
    doc = json.loads(signed.manifest_bytes)
    files = doc["files"]
    files["abc.txt"]["sha256"], files["config.json"]["sha256"] = (
        files["config.json"]["sha256"], files["abc.txt"]["sha256"])
    return SignedManifest(_canonical(doc), signed.signature)


@pytest.mark.parametrize(
    "forge",
    [
        _swap_hashes,
        lambda s: SignedManifest(s.manifest_bytes, bytes([s.signature[0] ^ 0x80])
                                 + s.signature[1:]),
        lambda s: SignedManifest.sign(
            Manifest(files={}, created=CREATED), generate_signing_key()),
        lambda s: SignedManifest(s.manifest_bytes,
                                 generate_signing_key().sign(s.manifest_bytes)),
    ],
    ids=["hash-swapped", "signature-flipped", "other-key-other-manifest", "other-key"],
)
def test_forged_transported_manifests_are_one_silent_error(
    transported: tuple[Path, SignedManifest], key: Ed25519PrivateKey,
    forge: Callable[[SignedManifest], SignedManifest]
) -> None:
    root, signed = transported
    forged = SignedManifest.from_text(forge(signed).to_text())  # well-formed on the wire
    with pytest.raises(ManifestSignatureError) as err:
        verify_directory(root, key.public_key(), signed=forged)
    assert str(err.value) == ""
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_an_old_manifest_left_in_the_folder_is_ignored(
        transported: tuple[Path, SignedManifest], key: Ed25519PrivateKey) -> None:
    root, signed = transported
    write_signed_manifest(root, generate_signing_key(), created=CREATED)  # another key's
    assert verify_directory(root, key.public_key(), signed=signed) == signed.verify(
        key.public_key())
    (root / MANIFEST_NAME).unlink()
    (root / SIGNATURE_NAME).unlink()
    assert verify_directory(root, key.public_key(), signed=signed).files


def test_the_folder_form_is_not_needed_next_to_the_model(
        transported: tuple[Path, SignedManifest], key: Ed25519PrivateKey) -> None:
    root, signed = transported
    assert not (root / MANIFEST_NAME).exists()
    verify_directory(root, key.public_key(), signed=signed)
    with pytest.raises(ManifestError, match=r"no fedtune-manifest\.json"):
        verify_directory(root, key.public_key())  # the folder form still needs its files
    with pytest.raises(TypeError, match=exactly("expected a SignedManifest, got str")):
        verify_directory(root, key.public_key(), signed=signed.to_text())  # type: ignore[arg-type]


def _text(**changes: object) -> str:
    manifest = Manifest(files={"a.bin": FileEntry(SHA256_ABC, 3)}, created=CREATED)
    doc: dict[str, object] = {"format": "fedtune-signed-manifest/1",
                              "manifest": manifest.canonical_bytes().decode(),
                              "signature": "ab" * 64}
    doc.update(changes)
    return json.dumps({k: v for k, v in doc.items() if v is not None}, sort_keys=True,
                      separators=(",", ":"))


_SIG_AT = _text().index('"abab')  # where the signature string starts


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "signed manifest is not valid JSON (Expecting value: line 1 column 1 (char 0)); "
         "it may be truncated, re-fetch it from the coordinator"),
        (_text()[:-9], "signed manifest is not valid JSON (Unterminated string starting at: "
         f"line 1 column {_SIG_AT + 1} (char {_SIG_AT})); "
         "it may be truncated, re-fetch it from the coordinator"),
        ("[]", "signed manifest: expected a JSON object, got list"),
        (_text(format=None),
         "signed manifest: missing keys ['format'], unexpected keys []"),
        (_text(extra=1), "signed manifest: missing keys [], unexpected keys ['extra']"),
        (_text(format="fedtune-signed-manifest/2"),
         "signed manifest: format: expected 'fedtune-signed-manifest/1', got "
         "'fedtune-signed-manifest/2'; update fedtune"),
        (_text(manifest={"files": {}}),
         "signed manifest: manifest: expected a string, got dict"),
        (_text(signature="AB" * 64),
         "signed manifest: signature: expected 128 lowercase hex digits, got "
         f"'{('AB' * 20)[:39]}... (130 characters)"),
        (_text(signature="ab" * 63),
         "signed manifest: signature: expected 128 lowercase hex digits, got "
         f"'{('ab' * 20)[:39]}... (128 characters)"),
        (_text(signature=12), "signed manifest: signature: expected 128 lowercase hex "
         "digits, got 12"),
        (_text(manifest="{}"),
         "manifest: missing keys ['created', 'files', 'format', 'label'], unexpected keys []"),
        (_text(manifest=json.dumps(_doc(), indent=1)),
         "manifest is not in canonical form (sorted keys, no spaces); "
         "it was not written by fedtune, re-fetch it from the coordinator"),
        (_text(manifest=_canonical(_doc(files={"../x": {"sha256": SHA256_ABC, "size": 3}}))
               .decode()),
         "`../x`: expected a relative path without '', '.' or '..' parts"),
        (_text().replace('"format"', '"format" '),
         "signed manifest is not in canonical form (sorted keys, no spaces, ASCII); it was "
         "not written by fedtune, re-fetch it from the coordinator"),
        ('{"format":"fedtune-signed-manifest/2",' + _text()[1:],
         "signed manifest is not in canonical form (sorted keys, no spaces, ASCII); it was "
         "not written by fedtune, re-fetch it from the coordinator"),  # a duplicated key
        (_text(manifest="\ud800"), "manifest is not UTF-8; re-fetch it from the coordinator"),
    ],
    ids=["empty", "truncated", "list", "missing-key", "extra-key", "format", "manifest-dict",
         "signature-uppercase", "signature-short", "signature-int", "manifest-empty-object",
         "manifest-not-canonical", "manifest-bad-path", "not-canonical", "duplicate-key",
         "surrogate"],
)
def test_malformed_signed_manifest_text_is_refused_with_reason(text: str,
                                                               message: str) -> None:
    with pytest.raises(ManifestError) as err:
        SignedManifest.from_text(text)
    assert str(err.value) == message


def test_signed_manifest_form_is_checked_on_construction() -> None:
    manifest = Manifest(files={}, created=CREATED).canonical_bytes()
    with pytest.raises(ManifestError,
                       match=exactly("signed manifest: signature: expected 64 bytes "
                                     "(Ed25519), got 63")):
        SignedManifest(manifest, b"\0" * 63)
    with pytest.raises(ManifestError, match="not valid JSON"):
        SignedManifest(b"{", b"\0" * 64)
    with pytest.raises(ManifestError, match=exactly("signed manifest: expected text, got bytes")):
        SignedManifest.from_text(b"{}")  # type: ignore[arg-type]
