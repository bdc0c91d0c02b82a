"""partition_source: real Flower Datasets partitioners over tiny datasets and the real
chatterbot corpus."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from kernels.data.examples import Example
from kernels.data.formats import DataFormatError
from protocols.run_config import ConfigError, DataSection
from simulations.devices import DevicePart, prepare_devices
from simulations.partitioning import partition_source

pytest.importorskip("flwr_datasets")


def section(**values: Any) -> DataSection:
    return DataSection.from_mapping({"min_examples": 2, **values})


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def users_file(tmp_path: Path, sizes: dict[str, int]) -> Path:
    """``{"text": "<user> <k>", "user": <user>}`` rows, users interleaved."""
    rows = [{"text": f"{user} {k}", "user": user, "label": f"l{k % 3}"}
            for k in range(max(sizes.values())) for user in sizes if k < sizes[user]]
    return write_jsonl(tmp_path / "data.jsonl", rows)


def texts(part: DevicePart) -> list[str]:
    return sorted(str(e.text) for e in part.train + part.heldout)


def rows_of(parts: list[DevicePart]) -> list[list[str]]:
    return [texts(p) for p in parts]


def test_natural_makes_one_device_per_value(tmp_path: Path) -> None:
    path = users_file(tmp_path, {"carol": 10, "alice": 6, "bob": 3})
    parts, layout = partition_source(section(source=str(path), partition_by="user"))
    assert layout == "text"
    assert [p.name for p in parts] == ["alice", "bob", "carol"]
    for part, n in zip(parts, (6, 3, 10), strict=True):
        assert texts(part) == sorted(f"{part.name} {k}" for k in range(n))
        assert len(part.heldout) == math.ceil(0.2 * n)
    # Held-out and training parts keep the file order.
    assert [e.text for e in parts[2].train] == sorted(
        (str(e.text) for e in parts[2].train), key=lambda t: int(t.split()[1]))


def test_iid_gives_equal_shuffled_shares(tmp_path: Path) -> None:
    path = users_file(tmp_path, {"a": 50, "b": 50})
    data = section(source=str(path), partition="iid", num_devices=4, seed=3)
    parts, _ = partition_source(data)
    assert [p.name for p in parts] == ["iid-0", "iid-1", "iid-2", "iid-3"]
    assert [len(p.train) + len(p.heldout) for p in parts] == [25, 25, 25, 25]
    assert sorted(t for p in parts for t in texts(p)) == sorted(
        f"{u} {k}" for u in "ab" for k in range(50))
    # Shuffled before sharding: the first device is not the file's first 25 rows.
    first = {json.loads(line)["text"] for line in path.read_text().splitlines()[:25]}
    assert set(texts(parts[0])) != first
    assert rows_of(partition_source(data)[0]) == rows_of(parts)
    assert rows_of(partition_source(section(source=str(path), partition="iid",
                                            num_devices=4, seed=4))[0]) != rows_of(parts)
    uneven, _ = partition_source(section(source=str(path), partition="iid", num_devices=3))
    assert [len(p.train) + len(p.heldout) for p in uneven] == [34, 33, 33]


def test_dirichlet_is_seeded(tmp_path: Path) -> None:
    path = users_file(tmp_path, {"a": 60, "b": 60})
    def run(seed: int) -> list[list[str]]:
        parts, _ = partition_source(section(source=str(path), partition="dirichlet",
                                            num_devices=4, partition_by="label", alpha=0.3,
                                            seed=seed))
        assert sum(len(p) for p in rows_of(parts)) <= 120
        return rows_of(parts)

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert all(p.name.startswith("dirichlet-") for p in partition_source(section(
        source=str(path), partition="dirichlet", num_devices=4, partition_by="label"))[0])


def test_min_examples_and_max_clients(tmp_path: Path) -> None:
    path = users_file(tmp_path, {"a": 5, "b": 9, "c": 3, "d": 9, "e": 7})
    parts, _ = partition_source(section(source=str(path), partition_by="user",
                                        min_examples=5))
    assert [p.name for p in parts] == ["a", "b", "d", "e"]
    parts, _ = partition_source(section(source=str(path), partition_by="user",
                                        max_clients=3))
    # The three largest (b and d tie at 9, then e), back in name order.
    assert [p.name for p in parts] == ["b", "d", "e"]
    parts, _ = partition_source(section(source=str(path), partition_by="user",
                                        max_clients=2, min_examples=8))
    assert [p.name for p in parts] == ["b", "d"]


def test_a_device_keeps_its_split_whatever_else_is_kept(tmp_path: Path) -> None:
    path = users_file(tmp_path, {"a": 10, "b": 12, "c": 30})
    every, _ = partition_source(section(source=str(path), partition_by="user"))
    one, _ = partition_source(section(source=str(path), partition_by="user", max_clients=1))
    assert one == [every[2]]


def test_no_device_left_says_how_big_the_largest_is(tmp_path: Path) -> None:
    path = users_file(tmp_path, {"a": 4, "b": 6})
    with pytest.raises(ConfigError, match=r"data.min_examples = 20.*\('b'\) has 6; lower "
                                          r"data.min_examples"):
        partition_source(section(source=str(path), partition_by="user", min_examples=20))


def test_missing_column_names_the_ones_there_are(tmp_path: Path) -> None:
    path = users_file(tmp_path, {"a": 4})
    with pytest.raises(ConfigError, match=r"data.partition_by = 'speaker'.*its columns are "
                                          r"\['file', 'folder', 'label', 'text', 'user'\]"):
        partition_source(section(source=str(path), partition_by="speaker"))
    with pytest.raises(ConfigError, match=r"'speaker'.*\['device', 'language', 'category'\]"):
        partition_source(section(source="chatterbot", partition_by="speaker"))


def test_more_devices_than_examples_is_a_config_error(tmp_path: Path) -> None:
    path = users_file(tmp_path, {"a": 4})
    with pytest.raises(ConfigError, match=r"data.num_devices = 9 but the data has only 4"):
        partition_source(section(source=str(path), partition="dirichlet", num_devices=9,
                                 partition_by="label"))


def test_bad_data_reports_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "user": "x"}\n{"text": 3, "user": "x"}\n')
    with pytest.raises(DataFormatError, match=r"d\.jsonl, line 2: 'text' must be a string"):
        partition_source(section(source=str(path), partition_by="user"))


def test_a_brought_heldout_part_is_ignored(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d" / "train.jsonl",
                [{"prompt": f"p{i}", "response": f"r{i}", "user": f"u{i % 2}"}
                 for i in range(8)])
    write_jsonl(tmp_path / "d" / "heldout.jsonl",
                [{"prompt": "held", "response": "out", "user": "u0"}])
    parts, layout = partition_source(section(source=str(tmp_path / "d"), partition_by="user"))
    assert layout == "instruction"
    assert [p.name for p in parts] == ["u0", "u1"]
    prompts = {e.turns[0].content for p in parts for e in p.train + p.heldout}
    assert prompts == {f"p{i}" for i in range(8)}


def test_a_folder_of_text_files_by_sub_folder(tmp_path: Path) -> None:
    for user, n in (("alice", 4), ("bob", 3)):
        for k in range(n):
            (tmp_path / "docs" / user).mkdir(parents=True, exist_ok=True)
            (tmp_path / "docs" / user / f"{k}.txt").write_text(f"{user} wrote {k}")
    parts, _ = partition_source(section(source=str(tmp_path / "docs"), partition_by="folder"))
    assert [(p.name, len(p.train), len(p.heldout)) for p in parts] == [
        ("alice", 3, 1), ("bob", 2, 1)]
    by_file, _ = partition_source(section(source=str(tmp_path / "docs"), partition_by="file",
                                          partition="dirichlet", num_devices=2))
    assert sum(len(p.train) + len(p.heldout) for p in by_file) == 7


@pytest.fixture(scope="module")
def chatterbot() -> list[DevicePart]:
    pytest.importorskip("yaml")
    return partition_source(section(source="chatterbot"))[0]


def test_chatterbot_devices_are_language_x_category(chatterbot: list[DevicePart]) -> None:
    names = [p.name for p in chatterbot]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert "english/ai" in names and "english/tech_support" in names
    assert all(name.count("/") == 1 for name in names)
    assert len({name.split("/")[0] for name in names}) > 10
    for part in chatterbot:
        assert len(part.train) + len(part.heldout) >= 2 and part.heldout
        for example in part.train + part.heldout:
            assert example.is_chat and len(example.turns) % 2 == 0
            assert [t.role for t in example.turns] == ["user", "assistant"] * (
                len(example.turns) // 2)
            assert all(t.content.strip() for t in example.turns) and example.reference


def test_chatterbot_partition_by_language(chatterbot: list[DevicePart]) -> None:
    parts, layout = partition_source(section(source="chatterbot", partition_by="language",
                                             min_examples=100))
    assert layout == "chat"
    names = [p.name for p in parts]
    assert "english" in names and "yoruba" not in names  # yoruba has a handful of chats
    english = next(p for p in parts if p.name == "english")
    english_devices = [p for p in chatterbot if p.name.startswith("english/")]
    assert len(english.train) + len(english.heldout) >= sum(
        len(p.train) + len(p.heldout) for p in english_devices)


def test_chatterbot_corpus_data() -> None:
    pytest.importorskip("yaml")
    from simulations.corpora.chatterbot import corpus_identity, load_conversations

    conversations = load_conversations()
    languages = Counter(columns["language"] for _, columns in conversations)
    assert len(languages) > 10 and languages.most_common(1)[0][0] == "english"
    example, columns = next((e, c) for e, c in conversations if c["device"] == "english/ai")
    assert example == Example(turns=example.turns) and example.turns[0].content == "What is AI?"
    assert columns == {"device": "english/ai", "language": "english", "category": "ai"}
    identity = corpus_identity()
    assert identity["version"] == "1.3.3"
    assert any(path == "english/ai.yml" for path, _ in identity["files"])
    assert json.loads(json.dumps(identity)) == json.loads(json.dumps(corpus_identity()))


def test_prepare_devices_writes_the_partition(tmp_path: Path) -> None:
    path = users_file(tmp_path, {"alice": 6, "bob": 5})
    devices = prepare_devices(section(source=str(path), partition_by="user"), tmp_path / "c")
    assert devices.names == ("alice", "bob")
    assert (devices.train_examples, devices.heldout_examples) == (8, 3)


def test_a_missing_corpus_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from simulations.corpora import chatterbot
    from simulations.devices import DataNotAvailable

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataNotAvailable, match=r"pip install chatterbot-corpus==1\.3\.3"):
        chatterbot.corpus_root()
