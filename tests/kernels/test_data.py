"""A device's data, from files to scored blocks: formats detected and refused with the file
and line named, chat templates with the answer located, packing and truncation rules, and
the golden token masks on SmolLM2's real tokenizer and chat template."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kernels.data.blocks import encode_blocks
from kernels.data.examples import Example, Turn, chat, instruction
from kernels.data.formats import DataFormatError, read_dataset, read_examples
from kernels.data.templates import ALPACA_PREAMBLE, PromptTemplate, TemplateError

CHATML = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n"
          "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# -- formats -----------------------------------------------------------------------------

def test_layouts_are_detected_from_the_columns(tmp_path: Path) -> None:
    text = _jsonl(tmp_path / "t.jsonl", [{"text": "one"}, {"text": "two"}])
    alpaca = _jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "2 and 3",
                                            "output": "5"}])
    pr = _jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi?", "response": "Hello."}])
    msgs = _jsonl(tmp_path / "c.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}]}])
    assert read_examples(text) == ([Example(text="one"), Example(text="two")], "text")
    assert read_examples(alpaca) == ([chat(("user", "Add\n\n2 and 3"), ("assistant", "5"))],
                                     "instruction")
    assert read_examples(pr) == ([chat(("user", "Hi?"), ("assistant", "Hello."))], "instruction")
    got, layout = read_examples(msgs)
    assert layout == "chat" and got[0].turns[0] == Turn("system", "Be brief.")


def test_csv_json_and_text_folders(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text('prompt,response\n"Hi, there",Hello\n', encoding="utf-8")
    assert read_examples(tmp_path / "d.csv")[0] == [chat(("user", "Hi, there"),
                                                         ("assistant", "Hello"))]
    (tmp_path / "d.json").write_text(json.dumps([{"text": "x"}]), encoding="utf-8")
    assert read_examples(tmp_path / "d.json")[0] == [Example(text="x")]
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "b.md").write_text("# B\n", encoding="utf-8")
    (docs / "a.txt").write_text("A\n", encoding="utf-8")
    (docs / ".hidden.txt").write_text("never read", encoding="utf-8")
    assert read_examples(docs) == ([Example(text="A\n"), Example(text="# B\n")], "text")


def test_a_folder_with_train_and_heldout_brings_its_own_split(tmp_path: Path) -> None:
    _jsonl(tmp_path / "train.jsonl", [{"text": "a"}, {"text": "b"}])
    _jsonl(tmp_path / "test.jsonl", [{"text": "c"}])
    dataset = read_dataset(tmp_path)
    assert [e.text for e in dataset.train] == ["a", "b"]
    assert dataset.heldout is not None and [e.text for e in dataset.heldout] == ["c"]
    assert read_dataset(tmp_path / "train.jsonl").heldout is None


def test_a_saved_datasets_folder_is_read(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = {"prompt": ["p1", "p2"], "response": ["r1", "r2"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "test": datasets.Dataset.from_dict(rows)}).save_to_disk(
        str(tmp_path / "saved"))
    dataset = read_dataset(tmp_path / "saved")
    assert dataset.layout == "instruction" and len(dataset.train) == 2
    assert dataset.heldout is not None and dataset.heldout[1].reference == "r2"


@pytest.mark.parametrize(("setup", "message"), [
    (lambda d: None, "no such file or folder"),
    (lambda d: (d / "x.jsonl").write_text(""), "holds no records"),
    (lambda d: (d / "x.txt").write_text("  \n"), "the file is empty"),
    (lambda d: (d / "x.txt").write_bytes(b"ok \xff\xfe"), r"not UTF-8 text \(byte 3\)"),
    (lambda d: (d / "x.jsonl").write_text('{"text": "a"}\n{"text": "b"\n'),
     r"x.jsonl, line 2: not valid JSON"),
    (lambda d: (d / "x.jsonl").write_text('{"title": "a"}\n'),
     r"unknown layout \(columns \['title'\]\)"),
    (lambda d: (d / "x.jsonl").write_text('{"text": "a"}\n{"text": 3}\n'),
     r"x.jsonl, line 2: 'text' must be a string, got int"),
    (lambda d: (d / "x.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "hi"}]}\n'), "has no assistant turn"),
    (lambda d: (d / "x.jsonl").write_text(
        '{"messages": [{"role": "bot", "content": "hi"}]}\n'), "has role 'bot'"),
    (lambda d: (d / "x.csv").write_text("text\na,b\n"), r"x.csv, row 2: more fields"),
    (lambda d: (d / "x.pdf").write_text("%PDF"), "unsupported file type '.pdf'"),
])
def test_bad_input_names_the_file_the_line_and_the_fix(
        tmp_path: Path, setup: object, message: str) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    setup(folder)  # type: ignore[operator]
    target = next(iter(folder.iterdir()), folder / "missing.jsonl")
    with pytest.raises(DataFormatError, match=message):
        read_dataset(target)


def test_mixed_kinds_and_layouts_in_one_folder_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("text", encoding="utf-8")
    _jsonl(tmp_path / "b.jsonl", [{"text": "x"}])
    with pytest.raises(DataFormatError, match=r"mixes plain-text files \(a.txt\) and record "
                                              r"files \(b.jsonl\)"):
        read_dataset(tmp_path)
    (tmp_path / "a.txt").unlink()
    _jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "response": "r"}])
    with pytest.raises(DataFormatError, match=r"b\.jsonl holds text data but c\.jsonl holds "
                                              r"instruction data"):
        read_dataset(tmp_path)


def test_the_format_can_be_forced(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "x.jsonl", [{"text": "t", "prompt": "p", "response": "r"}])
    assert read_examples(path)[1] == "instruction"  # supervised layouts win in 'auto'
    assert read_examples(path, "text")[1] == "text"
    with pytest.raises(DataFormatError, match="expected messages"):
        read_examples(path, "chat")


# -- templates ---------------------------------------------------------------------------

def test_chat_template_spans_cover_every_answer_and_nothing_else(tmp_path: Path) -> None:
    template = PromptTemplate(CHATML, eos_token="</s>")
    example = chat(("system", "S"), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"),
                   ("assistant", "A2"))
    rendered = template.render(example)
    assert rendered.text == ("<|system|>S</s>\n<|user|>Q1</s>\n<|assistant|>A1</s>\n"
                             "<|user|>Q2</s>\n<|assistant|>A2</s>\n")
    assert [rendered.text[a:b] for a, b in rendered.spans] == ["A1</s>\n", "A2</s>\n"]
    assert template.prompt(example.prompt_turns).endswith("<|user|>Q2</s>\n<|assistant|>")


def test_alpaca_is_the_fallback_and_its_span_is_the_answer_and_eos(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<eos>"}')
    template = PromptTemplate.for_tokenizer(tmp_path)
    assert template.name == "alpaca"
    rendered = template.render(instruction("Add", "5", input="2 and 3"))
    assert rendered.text == (f"{ALPACA_PREAMBLE}\n\n### Instruction:\nAdd\n\n2 and 3\n\n"
                             "### Response:\n5<eos>\n\n")
    assert [rendered.text[a:b] for a, b in rendered.spans] == ["5<eos>"]


def test_a_template_that_rewrites_history_is_refused() -> None:
    unstable = ("{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}"
                "{% endfor %}")
    with pytest.raises(TemplateError, match=r"data\.template = 'alpaca'"):
        PromptTemplate(unstable, eos_token="</s>").render(
            chat(("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "a2")))


# -- blocks ------------------------------------------------------------------------------

class _CharTokenizer:
    """A one-token-per-character stand-in for ``tokenizers.Tokenizer``."""

    class _Encoding:
        def __init__(self, text: str) -> None:
            self.ids = [ord(c) for c in text]
            self.offsets = [(i, i + 1) for i in range(len(text))]

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[object]:
        return [self._Encoding(t) for t in texts]


def _decode_scored(blocks: object) -> list[str]:
    return ["".join(chr(i) for i, s in zip(row, mask, strict=True) if s)
            for row, mask in zip(blocks.ids, blocks.scored, strict=True)]  # type: ignore[attr-defined]


def test_documents_are_packed_and_every_token_scored() -> None:
    template = PromptTemplate(None, eos_token="~")
    blocks = encode_blocks(_CharTokenizer(), [Example(text="abcde"), Example(text="fg")],
                           template, 4, eos_token_id=ord("~"))
    assert ["".join(map(chr, row)) for row in blocks.ids] == ["abcd", "e~fg"]  # "~" dropped
    assert blocks.every_token_scored and blocks.scored_tokens == 6
    assert not blocks.scored[:, 0].any()


def test_conversations_are_packed_whole_and_only_answers_scored() -> None:
    template = PromptTemplate(CHATML.replace("<|", "<").replace("|>", ">"), eos_token="~")
    short = chat(("user", "q"), ("assistant", "ab"))  # "<user>q~\n<assistant>ab~\n": 24 chars
    blocks = encode_blocks(_CharTokenizer(), [short, short, short], template, 48,
                           eos_token_id=ord("~"))
    assert blocks.ids.shape == (2, 48)  # two fit in a block; the third starts the next
    assert _decode_scored(blocks) == ["ab~\nab~\n", "ab~\n"]
    assert blocks.ids[1, 24:].tolist() == [ord("~")] * 24  # padding, never scored
    labels = blocks.labels()
    assert (labels[~blocks.scored] == -100).all() and (labels[blocks.scored] > 0).all()


def test_truncation_keeps_the_head_and_drops_examples_with_no_answer_left() -> None:
    template = PromptTemplate(CHATML.replace("<|", "<").replace("|>", ">"), eos_token="~")
    long_answer = chat(("user", "q"), ("assistant", "x" * 40))
    long_prompt = chat(("user", "q" * 40), ("assistant", "a"))
    blocks = encode_blocks(_CharTokenizer(), [long_answer, long_prompt], template, 28,
                           eos_token_id=ord("~"))
    assert blocks.truncated == 2 and blocks.dropped == 1
    assert _decode_scored(blocks) == ["x" * 8]  # "<user>q~\n<assistant>" is 28 - 8 chars


def test_smollm2_chat_blocks_score_exactly_the_answers() -> None:
    """Golden values on the real SmolLM2 tokenizer and its own chat template."""
    from tokenizers import Tokenizer

    from kernels.base_model import converted_dir
    from protocols.cache_dir import default_cache_dir

    model_dir = converted_dir(default_cache_dir())
    if not (model_dir / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 not prepared (`fedtune prepare`)")
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    template = PromptTemplate.for_tokenizer(model_dir)
    assert template.name == "chat template"
    example = chat(("user", "What is AI?"), ("assistant", "A branch of computer science."))
    blocks = encode_blocks(tokenizer, [example], template, 64, eos_token_id=2)
    scored = blocks.ids[blocks.scored]
    assert tokenizer.decode(scored.tolist(), skip_special_tokens=False) == (
        "A branch of computer science.<|im_end|>\n")
    text = tokenizer.decode(blocks.ids[0].tolist(), skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert int(np.argmax(blocks.scored[0])) == len(tokenizer.encode(
        template.prompt(example.prompt_turns), add_special_tokens=False).ids)


def test_unusual_line_breaks_survive_a_round_trip(tmp_path: Path) -> None:
    """JSON leaves U+2028 unescaped in strings; CSV keeps line breaks in quoted fields."""
    from kernels.data.formats import write_jsonl

    example = chat(("user", "a\u2028b\u0085c"), ("assistant", "line one\nline two"))
    write_jsonl(tmp_path / "x.jsonl", [example])
    assert read_examples(tmp_path / "x.jsonl")[0] == [example]
    (tmp_path / "y.csv").write_text('prompt,response\n"two\nlines",ok\n', encoding="utf-8")
    assert read_examples(tmp_path / "y.csv")[0] == [chat(("user", "two\nlines"),
                                                         ("assistant", "ok"))]


def test_a_conversation_must_open_with_the_user_and_a_split_name_is_unique(
        tmp_path: Path) -> None:
    _jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "assistant", "content": "hi"},
                                                {"role": "user", "content": "q"}]}])
    with pytest.raises(DataFormatError, match=r"c\.jsonl, line 1: the conversation starts "
                                              r"with an assistant turn"):
        read_dataset(tmp_path / "c.jsonl")
    split = tmp_path / "split"
    split.mkdir()
    _jsonl(split / "train.jsonl", [{"text": "a"}])
    (split / "train.csv").write_text("text\nb\n")
    _jsonl(split / "test.jsonl", [{"text": "c"}])
    with pytest.raises(DataFormatError, match=r"both train\.csv and train\.jsonl would be the "
                                              r"'train' part"):
        read_dataset(split)
