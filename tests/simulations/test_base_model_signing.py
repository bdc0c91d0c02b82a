"""The base model is signed by the (simulated) coordinator and verified by clients."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from client.app import verify_base_model
from protocols.manifest import ManifestError, ManifestMismatch, ManifestSignatureError
from server.signing import ensure_signed


@pytest.fixture()
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(tiny_model_dir, target)
    for name in ("fedtune-manifest.json", "fedtune-manifest.sig"):
        (target / name).unlink(missing_ok=True)
    return target


def test_signed_base_verifies_on_the_client(model_copy: Path, tmp_path: Path) -> None:
    key = ensure_signed(model_copy, tmp_path / "cache")
    assert (model_copy / "fedtune-manifest.json").is_file()
    verify_base_model(model_copy, key)
    assert ensure_signed(model_copy, tmp_path / "cache") == key  # idempotent


def test_tampered_base_is_refused(model_copy: Path, tmp_path: Path) -> None:
    key = ensure_signed(model_copy, tmp_path / "cache")
    weights = model_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ManifestMismatch, match=r"changed files `model\.safetensors`") as err:
        verify_base_model(model_copy, key)
    assert "refusing to train on a base model" in str(err.value)
    with pytest.raises(ManifestMismatch):  # the coordinator refuses to serve it too
        ensure_signed(model_copy, tmp_path / "cache")


def test_extra_file_is_refused(model_copy: Path, tmp_path: Path) -> None:
    key = ensure_signed(model_copy, tmp_path / "cache")
    (model_copy / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ManifestMismatch, match="unexpected files"):
        verify_base_model(model_copy, key)


def test_other_coordinator_key_is_refused_by_clients(model_copy: Path, tmp_path: Path) -> None:
    from protocols.manifest import generate_signing_key, public_key_bytes

    ensure_signed(model_copy, tmp_path / "cache")
    stranger = public_key_bytes(generate_signing_key().public_key()).hex()
    with pytest.raises(ManifestSignatureError):
        verify_base_model(model_copy, stranger)


def test_missing_key_is_a_clear_error(model_copy: Path) -> None:
    with pytest.raises(ManifestError, match="no coordinator public key"):
        verify_base_model(model_copy, "")
