"""Held-out loss of a causal LM on token blocks (perplexity = exp of the mean)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch


def mean_token_loss(
    model: torch.nn.Module, blocks: npt.NDArray[np.int64], batch_size: int
) -> tuple[float, int]:
    """Token-weighted mean next-token loss over ``blocks`` and the number of tokens scored."""
    import torch

    if len(blocks) == 0:
        raise ValueError("no evaluation blocks: the held-out text is shorter than one block")
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            batch = torch.from_numpy(blocks[i : i + batch_size])  # (B, T)
            n = batch.shape[0] * (batch.shape[1] - 1)  # labels are shifted by one
            total += float(model(input_ids=batch, labels=batch).loss) * n
            tokens += n
    return total / tokens, tokens
