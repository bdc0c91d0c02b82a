"""read_rows: the examples read_examples gives, with the raw values of named columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kernels.data.examples import chat, instruction
from kernels.data.formats import (
    DataFormatError,
    UnknownColumnError,
    read_dataset,
    read_examples,
    read_rows,
)


def _jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_columns_align_with_the_examples(tmp_path: Path) -> None:
    file = _jsonl(tmp_path / "d.jsonl", [
        {"instruction": f"q{i}", "output": f"a{i}", "user": f"u{i % 2}", "n": i,
         "ok": i == 1}
        for i in range(3)])
    examples, values, layout = read_rows(file, "auto", ["user", "n", "ok"])
    assert layout == "instruction"
    assert examples == read_examples(file)[0]
    assert examples[2] == instruction("q2", "a2")
    # Non-strings come back as their JSON text.
    assert values == [{"user": "u0", "n": "0", "ok": "false"},
                      {"user": "u1", "n": "1", "ok": "true"},
                      {"user": "u0", "n": "2", "ok": "false"}]


def test_no_columns_gives_one_empty_dict_per_example(tmp_path: Path) -> None:
    file = _jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}])
    examples, values, layout = read_rows(file, "text")
    assert (len(examples), values, layout) == (2, [{}, {}], "text")


def test_csv_columns(tmp_path: Path) -> None:
    file = tmp_path / "d.csv"
    messages = json.dumps([{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello"}])
    file.write_text('messages,topic\n' + "".join(
        f'"{messages.replace(chr(34), chr(34) * 2)}",t{i}\n' for i in range(2)),
        encoding="utf-8")
    examples, values, layout = read_rows(file, "chat", ["topic"])
    assert layout == "chat"
    assert examples == [chat(("user", "hi"), ("assistant", "hello"))] * 2
    assert values == [{"topic": "t0"}, {"topic": "t1"}]


def test_unknown_column_names_the_columns_there_are(tmp_path: Path) -> None:
    file = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "user": "x"}])
    with pytest.raises(UnknownColumnError) as caught:
        read_rows(file, "auto", ["speaker"])
    message = str(caught.value)
    assert str(file) in message and "'speaker'" in message
    assert "['file', 'folder', 'text', 'user']" in message
    assert caught.value.available == ("file", "folder", "text", "user")
    assert isinstance(caught.value, DataFormatError)


def test_a_record_without_the_value_is_named_by_line(tmp_path: Path) -> None:
    file = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "user": "x"}, {"text": "b"},
                                         {"text": "c", "user": None}])
    with pytest.raises(DataFormatError, match=r"d\.jsonl, line 2: no value for column 'user'"):
        read_rows(file, "auto", ["user"])


def test_text_files_have_file_and_folder_columns(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    for rel in ("b.txt", "a.md", "alice/1.txt", "alice/2.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"text of {rel}", encoding="utf-8")
    examples, values, layout = read_rows(root, "auto", ["file", "folder"])
    assert layout == "text"
    assert [e.text for e in examples] == [f"text of {v['file']}" for v in values]
    assert values == [{"file": "a.md", "folder": "."},
                      {"file": "alice/1.txt", "folder": "alice"},
                      {"file": "alice/2.txt", "folder": "alice"},
                      {"file": "b.txt", "folder": "."}]
    # A lone file: its name.
    assert read_rows(root / "alice" / "1.txt", "auto", ["file"])[1] == [{"file": "1.txt"}]
    with pytest.raises(UnknownColumnError, match=r"plain-text file has no column 'user'.*"
                                                 r"\['file', 'folder'\]"):
        read_rows(root, "auto", ["user"])


def test_record_files_have_file_columns_unless_they_bring_their_own(tmp_path: Path) -> None:
    _jsonl(tmp_path / "d" / "x.jsonl", [{"text": "1"}, {"text": "2"}])
    _jsonl(tmp_path / "d" / "y.jsonl", [{"text": "3", "file": "own"}])
    _, values, _ = read_rows(tmp_path / "d", "auto", ["file"])
    assert values == [{"file": "x.jsonl"}, {"file": "x.jsonl"}, {"file": "own"}]


def test_a_folder_with_its_own_split_gives_its_train_part(tmp_path: Path) -> None:
    _jsonl(tmp_path / "d" / "train.jsonl", [{"text": f"t{i}", "user": f"u{i}"} for i in range(3)])
    _jsonl(tmp_path / "d" / "heldout.jsonl", [{"text": "h", "user": "u9"}])
    examples, values, _ = read_rows(tmp_path / "d", "auto", ["user"])
    assert [e.text for e in examples] == ["t0", "t1", "t2"]
    assert [v["user"] for v in values] == ["u0", "u1", "u2"]
    assert read_dataset(tmp_path / "d").heldout is not None  # unchanged behaviour


def test_saved_dataset_dict_gives_its_train_split(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a", "b"], "label": [3, 4]}),
        "test": datasets.Dataset.from_dict({"text": ["c"], "label": [5]}),
    }).save_to_disk(str(folder))
    examples, values, layout = read_rows(folder, "auto", ["label"])
    assert ([e.text for e in examples], values, layout) == (
        ["a", "b"], [{"label": "3"}, {"label": "4"}], "text")
    with pytest.raises(UnknownColumnError, match=r"no column 'user'; its columns are "
                                                 r"\['label', 'text'\]"):
        read_rows(folder, "auto", ["user"])


def test_bad_data_is_still_reported_by_file_and_line(tmp_path: Path) -> None:
    file = tmp_path / "d.jsonl"
    file.write_text('{"text": "a", "user": "x"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"d\.jsonl, line 2: not valid JSON"):
        read_rows(file, "auto", ["user"])
