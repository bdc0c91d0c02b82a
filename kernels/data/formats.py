"""Reading a dataset from local files: which layouts fedtune accepts and how it detects them.

A data path is a file or a folder:

* plain text: ``.txt`` / ``.md`` files, one document each (documents are packed into token
  blocks, every token trained);
* records: ``.jsonl`` (one JSON object per line), ``.json`` (a list of objects), ``.csv``
  (a header row) or ``.parquet``, in one of these layouts (detected from the columns, or
  forced with ``format``):

  ==================  =======================================================  ============
  layout              columns                                                  ``format``
  ==================  =======================================================  ============
  text                ``text``                                                 text
  Alpaca              ``instruction``, ``output``, optional ``input``,         instruction
                      ``system``
  prompt / response   ``prompt`` and ``response`` (or ``completion``)          instruction
  chat                ``messages``: a list of ``{"role", "content"}``          chat
                      (roles system / user / assistant, at least one
                      assistant turn; in CSV a JSON string)
  ==================  =======================================================  ============

* a ``datasets.Dataset.save_to_disk`` folder (or a ``DatasetDict`` one: its ``train``
  split trains, its ``test``/``validation`` split is held out).

A folder's files must all be of one kind (text or records) and one layout. A folder whose
entries are named ``train`` and ``heldout`` (or ``test`` / ``validation``) — files like
``train.jsonl`` or sub-folders — brings its own held-out split; otherwise the caller splits.

Why our own readers instead of ``datasets.load_dataset`` for json/csv: its errors come from
pyarrow and name neither the file nor the line, and an edge device should not need pyarrow
to read a JSONL file. ``datasets`` is used where only it can read the data (``save_to_disk``
folders); parquet is read with pyarrow, which ``datasets`` installs.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from kernels.data.examples import ROLES, Example, Turn, instruction

DataFormat = Literal["auto", "text", "instruction", "chat"]
DATA_FORMATS: tuple[DataFormat, ...] = get_args(DataFormat)
TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
TRAIN_NAMES = ("train",)
HELDOUT_NAMES = ("heldout", "test", "validation")
LAYOUT_HELP = ("a 'text' column; 'instruction' + 'output' (Alpaca, optional 'input'); "
               "'prompt' + 'response'; or 'messages' (a list of {role, content})")


class DataFormatError(ValueError):
    """The data cannot be read; the message names the file (and line or row) and the fix."""


@dataclass(frozen=True)
class Dataset:
    """What a data path holds: its examples, its own held-out part if it brings one, and
    the layout found (``text``, ``instruction`` or ``chat``)."""

    train: tuple[Example, ...]
    heldout: tuple[Example, ...] | None
    layout: str
    source: Path


def _checked_source(path: Path, format: DataFormat) -> Path:
    """The data path, once the format is known and the path exists."""
    if format not in DATA_FORMATS:
        raise DataFormatError(f"data format {format!r}: must be one of {list(DATA_FORMATS)}")
    if not Path(path).exists():
        raise DataFormatError(f"{path}: no such file or folder; check the data path")
    return Path(path)


def read_dataset(path: Path, format: DataFormat = "auto") -> Dataset:
    """Read a file or folder (see the module doc); raise :class:`DataFormatError` on any
    problem, naming what is wrong and where."""
    path = _checked_source(path, format)
    if path.is_dir() and _is_saved_dataset(path):
        return _read_saved(path, format)
    if path.is_dir():
        parts = _explicit_split(path)
        if parts is not None:
            train, train_layout = read_examples(parts[0], format)
            held, held_layout = read_examples(parts[1], format)
            if held_layout != train_layout:
                raise DataFormatError(
                    f"{parts[0]} holds {train_layout} data but {parts[1]} holds {held_layout} "
                    "data; both parts of a split must have one layout")
            return Dataset(tuple(train), tuple(held), train_layout, path)
    examples, layout = read_examples(path, format)
    return Dataset(tuple(examples), None, layout, path)


def read_examples(path: Path, format: DataFormat = "auto") -> tuple[list[Example], str]:
    """Every example of one file or folder (no split detection) and their layout."""
    path = Path(path)
    files = _data_files(path)
    kinds = {f: ("text" if f.suffix.lower() in TEXT_SUFFIXES else "records") for f in files}
    if len(set(kinds.values())) > 1:
        text = next(f for f, k in kinds.items() if k == "text")
        records = next(f for f, k in kinds.items() if k == "records")
        raise DataFormatError(
            f"{path} mixes plain-text files ({text.name}) and record files ({records.name}); "
            "put each kind in its own folder")
    examples: list[Example] = []
    layouts: dict[str, Path] = {}
    for file in files:
        if kinds[file] == "text":
            if format not in ("auto", "text"):
                raise DataFormatError(f"{file}: a plain-text file cannot be read as "
                                      f"format = {format!r}; use a records file or 'auto'")
            examples.append(_read_text_file(file))
            layouts.setdefault("text", file)
        else:
            got, layout = _read_records(file, format)
            examples += got
            layouts.setdefault(layout, file)
        if len(layouts) > 1:
            (a, fa), (b, fb) = list(layouts.items())[:2]
            raise DataFormatError(f"{path}: {fa.name} holds {a} data but {fb.name} holds {b} "
                                  "data; one dataset must have one layout")
    return examples, next(iter(layouts))


def _data_files(path: Path) -> list[Path]:
    """The data files under ``path`` (itself if a file), sorted, hidden files skipped."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataFormatError(f"{path}: the folder is empty; put the device's data files "
                                  "in it")
    else:
        raise DataFormatError(f"{path}: no such file or folder; check the data path")
    supported = TEXT_SUFFIXES + RECORD_SUFFIXES
    for file in files:
        if file.suffix.lower() not in supported:
            raise DataFormatError(f"{file}: unsupported file type {file.suffix or '(none)'!r}; "
                                  f"fedtune reads {', '.join(supported)} files")
    return files


