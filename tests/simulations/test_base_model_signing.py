"""The base model is signed by the (simulated) coordinator without writing into the model
folder, the signed manifest travels with the run, and clients verify their copy against it.
A folder that is not a loadable model is refused up front with one line."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from client.app import verify_base_model
from protocols.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    ManifestError,
    ManifestMismatch,
    ManifestSignatureError,
    SignedManifest,
    generate_signing_key,
    write_signed_manifest,
)
from server.signing import SignedBase, ensure_signed, manifest_record_path


@pytest.fixture()
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(tiny_model_dir, target)
    for name in ("fedtune-manifest.json", "fedtune-manifest.sig"):
        (target / name).unlink(missing_ok=True)
    return target


def _verify(model_dir: Path, signed: SignedBase) -> None:
    """What a device does: its own folder, the pinned key, the text that came with the run."""
    verify_base_model(model_dir, signed.public_key, signed.manifest.to_text())


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    entries = {".": root.stat()}
    entries.update({p.relative_to(root).as_posix(): p.lstat() for p in root.rglob("*")})
    return {rel: (st.st_size, st.st_mtime_ns, st.st_mode) for rel, st in entries.items()}


def test_signed_base_verifies_on_the_client(model_copy: Path, tmp_path: Path) -> None:
    key = ensure_signed(model_copy, tmp_path / "cache")
    assert not (model_copy / "fedtune-manifest.json").exists()  # kept in the cache instead
    assert manifest_record_path(tmp_path / "cache", model_copy).is_file()
    _verify(model_copy, key)
    assert ensure_signed(model_copy, tmp_path / "cache") == key  # idempotent


def test_signing_writes_nothing_into_the_model_folder(model_copy: Path,
                                                      tmp_path: Path) -> None:
    before = _snapshot(model_copy)
    signed = ensure_signed(model_copy, tmp_path / "cache")
    assert _snapshot(model_copy) == before
    ensure_signed(model_copy, tmp_path / "cache")  # reusing the cached signature too
    _verify(model_copy, signed)
    assert _snapshot(model_copy) == before
    record = manifest_record_path(tmp_path / "cache", model_copy)
    assert record.parent == tmp_path / "cache" / "manifests"
    assert sorted(p.name for p in record.parent.iterdir()) == [record.name]  # no temp files


def test_a_read_only_model_folder_can_be_signed(model_copy: Path, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders anyway")
    model_copy.chmod(0o555)
    try:
        _verify(model_copy, ensure_signed(model_copy, tmp_path / "cache"))
    finally:
        model_copy.chmod(0o755)


def test_signed_manifest_round_trips_through_the_run_config_text(model_copy: Path,
                                                                 tmp_path: Path) -> None:
    signed = ensure_signed(model_copy, tmp_path / "cache")
    assert SignedManifest.from_text(signed.manifest.to_text()) == signed.manifest


def test_tampered_base_is_refused(model_copy: Path, tmp_path: Path) -> None:
    key = ensure_signed(model_copy, tmp_path / "cache")
    weights = model_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ManifestMismatch, match=r"changed files `model\.safetensors`") as err:
        _verify(model_copy, key)
    assert "refusing to train on a base model" in str(err.value)
    with pytest.raises(ManifestMismatch) as served:  # the coordinator refuses to serve it too
        ensure_signed(model_copy, tmp_path / "cache")
    record = manifest_record_path(tmp_path / "cache", model_copy)
    assert str(served.value) == (
        f"{model_copy}: changed files `model.safetensors` since fedtune signed it; refusing "
        "to serve a base model that changed under its signature: if you changed it on "
        f"purpose, delete {record} and fedtune signs it again")
    assert served.value.changed == ("model.safetensors",)
    record.unlink()  # what the message says to do after a deliberate change
    _verify(model_copy, ensure_signed(model_copy, tmp_path / "cache"))


def test_a_model_in_fedtunes_cache_is_signed_again_after_a_change(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    """The converted default model lives beside the signing key: a rebuild by `fedtune
    prepare` is signed again (refusing would protect nothing); devices need the new one."""
    cache = tmp_path / "cache"
    converted = cache / "models" / "some-model"
    shutil.copytree(tiny_model_dir, converted)
    first = ensure_signed(converted, cache)
    (converted / "generation_config.json").write_text("{}")  # e.g. a newer transformers
    second = ensure_signed(converted, cache)
    assert second.manifest != first.manifest and second.public_key == first.public_key
    _verify(converted, second)
    with pytest.raises(ManifestMismatch, match=r"generation_config\.json"):
        _verify(converted, first)


def test_missing_file_is_refused(model_copy: Path, tmp_path: Path) -> None:
    key = ensure_signed(model_copy, tmp_path / "cache")
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(ManifestMismatch, match=r"missing files `tokenizer\.json`"):
        _verify(model_copy, key)


def test_extra_file_is_refused(model_copy: Path, tmp_path: Path) -> None:
    key = ensure_signed(model_copy, tmp_path / "cache")
    (model_copy / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ManifestMismatch, match="unexpected files"):
        _verify(model_copy, key)


def test_other_coordinator_key_is_refused_by_clients(model_copy: Path, tmp_path: Path) -> None:
    from protocols.manifest import public_key_bytes

    signed = ensure_signed(model_copy, tmp_path / "cache")
    stranger = public_key_bytes(generate_signing_key().public_key()).hex()
    with pytest.raises(ManifestSignatureError):
        verify_base_model(model_copy, stranger, signed.manifest.to_text())


def test_manifest_signed_by_another_coordinator_is_refused(model_copy: Path,
                                                           tmp_path: Path) -> None:
    pinned = ensure_signed(model_copy, tmp_path / "cache")
    other = ensure_signed(model_copy, tmp_path / "another-cache")  # another coordinator
    assert other.public_key != pinned.public_key
    with pytest.raises(ManifestSignatureError):
        verify_base_model(model_copy, pinned.public_key, other.manifest.to_text())


def test_malformed_manifest_text_is_refused(model_copy: Path, tmp_path: Path) -> None:
    signed = ensure_signed(model_copy, tmp_path / "cache")
    with pytest.raises(ManifestError, match="signed manifest is not valid JSON"):
        verify_base_model(model_copy, signed.public_key, signed.manifest.to_text()[:-3])


def test_missing_key_is_a_clear_error(model_copy: Path, tmp_path: Path) -> None:
    signed = ensure_signed(model_copy, tmp_path / "cache")
    with pytest.raises(ManifestError, match="no coordinator public key"):
        verify_base_model(model_copy, "", signed.manifest.to_text())


def test_missing_manifest_is_one_clear_line(model_copy: Path, tmp_path: Path) -> None:
    signed = ensure_signed(model_copy, tmp_path / "cache")
    write_signed_manifest(model_copy, generate_signing_key())  # an old in-folder one is no use
    with pytest.raises(ManifestError) as err:
        verify_base_model(model_copy, signed.public_key, "")
    assert str(err.value) == (
        "security.verify_manifest is on but the run brought no signed manifest of the base "
        "model (paths.signed_manifest); the coordinator adds it when it starts the run "
        "(`fedtune simulate` or `fedtune coordinator`, the same fedtune version as this "
        "device), or turn verification off")


def test_a_folder_signed_by_an_older_fedtune_still_verifies(model_copy: Path,
                                                            tmp_path: Path) -> None:
    write_signed_manifest(model_copy, generate_signing_key())  # left by an older fedtune
    before = _snapshot(model_copy)
    signed = ensure_signed(model_copy, tmp_path / "cache")
    _verify(model_copy, signed)
    assert _snapshot(model_copy) == before, "the old files are left alone"
    (model_copy / MANIFEST_NAME).unlink()
    (model_copy / SIGNATURE_NAME).unlink()  # and a device's copy needs none
    _verify(model_copy, signed)


def test_the_client_app_checks_the_manifest_from_the_run_config(model_copy: Path,
                                                                tmp_path: Path) -> None:
    """``client.app._trainer`` refuses before loading: the key and the manifest come from
    the (merged) run config."""
    import client.app as client_app
    from protocols.run_config import ModelSection, RunConfig

    cache = tmp_path / "cache"
    signed = ensure_signed(model_copy, cache)
    flat = {**RunConfig(model=ModelSection(source=str(model_copy))).to_flat(),
            "paths.cache_dir": str(cache), "paths.manifest_public_key": signed.public_key}
    try:
        with pytest.raises(ManifestError, match="no signed manifest of the base model"):
            client_app._trainer(flat)
        (model_copy / "extra.bin").write_bytes(b"x")
        with pytest.raises(ManifestMismatch, match=r"unexpected files `extra\.bin`"):
            client_app._trainer({**flat, "paths.signed_manifest": signed.manifest.to_text()})
    finally:
        client_app._TRAINERS.clear()


# --- a folder that is not a loadable model ---------------------------------------------------


@pytest.mark.parametrize(
    ("files", "missing"),
    [
        (["config.json"], "no weights (*.safetensors or pytorch_model*.bin or "
         "model.safetensors.index.json or pytorch_model.bin.index.json) and no tokenizer "
         "files (tokenizer.json or tokenizer.model or vocab.json + merges.txt)"),
        (["config.json", "model.safetensors", "vocab.json"],
         "no tokenizer files (tokenizer.json or tokenizer.model or vocab.json + merges.txt)"),
        (["config.json", "tokenizer.json", "model.gguf"],
         "no weights (*.safetensors or pytorch_model*.bin or model.safetensors.index.json or "
         "pytorch_model.bin.index.json)"),
    ],
    ids=["config-only", "no-tokenizer", "no-weights"],
)
def test_a_folder_without_a_model_is_refused_with_one_line(
        tmp_path: Path, files: list[str], missing: str) -> None:
    from kernels.base_model import ModelNotAvailable, resolve_model_dir

    folder = tmp_path / "not-a-model"
    folder.mkdir()
    for name in files:
        (folder / name).write_text("{}")
    with pytest.raises(ModelNotAvailable) as err:
        resolve_model_dir(str(folder), tmp_path / "cache")
    assert str(err.value) == (
        f"model.source {str(folder)!r} is not a loadable model folder: {missing}; a model "
        "folder needs config.json, weights and tokenizer files: point it at a local Hugging "
        "Face causal-LM folder")


@pytest.mark.parametrize(
    "files",
    [["model.safetensors", "tokenizer.json"],
     ["pytorch_model-00001-of-00002.bin", "tokenizer.model"],
     ["model.safetensors.index.json", "vocab.json", "merges.txt"]],
    ids=["safetensors", "bin-shard", "index-bpe"],
)
def test_loadable_folders_pass(tmp_path: Path, files: list[str]) -> None:
    from kernels.base_model import resolve_model_dir

    for name in ["config.json", *files]:
        (tmp_path / name).write_text("{}")
    assert resolve_model_dir(str(tmp_path), tmp_path / "cache") == tmp_path


def test_fedtune_simulate_refuses_an_empty_model_folder_in_one_line(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from simulations.cli import main

    folder = tmp_path / "empty-with-config"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    code = main(["simulate", "--no-progress", "--runs-dir", str(runs), "--cache-dir",
                 str(cache), "--set", f"model.source={folder}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith(f"fedtune simulate: error: model.source '{folder}' is not a "
                             "loadable model folder: no weights")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"], "nothing written"
    assert not runs.exists() and not (cache / "manifests").exists()
