"""LoRA state: deterministic init, exact round trip through the wire record, strict keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kernels.base_model import load_causal_lm
from kernels.lora import attach_lora, get_adapter, set_adapter
from protocols.codecs import from_record, to_record
from protocols.run_config import LoraSection

torch.set_num_threads(1)


def _peft(model_dir: Path, seed: int = 0):  # type: ignore[no-untyped-def]
    return attach_lora(load_causal_lm(model_dir).model, LoraSection(r=4, seed=seed))


def test_same_seed_same_initial_adapter(tiny_model_dir: Path) -> None:
    a, b = get_adapter(_peft(tiny_model_dir)), get_adapter(_peft(tiny_model_dir))
    c = get_adapter(_peft(tiny_model_dir, seed=1))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a if "lora_A" in k)
    # PEFT's init: B starts at zero, so the initial adapter is the identity on the base.
    assert all(not a[k].any() for k in a if "lora_B" in k)
    # 2 layers x 5 target modules x (A, B)
    assert len(a) == 2 * 5 * 2


def test_adapter_round_trip_through_array_record(tiny_model_dir: Path) -> None:
    sender, receiver = _peft(tiny_model_dir), _peft(tiny_model_dir, seed=7)
    rng = np.random.default_rng(0)
    trained = {k: rng.normal(size=v.shape).astype(np.float32)
               for k, v in get_adapter(sender).items()}
    set_adapter(sender, trained)

    received = from_record(to_record(get_adapter(sender)))
    set_adapter(receiver, received)

    for key, value in get_adapter(receiver).items():
        np.testing.assert_array_equal(value, trained[key])
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(sender(input_ids=ids).logits, receiver(input_ids=ids).logits)
        # and the adapter really changes the function (B was non-zero)
        with sender.disable_adapter():
            base = sender(input_ids=ids).logits
    assert not torch.allclose(base, receiver(input_ids=ids).logits)


def test_set_adapter_refuses_wrong_keys(tiny_model_dir: Path) -> None:
    model = _peft(tiny_model_dir)
    tensors = get_adapter(model)
    key = next(iter(tensors))
    del tensors[key]
    with pytest.raises(ValueError, match="adapter keys do not match the model: missing"):
        set_adapter(model, tensors)


def test_unknown_target_module_is_named(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="c_attn"):
        attach_lora(load_causal_lm(tiny_model_dir).model,
                    LoraSection(target_modules="q_proj,c_attn"))