def _read_text_file(file: Path) -> Example:
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{file}: not UTF-8 text (byte {err.start}); save it as UTF-8"
                              ) from None
    if not text.strip():
        raise DataFormatError(f"{file}: the file is empty; remove it or add text")
    return Example(text=text)


def _read_records(file: Path, format: DataFormat) -> tuple[list[Example], str]:
    rows = list(_rows(file))
    if not rows:
        raise DataFormatError(f"{file}: the file holds no records; remove it or add some")
    layout = _layout(file, rows[0][1], format)
    return [_example(file, where, row, layout) for where, row in rows], _family(layout)


def _rows(file: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """``(where, row)`` pairs; ``where`` is "line 3" / "row 3" / "item 3" for errors."""
    suffix = file.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_rows(file)
        return
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{file}: not UTF-8 text (byte {err.start}); save it as UTF-8"
                              ) from None
    if suffix == ".jsonl":
        # Lines end at "\n" only: str.splitlines() would also split at U+2028/U+0085, which
        # JSON leaves unescaped inside strings.
        for number, line in enumerate(text.split("\n"), start=1):
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise DataFormatError(f"{file}, line {number}: not valid JSON ({err}); each line "
                                      "must be one JSON object") from None
            yield f"line {number}", _as_row(file, f"line {number}", row)
    elif suffix == ".json":
        try:
            doc = json.loads(text)
        except ValueError as err:
            raise DataFormatError(f"{file}: not valid JSON ({err})") from None
        if not isinstance(doc, list):
            raise DataFormatError(f"{file}: expected a JSON list of objects, got "
                                  f"{type(doc).__name__}; or write one object per line (.jsonl)")
        for index, row in enumerate(doc):
            yield f"item {index}", _as_row(file, f"item {index}", row)
    else:  # .csv
        # newline="" semantics: quoted fields keep their line breaks.
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for number, row in enumerate(reader, start=2):  # line 1 is the header
            if None in row:
                raise DataFormatError(f"{file}, row {number}: more fields than the header has; "
                                      "quote fields that contain commas")
            yield f"row {number}", row


