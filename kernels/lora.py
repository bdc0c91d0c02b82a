"""PEFT adapters on the frozen base (LoRA, prompt, prefix, (IA)3), and their numpy state.

Everything that leaves this module is a ``dict[str, np.ndarray]`` keyed in PEFT's saved
state-dict spelling, so the same keys serve the wire, the coordinator's aggregation and the
exported ``adapter_model.safetensors``: ``….lora_A.weight`` / ``….lora_B.weight`` for LoRA,
``….ia3_l`` for (IA)3, and one ``prompt_embeddings`` tensor for prompt tuning
``(virtual_tokens, hidden)`` and prefix tuning ``(virtual_tokens, layers · 2 · kv_dim)``.
Every kind is seeded from ``lora.seed``, so every party builds the identical initial adapter
from the config alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from protocols.adapter_spec import Tensors
from protocols.run_config import LoraSection

#: The one tensor of a prompt- or prefix-tuning adapter, in PEFT's saved spelling.
PROMPT_KEY = "prompt_embeddings"

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

#: Substrings of the parameter names PEFT gives adapter weights, per kind.
ADAPTER_PARAMETER_TAGS = (".lora_", "prompt_encoder.", ".ia3_l.")


def is_adapter_parameter(name: str) -> bool:
    """Whether a ``named_parameters`` name is an adapter weight (trained or, like FFA-LoRA's
    A, frozen), not a weight of the base model."""
    return any(tag in name for tag in ADAPTER_PARAMETER_TAGS)


def attach_adapter(model: PreTrainedModel, settings: LoraSection) -> PeftModel:
    """Wrap ``model`` with a fresh adapter of ``settings.kind``, seeded from ``settings.seed``.

    LoRA: :func:`attach_lora`. Prompt tuning starts from the embeddings of seeded random
    vocabulary tokens (PEFT's ``SAMPLE_VOCAB``: real token embeddings, so the first
    forward is a plausible input, unlike a unit Gaussian). Prefix tuning trains the
    prefix's keys and values directly (no reparametrising MLP: PEFT saves only the MLP's
    output, so an MLP-trained prefix could not be loaded back into a trainable one).
    (IA)3 starts at ones, i.e. the base model.
    """
    if settings.kind == "lora":
        return attach_lora(model, settings)
    import torch
    from peft import (
        IA3Config,
        PeftConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
        PromptTuningInit,
        get_peft_model,
    )

    config: PeftConfig
    if settings.kind == "prompt":
        config = PromptTuningConfig(task_type="CAUSAL_LM",
                                    num_virtual_tokens=settings.virtual_tokens,
                                    prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)
    elif settings.kind == "prefix":
        config = PrefixTuningConfig(task_type="CAUSAL_LM",
                                    num_virtual_tokens=settings.virtual_tokens,
                                    prefix_projection=False)
    elif settings.kind == "ia3":
        config = IA3Config(task_type="CAUSAL_LM")
    else:
        raise ValueError(f"lora.kind must be 'lora', 'prompt', 'prefix' or 'ia3', got "
                         f"{settings.kind!r}")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.manual_seed(settings.seed)
        peft_model = get_peft_model(model, config)
        if settings.kind == "prefix":
            _start_prefix_at_real_tokens(peft_model, settings.virtual_tokens)
    return peft_model


def _start_prefix_at_real_tokens(peft_model: PeftModel, n: int) -> None:
    """Set the prefix to the keys and values the base model computes for ``n`` seeded
    random vocabulary tokens (call under the seeded RNG).

    PEFT starts the prefix from a unit Gaussian, which on SmolLM2 takes the held-out loss
    from 5.0 to 10.6 before any training (measured); real tokens' keys and values (Li &
    Liang 2021 initialise from real words' activations) start it at the base model
    conditioned on a few tokens, like prompt tuning's ``SAMPLE_VOCAB``. PEFT's layout of
    the flat prefix, per virtual token: ``(layers · 2, kv_heads, head_dim)``, key then
    value of each layer (``PeftModel.get_prompt``'s view and permute).
    """
    import torch

    base: Any = peft_model.get_base_model()
    ids = torch.randint(0, int(base.config.vocab_size), (1, n))
    device = next(base.parameters()).device
    with torch.no_grad():
        cache = base(input_ids=ids.to(device), use_cache=True).past_key_values
        per_layer = [torch.stack([layer.keys[0], layer.values[0]])  # (2, H, N, D)
                     for layer in cache.layers]
        stacked = torch.stack(per_layer).flatten(0, 1)  # (L·2, H, N, D)
        flat = stacked.permute(2, 0, 1, 3).reshape(n, -1)  # (N, L·2·H·D)
        encoder: Any = peft_model.prompt_encoder["default"]
        encoder.embedding.weight.copy_(flat.to(encoder.embedding.weight.dtype))


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
    device = next(p.device for n, p in model.named_parameters() if is_adapter_parameter(n))
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)).to(device)
             for k, v in tensors.items()}
    result = set_peft_model_state_dict(model, state)
    # Prompt and prefix tuning: PEFT loads `prompt_embeddings` into the prompt encoder by
    # hand, after the module load that reports it as unexpected.
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if k != PROMPT_KEY]
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
