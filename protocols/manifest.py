"""Signed base-model manifest: clients check the base model before training on it.

ReCIT (2025) shows that a malicious coordinator can tamper with the frozen base model so that
the PEFT gradients of honest clients leak their private training text. The coordinator
therefore signs a manifest (sha256 and size of every file of the base model) with an Ed25519
key whose public half clients pin out of band; before training, a client verifies the
signature and re-hashes the model directory, and refuses on any difference, including extra
files a loader might pick up (a stray safetensors shard). Signatures cover exactly
:meth:`Manifest.canonical_bytes`; every signature failure is one silent
:class:`ManifestSignatureError`, as with ``cryptography.exceptions.InvalidSignature``.

The base model's signed manifest travels with the run, never in the model folder: the
coordinator signs the folder without writing into it (:func:`sign_directory`), keeps the
result in its own cache, and puts :meth:`SignedManifest.to_text` into the run config
(``paths.signed_manifest``); a device checks its own copy of the model against it with
``verify_directory(root, key, signed=SignedManifest.from_text(text))``. Folders fedtune
writes itself (the ONNX export in its cache) still carry ``fedtune-manifest.json`` + ``.sig``
(:func:`write_signed_manifest`), checked by ``verify_directory(root, key)``. Files with
those two names are never hashed, so a model folder signed by an older fedtune verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocols.atomic_write import write_bytes_atomic

FORMAT = "fedtune-manifest/1"
SIGNED_FORMAT = "fedtune-signed-manifest/1"
MANIFEST_NAME = "fedtune-manifest.json"
SIGNATURE_NAME = "fedtune-manifest.sig"
REFUSAL = (
    "refusing to train on a base model that does not match the coordinator's signed manifest; "
    "re-fetch the model from the coordinator"
)
_CHUNK = 1 << 20  # model shards are hundreds of MB: hash them 1 MiB at a time
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_SIGNATURE_HEX = re.compile(r"[0-9a-f]{128}")


class ManifestError(ValueError):
    """A manifest that cannot be parsed or holds an invalid field."""


class ManifestSignatureError(Exception):
    """The signature does not verify. Deliberately carries no detail."""


class ManifestMismatch(ValueError):
    """The directory differs from a validly signed manifest; lists what differs."""

    def __init__(self, message: str, *, missing: tuple[str, ...] = (),
                 changed: tuple[str, ...] = (), unexpected: tuple[str, ...] = (),
                 detail: str = "") -> None:
        super().__init__(message)
        self.missing, self.changed, self.unexpected = missing, changed, unexpected
        self.detail = detail or message  # what differs, without the advice on what to do


@dataclass(frozen=True)
class FileEntry:
    """Content digest of one file: lowercase sha256 hex and size in bytes."""

    sha256: str
    size: int

    def __post_init__(self) -> None:
        if not isinstance(self.sha256, str) or not _SHA256_HEX.fullmatch(self.sha256):
            raise ManifestError(f"sha256: expected 64 lowercase hex digits, got {self.sha256!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise ManifestError(f"size: expected a non-negative integer, got {self.size!r}")


@dataclass(frozen=True)
class Manifest:
    """Every file of a base model by relative POSIX path; ``label`` is free text."""

    files: Mapping[str, FileEntry]
    created: str
    format: str = FORMAT
    label: str = ""

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise ManifestError(f"format: expected {FORMAT!r}, got {self.format!r}; update fedtune")
        if not isinstance(self.created, str) or not isinstance(self.label, str):
            raise ManifestError("created and label must be strings")
        try:
            datetime.fromisoformat(self.created)
        except ValueError:
            raise ManifestError(f"created: expected ISO 8601, got {self.created!r}") from None
        for path, entry in self.files.items():
            _check_path(path)
            if not isinstance(entry, FileEntry):
                raise ManifestError(f"`{path}`: expected a FileEntry, got {type(entry).__name__}")
        # a read-only sorted copy: the caller's dict cannot change a manifest after the fact
        object.__setattr__(self, "files", MappingProxyType(dict(sorted(self.files.items()))))

    def canonical_bytes(self) -> bytes:
        """Deterministic UTF-8 JSON (sorted keys, no spaces): exactly what is signed."""
        files = {p: {"sha256": e.sha256, "size": e.size} for p, e in self.files.items()}
        doc = {"created": self.created, "files": files, "format": self.format, "label": self.label}
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class SignedManifest:
    """A manifest's canonical bytes and their Ed25519 signature: the form that travels with
    a run. Building one (or :meth:`from_text`) checks the form only; :meth:`verify` is the
    one way to the :class:`Manifest` itself, and it checks the signature first."""

    manifest_bytes: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.manifest_bytes, bytes) or not isinstance(self.signature, bytes):
            raise ManifestError("signed manifest: manifest and signature must be bytes")
        if len(self.signature) != 64:
            raise ManifestError(f"signed manifest: signature: expected 64 bytes (Ed25519), "
                                f"got {len(self.signature)}")
        _parse(self.manifest_bytes)  # a precise ManifestError for anything malformed

    @classmethod
    def sign(cls, manifest: Manifest, private_key: Ed25519PrivateKey) -> SignedManifest:
        return cls(manifest.canonical_bytes(), sign_manifest(manifest, private_key))

    def verify(self, public_key: Ed25519PublicKey) -> Manifest:
        """The manifest, only if the signature verifies with ``public_key``
        (:func:`verify_manifest`)."""
        return verify_manifest(self.manifest_bytes, self.signature, public_key)

    def to_text(self) -> str:
        """Compact ASCII JSON: ``{"format", "manifest": <canonical bytes as a string>,
        "signature": <128 hex digits>}`` with sorted keys; :meth:`from_text` reads it back."""
        doc = {"format": SIGNED_FORMAT, "manifest": self.manifest_bytes.decode("utf-8"),
               "signature": self.signature.hex()}
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_text(cls, text: str) -> SignedManifest:
        """Parse :meth:`to_text`'s output strictly; :class:`ManifestError` says what is wrong.

        Only the form is checked here: call :meth:`verify` before trusting anything in it.
        """
        what = "signed manifest"
        if not isinstance(text, str):
            raise ManifestError(f"{what}: expected text, got {type(text).__name__}")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{what} is not valid JSON ({exc}); it may be truncated, "
                                "re-fetch it from the coordinator") from None
        _expect_keys(what, doc, {"format", "manifest", "signature"})
        if doc["format"] != SIGNED_FORMAT:
            raise ManifestError(f"{what}: format: expected {SIGNED_FORMAT!r}, got "
                                f"{_short(doc['format'])}; update fedtune")
        if not isinstance(doc["manifest"], str):
            raise ManifestError(f"{what}: manifest: expected a string, got "
                                f"{type(doc['manifest']).__name__}")
        signature = doc["signature"]
        if not isinstance(signature, str) or not _SIGNATURE_HEX.fullmatch(signature):
            raise ManifestError(f"{what}: signature: expected 128 lowercase hex digits, got "
                                f"{_short(signature)}")
        try:
            manifest_bytes = doc["manifest"].encode("utf-8")
        except UnicodeEncodeError:
            raise ManifestError("manifest is not UTF-8; re-fetch it from the coordinator"
                                ) from None
        signed = cls(manifest_bytes, bytes.fromhex(signature))
        if signed.to_text() != text:
            raise ManifestError(f"{what} is not in canonical form (sorted keys, no spaces, "
                                "ASCII); it was not written by fedtune, re-fetch it from the "
                                "coordinator")
        return signed


def build_manifest(root: Path, *, created: str | None = None, label: str = "") -> Manifest:
    """Hash every regular file under ``root`` (except the manifest files themselves).

    ``created`` defaults to the current UTC time; pass a fixed value for reproducible bytes.
    Raises ``ValueError`` for a symlink leading outside ``root``, a symlinked directory or a
    special file, because a loader could read content the manifest does not pin.
    """
    files = {rel: _hash_file(path) for rel, path in _walk(Path(root))}
    if created is None:
        created = datetime.now(UTC).isoformat(timespec="seconds")
    return Manifest(files=files, created=created, label=label)


def sign_manifest(manifest: Manifest, private_key: Ed25519PrivateKey) -> bytes:
    """Ed25519 signature (64 bytes) over ``manifest.canonical_bytes()``."""
    if not isinstance(private_key, Ed25519PrivateKey):
        raise TypeError(f"expected an Ed25519PrivateKey, got {type(private_key).__name__}")
    return private_key.sign(manifest.canonical_bytes())


def verify_manifest(
    manifest_bytes: bytes, signature: bytes, public_key: Ed25519PublicKey
) -> Manifest:
    """Parse ``manifest_bytes`` and check ``signature``; return the manifest only if both pass.

    Parsing comes first so that a truncated download gets a precise :class:`ManifestError`;
    nothing parsed is returned or acted on before the signature verifies. A bad signature
    raises :class:`ManifestSignatureError` with no detail.
    """
    if not isinstance(public_key, Ed25519PublicKey):
        raise TypeError(f"expected an Ed25519PublicKey, got {type(public_key).__name__}")
    manifest = _parse(manifest_bytes)
    try:
        public_key.verify(signature, manifest_bytes)
    except InvalidSignature:
        raise ManifestSignatureError() from None
    return manifest


def sign_directory(
    root: Path, private_key: Ed25519PrivateKey, *, created: str | None = None, label: str = ""
) -> SignedManifest:
    """Build and sign the manifest of ``root``; writes nothing anywhere (``root`` may be a
    user's model folder: the result travels with the run, see the module docstring)."""
    return SignedManifest.sign(build_manifest(Path(root), created=created, label=label),
                               private_key)


def write_signed_manifest(
    root: Path, private_key: Ed25519PrivateKey, *, created: str | None = None, label: str = ""
) -> Manifest:
    """Build, sign and write both manifest files into ``root``, each replaced atomically.

    Only for folders fedtune writes itself (the ONNX export); never a user's model folder.
    """
    root = Path(root)
    manifest = build_manifest(root, created=created, label=label)
    signature = sign_manifest(manifest, private_key)
    # Both are public: 0o644 whatever the umask.
    write_bytes_atomic(root / MANIFEST_NAME, manifest.canonical_bytes(), mode=0o644)
    write_bytes_atomic(root / SIGNATURE_NAME, signature, mode=0o644)
    return manifest


def verify_directory(root: Path, public_key: Ed25519PublicKey, *,
                     signed: SignedManifest | None = None) -> Manifest:
    """Verify a signed manifest and that the files of ``root`` match it exactly.

    ``signed`` is the manifest that came with the run (a base model); without it the two
    manifest files in ``root`` are read (a folder fedtune wrote, e.g. the ONNX export).
    Raises :class:`ManifestError` if a manifest file is absent or malformed,
    :class:`ManifestSignatureError` if the signature fails, and :class:`ManifestMismatch`
    naming missing, changed and unexpected files.
    """
    root = Path(root)
    if signed is None:
        blobs = []
        for name in (MANIFEST_NAME, SIGNATURE_NAME):
            try:
                blobs.append((root / name).read_bytes())
            except (FileNotFoundError, NotADirectoryError):
                hint = "fetch the signed manifest from the coordinator"
                raise ManifestError(f"{root}: no {name}; {hint}") from None
        manifest = verify_manifest(blobs[0], blobs[1], public_key)
    else:
        if not isinstance(signed, SignedManifest):
            raise TypeError(f"expected a SignedManifest, got {type(signed).__name__}")
        manifest = signed.verify(public_key)
    try:
        present = dict(_walk(root))
    except ValueError as exc:
        raise ManifestMismatch(f"{exc}; {REFUSAL}", detail=str(exc)) from exc
    missing = tuple(sorted(set(manifest.files) - set(present)))
    unexpected = tuple(sorted(set(present) - set(manifest.files)))
    changed = tuple(rel for rel, entry in manifest.files.items()
                    if rel in present and _hash_file(present[rel]) != entry)
    if missing or changed or unexpected:
        parts = [f"{what} files {_preview(paths)}" for what, paths in
                 (("missing", missing), ("changed", changed), ("unexpected", unexpected)) if paths]
        detail = "; ".join(parts)
        raise ManifestMismatch(f"{root}: {detail}; {REFUSAL}", missing=missing,
                               changed=changed, unexpected=unexpected, detail=detail)
    return manifest


def generate_signing_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 key for the coordinator."""
    return Ed25519PrivateKey.generate()


def save_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    """Write ``key`` as unencrypted PKCS8 PEM, mode 0o600; refuses to overwrite a file.

    Overwriting a signing key would strand every client that pinned the old public key.
    """
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fd, 0o600)  # the umask may have removed bits, never added: make it exact
        fh.write(pem)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a key written by :func:`save_private_key`."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: expected an Ed25519 private key, got {type(key).__name__}")
    return key


def public_key_bytes(public_key: Ed25519PublicKey) -> bytes:
    """The raw 32-byte public key, the form clients pin."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public_key(raw_or_pem: bytes) -> Ed25519PublicKey:
    """Load a public key from its raw 32 bytes or from a PEM ``PUBLIC KEY`` block."""
    if raw_or_pem.lstrip().startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(raw_or_pem)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"expected an Ed25519 public key, got {type(key).__name__}")
        return key
    if len(raw_or_pem) != 32:
        raise ValueError(f"expected 32 raw bytes or a PEM block, got {len(raw_or_pem)} bytes")
    return Ed25519PublicKey.from_public_bytes(raw_or_pem)


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of sha256 over the raw public key, for logs."""
    return hashlib.sha256(public_key_bytes(public_key)).hexdigest()[:16]


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    """Yield ``(relative POSIX path, path)`` for every file under ``root`` but the manifest."""
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory")
    real_root = root.resolve()
    pending = [root]
    while pending:
        folder = pending.pop()
        with os.scandir(folder) as entries:
            listing = list(entries)
        for entry in listing:
            path = Path(entry.path)
            rel = path.relative_to(root).as_posix()
            if rel in (MANIFEST_NAME, SIGNATURE_NAME):
                continue
            if entry.is_symlink():
                try:
                    target = path.resolve(strict=True)
                except (OSError, RuntimeError):  # 3.11 raises RuntimeError on a loop
                    raise ValueError(f"`{rel}`: broken or looping symlink") from None
                if not target.is_relative_to(real_root):
                    raise ValueError(f"`{rel}`: symlink points outside {root} (to {target})")
                if not target.is_file():
                    raise ValueError(f"`{rel}`: symlink to a non-file; replace it with a copy")
                yield rel, path
            elif entry.is_dir():
                pending.append(path)
            elif entry.is_file():
                yield rel, path
            else:
                raise ValueError(f"`{rel}`: not a regular file or directory")


def _hash_file(path: Path) -> FileEntry:
    digest, size, buf = hashlib.sha256(), 0, bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
            size += n
    return FileEntry(sha256=digest.hexdigest(), size=size)


def _check_path(path: object) -> None:
    """Refuse paths that could escape the model folder, forge log lines or not encode."""
    if not isinstance(path, str) or not path.isprintable() or "\\" in path:
        raise ManifestError(f"{path!r}: expected a printable POSIX path without '\\'")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise ManifestError(f"`{path}`: expected a relative path without '', '.' or '..' parts")
    if path in (MANIFEST_NAME, SIGNATURE_NAME):
        raise ManifestError(f"`{path}`: the manifest cannot list itself")


def _parse(data: bytes) -> Manifest:
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ManifestError("manifest is not UTF-8; re-fetch it from the coordinator") from None
    except json.JSONDecodeError as exc:
        hint = "it may be truncated, re-fetch it from the coordinator"
        raise ManifestError(f"manifest is not valid JSON ({exc}); {hint}") from None
    _expect_keys("manifest", doc, {"created", "files", "format", "label"})
    _expect_keys("files", doc["files"], None)
    files = {}
    for path, entry in doc["files"].items():
        _check_path(path)  # first, so that no message echoes an unchecked name
        _expect_keys(f"`{path}`", entry, {"sha256", "size"})
        try:
            files[path] = FileEntry(sha256=entry["sha256"], size=entry["size"])
        except ManifestError as exc:
            raise ManifestError(f"`{path}`: {exc}") from None
    manifest = Manifest(files, doc["created"], doc["format"], doc["label"])
    if manifest.canonical_bytes() != data:
        raise ManifestError("manifest is not in canonical form (sorted keys, no spaces); "
                            "it was not written by fedtune, re-fetch it from the coordinator")
    return manifest


def _expect_keys(what: str, value: object, keys: set[str] | None) -> None:
    if not isinstance(value, dict):
        raise ManifestError(f"{what}: expected a JSON object, got {type(value).__name__}")
    if keys is not None and set(value) != keys:
        missing, extra = sorted(keys - set(value)), sorted(set(value) - keys)
        raise ManifestError(f"{what}: missing keys {missing}, unexpected keys {extra}")


def _short(value: object, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters: never echo a long value into a log."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _preview(paths: tuple[str, ...], limit: int = 3) -> str:
    shown = ", ".join(f"`{p}`" for p in paths[:limit])
    more = len(paths) - limit
    return shown + (f" and {more} more" if more > 0 else "")