def _parquet_rows(file: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataFormatError(f"{file}: reading parquet needs pyarrow (`pip install "
                              "datasets`, which brings it); or convert the file to JSONL"
                              ) from None
    try:
        rows = pq.read_table(file).to_pylist()
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise DataFormatError(f"{file}: not a readable parquet file ({err})") from None
    for index, row in enumerate(rows):
        yield f"row {index}", row


def _as_row(file: Path, where: str, row: Any) -> Mapping[str, Any]:
    if not isinstance(row, dict):
        raise DataFormatError(f"{file}, {where}: expected a JSON object, got "
                              f"{type(row).__name__}")
    return row


_LAYOUT_COLUMNS = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt-response": ("prompt", "response"),
    "prompt-completion": ("prompt", "completion"),
    "text": ("text",),
}
_FORMAT_LAYOUTS: dict[str, tuple[str, ...]] = {
    "chat": ("chat",),
    "instruction": ("alpaca", "prompt-response", "prompt-completion"),
    "text": ("text",),
    "auto": ("chat", "alpaca", "prompt-response", "prompt-completion", "text"),
}


def _layout(file: Path, first: Mapping[str, Any], format: DataFormat) -> str:
    """The layout of a records file, from its first record's columns."""
    for layout in _FORMAT_LAYOUTS[format]:
        if all(column in first for column in _LAYOUT_COLUMNS[layout]):
            return layout
    wanted = LAYOUT_HELP if format == "auto" else (
        " or ".join(" + ".join(_LAYOUT_COLUMNS[la]) for la in _FORMAT_LAYOUTS[format]))
    raise DataFormatError(
        f"{file}: unknown layout (columns {sorted(first)}); expected {wanted}. Rename the "
        "columns, or set the data format (text / instruction / chat)")


def _family(layout: str) -> str:
    return {"chat": "chat", "text": "text"}.get(layout, "instruction")


def _example(file: Path, where: str, row: Mapping[str, Any], layout: str) -> Example:
    def field(name: str, *, optional: bool = False) -> str:
        value = row.get(name)
        if value is None and optional:
            return ""
        if not isinstance(value, str):
            raise DataFormatError(f"{file}, {where}: '{name}' must be a string, got "
                                  f"{type(value).__name__ if value is not None else 'nothing'}")
        if not optional and not value.strip():
            raise DataFormatError(f"{file}, {where}: '{name}' is empty; fill it or drop the "
                                  "record")
        return value

    if layout == "text":
        return Example(text=field("text"))
    if layout == "alpaca":
        return instruction(field("instruction"), field("output"),
                           input=field("input", optional=True),
                           system=field("system", optional=True))
    if layout in ("prompt-response", "prompt-completion"):
        return instruction(field("prompt"), field(layout.split("-")[1]))
    return Example(turns=_turns(file, where, row.get("messages")))


def _turns(file: Path, where: str, messages: Any) -> tuple[Turn, ...]:
    if isinstance(messages, str):  # CSV cells hold the list as a JSON string
        try:
            messages = json.loads(messages)
        except ValueError:
            raise DataFormatError(f"{file}, {where}: 'messages' is not a JSON list") from None
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise DataFormatError(f"{file}, {where}: 'messages' must be a non-empty list of "
                              "{role, content} objects")
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise DataFormatError(f"{file}, {where}: message {index} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataFormatError(f"{file}, {where}: message {index} has role {role!r}; "
                                  f"expected one of {list(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise DataFormatError(f"{file}, {where}: message {index} ({role}) has no text "
                                  "content")
        turns.append(Turn(role, content))
    first = next((t.role for t in turns if t.role != "system"), None)
    if first == "assistant":
        raise DataFormatError(f"{file}, {where}: the conversation starts with an assistant "
                              "turn; the first turn after any system turn must be the user's")
    if not any(t.role == "assistant" for t in turns):
        raise DataFormatError(f"{file}, {where}: the conversation has no assistant turn, so "
                              "nothing would be trained on it")
    return tuple(turns)


