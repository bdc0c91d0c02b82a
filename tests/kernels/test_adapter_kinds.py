"""Prompt tuning, prefix tuning and (IA)3 beside LoRA (``lora.kind``): seeded on every party,
trained by the torch client, exported in PEFT format that ``PeftModel`` loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from client.local_data import LocalData
from client.torch_trainer import TorchLoraTrainer
from client.trainer import TrainInstruction
from kernels.base_model import load_causal_lm
from kernels.lora import PROMPT_KEY, attach_adapter, get_adapter, peft_config_dict, set_adapter
from protocols.run_config import ConfigError, LoraSection, RunConfig
from server.export import save_peft_adapter

KINDS = ["prompt", "prefix", "ia3"]


def _model(model_dir: Path, kind: str, seed: int = 0) -> torch.nn.Module:
    return attach_adapter(load_causal_lm(model_dir).model,
                          LoraSection(kind=kind, virtual_tokens=4, seed=seed))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the real tokens (prompt tuning prepends its virtual tokens' positions)."""
    with torch.no_grad():
        return model(input_ids=ids).logits[:, -ids.shape[1]:]


@pytest.mark.parametrize("kind", KINDS)
def test_every_party_builds_the_same_adapter_from_the_seed(tiny_model_dir: Path,
                                                           kind: str) -> None:
    one, two = get_adapter(_model(tiny_model_dir, kind)), get_adapter(_model(tiny_model_dir, kind))
    assert one.keys() == two.keys() and one
    assert all(one[k].tobytes() == two[k].tobytes() for k in one)
    if kind != "ia3":  # (IA)3 starts at ones, whatever the seed
        other = get_adapter(_model(tiny_model_dir, kind, seed=1))
        assert any(other[k].tobytes() != one[k].tobytes() for k in one)


def test_the_saved_keys_and_shapes_are_peft_s(tiny_model_dir: Path) -> None:
    config = load_causal_lm(tiny_model_dir).model.config
    layers, hidden = config.num_hidden_layers, config.hidden_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    prompt = get_adapter(_model(tiny_model_dir, "prompt"))
    assert {k: v.shape for k, v in prompt.items()} == {PROMPT_KEY: (4, hidden)}
    prefix = get_adapter(_model(tiny_model_dir, "prefix"))
    assert {k: v.shape for k, v in prefix.items()} == {PROMPT_KEY: (4, layers * 2 * kv)}
    ia3 = get_adapter(_model(tiny_model_dir, "ia3"))
    assert ia3 and all(k.endswith(".ia3_l") for k in ia3)
    assert {k.split(".")[-2] for k in ia3} == {"k_proj", "v_proj", "down_proj"}
    assert all(np.all(v == 1.0) for v in ia3.values()), "(IA)3 starts at the base model"


@pytest.mark.parametrize("kind", KINDS)
def test_set_adapter_loads_every_kind_and_refuses_foreign_keys(tiny_model_dir: Path,
                                                               kind: str) -> None:
    model = _model(tiny_model_dir, kind)
    ids = torch.arange(3, 13).reshape(1, 10)
    before = _logits(model, ids)
    moved = {k: v + 0.5 for k, v in get_adapter(model).items()}
    set_adapter(model, moved)
    assert all(np.array_equal(v, moved[k]) for k, v in get_adapter(model).items())
    assert not torch.allclose(_logits(model, ids), before)
    with pytest.raises(ValueError, match="adapter keys do not match"):
        set_adapter(model, {**moved, "base_model.model.x.lora_A.weight": np.zeros(2, "f4")})


@pytest.mark.parametrize("kind", KINDS)
def test_peft_loads_the_exported_adapter_of_every_kind(tiny_model_dir: Path, tmp_path: Path,
                                                       kind: str) -> None:
    """The coordinator's export is a PEFT adapter folder: ``PeftModel.from_pretrained`` on
    the base gives the same logits as fedtune's model holding the same tensors."""
    from peft import PeftModel

    model = _model(tiny_model_dir, kind)
    rng = np.random.default_rng(0)
    trained = {k: (v + 0.3 * rng.standard_normal(v.shape)).astype(np.float32)
               for k, v in get_adapter(model).items()}
    set_adapter(model, trained)
    folder = save_peft_adapter(tmp_path / "adapter", trained,
                               peft_config_dict(model, str(tiny_model_dir)))
    loaded = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir).model, folder)
    for key, value in get_adapter(loaded).items():
        np.testing.assert_array_equal(value, trained[key])
    ids = torch.arange(5, 17).reshape(1, 12)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids))


