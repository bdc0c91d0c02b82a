"""A tiny federation for driving the real ClientApp and strategy in-process: the tiny
Llama, a miniature play split into simulated devices, and the adapter the clients start
from. Shared by the loopback tests of secure aggregation and of lossy uploads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from protocols.adapter_spec import AdapterSpec
from protocols.run_config import RunConfig


def tiny_federation(tiny_model_dir: Path, cache: Path, *, learning_rate: float,
                    secagg: bool = True) -> dict[str, Any]:
    """The run config (flat, with the devices' folders), the initial adapter, its spec, the
    checked inputs and the cache."""
    from client.app import _trainer
    from kernels.lora import get_adapter
    from simulations.runner import check_inputs
    from tests.conftest import mini_play

    texts = cache / "data" / "shakespeare" / "texts"
    texts.mkdir(parents=True)
    (texts / "miniature_gut.txt").write_text(mini_play())
    config = RunConfig.from_nested({
        "model": {"source": str(tiny_model_dir)},
        "data": {"min_examples": 5, "heldout_fraction": 0.25},
        "lora": {"r": 4},
        "train": {"local_steps": 2, "batch_size": 2, "seq_len": 16,
                  "learning_rate": learning_rate},
        "security": {"verify_manifest": False, "secagg": secagg},
    })
    inputs = check_inputs(config, cache)
    assert inputs.devices is not None
    flat = {**config.to_flat(), "paths.cache_dir": str(cache),
            "paths.devices_dir": str(inputs.devices.root)}
    adapter = get_adapter(_trainer(flat).model)  # type: ignore[attr-defined]
    frozen = frozenset(k for k in adapter if config.lora.is_frozen(k))
    return {"flat": flat, "adapter": adapter, "inputs": inputs, "cache": cache,
            "spec": AdapterSpec.from_arrays(adapter, {}, frozen=frozen)}