def _explicit_split(folder: Path) -> tuple[Path, Path] | None:
    """``(train, heldout)`` entries of a folder that brings its own split, else None."""
    entries: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        key = entry.stem.lower() if entry.is_file() else entry.name.lower()
        if key in entries and key in TRAIN_NAMES + HELDOUT_NAMES:
            raise DataFormatError(f"{folder}: both {entries[key].name} and {entry.name} would be "
                                  f"the '{key}' part; keep one")
        entries[key] = entry
    train = next((entries[n] for n in TRAIN_NAMES if n in entries), None)
    held = next((entries[n] for n in HELDOUT_NAMES if n in entries), None)
    if train is None or held is None:
        return None
    extra = sorted(set(entries.values()) - {train, held})
    if extra:
        raise DataFormatError(f"{folder}: has '{train.name}' and '{held.name}' (a split) but "
                              f"also {[p.name for p in extra][:3]}; move the other entries "
                              "out, or into one of the two parts")
    return train, held


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file())


def _read_saved(folder: Path, format: DataFormat) -> Dataset:
    """A ``save_to_disk`` folder: only ``datasets`` reads its Arrow files."""
    try:
        import datasets
    except ImportError:
        raise DataFormatError(f"{folder} is a `datasets` folder (save_to_disk); reading it "
                              "needs `pip install datasets`") from None
    loaded = datasets.load_from_disk(str(folder), keep_in_memory=True)
    if isinstance(loaded, datasets.DatasetDict):
        train_name = next((n for n in TRAIN_NAMES if n in loaded), None)
        held_name = next((n for n in HELDOUT_NAMES if n in loaded), None)
        if train_name is None:
            raise DataFormatError(f"{folder}: the saved DatasetDict has splits "
                                  f"{sorted(loaded)} but no 'train' split")
        train, layout = _saved_examples(folder / train_name, loaded[train_name], format)
        held = None
        if held_name is not None:
            held, _ = _saved_examples(folder / held_name, loaded[held_name], format)
        return Dataset(tuple(train), None if held is None else tuple(held), layout, folder)
    train, layout = _saved_examples(folder, loaded, format)
    return Dataset(tuple(train), None, layout, folder)


def _saved_examples(where: Path, table: Any, format: DataFormat) -> tuple[list[Example], str]:
    rows = table.to_list()
    if not rows:
        raise DataFormatError(f"{where}: the saved dataset has no rows")
    layout = _layout(where, rows[0], format)
    return [_example(where, f"row {i}", row, layout) for i, row in enumerate(rows)], _family(
        layout)


FILE_COLUMN = "file"
FOLDER_COLUMN = "folder"
FILE_COLUMNS = (FILE_COLUMN, FOLDER_COLUMN)


class UnknownColumnError(DataFormatError):
    """A column asked of :func:`read_rows` is not in the data; ``available`` names those that
    are (so a caller can say which setting to change)."""

    def __init__(self, message: str, available: Sequence[str]) -> None:
        super().__init__(message)
        self.available = tuple(available)


