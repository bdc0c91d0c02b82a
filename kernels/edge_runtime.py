"""The edge side of the frozen base: one ONNX Runtime session, adapter tensors as inputs.

An edge device cannot train with backprop (ONNX Runtime dropped its training packages after
1.19; docs/architecture.md), so it runs forward passes only: MeZO/SPSA steps evaluate the
loss at θ ± εz. The exported graph (:mod:`kernels.edge_export`) takes every LoRA tensor as a
graph input, so a single :class:`EdgeModel` session serves every adapter version and every
perturbation; nothing is rebuilt per call.

This module must import without torch, transformers or peft (``pip install fedtune[edge]``):
it uses numpy, onnxruntime, tokenizers, the standard library and ``protocols`` only.

Buffers and aliasing (docs/architecture.md): on CPU an ``OrtValue`` made from a numpy array
*shares* that array's memory. :class:`EdgeModel` therefore never binds caller arrays: each
call copies the adapter and the token ids into buffers it owns (a few MB, ~1 ms against a
forward pass of tens to hundreds of ms), so callers may reuse or mutate their arrays as soon
as a call returns, and a perturbation written into the caller's θ buffer can never leak into
a later run. The returned NLL array is a fresh copy too. A model is not thread-safe: calls
are serialised by a lock; use one :class:`EdgeModel` per thread for parallelism.

Exports with int8 activations (``int8*`` options; :attr:`EdgeModel.float_activations` is
False) are for forward-only evaluation: their loss is not smooth in the adapter at MeZO's ε,
and one activation scale per MatMul input spans the whole batch, so a row's NLL also depends
on the other rows of its batch (by up to ~2 nats per token on SmolLM2; ~0.006 in the mean).
The default export keeps float activations and has neither problem.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from protocols.adapter_spec import Tensors
from protocols.manifest import (
    MANIFEST_NAME,
    REFUSAL,
    ManifestError,
    ManifestMismatch,
    build_manifest,
    load_public_key,
    verify_directory,
)

#: Tag written into ``edge_config.json``; a runtime refuses formats it does not know.
EDGE_FORMAT = "fedtune-edge/1"
CONFIG_NAME = "edge_config.json"
MODEL_NAME = "model.onnx"
TOKENIZER_NAME = "tokenizer.json"
INPUT_IDS = "input_ids"
OUTPUT_NLL = "token_nll"


class EdgeModelError(ValueError):
    """An export folder that cannot be used (bad config, wrong format); says what to do."""


class EdgeModel:
    """A verified ONNX export of the base LM + LoRA, evaluated with adapter tensors as inputs.

    Parameters
    ----------
    export_dir
        A folder written by :func:`kernels.edge_export.export_edge`.
    public_key
        The coordinator's Ed25519 public key (raw 32 bytes, PEM, or a key object). When given,
        the signed manifest must verify; when ``None`` the unsigned hashes are still checked,
        which catches corruption but not a malicious coordinator (ReCIT-style tampering).
    threads
        ONNX Runtime intra-op threads. Keep it at the number of cores the process may use;
        oversubscription was ~250x slower on a 2-core box.
    verify
        Re-hash every file before loading (default). Turn off only in benchmarks that
        already verified the folder in the same process.
    """

    def __init__(
        self,
        export_dir: Path,
        *,
        public_key: Any = None,
        threads: int = 1,
        verify: bool = True,
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.export_dir = Path(export_dir)
        if verify:
            verify_export(self.export_dir, public_key=public_key)
        self.config = _read_config(self.export_dir)
        entries = self.config["adapter"]
        self._input_names = {e["key"]: e["input"] for e in entries}
        self._shapes = {e["key"]: tuple(int(d) for d in e["shape"]) for e in entries}
        self.vocab_size = int(self.config["vocab_size"])
        eos = self.config.get("eos_token_id")
        self.eos_token_id: int | None = None if eos is None else int(eos)
        self.tokenizer = Tokenizer.from_file(str(self.export_dir / TOKENIZER_NAME))

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(self.export_dir / self.config["model_file"]),
            sess_options=options,
            providers=["CPUExecutionProvider"],
        )
        graph_inputs = {i.name for i in self.session.get_inputs()}
        wanted = {INPUT_IDS, *self._input_names.values()}
        if graph_inputs != wanted:
            raise EdgeModelError(
                f"{self.export_dir}: graph inputs do not match {CONFIG_NAME}: missing "
                f"{sorted(wanted - graph_inputs)[:3]}, unexpected "
                f"{sorted(graph_inputs - wanted)[:3]}; re-export the model"
            )
        # Owned buffers, bound once: a call copies into them (see the module docstring).
        self._adapter = {k: np.zeros(s, dtype=np.float32) for k, s in self._shapes.items()}
        self._binding = self.session.io_binding()
        for key, buf in self._adapter.items():
            self._binding.bind_ortvalue_input(
                self._input_names[key], ort.OrtValue.ortvalue_from_numpy(buf)
            )
        self._ids: npt.NDArray[np.int64] | None = None
        self._out: npt.NDArray[np.float32] | None = None
        self._ort = ort
        self._lock = threading.Lock()

    @property
    def adapter_keys(self) -> list[str]:
        """Adapter tensor names, exactly the wire keys of :func:`kernels.lora.get_adapter`."""
        return list(self._shapes)

    @property
    def adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    @property
    def quantization(self) -> str:
        return str(self.config["quantization"])

    @property
    def float_activations(self) -> bool:
        """False for int8-activation exports: fast, but not smooth enough for MeZO's ±εz
        finite differences (see :attr:`kernels.edge_quantize.QuantOption.float_activations`);
        use them for forward-only evaluation."""
        # Revision-1 exports did not record it; all of their quantized options were int8.
        return bool(self.config.get("float_activations", self.quantization == "fp32"))

    def zero_adapter(self) -> Tensors:
        """All-zero adapter tensors: the base model's own function (B = 0)."""
        return {k: np.zeros(s, dtype=np.float32) for k, s in self._shapes.items()}

    def token_nll(
        self, input_ids: npt.NDArray[np.integer[Any]], adapter: Mapping[str, npt.ArrayLike]
    ) -> npt.NDArray[np.float32]:
        """Per-token negative log-likelihood of the next token, shape ``(B, S-1)``.

        ``nll[b, t] = -log p(input_ids[b, t+1] | input_ids[b, :t+1])`` under base + adapter.
        """
        ids = self._check_ids(input_ids)
        self._check_adapter(adapter)
        with self._lock:
            for key, buf in self._adapter.items():
                np.copyto(buf, adapter[key], casting="same_kind")
            self._bind_ids(ids)
            self.session.run_with_iobinding(self._binding)
            assert self._out is not None  # bound by _bind_ids
            return self._out.copy()

    def mean_loss(
        self, input_ids: npt.NDArray[np.integer[Any]], adapter: Mapping[str, npt.ArrayLike],
        *, scored: npt.NDArray[np.bool_] | None = None,
    ) -> float:
        """Mean next-token loss over the scored tokens (the causal-LM loss; ppl = exp).

        ``scored`` ``(B, S)`` is the loss mask (:class:`kernels.data.blocks.Blocks`): the graph
        returns every position's loss, so a response-only loss is a masked mean here and the
        export needs no mask input. ``None`` scores every token."""
        nll = self.token_nll(input_ids, adapter)  # (B, S-1): nll[:, t] predicts token t+1
        mask = None if scored is None else np.asarray(scored, dtype=np.bool_)[:, 1:]
        if mask is None or mask.all():
            return float(nll.mean(dtype=np.float64))
        count = int(mask.sum())
        if count == 0:
            raise ValueError("mean_loss: no scored token in this batch")
        return float(nll.sum(dtype=np.float64, where=mask)) / count

    def perplexity(
        self,
        blocks: npt.NDArray[np.integer[Any]],
        adapter: Mapping[str, npt.ArrayLike],
        *,
        batch_size: int = 8,
    ) -> float:
        """exp(token-weighted mean loss) over ``blocks``, evaluated ``batch_size`` at a time."""
        if len(blocks) == 0:
            raise ValueError("no blocks to evaluate: the text is shorter than one block")
        total, count = 0.0, 0
        for i in range(0, len(blocks), batch_size):
            nll = self.token_nll(blocks[i : i + batch_size], adapter)
            total += float(nll.sum(dtype=np.float64))
            count += nll.size
        return math.exp(total / count)

    def token_blocks(self, texts: Sequence[str], seq_len: int) -> npt.NDArray[np.int64]:
        """:func:`token_blocks` with this export's tokenizer and EOS id."""
        return token_blocks(self.tokenizer, texts, seq_len, eos_token_id=self.eos_token_id)

    def _check_ids(self, input_ids: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.int64]:
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
            raise ValueError(f"input_ids: expected shape (batch >= 1, seq >= 2), got {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"input_ids: expected an integer array, got {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(
                f"input_ids: token ids must be in [0, {self.vocab_size}), got "
                f"[{ids.min()}, {ids.max()}]; use this export's tokenizer"
            )
        return ids.astype(np.int64, copy=False)

    def _check_adapter(self, adapter: Mapping[str, npt.ArrayLike]) -> None:
        if adapter.keys() != self._shapes.keys():
            missing = sorted(self._shapes.keys() - adapter.keys())
            unexpected = sorted(adapter.keys() - self._shapes.keys())
            raise ValueError(
                f"adapter keys do not match the export: missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}; the export and the run must use the same [lora] settings"
            )
        for key, shape in self._shapes.items():
            got = np.shape(adapter[key])
            if got != shape:
                raise ValueError(f"`{key}`: expected shape {shape}, got {got}")

    def _bind_ids(self, ids: npt.NDArray[np.int64]) -> None:
        """Copy ids into the owned buffer; reallocate and rebind only when the shape changes."""
        if self._ids is None or self._ids.shape != ids.shape:
            self._ids = np.empty(ids.shape, dtype=np.int64)
            self._out = np.empty((ids.shape[0], ids.shape[1] - 1), dtype=np.float32)
            self._binding.bind_ortvalue_input(
                INPUT_IDS, self._ort.OrtValue.ortvalue_from_numpy(self._ids)
            )
            self._binding.bind_ortvalue_output(
                OUTPUT_NLL, self._ort.OrtValue.ortvalue_from_numpy(self._out)
            )
        np.copyto(self._ids, ids)


def verify_export(export_dir: Path, *, public_key: Any = None) -> None:
    """Check every file of an export against its manifest before ONNX Runtime reads it.

    With ``public_key`` the manifest's Ed25519 signature must verify
    (:func:`protocols.manifest.verify_directory`); without, the manifest is only a list of
    hashes. Raises :class:`~protocols.manifest.ManifestMismatch` naming missing, changed and
    unexpected files, or :class:`~protocols.manifest.ManifestError` if there is no manifest.
    """
    root = Path(export_dir)
    if public_key is not None:
        if isinstance(public_key, bytes | bytearray):
            public_key = load_public_key(bytes(public_key))
        verify_directory(root, public_key)
        return
    path = root / MANIFEST_NAME
    try:
        doc = json.loads(path.read_bytes())
        expected = {p: (e["sha256"], e["size"]) for p, e in doc["files"].items()}
    except FileNotFoundError:
        hint = "re-export or re-fetch the model"
        raise ManifestError(f"{root}: no {MANIFEST_NAME}; {hint}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc}); re-fetch the export") from None
    actual = {p: (e.sha256, e.size) for p, e in build_manifest(root).files.items()}
    missing = tuple(sorted(expected.keys() - actual.keys()))
    unexpected = tuple(sorted(actual.keys() - expected.keys()))
    changed = tuple(sorted(p for p in expected.keys() & actual.keys() if expected[p] != actual[p]))
    if missing or changed or unexpected:
        parts = [f"{what} files {list(paths)[:3]}" for what, paths in
                 (("missing", missing), ("changed", changed), ("unexpected", unexpected)) if paths]
        raise ManifestMismatch(f"{root}: {'; '.join(parts)}; {REFUSAL}",
                               missing=missing, changed=changed, unexpected=unexpected)


def token_blocks(
    tokenizer: Any, texts: Sequence[str], seq_len: int, *, eos_token_id: int | None
) -> npt.NDArray[np.int64]:
    """Plain text as ``(N, seq_len)`` blocks with a ``tokenizers.Tokenizer``
    (:func:`kernels.data.blocks.document_blocks`, which torch devices use too)."""
    from kernels.data.blocks import document_blocks

    return document_blocks(tokenizer, texts, seq_len, eos_token_id=eos_token_id)


def read_config(export_dir: Path) -> dict[str, Any]:
    """The parsed ``edge_config.json`` of an export (format-checked)."""
    return _read_config(Path(export_dir))


def _read_config(root: Path) -> dict[str, Any]:
    path = root / CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeModelError(f"{root}: no {CONFIG_NAME}; is this an edge export?") from None
    except ValueError as exc:
        raise EdgeModelError(f"{path}: not valid JSON ({exc}); re-export the model") from None
    if not isinstance(config, dict) or config.get("format") != EDGE_FORMAT:
        got = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise EdgeModelError(
            f"{path}: format {got!r} is not {EDGE_FORMAT!r}; re-export with this fedtune version"
        )
    for field in ("model_file", "adapter", "vocab_size", "quantization", "float_activations"):
        if field not in config:
            raise EdgeModelError(f"{path}: missing field {field!r}; re-export the model")
    return config
