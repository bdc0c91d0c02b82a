"""The coordinator's signing key and the signed manifest of the base model it serves.

The coordinator keeps an Ed25519 key in its cache and signs the base-model folder
(sha256 and size of every file) without writing into it: the folder may be the user's own
model, which fedtune never changes. The signed manifest is kept in the cache,
``<cache>/manifests/<hash of the folder's resolved path>.json``, and travels with the run
(``paths.signed_manifest``); devices check their own copy of the model against it with the
coordinator key they pinned (``paths.manifest_public_key``).

Staleness: every run re-hashes the folder against the cached manifest. A user's folder
that changed after it was signed is refused, not silently re-signed (the message names the
cached manifest to delete to re-sign on purpose). A folder inside fedtune's cache (the
converted default model) is signed again when ``fedtune prepare`` rebuilt it: whoever can
change it can change the signing key beside it, so refusing would protect nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocols.atomic_write import write_json_atomic
from protocols.manifest import (
    ManifestError,
    ManifestMismatch,
    ManifestSignatureError,
    SignedManifest,
    generate_signing_key,
    key_fingerprint,
    load_private_key,
    public_key_bytes,
    save_private_key,
    sign_directory,
    verify_directory,
)

log = logging.getLogger(__name__)

#: Format of the coordinator's cached record (not what travels: that is the signed text).
RECORD_FORMAT = "fedtune-manifest-record/1"


def coordinator_key_path(cache_dir: Path) -> Path:
    return cache_dir / "keys" / "coordinator-ed25519.pem"


def ensure_signing_key(cache_dir: Path) -> Path:
    """The coordinator key's path, generating the key on first use."""
    key_path = coordinator_key_path(cache_dir)
    if not key_path.exists():
        key_path.parent.mkdir(parents=True, exist_ok=True)
        save_private_key(generate_signing_key(), key_path)
    return key_path


def manifest_record_path(cache_dir: Path, model_dir: Path) -> Path:
    """Where the signed manifest of ``model_dir`` is kept: one file per resolved path."""
    digest = hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:32]
    return cache_dir / "manifests" / f"{digest}.json"


@dataclass(frozen=True)
class SignedBase:
    """What a run hands devices about its base model: the key to pin (hex of the raw
    Ed25519 public key) and the signed manifest (:meth:`SignedManifest.to_text` for the run
    config)."""

    public_key: str
    manifest: SignedManifest


def ensure_signed(model_dir: Path, cache_dir: Path) -> SignedBase:
    """Sign ``model_dir`` (writing only into ``cache_dir``) or reuse its cached signature
    after re-checking every file; return what devices need to verify their copy."""
    key = load_private_key(ensure_signing_key(cache_dir))
    public = key.public_key()
    folder = Path(model_dir).resolve()
    record_path = manifest_record_path(cache_dir, folder)
    signed = _load_record(record_path, folder)
    if signed is not None:
        try:
            verify_directory(folder, public, signed=signed)
        except ManifestSignatureError:
            # Signed by another coordinator key (the key file was replaced): this host
            # serves the folder now, so it signs it.
            log.warning("re-signing base model %s with key %s", folder, key_fingerprint(public))
            signed = None
        except ManifestMismatch as exc:
            if folder.is_relative_to(Path(cache_dir).resolve()):
                log.warning("base model %s changed since it was signed (%s); signing it again",
                            folder, exc.detail)
                signed = None
            else:
                raise ManifestMismatch(
                    f"{folder}: {exc.detail} since fedtune signed it; refusing to serve a "
                    "base model that changed under its signature: if you changed it on "
                    f"purpose, delete {record_path} and fedtune signs it again",
                    missing=exc.missing, changed=exc.changed, unexpected=exc.unexpected,
                    detail=exc.detail) from None
    if signed is None:
        log.info("signing base model %s (key %s)", folder, key_fingerprint(public))
        signed = sign_directory(folder, key, label=folder.name)
        record_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(record_path, {"format": RECORD_FORMAT, "model_dir": str(folder),
                                        "signed_manifest": signed.to_text()},
                          indent=1, sort_keys=True, mode=0o644)
    return SignedBase(public_key_bytes(public).hex(), signed)


def _load_record(path: Path, folder: Path) -> SignedManifest | None:
    """The cached signed manifest of ``folder``, or None when there is none to reuse."""
    try:
        record: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("unreadable signed manifest %s (%s); signing %s again", path, exc, folder)
        return None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        log.warning("%s is not a fedtune manifest record; signing %s again", path, folder)
        return None
    if record.get("model_dir") != str(folder):  # a hash collision: never in practice
        log.warning("%s belongs to %s; signing %s again", path, record.get("model_dir"), folder)
        return None
    try:
        return SignedManifest.from_text(record["signed_manifest"])
    except (KeyError, ManifestError) as exc:
        log.warning("unusable signed manifest in %s (%s); signing %s again", path, exc, folder)
        return None
