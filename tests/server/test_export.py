"""The exported adapter is a real PEFT adapter: PeftModel.from_pretrained loads it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kernels.base_model import load_causal_lm
from kernels.lora import attach_lora, get_adapter, peft_config_dict
from protocols.run_config import LoraSection
from server.export import save_peft_adapter


def test_peft_loads_exported_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    model = attach_lora(load_causal_lm(tiny_model_dir).model, LoraSection(r=4))
    rng = np.random.default_rng(0)
    trained = {k: rng.normal(size=v.shape).astype(np.float32)
               for k, v in get_adapter(model).items()}
    target = save_peft_adapter(tmp_path / "adapter", trained,
                               peft_config_dict(model, str(tiny_model_dir)))
    assert sorted(p.name for p in target.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    assert not list(tmp_path.glob(".adapter-*")), "temporary folder left behind"
    assert json.loads((target / "adapter_config.json").read_text())["r"] == 4

    loaded = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir).model, target)
    for key, value in get_adapter(loaded).items():
        np.testing.assert_array_equal(value, trained[key])
    ids = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        base = load_causal_lm(tiny_model_dir).model(input_ids=ids).logits
        assert not torch.allclose(loaded(input_ids=ids).logits, base)


def test_export_replaces_previous_adapter_atomically(tmp_path: Path) -> None:
    arrays = {"w": np.ones((2, 2), np.float32)}
    save_peft_adapter(tmp_path / "adapter", arrays, {"r": 1})
    save_peft_adapter(tmp_path / "adapter", {"w": np.zeros((2, 2), np.float32)}, {"r": 2})
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_the_exported_base_name_is_portable(tiny_model_dir: Path, tmp_path: Path) -> None:
    """An adapter loads on another machine: it never records the trainer's absolute path."""
    from kernels.base_model import SMOLLM2, portable_model_name

    assert portable_model_name(SMOLLM2, tmp_path / "anywhere") == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_model_name(str(tiny_model_dir), tiny_model_dir) == tiny_model_dir.name
    for saved_from, expected in [("acme/llama-7b", "acme/llama-7b"),
                                 ("/home/me/models/llama", "mine"), ("./llama", "mine"),
                                 ("C:/models/x", "mine")]:
        folder = tmp_path / "mine"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"_name_or_path": saved_from}))
        assert portable_model_name(str(folder), folder) == expected, saved_from
    model = attach_lora(load_causal_lm(tiny_model_dir).model, LoraSection(r=4))
    config = peft_config_dict(model, portable_model_name(str(tiny_model_dir), tiny_model_dir))
    target = save_peft_adapter(tmp_path / "adapter", get_adapter(model), config)
    recorded = json.loads((target / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == tiny_model_dir.name
