"""Membership inference on the adapter the coordinator ends up with: did a block train it?

The attack of the PEFT-privacy papers, white-box and calibrated by the base model: score a
text block by the ratio of its loss under the fine-tuned adapter to its loss under the
adapter before the round (a member's loss drops more than a non-member's; Carlini et al.
2021's reference-model calibration, Mireshghallah et al. 2022 for fine-tuned LMs). Lower
scores mean "member". Reported as ROC AUC (0.5 = guessing) and the true-positive rate at a
1 % false-positive rate, the operating point that says whether *some* members are exposed
with confidence (Carlini et al. 2022, "Membership Inference Attacks From First Principles").

The fine-tuned adapter is the coordinator's: safeguards off, the target's own (global +
its update, which the coordinator sees); safeguards on, the next global adapter (global +
the noised secure sum over the cohort / m). Members are the target's training blocks;
non-members the target's own blocks it did not train on (same speaker, so the score
measures membership and not who is speaking) and, for comparison, other devices' blocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


def block_losses(model: Any, adapter: Mapping[str, npt.NDArray[Any]],
                 blocks: npt.NDArray[np.int64], *, batch_size: int = 16) -> FloatArray:
    """Mean next-token loss of each block (every token scored) with ``adapter`` loaded."""
    import torch
    import torch.nn.functional as F

    from kernels.lora import set_adapter

    set_adapter(model, adapter)
    model.eval()
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            batch = torch.from_numpy(np.asarray(blocks[start:start + batch_size]))
            logits = model(input_ids=batch).logits[:, :-1]
            targets = batch[:, 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   reduction="none").view(targets.shape)
            out += loss.mean(dim=1).tolist()
    return np.asarray(out, dtype=np.float64)


def loss_ratio_scores(model: Any, base: Mapping[str, npt.NDArray[Any]],
                      tuned: Mapping[str, npt.NDArray[Any]],
                      blocks: npt.NDArray[np.int64]) -> FloatArray:
    """``loss(tuned) / loss(base)`` per block; the model is left with ``base`` loaded."""
    tuned_losses = block_losses(model, tuned, blocks)
    base_losses = block_losses(model, base, blocks)
    return tuned_losses / base_losses


def roc_auc(members: FloatArray, non_members: FloatArray) -> float:
    """P(a member scores lower than a non-member), ties counting half (Mann-Whitney U)."""
    m = np.asarray(members, dtype=np.float64)[:, None]
    n = np.asarray(non_members, dtype=np.float64)[None, :]
    if m.size == 0 or n.size == 0:
        raise ValueError("membership inference needs members and non-members")
    return float(np.mean((m < n) + 0.5 * (m == n)))


def tpr_at_fpr(members: FloatArray, non_members: FloatArray, fpr: float = 0.01) -> float:
    """Share of members flagged when at most ``fpr`` of the non-members are: the threshold
    is the ``floor(fpr * N) + 1``-th lowest non-member score, members strictly below it."""
    non = np.sort(np.asarray(non_members, dtype=np.float64))
    if non.size == 0:
        raise ValueError("membership inference needs non-members")
    threshold = non[min(int(np.floor(fpr * non.size)), non.size - 1)]
    return float(np.mean(np.asarray(members) < threshold))
