"""Which torch device a party computes on, and in which precision.

One place decides for every torch path (client training and evaluation, DP-SGD, the
coordinator's central evaluation), so ``auto`` means the same everywhere: the first CUDA
device when torch sees one, else the CPU. A name asking for CUDA on a machine without it is
an error that says so, never a silent fall-back: a run that asked for the GPU and trained on
the CPU would report numbers for hardware it did not use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from protocols.run_config import ConfigError, check_device_name

if TYPE_CHECKING:
    import torch


class DeviceNotAvailable(ConfigError):
    """The configured device does not exist on this machine."""


def resolve_device(name: str, *, key: str = "client.device") -> torch.device:
    """The torch device for ``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``)."""
    import torch

    check_device_name(key, name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceNotAvailable(
                f"{key} = {name!r} but torch sees no CUDA device on this machine (torch "
                f"{torch.__version__}, built {'with' if torch.version.cuda else 'without'} "
                "CUDA); use 'auto' or 'cpu', or install a CUDA build of torch")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceNotAvailable(
                f"{key} = {name!r} but this machine has {count} CUDA device(s) "
                f"(cuda:0 .. cuda:{count - 1})")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def torch_dtype(name: str) -> torch.dtype:
    """``float32`` / ``bfloat16`` as a torch dtype."""
    import torch

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ConfigError(f"dtype {name!r}: expected one of {sorted(dtypes)}")
    return dtypes[name]


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Autocast to ``dtype`` on ``device`` for bfloat16, nothing for float32 (the adapter's
    parameters stay float32 either way; only matmuls of the frozen base run in bf16)."""
    import torch

    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
