"""Held-out loss of a causal LM on token blocks (perplexity = exp of the mean)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch

    from kernels.data.blocks import Blocks


def mean_token_loss(
    model: torch.nn.Module, blocks: Blocks | npt.NDArray[np.int64], batch_size: int
) -> tuple[float, int]:
    """Token-weighted mean next-token loss over the scored tokens of ``blocks`` (every token
    of a plain id array; the responses of chat blocks) and the number of tokens scored."""
    import torch

    from kernels.data.blocks import Blocks

    if not isinstance(blocks, Blocks):
        scored = np.ones(np.shape(blocks), dtype=np.bool_)
        scored[:, 0] = False
        blocks = Blocks(np.asarray(blocks, dtype=np.int64), scored)
    if len(blocks) == 0:
        raise ValueError("no evaluation blocks: the held-out text is shorter than one block")
    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            batch = blocks.take(slice(i, i + batch_size))
            n = batch.scored_tokens  # HF's loss is the mean over them
            if n == 0:
                continue
            loss = model(input_ids=torch.from_numpy(batch.ids).to(device),  # (B, T)
                         labels=torch.from_numpy(batch.labels()).to(device)).loss
            total += float(loss) * n
            tokens += n
    return total / tokens, tokens
