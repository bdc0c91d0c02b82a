"""Export the base causal LM + its adapter to ONNX for edge clients, adapter tensors as inputs.

Runs on the coordinator or a dev box (torch, transformers, peft); the device side is
:mod:`kernels.edge_runtime`. The graph computes, for ``input_ids`` int64 ``(B, S)`` and one
float32 input per LoRA tensor, ``token_nll`` float32 ``(B, S-1)``: the next-token negative
log-likelihood. Log-softmax and gather run inside the graph, so the ``(B, S, 49152)`` logits
never leave ONNX Runtime. Because every adapter tensor is an input, one ORT session serves
every adapter version and every MeZO perturbation θ ± εz.

The adapter is attached with :func:`kernels.lora.attach_adapter` and the same
:class:`~protocols.run_config.LoraSection` as the torch client, so input names map 1:1 to
the wire keys of :func:`kernels.lora.get_adapter` (recorded in ``edge_config.json``). Kinds:
LoRA (each ``lora_A``/``lora_B`` an input), (IA)3 (each scale vector an input, applied as
PEFT's IA3 layer does) and prompt tuning (the ``prompt_embeddings`` input is prepended to
the token embeddings; the loss covers the real tokens only). Prefix tuning is not exported:
its prefix enters as a key/value cache object the legacy tracer does not follow.

Exporter choice: the legacy TorchScript exporter (``dynamo=False``). It exports SmolLM2-135M
in ~60 s here against ~150 s for the dynamo exporter, and tracing lets a LoRA layer read its
weights from a Python-side slot filled from the wrapper's ``*adapter`` arguments; the dynamo
exporter rejects variadic inputs' dynamic shapes and ``torch.func.functional_call`` cannot be
traced by the legacy one. Tracing bakes Python branches in: transformers' branches taken for
``S > 1`` without padding (we pass an all-ones attention mask, which also avoids ``aten::diff``
in its packed-sequence check), hence the runtime's ``S >= 2`` requirement. If a torch release
drops the legacy exporter, this module is the one place to port.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from kernels.edge_quantize import DEFAULT_QUANTIZATION, quantization_option, quantize_model
from kernels.edge_runtime import (
    CONFIG_NAME,
    EDGE_FORMAT,
    INPUT_IDS,
    MODEL_NAME,
    OUTPUT_NLL,
    TOKENIZER_NAME,
    token_blocks,
)
from kernels.lora import PROMPT_KEY
from protocols.atomic_write import recover_dir, replace_dir_atomic
from protocols.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    build_manifest,
    write_signed_manifest,
)
from protocols.run_config import EDGE_EXPORTABLE_KINDS, LoraSection

if TYPE_CHECKING:
    import torch
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger(__name__)

OPSET = 17
#: Adapter kinds (``lora.kind``) whose tensors the graph takes as inputs.
EXPORTABLE_KINDS = EDGE_EXPORTABLE_KINDS
#: Bump when the graph's contract changes: it is part of the cache key.
EXPORT_REVISION = 3  # 3: the chat template travels with the tokenizer
#: What an edge device needs to tokenize and render its data like a torch device does.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def export_edge(
    model_dir: Path,
    out_dir: Path,
    lora: LoraSection,
    *,
    quantization: str = DEFAULT_QUANTIZATION,
    signing_key: Ed25519PrivateKey | None = None,
    calibration_texts: Sequence[str] | None = None,
    force: bool = False,
) -> Path:
    """Export ``model_dir`` + its adapter to ``out_dir`` (cached) and return ``out_dir``.

    ``out_dir`` ends up holding ``model.onnx``, the tokenizer files, ``edge_config.json`` and
    a manifest (sha256 of every file; signed when ``signing_key`` is given). The folder is
    built in a temporary sibling and renamed into place, so a crash never leaves half an
    export. An existing export with the same cache key (source model files, LoRA settings,
    quantization, exporter revision) is reused unless ``force``; batch and sequence length
    are dynamic, so one export serves every batch shape.

    ``calibration_texts`` feed the activation statistics of calibrated options (default:
    :data:`CALIBRATION_TEXT`). They must be public text: never client
    data, which would leak into the model shipped to every device. A different text does
    not invalidate the cache; pass ``force=True``.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    option = quantization_option(quantization)  # fail fast on an unknown name
    if not (model_dir / TOKENIZER_NAME).is_file():
        raise FileNotFoundError(
            f"{model_dir}: no {TOKENIZER_NAME}; edge clients need a fast (tokenizers) "
            "tokenizer: save one there with `tokenizer.save_pretrained`"
        )
    key = _cache_key(model_dir, lora, option.name)
    recover_dir(out_dir)  # a crash mid-replace (off Linux) may have left the old export aside
    if not force and _cached(out_dir, key):
        log.info("reusing edge export %s (%s)", out_dir, option.name)
        if signing_key is not None:
            write_signed_manifest(out_dir, signing_key, label=f"edge export {option.name}")
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        start = time.perf_counter()
        build = tmp / "build"
        build.mkdir()
        fp32 = build / "fp32.onnx"
        info = export_onnx_fp32(model_dir, fp32, lora)
        final = tmp / "export"
        final.mkdir()
        calibration = None
        if option.needs_calibration:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_NAME))
            calibration = calibration_blocks(
                tokenizer, eos_token_id=info["eos_token_id"], texts=calibration_texts
            )
        quantize_model(fp32, final / MODEL_NAME, option, calibration=calibration)
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, final / name)
        config = {
            "format": EDGE_FORMAT,
            "model_file": MODEL_NAME,
            "opset": OPSET,
            "quantization": option.name,
            "quantization_help": option.help,
            "float_activations": option.float_activations,
            "inputs": {INPUT_IDS: {"dtype": "int64", "shape": ["batch", "seq"]}},
            "output": {OUTPUT_NLL: {"dtype": "float32", "shape": ["batch", "seq-1"]}},
            "adapter": info["adapter"],
            "lora": asdict(lora),
            "vocab_size": info["vocab_size"],
            "eos_token_id": info["eos_token_id"],
            "source_model": model_dir.name,
            "cache_key": key,
            "export_seconds": round(time.perf_counter() - start, 1),
        }
        (final / CONFIG_NAME).write_text(json.dumps(config, indent=1), encoding="utf-8")
        if signing_key is not None:
            write_signed_manifest(final, signing_key, label=f"edge export {option.name}")
        else:
            manifest = build_manifest(final, label=f"edge export {option.name}")
            (final / MANIFEST_NAME).write_bytes(manifest.canonical_bytes())
        replace_dir_atomic(final, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s to %s (%s)", model_dir, out_dir, option.name)
    return out_dir


def export_onnx_fp32(model_dir: Path, onnx_path: Path, lora: LoraSection) -> dict[str, Any]:
    """Write the float32 graph to ``onnx_path``; return adapter entries, vocab size, EOS id.

    ``adapter`` is a list of ``{"input", "key", "shape"}`` in graph-input order.
    """
    import torch

    from kernels.base_model import load_causal_lm
    from kernels.lora import attach_adapter, get_adapter

    if lora.kind not in EXPORTABLE_KINDS:
        raise ValueError(f"lora.kind = {lora.kind!r} has no edge export (kinds: "
                         f"{list(EXPORTABLE_KINDS)}); see this module's docstring")
    loaded = load_causal_lm(Path(model_dir))
    model = attach_adapter(loaded.model, lora)
    model.eval()
    adapter = get_adapter(model)
    keys = list(adapter)
    names = adapter_input_names(keys)
    wrapper = _nll_graph(model, keys)
    ids = torch.randint(0, int(model.config.vocab_size), (2, 8), generator=torch.Generator())
    example = tuple(torch.from_numpy(adapter[k]) for k in keys)
    with torch.no_grad(), warnings.catch_warnings():
        # Tracer warnings about branches baked in are expected (see the module docstring).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (ids, *example),
            str(onnx_path),
            input_names=[INPUT_IDS, *names],
            output_names=[OUTPUT_NLL],
            dynamic_axes={INPUT_IDS: {0: "batch", 1: "seq"}, OUTPUT_NLL: {0: "batch", 1: "seq_1"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    eos = loaded.tokenizer.eos_token_id
    return {
        "adapter": [
            {"input": n, "key": k, "shape": list(adapter[k].shape)}
            for n, k in zip(names, keys, strict=True)
        ],
        "vocab_size": int(model.config.vocab_size),
        "eos_token_id": None if eos is None else int(eos),
    }


def adapter_input_names(keys: list[str]) -> list[str]:
    """Graph input name per adapter key: the key with non-identifier characters as ``_``.

    ONNX names need not be identifiers, but tools (quantizers, netron, C APIs) handle plain
    names best. Refuses the (unlikely) case of two keys that collide.
    """
    names = [re.sub(r"[^0-9A-Za-z_]", "_", k) for k in keys]
    if len(set(names)) != len(names) or INPUT_IDS in names:
        raise ValueError("adapter keys collide once sanitised for ONNX input names")
    return names


class _AdapterSlot:
    """Holds the adapter tensors of the forward being traced (shared by all LoRA layers)."""

    def __init__(self) -> None:
        self.tensors: tuple[Any, ...] = ()


def _nll_graph(model: Any, keys: list[str]) -> torch.nn.Module:
    """The traced module: base + LoRA, LoRA weights from the positional ``*adapter``.

    Classes are defined inside so that importing this module does not import torch.
    """
    import torch
    from torch.nn import functional

    class LoraFromSlot(torch.nn.Module):
        """Stands in for a PEFT ``lora_A``/``lora_B`` ``nn.Linear``: same math, weight from
        the slot. ``weight`` stays as an attribute because PEFT reads its dtype."""

        def __init__(self, slot: _AdapterSlot, index: int, weight: torch.Tensor) -> None:
            super().__init__()
            self.slot, self.index = slot, index
            self.weight = weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return functional.linear(x, self.slot.tensors[self.index])  # (B, S, out)

    class IA3FromSlot(torch.nn.Module):
        """Stands in for a PEFT (IA)3 ``Linear``: the base layer, scaled by the slot's
        vector on its input (feed-forward layers) or its output (the others), as PEFT's
        ``IA3Layer.forward`` does."""

        def __init__(self, slot: _AdapterSlot, index: int, layer: Any) -> None:
            super().__init__()
            self.slot, self.index = slot, index
            self.base_layer, self.is_feedforward = layer.base_layer, layer.is_feedforward

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scale = self.slot.tensors[self.index].flatten()
            if self.is_feedforward:
                return self.base_layer(x * scale)  # type: ignore[no-any-return]
            return self.base_layer(x) * scale  # type: ignore[no-any-return]

    class NllGraph(torch.nn.Module):
        def __init__(self, model: Any, keys: list[str]) -> None:
            super().__init__()
            self.model, self.slot = model, _AdapterSlot()
            base = model.get_base_model()  # LoRA and (IA)3 layers are injected in place
            self.decoder, self.head = base.get_decoder(), base.get_output_embeddings()
            self.prompt = keys == [PROMPT_KEY]  # prompt tuning: one (N, hidden) input
            modules = dict(model.named_modules())
            for index, key in enumerate(keys):
                if self.prompt:
                    continue
                if key.endswith(".ia3_l"):
                    # "<parent>.<child>.ia3_l": the IA3 layer <child> of module <parent>
                    parent, child = key.removesuffix(".ia3_l").rsplit(".", 1)
                    layer = getattr(modules[parent], child)
                    setattr(modules[parent], child, IA3FromSlot(self.slot, index, layer))
                    continue
                # "<module>.lora_A.weight" -> the layer's ModuleDict "lora_A", adapter "default"
                module_name, kind, _ = key.rsplit(".", 2)
                holder = getattr(modules[module_name], kind)
                holder["default"] = LoraFromSlot(self.slot, index, holder["default"].weight)

        def forward(self, input_ids: torch.Tensor, *adapter: torch.Tensor) -> torch.Tensor:
            self.slot.tensors = adapter
            if self.prompt:
                # PEFT's prompt tuning: the virtual tokens' embeddings before the real ones.
                embeds = self.decoder.get_input_embeddings()(input_ids)  # (B, S, H)
                prompt = adapter[0].unsqueeze(0).expand(input_ids.shape[0], -1, -1)
                embeds = torch.cat([prompt.to(embeds.dtype), embeds], dim=1)  # (B, N+S, H)
                mask = torch.ones(embeds.shape[:2], dtype=torch.int64)
                out = self.decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
                states = out.last_hidden_state[:, adapter[0].shape[0]:, :]  # (B, S, H)
            else:
                mask = torch.ones_like(input_ids)
                out = self.decoder(input_ids=input_ids, attention_mask=mask, use_cache=False)
                states = out.last_hidden_state
            # Drop the last position before the vocabulary projection: it has no target, and
            # slicing (B, S, H) instead of (B, S, V) logits saves a 49k-wide copy.
            logits = self.head(states[:, :-1, :])  # (B, S-1, V)
            logp = torch.log_softmax(logits.float(), dim=-1)  # (B, S-1, V)
            target = input_ids[:, 1:].unsqueeze(-1)  # (B, S-1, 1)
            return -torch.gather(logp, -1, target).squeeze(-1)  # (B, S-1)

    return NllGraph(model, keys)


def _cache_key(model_dir: Path, lora: LoraSection, quantization: str) -> str:
    """Source files by (name, size, mtime), adapter settings, quantization, exporter revision.

    Stat data instead of content hashes: re-hashing a 540 MB model to decide whether to
    skip a one-minute export is not worth it; a converted model is replaced, not edited.
    """
    files = sorted(  # the manifest is left out: re-signing the model changes no weight
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.iterdir()
        if p.is_file() and p.name not in (MANIFEST_NAME, SIGNATURE_NAME)
    )
    doc = {"files": files, "lora": asdict(lora), "quantization": quantization,
           "revision": EXPORT_REVISION, "opset": OPSET, "format": EDGE_FORMAT}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _cached(out_dir: Path, key: str) -> bool:
    try:
        config = json.loads((out_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("cache_key") == key


#: Public, generic text for activation calibration (written for fedtune; no client data).
#: Varied registers — narrative, dialogue, verse, technical prose, lists — because the
#: outlier channels that matter appear on delimiters and sequence starts in any text.
CALIBRATION_TEXT = (
    "The morning train left the station a few minutes late, and the passengers settled "
    "into their seats with coffee, newspapers and the quiet resignation of a long commute. "
    "Outside, the fields were still grey with frost; a farmer walked along the fence with "
    "two dogs running ahead of him.",
    "\"Have you seen my keys?\" she asked, searching the pockets of her coat. \"I put them "
    "on the table last night, I am sure of it.\" He laughed and pointed at the door, where "
    "the keys were still hanging in the lock.",
    "O gentle night, that hides the weary town,\nLet every lamp and every care lie down;\n"
    "The river keeps its counsel, cold and deep,\nAnd all the bells are silent in their sleep.",
    "To install the package, create a virtual environment, activate it, and run the "
    "installer with the version you need. If the build fails, check that the compiler is "
    "on your PATH and that the headers match the interpreter; then try again with verbose "
    "output enabled.",
    "Ingredients: two cups of flour, one teaspoon of salt, three eggs, a cup of milk and a "
    "spoon of butter. Mix the dry ingredients first, whisk in the eggs, add the milk slowly, "
    "and let the batter rest for thirty minutes before cooking.",
    "In 1854 the physician John Snow mapped the cases of cholera around a water pump in "
    "London and argued that the disease spread through contaminated water rather than bad "
    "air. The handle of the pump was removed, and the number of new cases fell.",
    "KING. Where is the messenger? Let him come in.\nMESSENGER. My lord, the army waits "
    "upon the hill, and the enemy has crossed the river at dawn.\nKING. Then we shall meet "
    "them there. Sound the trumpets, and let no man be idle!",
    "Questions for review: 1. What is the difference between weather and climate? 2. Why do "
    "coastal cities have milder winters? 3. Explain, in your own words, how a rain shadow "
    "forms behind a mountain range.",
)


def calibration_blocks(
    tokenizer: Any,
    *,
    eos_token_id: int | None,
    texts: Sequence[str] | None = None,
    seq_len: int = 64,
    max_blocks: int = 16,
) -> npt.NDArray[np.int64]:
    """Token blocks for activation calibration: ``texts`` or :data:`CALIBRATION_TEXT`.

    ``tokenizer`` is a ``tokenizers.Tokenizer``; blocks are cut like every other block in
    fedtune (:func:`kernels.edge_runtime.token_blocks`) and spread evenly over the text.
    """
    source = list(CALIBRATION_TEXT) if texts is None else list(texts)
    blocks = token_blocks(tokenizer, source, seq_len, eos_token_id=eos_token_id)
    if len(blocks) == 0:
        raise ValueError(f"calibration text is shorter than one {seq_len}-token block")
    pick = np.unique(np.linspace(0, len(blocks) - 1, num=min(max_blocks, len(blocks))).astype(int))
    chosen: npt.NDArray[np.int64] = blocks[pick]
    return chosen
