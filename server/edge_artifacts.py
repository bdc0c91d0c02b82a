"""The simulated coordinator's edge artifact: the base exported to ONNX, quantized, signed.

Edge clients never see the torch model: the coordinator exports it once per (model, LoRA
settings, quantization) into the cache with :func:`kernels.edge_export.export_edge`, signs
the folder's manifest with the same Ed25519 key as the base model, and passes the folder to
clients through the run config (``paths.edge_export``), as a deployment would ship it.
"""

from __future__ import annotations

from pathlib import Path

from protocols.run_config import RunConfig


def edge_export_dir(cache_dir: Path, model_dir: Path, quantization: str,
                    kind: str = "lora") -> Path:
    """The cache folder of one export: per base model, adapter kind and quantization, so
    runs with different kinds never replace each other's export while one is running."""
    label = model_dir.name if kind == "lora" else f"{model_dir.name}-{kind}"
    return cache_dir / "edge" / f"{label}-{quantization}"


def ensure_edge_export(model_dir: Path, cache_dir: Path, config: RunConfig) -> Path:
    """Export (or reuse) and sign the edge model for this run's LoRA and quantization."""
    from kernels.edge_export import export_edge
    from kernels.edge_quantize import DEFAULT_QUANTIZATION
    from protocols.manifest import load_private_key
    from server.signing import coordinator_key_path, ensure_signing_key

    quantization: str = config.edge.quantization
    if quantization == "default":
        quantization = DEFAULT_QUANTIZATION
    ensure_signing_key(cache_dir)
    key = load_private_key(coordinator_key_path(cache_dir))
    out = edge_export_dir(cache_dir, model_dir, quantization, config.lora.kind)
    return export_edge(model_dir, out, config.lora, quantization=quantization, signing_key=key)
