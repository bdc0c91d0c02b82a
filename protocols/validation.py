"""Validation of decoded client updates against the adapter spec.

Runs on the coordinator before aggregation and fails closed: a single bad tensor rejects
the whole reply, with a reason naming the key, what was expected and what arrived.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from protocols.adapter_spec import AdapterSpec
from protocols.errors import InvalidUpdate
from protocols.keys import CLIENT_METRIC_KEYS, EDGE_CLIENT, LINE_SEARCH_LOSSES, NUM_EXAMPLES


def validate_update(
    tensors: Mapping[str, npt.NDArray[Any]],
    spec: AdapterSpec,
    *,
    expected_keys: list[str] | None = None,
) -> None:
    """Raise :class:`InvalidUpdate` unless ``tensors`` is a well-formed adapter update.

    ``expected_keys`` defaults to the spec's trainable tensors: frozen tensors (FFA-LoRA's A)
    are not uploaded, so their presence is as suspicious as a missing trainable one.
    """
    expected = set(spec.trainable_keys if expected_keys is None else expected_keys)
    got = set(tensors)
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_preview(unexpected)}")
        raise InvalidUpdate("; ".join(parts))
    for key in sorted(expected):
        value = tensors[key]
        want = spec.tensors[key].shape
        if tuple(value.shape) != want:
            raise InvalidUpdate(f"`{key}`: expected shape {want}, got {tuple(value.shape)}")
        if value.dtype != np.float32:
            raise InvalidUpdate(f"`{key}`: expected dtype float32, got {value.dtype}")
        # A finite sum proves every value finite (an inf or NaN makes the sum inf or NaN):
        # one read of the tensor, no mask; only a non-finite sum needs the element check.
        if not np.isfinite(np.sum(value)) and not np.isfinite(value).all():
            raise InvalidUpdate(f"`{key}`: contains NaN or Inf")


def update_norm(delta: Mapping[str, npt.NDArray[Any]]) -> float:
    """L2 norm of a delta over all its tensors together, in float64: the size of an update
    as client-level DP clips it and as the coordinator bounds it (every upload is a delta,
    so no reference adapter is subtracted)."""
    total = 0.0
    for value in delta.values():
        as64 = value.astype(np.float64)
        total += float(np.sum(as64 * as64))
    return float(np.sqrt(total))


def validate_metrics(metrics: Mapping[str, Any]) -> int:
    """Check a client's metrics and return its example count.

    Only the closed set :data:`protocols.keys.CLIENT_METRIC_KEYS` of finite numbers is
    allowed, so metrics cannot carry text; the example count must be a positive integer
    because it weights the average.
    """
    unexpected = sorted(set(metrics) - CLIENT_METRIC_KEYS)
    if unexpected:
        raise InvalidUpdate(f"unexpected metric keys {_preview(unexpected)}")
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidUpdate(f"metric `{key}`: expected a number, got {type(value).__name__}")
        if not np.isfinite(value):
            raise InvalidUpdate(f"metric `{key}`: not finite ({value})")
    if NUM_EXAMPLES not in metrics:
        raise InvalidUpdate(f"metric `{NUM_EXAMPLES}` is missing")
    count = metrics[NUM_EXAMPLES]
    if not isinstance(count, int) or count <= 0:
        raise InvalidUpdate(f"metric `{NUM_EXAMPLES}`: expected a positive integer, got {count!r}")
    return count


def validate_line_search(metrics: Mapping[str, Any], count: int) -> list[float]:
    """A line-search reply's losses: exactly ``count`` finite numbers under
    :data:`protocols.keys.LINE_SEARCH_LOSSES` and nothing else, so the reply can carry
    nothing but one loss per multiple asked."""
    unexpected = sorted(set(metrics) - {LINE_SEARCH_LOSSES})
    if unexpected:
        raise InvalidUpdate(f"unexpected metric keys {_preview(unexpected)} in a line-search "
                            f"reply (only `{LINE_SEARCH_LOSSES}`)")
    losses = metrics.get(LINE_SEARCH_LOSSES)
    if not isinstance(losses, list) or len(losses) != count:
        raise InvalidUpdate(f"`{LINE_SEARCH_LOSSES}`: expected a list of {count} losses, one "
                            f"per multiple asked, got {losses!r:.80}")
    if not all(isinstance(x, int | float) and not isinstance(x, bool) and np.isfinite(x)
               for x in losses):
        raise InvalidUpdate(f"`{LINE_SEARCH_LOSSES}`: every loss must be a finite number, got "
                            f"{losses!r:.80}")
    return [float(x) for x in losses]


def validate_kind_reply(metrics: Mapping[str, Any]) -> bool:
    """A kind reply's answer, whether the device is an edge device: exactly
    :data:`protocols.keys.EDGE_CLIENT` set to 0 or 1 and nothing else, so the reply carries
    nothing but the kind asked."""
    unexpected = sorted(set(metrics) - {EDGE_CLIENT})
    if unexpected:
        raise InvalidUpdate(f"unexpected metric keys {_preview(unexpected)} in a kind reply "
                            f"(only `{EDGE_CLIENT}`)")
    flag = metrics.get(EDGE_CLIENT)
    if isinstance(flag, bool) or flag not in (0, 1):
        raise InvalidUpdate(f"`{EDGE_CLIENT}`: expected 1 (an edge device) or 0 (a torch "
                            f"device), got {flag!r:.40}")
    return bool(flag)


def _preview(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(f"`{k}`" for k in keys[:limit])
    more = len(keys) - limit
    return shown + (f" and {more} more" if more > 0 else "")


def clip_update(update: Mapping[str, npt.NDArray[Any]], clip_norm: float
                ) -> tuple[dict[str, npt.NDArray[np.float32]], float]:
    """``update`` scaled to L2 norm at most ``clip_norm`` (norm over all tensors together),
    and its norm before clipping: client-level DP's sensitivity bound."""
    norm = update_norm(update)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (v * factor).astype(np.float32) for k, v in update.items()}, norm
