"""Generation quality: ROUGE-L golden values, multilingual tokenization, prompt choice, and
greedy answers from the real central model written to ``generations.json``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kernels.data.examples import Example, chat
from kernels.data.templates import PromptTemplate
from server.generation_eval import (
    GENERATIONS,
    UnicodeTokenizer,
    pick_prompts,
    rouge_l,
    write_generations,
)

CHATML = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n"
          "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_rouge_l_golden_values() -> None:
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == 1.0
    assert rouge_l(["a b c"], ["x y z"]) == 0.0
    # LCS "the cat sat" = 3: precision 3/3, recall 3/6, F1 = 2/3
    assert rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(2 / 3)
    assert rouge_l(["The CAT, sat!"], ["the cat sat"]) == 1.0  # case and punctuation
    assert rouge_l(["x", "the cat"], ["x", "the dog"]) == pytest.approx((1.0 + 0.5) / 2)


def test_unicode_tokenizer_scores_every_script() -> None:
    tokenizer = UnicodeTokenizer()
    assert tokenizer.tokenize("Hello, World!") == ["hello", "world"]
    assert tokenizer.tokenize("我喜欢机器") == ["我", "喜", "欢", "机", "器"]
    assert tokenizer.tokenize("سلام دنیا") == ["سلام", "دنیا"]
    assert tokenizer.tokenize("Привет мир") == ["привет", "мир"]
    assert rouge_l(["我喜欢猫"], ["我喜欢狗"]) == pytest.approx(0.75)  # rouge-score's own: 0


def test_prompts_are_spread_over_the_conversations_and_text_has_none() -> None:
    template = PromptTemplate(CHATML, eos_token="</s>")
    chats = [chat(("user", f"q{i}"), ("assistant", f"a{i}")) for i in range(10)]
    picked = pick_prompts([Example(text="doc"), *chats], template, 4)
    assert picked is not None
    assert picked.questions == ("q0", "q3", "q6", "q9")
    assert picked.references == ("a0", "a3", "a6", "a9")
    assert picked.prompts[0] == "<|user|>q0</s>\n<|assistant|>"
    assert pick_prompts([Example(text="doc")], template, 4) is None


@pytest.mark.slow
def test_central_model_answers_and_scores_base_and_tuned(tiny_model_dir: Path,
                                                         tmp_path: Path) -> None:
    from protocols.run_config import RunConfig
    from server.central_eval import CentralModel

    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "tiny-chat"))
    (model_dir / "chat_template.jinja").write_text(CHATML)
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(chat(("user", f"who speaks {i}?"),
                                            ("assistant", "PROSPERO speaks")).to_json()) + "\n"
                            for i in range(6)))
    config = RunConfig.from_nested({"model": {"source": str(model_dir)}, "lora": {"r": 4}})
    central = CentralModel(model_dir, config, threads=1)
    assert central.load_eval_data(data, seq_len=64, max_blocks=4) > 0
    tuned = {k: v + 0.05 for k, v in central.initial_adapter.items()}
    first = central.generate(tuned, ["<|user|>who speaks?</s>\n<|assistant|>"],
                             max_new_tokens=8)
    assert first == central.generate(tuned, ["<|user|>who speaks?</s>\n<|assistant|>"],
                                     max_new_tokens=8)  # greedy: repeatable
    doc = write_generations(tmp_path, central, central.initial_adapter, tuned, count=3,
                            max_new_tokens=8, samples=2)
    saved = json.loads((tmp_path / GENERATIONS).read_text())
    assert doc == saved
    assert saved["metric"] == "rougeL-f1" and saved["prompts"] == 3
    assert set(saved["scores"]) == {"base", "tuned"}
    assert all(0.0 <= v <= 1.0 for v in saved["scores"].values())
    assert [s["reference"] for s in saved["samples"]] == ["PROSPERO speaks"] * 2
    assert saved["samples"][0]["prompt"] == "who speaks 0?"
    assert all(isinstance(s["base"], str) and isinstance(s["tuned"], str)
               for s in saved["samples"])
