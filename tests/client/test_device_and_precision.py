"""Where and in which precision torch clients compute (issue 15), on the CPU this suite has.

The CUDA paths run the same code with another ``torch.device``; the tests that need a GPU
skip here with the reason, and ``simulations/bench/gpu_check.py`` exercises them on one.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from client.local_data import LocalData
from client.torch_trainer import TorchLoraTrainer
from client.trainer import TrainInstruction
from kernels.device import DeviceNotAvailable, resolve_device
from kernels.lora import get_adapter, set_adapter
from protocols.run_config import ClientSection, ConfigError, LoraSection, RunConfig
from tests.conftest import mini_play
from tests.measured import THREADS

DATA = LocalData("mini/ALL", train=tuple(mini_play().split("\n\n")), heldout=())
HELD = LocalData("mini/ALL", train=(), heldout=DATA.train)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _instruction(steps: int) -> TrainInstruction:
    return TrainInstruction(server_round=1, local_steps=steps, batch_size=4,
                            learning_rate=0.05, seq_len=16, seed=3)


# -- choosing the device ----------------------------------------------------------------------


def test_auto_and_cpu_resolve_here_and_cuda_is_refused_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal cannot happen here")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(DeviceNotAvailable, match="torch sees no CUDA device"):
            resolve_device(name)
    with pytest.raises(ConfigError, match="expected 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        resolve_device("gpu0")


def test_cuda_names_resolve_against_the_gpus_torch_reports(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The selection logic with torch's CUDA queries answering as a two-GPU machine would
    (nothing is allocated on a device: only the names are resolved)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceNotAvailable, match=r"2 CUDA device\(s\) \(cuda:0 .. cuda:1\)"):
        resolve_device("cuda:2", key="eval.device")


def test_the_config_names_bad_device_and_precision_settings() -> None:
    with pytest.raises(ConfigError, match=re.escape("client.device = 'tpu'")):
        RunConfig.from_nested({"client": {"device": "tpu"}})
    with pytest.raises(ConfigError, match=re.escape("eval.device = 'cuda:x'")):
        RunConfig.from_nested({"eval": {"device": "cuda:x"}})
    with pytest.raises(ConfigError, match=re.escape("client.dtype")):
        RunConfig.from_nested({"client": {"dtype": "float16"}})
    for client in ({"dtype": "bfloat16"}, {"gradient_checkpointing": True}):
        with pytest.raises(ConfigError, match=re.escape("privacy.dpsgd runs in float32")):
            RunConfig.from_nested({"client": client, "privacy": {"dpsgd": True}})


def test_a_simulation_refuses_gpu_settings_it_cannot_place() -> None:
    from simulations.runner import check_gpus_for_simulation

    pinned = RunConfig.from_nested({"client": {"device": "cuda:0"}})
    with pytest.raises(ConfigError, match=re.escape("needs federation.client_gpus > 0")):
        check_gpus_for_simulation(pinned)
    check_gpus_for_simulation(RunConfig())  # the defaults: no GPU asked for, nothing to check
    with pytest.raises(ConfigError, match="whole number of GPUs"):
        check_gpus_for_simulation(RunConfig.from_nested({"federation": {"client_gpus": 1.5}}))
    with pytest.raises(ConfigError, match="sees only the GPU share"):
        check_gpus_for_simulation(RunConfig.from_nested({
            "client": {"device": "cuda:1"}, "federation": {"client_gpus": 0.5}}))
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    shared = RunConfig.from_nested({"federation": {"client_gpus": 0.25}})
    with pytest.raises(ConfigError, match=re.escape("client_gpus = 0.25 but torch sees no")):
        check_gpus_for_simulation(shared)


# -- precision and memory options --------------------------------------------------------------


def test_adapters_leave_the_device_as_the_same_float32_bits(tiny_model_dir: Path) -> None:
    """Whatever the base's precision, the adapter is float32 and what goes in comes out
    bit for bit: the codec sees the values a float32 CPU client would send."""
    rng = np.random.default_rng(0)
    for dtype in ("float32", "bfloat16"):
        trainer = TorchLoraTrainer(tiny_model_dir, LoraSection(r=4, freeze_a=False),
                                   threads=THREADS, client=ClientSection(dtype=dtype))
        base = {p.dtype for n, p in trainer.model.named_parameters() if ".lora_" not in n}
        lora = {p.dtype for n, p in trainer.model.named_parameters() if ".lora_" in n}
        assert base == {getattr(torch, dtype)} and lora == {torch.float32}, dtype
        rotary = {b.dtype for n, b in trainer.model.named_buffers() if "inv_freq" in n}
        assert rotary == {torch.float32}, (dtype, rotary)  # positions keep their precision
        values = {k: rng.normal(size=v.shape).astype(np.float32)
                  for k, v in get_adapter(trainer.model).items()}
        set_adapter(trainer.model, values)
        back = get_adapter(trainer.model)
        for key, value in values.items():
            assert back[key].dtype == np.float32 and back[key].flags.c_contiguous
            assert back[key].tobytes() == value.tobytes(), (dtype, key)


def test_bfloat16_training_learns_and_reports_float32(tiny_model_dir: Path) -> None:
    trainer = TorchLoraTrainer(tiny_model_dir, LoraSection(r=4, freeze_a=False),
                               threads=THREADS, client=ClientSection(dtype="bfloat16"))
    start = get_adapter(trainer.model)
    before = trainer.evaluate(start, HELD, seq_len=16, batch_size=8).loss
    outcome = trainer.train(start, DATA, _instruction(steps=20))
    after = trainer.evaluate(outcome.tensors, HELD, seq_len=16, batch_size=8).loss
    assert all(v.dtype == np.float32 for v in outcome.tensors.values())
    assert np.isfinite(after) and after < before, (before, after)


def test_gradient_checkpointing_gives_the_same_update(tiny_model_dir: Path) -> None:
    """Recomputing activations changes memory, not arithmetic: the same steps, the same
    adapter (float32 on the CPU: equal up to summation order)."""
    updates = []
    for checkpointing in (False, True):
        trainer = TorchLoraTrainer(
            tiny_model_dir, LoraSection(r=4, freeze_a=False), threads=THREADS,
            client=ClientSection(gradient_checkpointing=checkpointing))
        assert trainer.model.base_model.model.is_gradient_checkpointing == checkpointing
        start = get_adapter(trainer.model)
        updates.append(trainer.train(start, DATA, _instruction(steps=3)).tensors)
    for key in updates[0]:
        np.testing.assert_allclose(updates[1][key], updates[0][key], rtol=1e-5, atol=1e-7,
                                   err_msg=key)
        assert not np.array_equal(updates[0][key], start[key]) or ".lora_A." in key


# -- on a GPU --------------------------------------------------------------------------------


@CUDA
@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_a_cuda_client_matches_the_cpu_client(tiny_model_dir: Path, quantize: str) -> None:
    """The same round on cuda and on the CPU: the same adapter within float32 noise, and a
    quantized base runs the Triton kernels there."""
    from kernels.quant_linear import get_backend
    from protocols import keys
    from protocols.run_config import ModelSection

    model = ModelSection(quantize=quantize, quant_group_size=32)
    got = {}
    for device in ("cpu", "cuda"):
        trainer = TorchLoraTrainer(tiny_model_dir, LoraSection(r=4), threads=THREADS,
                                   model_section=model, client=ClientSection(device=device))
        start = get_adapter(trainer.model)
        outcome = trainer.train(start, DATA, _instruction(steps=3))
        got[device] = outcome.tensors
        if device == "cuda":
            assert outcome.metrics[keys.PEAK_MEMORY_BYTES] > 0
            assert outcome.metrics[keys.STEP_SECONDS] > 0
            if quantize != "none":  # 'auto' resolves per call: Triton on CUDA tensors
                assert get_backend("auto", trainer.device).name == "triton"
    for key in got["cpu"]:
        np.testing.assert_allclose(got["cuda"][key], got["cpu"][key], rtol=1e-3, atol=1e-5)
