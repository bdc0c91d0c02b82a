"""protocols.atomic_write: contents land, failures leave the old version and no temporary
file, folders are never missing, and every write is fsynced."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from protocols import atomic_write
from protocols.atomic_write import (
    aside_path,
    recover_dir,
    replace_dir_atomic,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def make_dir(path: Path, content: str) -> Path:
    path.mkdir()
    (path / "weights.bin").write_text(content)
    (path / "sub").mkdir()
    (path / "sub" / "config.json").write_text(json.dumps({"v": content}))
    return path


def content(path: Path) -> str:
    return (path / "weights.bin").read_text()


@pytest.fixture
def no_exchange(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rename-aside path taken where the OS cannot swap two folders in one step."""
    monkeypatch.setattr(atomic_write, "_exchange", lambda a, b: False)


# -- files -----------------------------------------------------------------------------------


def test_contents_land(tmp_path: Path) -> None:
    write_bytes_atomic(tmp_path / "a.bin", b"\x00\x01")
    write_text_atomic(tmp_path / "b.txt", "héllo\nworld")
    write_json_atomic(tmp_path / "c.json", {"b": 1, "a": [1, 2]}, indent=2, sort_keys=True)
    write_json_atomic(str(tmp_path / "d.json"), {"b": 1, "a": 2})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_bytes() == "héllo\nworld".encode()
    assert (tmp_path / "c.json").read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2)
    assert (tmp_path / "d.json").read_text() == '{"b": 1, "a": 2}'
    assert names(tmp_path) == ["a.bin", "b.txt", "c.json", "d.json"]


def test_overwrites_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    for i in range(3):
        write_json_atomic(path, {"round": i})
    assert json.loads(path.read_text()) == {"round": 2}
    assert names(tmp_path) == ["state.json"]


def test_mode(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_text_atomic(tmp_path / "private", "x", mode=0o600)
        write_text_atomic(tmp_path / "script", "#!/bin/sh\n", mode=0o755)  # umask not applied
        write_text_atomic(tmp_path / "plain", "x")  # like open(): 0o666 less the umask
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "script").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o600


def test_unserialisable_object_leaves_old_file(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert names(tmp_path) == ["summary.json"]


def test_failing_write_leaves_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ledger.json"
    write_text_atomic(path, "old")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old"
    assert names(tmp_path) == ["ledger.json"]


def test_failing_replace_leaves_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "checkpoint.safetensors"
    write_bytes_atomic(path, b"old")

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError("simulated failure of the rename")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="simulated"):
        write_bytes_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert names(tmp_path) == ["checkpoint.safetensors"]


@pytest.fixture()
def synced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What os.fsync is called on, in order: "file" or "dir"."""
    kinds: list[str] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        kinds.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    return kinds


def test_file_and_folder_are_fsynced(tmp_path: Path, synced: list[str]) -> None:
    write_bytes_atomic(tmp_path / "a.bin", b"data")
    assert synced == ["file", "dir"]  # the data before the rename, the rename after it


# -- folders ---------------------------------------------------------------------------------


def test_replace_dir_publishes_new_folder(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    replace_dir_atomic(make_dir(tmp_path / "stage1", "one"), target)  # no old target
    assert content(target) == "one"
    replace_dir_atomic(make_dir(tmp_path / "stage2", "two"), target)  # replaces the old one
    assert content(target) == "two"
    assert json.loads((target / "sub" / "config.json").read_text()) == {"v": "two"}
    assert names(tmp_path) == ["adapter"]  # staged folders gone, old one deleted


def test_replace_dir_aside_path(tmp_path: Path, no_exchange: None) -> None:
    target = make_dir(tmp_path / "adapter", "old")
    replace_dir_atomic(make_dir(tmp_path / "stage", "new"), target)
    assert content(target) == "new"
    assert names(tmp_path) == ["adapter"]


def test_replace_dir_swaps_in_one_step_on_linux(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if atomic_write._renameat2() is None:
        pytest.skip("no renameat2 here")
    target = make_dir(tmp_path / "adapter", "old")
    calls: list[tuple[Any, Any]] = []
    real_replace = os.replace

    def recording_replace(src: Any, dst: Any) -> None:
        calls.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    replace_dir_atomic(make_dir(tmp_path / "stage", "new"), target)
    assert content(target) == "new"
    assert calls == []  # one renameat2(RENAME_EXCHANGE): the target is never missing
    assert names(tmp_path) == ["adapter"]


def fail_renames(monkeypatch: pytest.MonkeyPatch, *, failing: set[int]) -> None:
    """Let os.replace run normally except on the calls numbered in ``failing`` (from 1)."""
    real_replace = os.replace
    calls = 0

    def replace(src: Any, dst: Any) -> None:
        nonlocal calls
        calls += 1
        if calls in failing:
            raise SystemExit(f"simulated failure of rename #{calls}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_crash_between_renames_is_recoverable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_exchange: None
) -> None:
    target = make_dir(tmp_path / "model", "old")
    staged = make_dir(tmp_path / "stage", "new")
    with monkeypatch.context() as patch:
        # The process dies right after moving the old folder aside: no later rename
        # happens, not even the rollback an ordinary exception would trigger.
        fail_renames(patch, failing={2, 3})
        with pytest.raises(SystemExit):
            replace_dir_atomic(staged, target)
    assert not target.exists()
    assert content(aside_path(target)) == "old"  # the complete previous version
    assert recover_dir(target)  # what a reader (or the next replace) does first
    assert content(target) == "old"
    assert names(tmp_path) == ["model", "stage"]
    assert not recover_dir(target)  # nothing left to repair


def test_exception_between_renames_rolls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_exchange: None
) -> None:
    target = make_dir(tmp_path / "model", "old")
    staged = make_dir(tmp_path / "stage", "new")
    with monkeypatch.context() as patch:
        fail_renames(patch, failing={2})
        with pytest.raises(SystemExit):
            replace_dir_atomic(staged, target)
    assert content(target) == "old"  # back in place before the exception propagated
    assert content(staged) == "new"  # left for the caller's cleanup
    assert not os.path.lexists(aside_path(target))


def test_crash_after_second_rename_leaves_new_version(
    tmp_path: Path, no_exchange: None
) -> None:
    target = make_dir(tmp_path / "model", "new")
    make_dir(aside_path(target), "old")  # killed before the old copy was deleted
    assert recover_dir(target)
    assert content(target) == "new"
    assert names(tmp_path) == ["model"]


def test_next_replace_repairs_first(tmp_path: Path, no_exchange: None) -> None:
    target = tmp_path / "model"
    make_dir(aside_path(target), "old")  # a crash left only the aside copy
    replace_dir_atomic(make_dir(tmp_path / "stage", "new"), target)
    assert content(target) == "new"
    assert names(tmp_path) == ["model"]


def test_replace_dir_fsyncs_contents(tmp_path: Path, synced: list[str]) -> None:
    target = make_dir(tmp_path / "model", "old")
    staged = make_dir(tmp_path / "stage", "new")
    replace_dir_atomic(staged, target)
    assert synced.count("file") == 2  # weights.bin and sub/config.json
    assert synced.count("dir") >= 3  # stage, stage/sub, and the parent after the rename
