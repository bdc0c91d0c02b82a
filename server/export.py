"""Writing the global adapter in PEFT's on-disk layout, atomically.

``adapter_config.json`` + ``adapter_model.safetensors`` is what
``peft.PeftModel.from_pretrained(base, path)`` loads. Written with safetensors' numpy API so
the coordinator needs no torch. The folder is assembled beside its target and published with
:func:`protocols.atomic_write.replace_dir_atomic`: a crash mid-write never leaves a half
adapter where a user would load it, and an old adapter stays in place until the new one
replaces it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors.numpy import save_file

import protocols
from protocols.atomic_write import replace_dir_atomic

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def save_peft_adapter(
    target: Path, tensors: Mapping[str, npt.NDArray[Any]], peft_config: Mapping[str, Any]
) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        save_file(
            {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
            str(tmp / WEIGHTS_NAME),
            metadata={"format": "pt", "fedtune_version": protocols.__version__},
        )
        config = {**peft_config, "inference_mode": True}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        replace_dir_atomic(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