def read_rows(path: Path, format: DataFormat = "auto", columns: Sequence[str] = ()
              ) -> tuple[list[Example], list[dict[str, str]], str]:
    """The training examples of a data path, for each the raw values of ``columns`` (what a
    simulation partitions by: a user id, a label), and their layout.

    Only the training part is read: a folder that brings its own split (see the module doc)
    or a saved ``DatasetDict`` gives its ``train`` part. The examples are exactly
    :func:`read_examples`' (same checks, same order); the values are strings, other JSON
    values written as JSON (``17``, ``true``). Besides a record's own columns, every file
    has ``file`` (its path relative to the folder read; a lone file's name) and ``folder``
    (that path's folder, ``.`` at the top), unless a record has columns of those names: so
    a folder of ``.txt`` files, one document each and no other column, can be partitioned
    one device per file or per sub-folder. A column that is not there raises
    :class:`UnknownColumnError` naming those that are."""
    path = _checked_source(path, format)
    if path.is_dir() and _is_saved_dataset(path):
        return _saved_rows(path, format, columns)
    if path.is_dir():
        parts = _explicit_split(path)
        if parts is not None:
            path = parts[0]
    examples, layout = read_examples(path, format)
    # Records are parsed a second time for their columns, so that read_examples stays the
    # one place deciding what an example is; the two passes see the same files and rows.
    values = [row for file in _data_files(path) for row in _file_values(path, file, columns)]
    if len(values) != len(examples):  # pragma: no cover - the files changed between passes
        raise DataFormatError(f"{path}: changed while being read; read it again")
    return examples, values, layout


def _file_values(root: Path, file: Path, columns: Sequence[str]) -> Iterator[dict[str, str]]:
    """Each example's ``columns`` in ``file`` (one document for a text file)."""
    relative = file.relative_to(root) if root.is_dir() else Path(file.name)
    own = {FILE_COLUMN: relative.as_posix(), FOLDER_COLUMN: relative.parent.as_posix()}
    if file.suffix.lower() in TEXT_SUFFIXES:
        missing = [c for c in columns if c not in own]
        if missing:
            raise UnknownColumnError(
                f"{file}: a plain-text file has no column {missing[0]!r}; its only columns "
                f"are {list(FILE_COLUMNS)} (its path)", FILE_COLUMNS)
        yield {c: own[c] for c in columns}
        return
    available: list[str] | None = None
    for where, row in _rows(file):
        if available is None:
            available = sorted({*row, *FILE_COLUMNS})
            missing = [c for c in columns if c not in available]
            if missing:
                raise UnknownColumnError(
                    f"{file}: no column {missing[0]!r}; its columns are {available}",
                    available)
        yield {c: _column_value(file, where, c, row[c] if c in row else own.get(c))
               for c in columns}


def _column_value(file: Path, where: str, column: str, value: Any) -> str:
    if value is None:
        raise DataFormatError(f"{file}, {where}: no value for column {column!r}; fill it or "
                              "drop the record")
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _saved_rows(folder: Path, format: DataFormat, columns: Sequence[str]
                ) -> tuple[list[Example], list[dict[str, str]], str]:
    """A ``save_to_disk`` folder's training rows (a ``DatasetDict``'s ``train`` split)."""
    try:
        import datasets
    except ImportError:
        raise DataFormatError(f"{folder} is a `datasets` folder (save_to_disk); reading it "
                              "needs `pip install datasets`") from None
    loaded = datasets.load_from_disk(str(folder), keep_in_memory=True)
    where, table = folder, loaded
    if isinstance(loaded, datasets.DatasetDict):
        name = next((n for n in TRAIN_NAMES if n in loaded), None)
        if name is None:
            raise DataFormatError(f"{folder}: the saved DatasetDict has splits "
                                  f"{sorted(loaded)} but no 'train' split")
        where, table = folder / name, loaded[name]
    available = sorted(table.column_names)
    missing = [c for c in columns if c not in available]
    if missing:
        raise UnknownColumnError(
            f"{where}: no column {missing[0]!r}; its columns are {available}", available)
    examples, layout = _saved_examples(where, table, format)
    rows = table.select_columns(list(columns)).to_list() if columns else [{}] * len(examples)
    values = [{c: _column_value(where, f"row {i}", c, row[c]) for c in columns}
              for i, row in enumerate(rows)]
    return examples, values, layout


def write_jsonl(path: Path, examples: Sequence[Example]) -> None:
    """Write examples in the canonical layout (``text`` or ``messages`` rows)."""
    from protocols.atomic_write import write_text_atomic

    lines = (json.dumps(e.to_json(), ensure_ascii=False) for e in examples)
    write_text_atomic(Path(path), "".join(f"{line}\n" for line in lines))
