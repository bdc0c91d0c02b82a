"""What the coordinator needs before a run starts — and what it does not: any device's data.

The coordinator holds the base model (to sign it, export it for edge devices and, if asked,
score the global adapter), its own optional evaluation file (``eval.path``) and the run
config. Devices name their own data in their own configs; nothing here reads, lists or
creates device data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocols.run_config import ConfigError, PathsSection, RunConfig


@dataclass(frozen=True)
class CoordinatorInputs:
    """Everything a coordinator run needs, checked before any run folder exists."""

    config: RunConfig
    cache_dir: Path
    model_dir: Path
    manifest_public_key: str = ""  # hex of the raw Ed25519 key devices verify the base with
    edge_export: Path | None = None  # the signed ONNX export edge devices run, if any
    signed_manifest: str = ""  # the base model's signed manifest (SignedManifest text)
    secagg_roster: str = ""  # the organisation's signed roster: authenticated SecAgg


def check_coordinator_inputs(config: RunConfig, cache_dir: Path) -> CoordinatorInputs:
    """Fail early with one clear error: the base model (signed when devices verify it), the
    edge export when edge devices take part, and ``eval.path`` when one is named."""
    from kernels.base_model import resolve_model_dir

    model_dir = resolve_model_dir(config.model.source, cache_dir)
    if config.eval.path is not None:
        from kernels.data.formats import DataFormatError
        from server.central_eval import evaluation_examples

        if not config.eval.path.exists():
            raise ConfigError(f"eval.path = {str(config.eval.path)!r} does not exist; name a "
                              "file or folder of evaluation data this coordinator owns, or "
                              "remove it")
        try:
            evaluation_examples(config.eval.path)  # read now, not after the run started
        except DataFormatError as err:
            raise ConfigError(f"eval.path: {err}") from None
    public_key = signed_manifest = ""
    if config.security.verify_manifest:
        from server.signing import ensure_signed

        # signed in the cache, never in model_dir: the manifest travels with the run
        signed = ensure_signed(model_dir, cache_dir)
        public_key, signed_manifest = signed.public_key, signed.manifest.to_text()
    edge_export = None
    if config.edge.fraction > 0:
        from server.edge_artifacts import ensure_edge_export

        edge_export = ensure_edge_export(model_dir, cache_dir, config)
    return CoordinatorInputs(config, cache_dir, model_dir, public_key, edge_export,
                             signed_manifest)


def coordinator_run_config(inputs: CoordinatorInputs, run_dir: Path, *,
                           devices_dir: Path | None = None) -> dict[str, Any]:
    """The flat Flower run config of a run: the config plus this party's paths.
    ``devices_dir`` is for simulations only (where the simulated devices' folders are)."""
    flat: dict[str, Any] = inputs.config.to_flat()
    flat.update(PathsSection(
        cache_dir=inputs.cache_dir, devices_dir=devices_dir, run_dir=run_dir,
        manifest_public_key=inputs.manifest_public_key, edge_export=inputs.edge_export,
        signed_manifest=inputs.signed_manifest, secagg_roster=inputs.secagg_roster,
    ).to_flat())
    return flat
