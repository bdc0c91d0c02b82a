"""LoRA adapters on the frozen base, through PEFT, and their plain-numpy state.

Everything that leaves this module is a ``dict[str, np.ndarray]`` keyed in PEFT's saved
state-dict spelling, so the same keys serve the wire, the coordinator's aggregation and the
exported ``adapter_model.safetensors``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from protocols.adapter_spec import Tensors
from protocols.run_config import LoraSection

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

def attach_lora(model: PreTrainedModel, settings: LoraSection) -> PeftModel:
    """Wrap ``model`` with a fresh LoRA adapter.

    A is drawn from ``settings.seed`` so every party builds the identical initial adapter
    from the config alone (B starts at zero, as in PEFT).
    """
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # PEFT annotates int, accepts float
        lora_dropout=settings.dropout,
        target_modules=list(settings.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # PEFT calls a transformers API deprecated in v5; harmless, and noisy per client.
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.manual_seed(settings.seed)
        peft_model = get_peft_model(model, config)
    if settings.freeze_a:
        for name, param in peft_model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    missing = [t for t in settings.targets if not _has_module(peft_model, t)]
    if missing:
        raise ValueError(
            f"lora.target_modules {missing} match no layer of the base model; "
            "check the module names of this architecture"
        )
    return peft_model


def _has_module(model: PeftModel, suffix: str) -> bool:
    return any(name.endswith(f".{suffix}") for name, _ in model.named_modules())


def get_adapter(model: PeftModel) -> Tensors:
    """The adapter tensors, in PEFT's saved key spelling, as float32 numpy copies."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return {k: v.detach().to("cpu").float().numpy().copy() for k, v in state.items()}


def set_adapter(model: PeftModel, tensors: Mapping[str, npt.NDArray[Any]]) -> None:
    """Load adapter tensors into ``model``; refuses missing or unexpected keys."""
    import torch
    from peft import set_peft_model_state_dict

    expected = set(get_adapter_keys(model))
    got = set(tensors)
    if expected != got:
        raise ValueError(
            f"adapter keys do not match the model: missing {sorted(expected - got)[:3]}, "
            f"unexpected {sorted(got - expected)[:3]}"
        )
    # On the adapter's device: PEFT copies into the existing parameters either way, but a
    # CUDA model would otherwise copy host tensors one small transfer at a time.
    device = next(p.device for n, p in model.named_parameters() if ".lora_" in n)
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)).to(device)
             for k, v in tensors.items()}
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"PEFT did not accept adapter keys {unexpected[:3]}")


def get_adapter_keys(model: PeftModel) -> list[str]:
    from peft import get_peft_model_state_dict

    return list(get_peft_model_state_dict(model).keys())


def peft_config_dict(model: PeftModel, base_model_name: str) -> dict[str, Any]:
    """The ``adapter_config.json`` content, JSON-safe, for the coordinator to save;
    ``base_model_name`` from :func:`kernels.base_model.portable_model_name`."""
    config = model.peft_config["default"].to_dict()
    config["base_model_name_or_path"] = base_model_name
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
