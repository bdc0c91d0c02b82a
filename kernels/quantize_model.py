"""Swap the frozen linear layers of a (PEFT-wrapped) causal LM for quantized ones.

Call :func:`quantize_base` *after* :func:`kernels.lora.attach_lora`: PEFT only wraps layer
types it knows, so the adapter is attached to the float ``nn.Linear`` first and its
``base_layer`` is then replaced by a :class:`~kernels.quant_linear.QuantLinear`. The
adapter's parameters, names and initialisation are untouched, so a quantized client and a
float coordinator agree on every adapter key. On a model without PEFT the matching
``nn.Linear`` layers are replaced directly (inference, perplexity).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from kernels.quant_linear import QuantLinear, quant_lora_linear

log = logging.getLogger(__name__)

#: Llama-family projection names; lm_head and embeddings stay in float unless asked.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class QuantReport:
    """What :func:`quantize_base` did. Byte counts are of unique tensor storage."""

    mode: str
    group_size: int
    symmetric: bool
    layers: int  # linear layers replaced
    fused: int  # PEFT LoRA layers switched to the one-node base+LoRA path
    bytes_before: int  # weight (+ bias) bytes of the replaced layers, in their float dtype
    bytes_after: int  # the same layers quantized
    model_bytes_before: int  # every parameter and buffer of the model
    model_bytes_after: int

    @property
    def ratio(self) -> float:
        """Quantized / original bytes of the replaced layers."""
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0


def quantize_base(
    model: nn.Module,
    mode: str,
    group_size: int = 128,
    *,
    symmetric: bool = True,
    targets: Iterable[str] = DEFAULT_TARGETS,
    include_lm_head: bool = False,
    mode_overrides: Mapping[str, str] | None = None,
    fused: bool = True,
    backend: str = "auto",
) -> QuantReport:
    """Replace every frozen linear layer named in ``targets`` by a :class:`QuantLinear`.

    Parameters
    ----------
    mode:
        ``"int8"`` (per output channel) or ``"int4"`` (per ``group_size`` inputs).
    symmetric:
        int4 only: ``False`` stores each group's minimum too (see ``QuantizedWeight``).
    include_lm_head:
        Also quantize ``lm_head``. With tied embeddings (SmolLM2) this saves nothing: the
        embedding keeps the float matrix.
    mode_overrides:
        Per layer name, a different mode, e.g. ``{"down_proj": "int8"}``.
    fused:
        Route PEFT LoRA layers through :func:`~kernels.quant_linear.quant_lora_linear`.
        Turn it off for Opacus DP-SGD: its per-sample hooks sit on PEFT's ``lora_A`` /
        ``lora_B`` modules, which the fused path does not call.
    backend:
        ``"auto"`` (Triton on CUDA when installed), ``"torch"`` or ``"triton"``.
    """
    if mode not in ("int8", "int4"):
        raise ValueError(f"quantize mode must be 'int8' or 'int4', got {mode!r}")
    wanted = set(targets) | ({"lm_head"} if include_lm_head else set())
    overrides = dict(mode_overrides or {})
    before_model = _storage_bytes(model)
    layers = fused_count = before = after = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            layer = parent_name.rpartition(".")[2] if child_name == "base_layer" else child_name
            if type(child) is not nn.Linear or layer not in wanted:
                continue
            if child.weight.requires_grad:
                log.warning("%s.%s is trainable: left in float (only frozen layers are "
                            "quantized; freeze the base before quantize_base)",
                            parent_name, child_name)
                continue
            layer_mode = overrides.get(layer, mode)
            quant = QuantLinear.from_linear(  # int8 is symmetric per channel by definition
                child, layer_mode, group_size=group_size,
                symmetric=symmetric or layer_mode == "int8", backend=backend,
            )
            before += _tensor_bytes([child.weight, child.bias])
            after += quant.nbytes
            setattr(parent, child_name, quant)
            layers += 1
            if child_name == "base_layer" and fused and _make_fused(parent):
                fused_count += 1
    if layers == 0:
        raise ValueError(f"no frozen nn.Linear named {sorted(wanted)} in the model; "
                         "check `targets` against the model's module names")
    report = QuantReport(mode, group_size if mode == "int4" else 0, symmetric, layers,
                         fused_count, before, after, before_model, _storage_bytes(model))
    log.info("quantized %d linear layers to %s: %.1f MB -> %.1f MB (%d fused with LoRA)",
             layers, mode, before / 1e6, after / 1e6, fused_count)
    return report


def _make_fused(module: nn.Module) -> bool:
    """Turn a PEFT ``lora.Linear`` into :class:`FusedQuantLoraLinear` in place.

    The class swap (as ``torch.nn.utils.parametrize`` does) keeps the module object, its
    parameters and ``isinstance(m, lora.Linear)``, so every PEFT utility still applies.
    """
    from peft.tuners.lora import Linear as LoraLinear

    if type(module) is not LoraLinear:
        return False  # a PEFT subclass we do not know: leave PEFT's own forward
    module.__class__ = fused_lora_linear_class()
    return True


@functools.cache
def fused_lora_linear_class() -> type[Any]:
    """PEFT's ``lora.Linear`` with base + LoRA in one autograd node when it is plain LoRA.

    Built lazily so importing this module does not import PEFT.
    """
    from peft.tuners.lora import Linear as LoraLinear

    class FusedQuantLoraLinear(LoraLinear):
        """A LoRA layer over a :class:`QuantLinear`; PEFT's path for anything but plain LoRA."""

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            adapter = self._fusable_adapter(args, kwargs)
            if adapter is None or not isinstance(self.base_layer, QuantLinear):
                out: torch.Tensor = super().forward(x, *args, **kwargs)
                return out
            lora_a = cast(torch.Tensor, self.lora_A[adapter].weight)  # (r, K)
            lora_b = cast(torch.Tensor, self.lora_B[adapter].weight)  # (N, r)
            return quant_lora_linear(x, self.base_layer, lora_a, lora_b, self.scaling[adapter])

        def _fusable_adapter(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
            if args or kwargs or self.disable_adapters or self.merged:
                return None
            active = [a for a in self.active_adapters if a in self.lora_A]
            if len(active) != 1:
                return None
            name: str = active[0]
            dropout = self.lora_dropout[name]
            if (name in self.lora_variant or self.lora_B[name].bias is not None
                    or (self.training and getattr(dropout, "p", 0.0) > 0)):
                return None
            return name

        def merge(self, *args: Any, **kwargs: Any) -> None:
            raise NotImplementedError("cannot merge a LoRA adapter into a quantized base; "
                                      "export the adapter and merge it into the float model")

    return FusedQuantLoraLinear


def _tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _storage_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, counting shared (tied) storage once."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())