@pytest.mark.parametrize("kind", KINDS)
def test_the_torch_client_trains_every_kind(tiny_model_dir: Path, kind: str) -> None:
    """A round of AdamW moves the adapter, lowers the training loss on repeated data, and
    returns every tensor of the adapter (none is frozen outside FFA-LoRA)."""
    lora = LoraSection(kind=kind, virtual_tokens=4)
    trainer = TorchLoraTrainer(tiny_model_dir, lora)
    start = get_adapter(trainer.model)
    data = LocalData("c", train=("to be or not to be, that is the question. " * 12,),
                     heldout=("whether tis nobler in the mind to suffer " * 3,))
    before = trainer.evaluate(start, data, seq_len=16, batch_size=4).loss
    outcome = trainer.train(start, data, TrainInstruction(
        server_round=1, local_steps=20, batch_size=4, learning_rate=0.05, seq_len=16, seed=0))
    assert outcome.tensors.keys() == start.keys()
    assert any(not np.array_equal(outcome.tensors[k], start[k]) for k in start)
    after = trainer.evaluate(outcome.tensors, data, seq_len=16, batch_size=4).loss
    assert after < before, (kind, before, after)


@pytest.mark.parametrize(("settings", "needs"), [
    ({"model": {"quantize": "int8"}}, "model.quantize"),
    ({"privacy": {"dpsgd": True}}, "privacy.dpsgd"),
])
@pytest.mark.parametrize("kind", KINDS)
def test_what_runs_lora_only_is_refused_with_the_reason(kind: str, settings: dict[str, dict],
                                                        needs: str) -> None:
    with pytest.raises(ConfigError, match=rf"lora.kind = '{kind}' cannot run with {needs}"):
        RunConfig.from_nested({"lora": {"kind": kind}, **settings})


def test_edge_devices_run_the_kinds_the_export_takes() -> None:
    edge = {"edge": {"fraction": 0.5}, "security": {"secagg": False}}
    for kind in ("ia3", "prompt"):
        assert RunConfig.from_nested({"lora": {"kind": kind}, **edge}).lora.kind == kind
    with pytest.raises(ConfigError, match=r"lora.kind = 'prefix' cannot run with edge.fraction"):
        RunConfig.from_nested({"lora": {"kind": "prefix"}, **edge})
    with pytest.raises(ConfigError, match=r"'components' .* needs lora.kind = 'lora'"):
        RunConfig.from_nested({"lora": {"kind": "ia3"},
                               "edge": {"fraction": 0.5, "subspace": "components"},
                               "security": {"secagg": False}})


def test_prefix_refuses_gradient_checkpointing_and_kinds_have_no_ranks() -> None:
    with pytest.raises(ConfigError, match=r"client\.gradient_checkpointing"):
        RunConfig.from_nested({"lora": {"kind": "prefix"},
                               "client": {"gradient_checkpointing": True}})
    RunConfig.from_nested({"lora": {"kind": "prompt"},
                           "client": {"gradient_checkpointing": True}})  # prompt: fine
    with pytest.raises(ConfigError, match=r"lora.kind = 'ia3' has none"):
        RunConfig.from_nested({"lora": {"kind": "ia3", "device_ranks": [4, 8]}})


def test_a_fresh_prefix_is_the_base_model_after_real_tokens(tiny_model_dir: Path) -> None:
    """The prefix starts at the keys and values the base computes for seeded vocabulary
    tokens: the prefix model's logits are the base model's after those tokens (PEFT's
    unit-Gaussian start moved SmolLM2's held-out loss from 5.0 to 10.6)."""
    from kernels.lora import _start_prefix_at_real_tokens

    model = _model(tiny_model_dir, "prefix")
    base = model.get_base_model()
    torch.manual_seed(5)
    _start_prefix_at_real_tokens(model, 4)
    torch.manual_seed(5)
    tokens = torch.randint(0, int(base.config.vocab_size), (1, 4))
    ids = torch.arange(7, 19).reshape(2, 6)
    with torch.no_grad():
        after_tokens = base(input_ids=torch.cat([tokens.expand(2, -1), ids], 1)).logits[:, 4:]
    torch.testing.assert_close(_logits(model, ids), after_tokens, rtol=1e-4, atol=1e-4)
