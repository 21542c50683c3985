"""Build a small C or C++ shared library once per source and toolchain, with the system compiler, offline.

    path = shared_library("plan_guard", SRC_DIR / "plan_guard.cpp", flags, suffix=".so")

The library lands in $XDG_CACHE_HOME/ftsam/native/<key>/ (default ~/.cache/ftsam/native), where <key> hashes the
source, the flags and the compiler, so an edited source or another torch gets its own build and a built one is
reused. The build writes into a temporary folder beside it and renames the file into place: two processes
building at once both finish, and nobody loads half a file. Needs only `cc`/`c++` (no ninja, no network).
"""

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path


class BuildError(RuntimeError):
    """The compiler is missing or failed (the message ends with its last output lines)."""


def cache_root():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ftsam" / "native"


def compiler(language):
    """The C (`language="c"`) or C++ compiler: $CC / $CXX, else cc / c++ on PATH."""
    env, names = ("CC", ("cc", "gcc", "clang")) if language == "c" else ("CXX", ("c++", "g++", "clang++"))
    found = os.environ.get(env) or next((shutil.which(n) for n in names if shutil.which(n)), None)
    if not found:
        raise BuildError(f"no {language} compiler found (set ${env} or install gcc)")
    return found


def shared_library(name, source, flags, suffix=".so", language=None):
    """Path of `name + suffix` built from `source` with `flags` (built now unless a build of this exact
    source, flag list and compiler is cached); BuildError when the compiler fails."""
    source = Path(source)
    language = language or ("c" if source.suffix == ".c" else "c++")
    cc = compiler(language)
    text = source.read_bytes()
    key = hashlib.sha256(b"\0".join([text, cc.encode(), *map(str.encode, flags)])).hexdigest()[:20]
    folder = cache_root() / key
    target = folder / f"{name}{suffix}"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run([cc, str(source), "-o", str(out), *flags], capture_output=True, text=True)
        if proc.returncode:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise BuildError(f"building {source.name} failed ({cc}): {tail}")
        os.replace(out, target)
    return target


__all__ = ["BuildError", "cache_root", "compiler", "shared_library"]
