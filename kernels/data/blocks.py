"""Examples → fixed-length token blocks, with the mask of the tokens that are scored.

Both trainers (torch and ONNX Runtime) and the coordinator's central evaluation cut their
blocks here, with the same ``tokenizers.Tokenizer`` (a transformers fast tokenizer's
``backend_tokenizer``), so the same data gives the same blocks on every kind of device.

Rules (documented in docs/data.md and tested):

* **Documents** (plain text) are concatenated, each followed by EOS, and cut into blocks of
  ``seq_len`` tokens; the tail shorter than a block is dropped. Every token is scored (the
  first of a block has no context in it and is never scored: the causal-LM shift).
* **Conversations** are rendered with the prompt template; only the tokens that start inside
  an assistant span are scored. An example longer than ``seq_len`` keeps its first
  ``seq_len`` tokens; one whose scored tokens all fall beyond that is dropped (counted in
  :attr:`Blocks.dropped`). Whole examples are packed greedily in order into blocks (an
  example never straddles two blocks, so its answer always sees its own prompt); the rest of
  a block is padding, never scored. Packed examples see the earlier ones in their block as
  context, as in TRL's packing; each starts with the template's own start-of-turn markers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from kernels.data.examples import Example
from kernels.data.templates import PromptTemplate


@dataclass(frozen=True)
class Blocks:
    """``ids`` ``(N, T)`` int64 and ``scored`` ``(N, T)`` bool: ``scored[n, t]`` says token
    ``t`` is a prediction target (predicted from the tokens before it); column 0 is never
    scored. ``truncated`` / ``dropped`` count examples cut short / left out entirely."""

    ids: npt.NDArray[np.int64]
    scored: npt.NDArray[np.bool_]
    truncated: int = 0
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index: Any) -> Blocks:
        """The blocks at ``index`` (an int array or a slice)."""
        return Blocks(self.ids[index], self.scored[index])

    @property
    def scored_tokens(self) -> int:
        return int(self.scored[:, 1:].sum())

    @property
    def every_token_scored(self) -> bool:
        """Plain-text blocks: the loss is the ordinary causal-LM loss."""
        return bool(self.scored[:, 1:].all())

    def labels(self) -> npt.NDArray[np.int64]:
        """Hugging Face ``labels``: the ids, ``-100`` where nothing is scored."""
        return np.where(self.scored, self.ids, -100).astype(np.int64)


def empty_blocks(seq_len: int) -> Blocks:
    return Blocks(np.zeros((0, seq_len), np.int64), np.zeros((0, seq_len), np.bool_))


def encode_blocks(tokenizer: Any, examples: Sequence[Example], template: PromptTemplate,
                  seq_len: int, *, eos_token_id: int | None) -> Blocks:
    """Cut ``examples`` into blocks (module doc); documents first, then conversations.

    ``tokenizer`` is a ``tokenizers.Tokenizer``; ``eos_token_id`` ends each document and
    pads conversation blocks.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    texts = [e.text for e in examples if e.text is not None]
    chats = [e for e in examples if e.text is None]
    parts = []
    if texts:
        parts.append(_documents(tokenizer, texts, seq_len, eos_token_id))
    if chats:
        parts.append(_conversations(tokenizer, chats, template, seq_len, eos_token_id))
    if not parts:
        return empty_blocks(seq_len)
    return Blocks(np.concatenate([p.ids for p in parts]),
                  np.concatenate([p.scored for p in parts]),
                  truncated=sum(p.truncated for p in parts), dropped=sum(p.dropped for p in parts))


def document_blocks(tokenizer: Any, texts: Sequence[str], seq_len: int, *,
                    eos_token_id: int | None) -> npt.NDArray[np.int64]:
    """Plain documents as ``(N, seq_len)`` ids: each followed by EOS, concatenated, cut; the
    tail shorter than a block is dropped (packing wastes no compute on padding)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(list(texts), add_special_tokens=False):
        ids.extend(encoding.ids)
        if eos_token_id is not None:
            ids.append(int(eos_token_id))
    n = len(ids) // seq_len
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


def _documents(tokenizer: Any, texts: Sequence[str], seq_len: int, eos: int | None) -> Blocks:
    blocks = document_blocks(tokenizer, texts, seq_len, eos_token_id=eos)
    scored = np.ones_like(blocks, dtype=np.bool_)
    scored[:, 0] = False
    return Blocks(blocks, scored)


def _conversations(tokenizer: Any, chats: Sequence[Example], template: PromptTemplate,
                   seq_len: int, eos: int | None) -> Blocks:
    rendered = [template.render(e) for e in chats]
    encodings = tokenizer.encode_batch([r.text for r in rendered], add_special_tokens=False)
    pad = 0 if eos is None else int(eos)
    rows: list[tuple[list[int], list[bool]]] = []
    current_ids: list[int] = []
    current_scored: list[bool] = []
    truncated = dropped = 0
    for item, encoding in zip(rendered, encodings, strict=True):
        ids = list(encoding.ids)
        scored = [any(start <= s < end for start, end in item.spans)
                  for s, _ in encoding.offsets]
        if len(ids) > seq_len:
            truncated += 1
            ids, scored = ids[:seq_len], scored[:seq_len]
        if not any(scored[1:]):
            dropped += 1
            continue
        if len(current_ids) + len(ids) > seq_len:
            rows.append((current_ids, current_scored))
            current_ids, current_scored = [], []
        if current_ids:  # the block's first token is never scored; later ones are
            current_ids += ids
            current_scored += scored
        else:
            current_ids, current_scored = ids, [False, *scored[1:]]
    if current_ids:
        rows.append((current_ids, current_scored))
    out_ids = np.full((len(rows), seq_len), pad, dtype=np.int64)
    out_scored = np.zeros((len(rows), seq_len), dtype=np.bool_)
    for n, (ids, scored) in enumerate(rows):
        out_ids[n, : len(ids)] = ids
        out_scored[n, : len(scored)] = scored
    return Blocks(out_ids, out_scored, truncated=truncated, dropped=dropped)
