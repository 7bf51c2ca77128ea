"""Where and with what a benchmark ran: the ``environment`` of every results file. Light on
purpose (torch and the package, no PEFT or transformers import), so that the GPU check's probe
can ask for it quickly."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import subprocess
from pathlib import Path

import torch

import reslora_kernels

ROOT = Path(__file__).resolve().parents[1]


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    """``RESLORA_GIT_COMMIT`` when set (the device machine's copy of the tree has no .git, so
    the caller passes it), else ``git rev-parse HEAD`` with ``+dirty`` for uncommitted changes."""
    if os.environ.get("RESLORA_GIT_COMMIT"):
        return os.environ["RESLORA_GIT_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    if not commit:
        return "unknown"
    status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    return commit + ("+dirty" if status.strip() else "")


def environment() -> dict:
    """Where and with what the numbers were measured."""
    cuda = torch.cuda.is_available()
    versions = {"torch": torch.__version__, "reslora_kernels": reslora_kernels.__version__}
    versions.update({name: _version(name) for name in ("triton", "peft", "transformers")})
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "cuda": torch.version.cuda if cuda else None,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "versions": versions,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend_fold": reslora_kernels.fold_report(),
    }
