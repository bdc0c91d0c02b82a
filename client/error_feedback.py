"""Error feedback for lossy update codecs: what a round's upload lost is sent next round.

A lossy codec (``fp16`` ... ``sign1``, :mod:`protocols.lossy_codecs`) sends ``Q(d)`` instead
of the delta ``d``. With error feedback (Seide et al. 2014; Karimireddy et al. 2019, EF-SGD)
the device keeps the residual ``r = (d + r_prev) - Q(d + r_prev)`` and adds it to its next
delta, so nothing is lost for good: over rounds the sum of what was sent tracks the sum of
what was trained. The residual is this device's own state: it lives in Flower's
``context.state`` (per node and run, in simulation and deployment alike) and never leaves
the device. It is dropped when the codec or the adapter's tensors change. Under secure
aggregation with quantized uploads the device keeps the residual of its flat vector the
same way (``client/app.py``), after the DP clip and noise: what quantization lost, never
the noise.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context

from protocols.adapter_spec import Tensors
from protocols.codecs import ClientUpdate, RoundContext, UpdateCodec, from_record, to_record
from protocols.records import get_str

RESIDUAL_KEY = "codec-residual"
RESIDUAL_CODEC_KEY = "codec-residual-codec"


def load_residual(context: Context, codec: str, delta: Tensors) -> Tensors:
    """The residual kept for ``codec`` and exactly these tensors, or none."""
    meta = context.state.config_records.get(RESIDUAL_CODEC_KEY)
    record = context.state.array_records.get(RESIDUAL_KEY)
    if meta is None or record is None or get_str(meta, "codec") != codec:
        return {}
    residual = from_record(record)
    if set(residual) != set(delta) or any(residual[k].shape != delta[k].shape for k in delta):
        return {}
    return residual


def encode_with_feedback(codec: UpdateCodec, update: ClientUpdate, ctx: RoundContext,
                         context: Context) -> ArrayRecord:
    """Encode ``update`` plus the kept residual; keep what this upload loses."""
    residual = load_residual(context, codec.name, update.delta)
    corrected = {k: (v + residual[k]) if k in residual else v for k, v in update.delta.items()}
    record = codec.encode(ClientUpdate(delta=corrected), ctx)
    sent = codec.decode(record, ctx)  # what the coordinator will add
    store_residual(context, codec.name, {k: corrected[k] - sent[k] for k in corrected})
    return record


def store_residual(context: Context, codec: str, residual: Tensors) -> None:
    """Keep ``residual`` in the device's own state for the next upload with ``codec``."""
    context.state.array_records[RESIDUAL_KEY] = to_record(residual)
    context.state.config_records[RESIDUAL_CODEC_KEY] = ConfigRecord({"codec": codec})
