"""Atomic writes: whoever reads a path, and whatever a crash interrupts, sees the old version
or the new one, never half of one.

Files — :func:`write_bytes_atomic`, :func:`write_text_atomic`, :func:`write_json_atomic`:

1. create a temporary file ``.<name>.<random>.tmp`` in the target's own folder (so the rename
   below never crosses a filesystem and a leftover never looks like the real file);
2. write, flush and ``os.fsync`` it: the bytes are on disk before any name points at them;
3. ``os.replace`` it onto the target: one atomic step on POSIX;
4. ``os.fsync`` the folder, so the rename itself survives a power cut.

An exception before step 3 (an unserialisable object, a full disk, a failing rename) leaves
the old file untouched and deletes the temporary file. Only a crash of the process or the
machine can leave a ``.<name>.*.tmp`` behind; nothing reads those.

Folders — :func:`replace_dir_atomic` publishes a folder that was assembled beside its target
(by ``save_pretrained``, an exporter, a tar extraction...). Every file in it is fsynced first.
If no target exists it is simply renamed into place. Otherwise:

* On Linux (``renameat2(RENAME_EXCHANGE)``: ext4, xfs, btrfs, tmpfs, overlayfs...) the new
  folder and the old one swap names in one atomic step, and the old one, now under the staged
  name, is deleted. The target is never missing; a crash before the deletion leaves the old
  version under the staged (temporary) name, which nothing reads.
* Elsewhere the old folder is renamed aside to ``.<name>.old``, the new one renamed in, and
  the aside copy deleted. A crash **between the two renames** leaves no target and the
  complete old folder at ``.<name>.old``; a crash after the second leaves the new target and
  a stale ``.<name>.old``. :func:`recover_dir` repairs both (it moves the old folder back, or
  deletes the stale copy); :func:`replace_dir_atomic` calls it first, and a reader that checks
  for a cached folder should call it before looking.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import secrets
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "aside_path",
    "recover_dir",
    "replace_dir_atomic",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

StrPath = str | os.PathLike[str]


# -- files -----------------------------------------------------------------------------------


def write_bytes_atomic(path: StrPath, data: bytes, *, mode: int | None = None) -> None:
    """Replace ``path``'s contents with ``data`` atomically and durably (see module doc).

    ``mode``: ``None`` gives the file the permissions a plain ``open(path, "w")`` would
    (``0o666`` less the umask); an integer sets exactly those bits (the umask is not applied),
    e.g. ``0o600`` for a private file or ``0o755`` for a script.
    """
    target = Path(path)
    fd, tmp = _create_temp(target)
    try:
        with os.fdopen(fd, "wb") as handle:
            if mode is not None:
                os.chmod(tmp, mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def write_text_atomic(
    path: StrPath, text: str, *, encoding: str = "utf-8", mode: int | None = None
) -> None:
    """:func:`write_bytes_atomic` of ``text`` encoded with ``encoding`` (no newline
    translation: the file holds exactly ``text``)."""
    write_bytes_atomic(path, text.encode(encoding), mode=mode)


def write_json_atomic(
    path: StrPath,
    obj: Any,
    *,
    indent: int | None = None,
    sort_keys: bool = False,
    mode: int | None = None,
) -> None:
    """:func:`write_text_atomic` of ``json.dumps(obj, indent=indent, sort_keys=sort_keys)``.

    The object is serialised before anything is written: an unserialisable one raises
    ``TypeError`` and leaves no trace on disk.
    """
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys), mode=mode)


def _create_temp(target: Path) -> tuple[int, Path]:
    """A new, empty, exclusively created file beside ``target``: (open descriptor, path)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp  # the umask applies, as with open()
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue


def _fsync_dir(folder: Path) -> None:
    """Make the entries of ``folder`` (a rename into or out of it) durable. POSIX only:
    Windows cannot open a folder for fsync (and commits renames itself)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- folders ---------------------------------------------------------------------------------


def aside_path(target: StrPath) -> Path:
    """Where :func:`replace_dir_atomic` keeps the old ``target`` while it renames the new one
    in, where the OS cannot swap them in one step: ``.<name>.old`` beside it."""
    target = Path(target)
    return target.with_name(f".{target.name}.old")


def recover_dir(target: StrPath) -> bool:
    """Repair what a crash inside :func:`replace_dir_atomic` left at ``target``.

    If ``target`` is missing and its aside copy (:func:`aside_path`) exists, the copy, the
    complete previous version, is moved back. If both exist the copy is stale (the crash came
    after the new folder was in place) and is deleted. Returns whether there was anything to
    repair; cheap (one ``lstat``) when there was not.
    """
    target = Path(target)
    aside = aside_path(target)
    if not os.path.lexists(aside):
        return False
    if os.path.lexists(target):
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(aside, target)
        _fsync_dir(target.parent)
    return True


def replace_dir_atomic(staged: StrPath, target: StrPath) -> None:
    """Publish the folder ``staged`` as ``target``, replacing any old ``target`` (module doc).

    ``staged`` must be on the same filesystem as ``target``: assemble it in
    ``tempfile.mkdtemp(dir=target.parent)``. When this returns, ``staged`` no longer exists
    and ``target`` holds exactly its contents, on disk. On an exception the old ``target``
    is back in place and ``staged`` is left for the caller to delete. Two processes must
    not replace the same ``target`` at the same time.
    """
    staged, target = Path(staged), Path(target)
    _fsync_tree(staged)
    recover_dir(target)
    if not os.path.lexists(target):
        os.replace(staged, target)
        _fsync_parents(staged, target)
        return
    if _exchange(staged, target):  # now the old folder is at ``staged``
        _fsync_parents(staged, target)
        shutil.rmtree(staged, ignore_errors=True)
        return
    aside = aside_path(target)
    os.replace(target, aside)
    try:
        os.replace(staged, target)
    except BaseException:
        os.replace(aside, target)
        raise
    _fsync_parents(staged, target)
    shutil.rmtree(aside, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """fsync every regular file and folder under ``root`` (symlinks are left alone)."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_parents(staged: Path, target: Path) -> None:
    _fsync_dir(target.parent)
    if staged.parent.resolve() != target.parent.resolve():
        _fsync_dir(staged.parent)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP})


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """libc's ``renameat2`` (glibc >= 2.28), or ``None`` off Linux or in an older libc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        raw = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    raw.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    raw.restype = ctypes.c_int
    func: Callable[..., int] = raw
    return func


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one atomic step; ``False`` (and nothing changed)
    where the OS or the filesystem cannot."""
    func = _renameat2()
    if func is None:
        return False
    if func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
