"""How many bytes an upload weighs before anything is trained, and which codec fits a budget.

Every codec's upload size depends on the adapter's shapes only (values change the bytes
inside the arrays, never their count), so encoding zeros of the trainable shapes and packing
them as a device does (:func:`protocols.packing.pack_record`) gives the exact size a device
will send. The coordinator uses it to choose ``federation.codec = "auto"`` against
``federation.max_upload_bytes`` and to refuse, at start, a codec that can never fit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from protocols.codecs import ClientUpdate, RoundContext, get_codec, record_nbytes
from protocols.packing import pack_record
from protocols.run_config import ConfigError

#: Codecs "auto" may pick, most precise first.
AUTO_ORDER = ("fp32", "bf16", "int8", "int4", "int3", "int2", "topk", "sign1")


def upload_size(codec: str, shapes: Mapping[str, tuple[int, ...]],
                adapter_keys: Sequence[str] = ()) -> int:
    """Bytes of a device's packed upload of tensors of ``shapes`` with ``codec``;
    ``adapter_keys`` names every tensor of the global adapter (frozen ones too: the lossy
    codecs' tensor bitmap has a bit for each), by default those of ``shapes``."""
    zeros = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    others = {k: np.zeros(1, np.float32) for k in adapter_keys if k not in zeros}
    ctx = RoundContext(global_adapter={**zeros, **others})
    return record_nbytes(pack_record(get_codec(codec).encode(ClientUpdate(zeros), ctx)))


def choose_codec(budget: int, shapes: Mapping[str, tuple[int, ...]],
                 order: Sequence[str] = AUTO_ORDER, adapter_keys: Sequence[str] = ()) -> str:
    """The most precise codec whose upload fits ``budget`` bytes (0: no budget, fp32)."""
    if budget <= 0:
        return order[0]
    sizes = {}
    for codec in order:
        sizes[codec] = upload_size(codec, shapes, adapter_keys)
        if sizes[codec] <= budget:
            return codec
    raise ConfigError(
        f"federation.max_upload_bytes = {budget} is below every codec's upload for this "
        f"adapter (smallest: {order[-1]}, {sizes[order[-1]]} bytes); raise it, or train "
        "fewer coordinates (a lower lora.r, fewer lora.target_modules)")
