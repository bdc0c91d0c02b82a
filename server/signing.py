"""The simulated coordinator's signing key and the signed manifest of the base it serves.

In a simulation this process is the coordinator: it keeps an Ed25519 key in the cache,
signs the base-model folder once (writing ``fedtune-manifest.json`` + ``.sig`` into it), and
hands clients the raw public key through the run config, as a deployment would pin it on
devices. A folder that was signed and then changed is refused, not silently re-signed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from protocols.manifest import (
    MANIFEST_NAME,
    ManifestSignatureError,
    generate_signing_key,
    key_fingerprint,
    load_private_key,
    public_key_bytes,
    save_private_key,
    verify_directory,
    write_signed_manifest,
)

log = logging.getLogger(__name__)


def coordinator_key_path(cache_dir: Path) -> Path:
    return cache_dir / "keys" / "coordinator-ed25519.pem"


def ensure_signing_key(cache_dir: Path) -> Path:
    """The coordinator key's path, generating the key on first use."""
    key_path = coordinator_key_path(cache_dir)
    if not key_path.exists():
        key_path.parent.mkdir(parents=True, exist_ok=True)
        save_private_key(generate_signing_key(), key_path)
    return key_path


def ensure_signed(model_dir: Path, cache_dir: Path) -> str:
    """Sign ``model_dir`` if it carries no manifest yet, verify it otherwise; return the
    public key as hex for the clients."""
    key = load_private_key(ensure_signing_key(cache_dir))
    public = key.public_key()
    if not (model_dir / MANIFEST_NAME).exists():
        log.info("signing base model %s (key %s)", model_dir, key_fingerprint(public))
        write_signed_manifest(model_dir, key, label=model_dir.name)
    try:
        verify_directory(model_dir, public)
    except ManifestSignatureError:
        # Signed by another coordinator key (another cache): this host serves the folder
        # now, so it signs it. Files changed under *our* signature are still refused above.
        log.warning("re-signing base model %s with key %s", model_dir, key_fingerprint(public))
        write_signed_manifest(model_dir, key, label=model_dir.name)
    return public_key_bytes(public).hex()
