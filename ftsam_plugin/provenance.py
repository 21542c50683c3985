"""Where a number was made: CPU model, core count, torch version and thread count, for every summary a benchmark
writes. CPU runs reproduce to the digit only on the same CPU type at the same thread count, so a summary that does
not name them cannot be checked."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from typing import Dict, Optional

__all__ = ["cpu_name", "machine", "machine_short", "git_commit", "sha256_file"]


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    name = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as handle:
            name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), name)
    except OSError:
        pass
    return name


def machine(threads: Optional[int] = None) -> Dict[str, object]:
    """{cpu, logical_cpus, torch, threads, python}: `threads` is the torch thread count the run used (default: this
    process's)."""
    import torch

    return {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": int(threads if threads is not None else torch.get_num_threads()),
            "python": platform.python_version()}


def machine_short(threads: Optional[int] = None) -> str:
    """One line: 'Intel(R) Xeon(R) Processor @ 2.80GHz, 2 logical CPUs, torch 2.14.1, 1 thread'."""
    m = machine(threads)
    return (f"{m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}, {m['threads']} "
            f"thread{'s' if m['threads'] != 1 else ''}")


def git_commit(repo: str) -> str:
    """The short commit of `repo`, with ' + uncommitted changes' when its tracked files differ from it."""
    try:
        head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=repo, text=True,
                                       stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                        text=True, stderr=subprocess.DEVNULL).strip()
        return head + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sha256_file(path: str) -> str:
    """The sha256 of a file's bytes (which record, which data a run used)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
