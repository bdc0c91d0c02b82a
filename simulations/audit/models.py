"""The base models the audit attacks: the real SmolLM2 (whole or truncated) and a tiny one.

Both are written as ordinary Hugging Face folders, so the client code under audit loads them
exactly as it loads any ``model.source`` (``kernels.base_model.load_causal_lm``): the audit
never re-implements the client's model.

Why a truncated SmolLM2: on a 2-core CPU one SmolLM2-135M training step on 16 x 16 tokens
takes ~3.5 s and a second-order step of the optimisation attack ~10 s, so the full grid
(12 cells, 10 simulated clients per protected cell) would take far longer than the audit's
10-minute budget. Keeping the first ``L`` decoder layers with the real embeddings, final norm
and tied output head keeps everything the attacks exploit (the output head writes
``W^T (p - onehot(y))`` into the last layer's residual stream) at a fraction of the cost;
``--layers 0`` keeps all 30.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from protocols.atomic_write import recover_dir, replace_dir_atomic

#: Marker written into generated folders: what they were built from, so a stale copy is rebuilt.
_MARKER = "fedtune-audit-model.json"


def _is_current(path: Path, recipe: dict[str, object]) -> bool:
    recover_dir(path)  # a crash mid-replace (off Linux) may have left the model aside
    marker = path / _MARKER
    if not (path / "config.json").is_file() or not marker.is_file():
        return False
    return bool(json.loads(marker.read_text(encoding="utf-8")) == recipe)


def _publish(tmp: Path, target: Path, recipe: dict[str, object]) -> Path:
    (tmp / _MARKER).write_text(json.dumps(recipe, sort_keys=True), encoding="utf-8")
    replace_dir_atomic(tmp, target)  # a half-written model is never visible
    return target


def truncated_model(source_dir: Path, layers: int, out_root: Path) -> Path:
    """A copy of ``source_dir`` keeping its first ``layers`` decoder layers (cached).

    ``layers = 0`` or at least the model's depth returns ``source_dir`` itself.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    if layers < 0:
        raise ValueError(f"layers must be >= 0 (0 = all), got {layers}")
    depth = int(AutoConfig.from_pretrained(source_dir, local_files_only=True).num_hidden_layers)
    if layers == 0 or layers >= depth:
        return source_dir
    recipe: dict[str, object] = {"source": str(source_dir.resolve()), "layers": layers}
    target = out_root / f"{source_dir.name}-first{layers}"
    if _is_current(target, recipe):
        return target
    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32,
                                                 local_files_only=True)
    inner = model.model
    inner.layers = inner.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_root, prefix=".truncate-"))
    try:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source_dir, local_files_only=True).save_pretrained(tmp)
        return _publish(tmp, target, recipe)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tiny_model(texts: Sequence[str], out_dir: Path, *, vocab_size: int = 512,
               hidden_size: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A random-init Llama with a byte-level BPE tokenizer trained on ``texts`` (cached).

    Like the test suite's ``tiny_model_dir``, with a wider hidden state (64 instead of 32):
    the analytic attack separates tokens by their direction in the residual stream, and a
    rank-8 update in a 32-dimensional stream spans a quarter of it.
    """
    import hashlib

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    if not texts:
        raise ValueError("tiny_model needs some text to train its tokenizer on")
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    recipe: dict[str, object] = {"texts": digest, "vocab_size": vocab_size,
                                 "hidden_size": hidden_size, "layers": layers, "seed": seed}
    if _is_current(out_dir, recipe):
        return out_dir
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"],
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, eos_token="<eos>")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".tiny-"))
    try:
        fast.save_pretrained(tmp)
        config = LlamaConfig(
            vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, eos_token_id=fast.eos_token_id,
            bos_token_id=fast.eos_token_id, tie_word_embeddings=True,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            LlamaForCausalLM(config).save_pretrained(tmp)
        return _publish(tmp, out_dir, recipe)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
