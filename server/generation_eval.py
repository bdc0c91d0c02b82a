"""Generation quality on held-out prompts: ROUGE-L of greedy answers, base vs tuned.

Perplexity says how well the adapter predicts reference answers; users judge what it
*writes*. After a run on chat or instruction data the coordinator (or the centralized
baseline) answers ``eval.generate`` held-out prompts from its evaluation data greedily, with
the base model and with the tuned adapter, and scores each answer against the reference
with ROUGE-L F1 (Google's ``rouge-score`` package). ``generations.json`` in the run folder
keeps the scores and ``eval.samples`` side-by-side answers for the report.

The prompts come from evaluation data the coordinator owns (``eval.path``; in a simulation
the held-out sample of every device, which the simulating host holds anyway): no device is
asked for text.

Tokenization for ROUGE: ``rouge-score``'s default keeps only ``[a-z0-9]`` runs, which
scores every Chinese, Persian or Ukrainian answer 0. :class:`UnicodeTokenizer` lowercases
and splits on Unicode word characters, and scripts written without spaces (CJK, Thai, ...)
into single characters, so multilingual data gets a meaningful score.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from protocols.atomic_write import write_json_atomic

if TYPE_CHECKING:
    from kernels.data.examples import Example
    from kernels.data.templates import PromptTemplate
    from server.central_eval import CentralModel

log = logging.getLogger(__name__)

GENERATIONS = "generations.json"
METRIC = "rougeL-f1"
_WORD = re.compile(r"\w+", re.UNICODE)


class UnicodeTokenizer:
    """``rouge-score`` tokenizer: lowercased Unicode words; unspaced scripts per character."""

    def tokenize(self, text: str) -> list[str]:
        tokens: list[str] = []
        for word in _WORD.findall(text.lower()):
            if any(_unspaced(ch) for ch in word):
                tokens.extend(word)  # one token per character
            else:
                tokens.append(word)
        return tokens


def _unspaced(ch: str) -> bool:
    """Characters of scripts written without spaces between words."""
    name = unicodedata.name(ch, "")
    return name.startswith(("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "THAI", "LAO",
                            "KHMER", "MYANMAR", "TIBETAN"))


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 of each prediction against its reference."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise RuntimeError("generation scoring needs `pip install rouge-score==0.1.2` "
                           "(in fedtune[sim] and fedtune[coordinator])") from None
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeTokenizer())
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure
              for pred, ref in zip(predictions, references, strict=True)]
    return float(np.mean(scores)) if scores else 0.0


@dataclass(frozen=True)
class HeldoutPrompts:
    """Prompts rendered for the model, the last user turn (for people) and the references."""

    prompts: tuple[str, ...]
    questions: tuple[str, ...]
    references: tuple[str, ...]


def pick_prompts(examples: Sequence[Example], template: PromptTemplate, count: int
                 ) -> HeldoutPrompts | None:
    """``count`` conversations spread evenly over ``examples`` (they are ordered by
    device), or None when there are no conversations (plain text has no prompts)."""
    chats = [e for e in examples if e.is_chat]
    if not chats or count < 1:
        return None
    picks = np.unique(np.linspace(0, len(chats) - 1, num=min(count, len(chats))).astype(int))
    chosen = [chats[int(i)] for i in picks]
    return HeldoutPrompts(
        prompts=tuple(template.prompt(e.prompt_turns) for e in chosen),
        questions=tuple(next((t.content for t in reversed(e.prompt_turns) if t.role == "user"),
                             "") for e in chosen),
        references=tuple(e.reference for e in chosen))


def evaluate_generations(central: CentralModel, adapters: Mapping[str, Mapping[str, Any]],
                         prompts: HeldoutPrompts, *, max_new_tokens: int, samples: int
                         ) -> dict[str, Any]:
    """Answer every prompt with each adapter (``{"base": ..., "tuned": ...}``); return the
    ``generations.json`` document."""
    answers = {name: central.generate(adapter, prompts.prompts, max_new_tokens=max_new_tokens)
               for name, adapter in adapters.items()}
    scores = {name: rouge_l(out, prompts.references) for name, out in answers.items()}
    return {
        "metric": METRIC, "prompts": len(prompts.prompts), "max_new_tokens": max_new_tokens,
        "scores": scores,
        "samples": [{"prompt": prompts.questions[i], "reference": prompts.references[i],
                     **{name: out[i] for name, out in answers.items()}}
                    for i in range(min(samples, len(prompts.prompts)))],
    }


def write_generations(run_dir: Path, central: CentralModel, base: Mapping[str, Any],
                      tuned: Mapping[str, Any], *, count: int, max_new_tokens: int,
                      samples: int) -> dict[str, Any] | None:
    """Score base and tuned on the central evaluation data's prompts and write
    ``generations.json``; None (and nothing written) when there is nothing to prompt."""
    prompts = pick_prompts(central.examples, central.template, count)
    if prompts is None:
        log.info("no generation metric: the evaluation data has no chat or instruction "
                 "examples (eval.generate needs prompts with reference answers)")
        return None
    log.info("generating answers to %d held-out prompts (base and tuned, greedy, up to %d "
             "tokens)", len(prompts.prompts), max_new_tokens)
    doc = evaluate_generations(central, {"base": base, "tuned": tuned}, prompts,
                               max_new_tokens=max_new_tokens, samples=samples)
    write_json_atomic(run_dir / GENERATIONS, doc, indent=1)
    log.info("ROUGE-L F1 on %d held-out prompts: base %.4f, tuned %.4f", doc["prompts"],
             doc["scores"]["base"], doc["scores"]["tuned"])
    return doc
