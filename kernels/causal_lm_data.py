"""Plain text into fixed-length token blocks with a Hugging Face tokenizer.

A thin front of :func:`kernels.data.blocks.document_blocks` for code that holds a
transformers tokenizer (audits, benchmarks): the cutting itself lives in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from kernels.data.blocks import document_blocks

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def token_blocks(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], seq_len: int
) -> npt.NDArray[np.int64]:
    """Concatenate ``texts`` (EOS-separated) and cut them into ``(N, seq_len)`` blocks; the
    tail shorter than ``seq_len`` is dropped."""
    return document_blocks(tokenizer.backend_tokenizer, texts, seq_len,
                           eos_token_id=tokenizer.eos_token_id)
