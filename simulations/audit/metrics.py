"""How much of the target's text an attack got back, and what guessing would get.

* bag-of-tokens recall: the share of the batch's distinct tokens among the attack's top-K,
  with ``K`` the true number of distinct tokens (the usual oracle-K protocol; Melis et al.
  2019, LAMP). A random K-subset of a V-token vocabulary scores ``K / V`` on average.
* token recovery rate: the share of the batch's ``B x S`` positions whose token the attack
  got exactly right. Reconstructed sequences come in no particular order, so each is
  assigned to one true sequence by a maximum-weight matching (Hungarian algorithm), as LAMP
  matches sentences before scoring. A uniform guess per position scores ``1 / V``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]


def distinct(tokens: IntArray) -> set[int]:
    return {int(t) for t in np.asarray(tokens).ravel()}


def bag_recall(predicted: IntArray, truth: IntArray) -> float:
    """Share of the distinct true tokens found in ``predicted`` (any shape)."""
    true = distinct(truth)
    if not true:
        raise ValueError("the ground truth holds no token")
    return len(true & distinct(predicted)) / len(true)


def bag_chance(truth: IntArray, vocab_size: int) -> float:
    """Expected recall of ``K`` tokens drawn at random: ``K / V``."""
    return len(distinct(truth)) / vocab_size


def token_recovery(predicted: IntArray, truth: IntArray) -> float:
    """Share of positions recovered exactly, after matching predicted to true sequences.

    Both are ``(B, S)``; the row permutation maximising the number of equal positions is
    found with :func:`scipy.optimize.linear_sum_assignment`.
    """
    from scipy.optimize import linear_sum_assignment

    pred = np.asarray(predicted)
    true = np.asarray(truth)
    if pred.shape != true.shape or pred.ndim != 2:
        raise ValueError(f"predicted and truth must both be (B, S), got {pred.shape} and "
                         f"{true.shape}")
    hits = (pred[:, None, :] == true[None, :, :]).sum(axis=2)  # (B_pred, B_true)
    rows, cols = linear_sum_assignment(hits, maximize=True)
    return float(hits[rows, cols].sum()) / true.size


def recovery_chance(vocab_size: int) -> float:
    """Expected rate of a uniform guess per position (matching adds O(1/V) at most)."""
    return 1.0 / vocab_size


def frequency_guess(public_tokens: IntArray, k: int) -> IntArray:
    """The ``k`` most frequent tokens of text the attacker already has (ties: lower id).

    The honest baseline for a bag-of-tokens attack: what a coordinator guesses without
    looking at any update. Uniform chance (``K / V``) is far weaker on natural text, where a
    few tokens make up much of every batch.
    """
    counts = np.bincount(np.asarray(public_tokens, dtype=np.int64).ravel())
    return np.argsort(-counts, kind="stable")[:k].astype(np.int64)
