"""Helpers for the BackdoorBench integration tests: a checkout copy, the patch script, subprocesses, patch parsing.

(The tiny GTSRB folder comes from tests/helpers.py: make_gtsrb_folder.)
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PATCH_DIR = REPO / "patches"
APPLY_SCRIPT = PATCH_DIR / "apply.sh"
LAUNCHER_PATCH = PATCH_DIR / "0001-defense-plugin-launcher.patch"


def copy_checkout(src, dst):
    """Copy a BackdoorBench checkout without its .git (runs never touch the original)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git", "__pycache__"), symlinks=True)
    return Path(dst)


def run(args, cwd, timeout=600, env=None, check=True):
    """Run a command; on an unexpected exit code fail with the tail of its output."""
    merged = dict(os.environ)
    merged.update(env or {})
    proc = subprocess.run([str(a) for a in args], cwd=str(cwd), env=merged, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode} in {cwd}\n"
                             f"--- stdout (tail) ---\n{proc.stdout[-4000:]}\n"
                             f"--- stderr (tail) ---\n{proc.stderr[-6000:]}")
    return proc


def apply_patches(root, check=True):
    return run(["bash", APPLY_SCRIPT, root], cwd=REPO, check=check)


def python():
    return sys.executable


def patch_files(patch_path):
    """Split a git patch into {path: [hunk body lines]} (paths as on the ``+++`` side, /dev/null kept)."""
    files, current = {}, None
    in_diff = False
    for line in Path(patch_path).read_text().splitlines():
        if line.startswith("diff --git "):
            in_diff, current = True, None
            continue
        if not in_diff:
            continue
        if line.startswith("+++ "):
            current = re.sub(r"^\+\+\+ (b/)?", "", line)
            files[current] = []
        elif line.startswith(("--- ", "index ", "new file mode", "deleted file mode", "similarity", "rename ")):
            continue
        elif line == "-- ":  # format-patch signature separator
            in_diff = False
        elif current is not None:
            files[current].append(line)
    return files


def extract_added_file(patch_path, path, dest):
    """Write the file that ``patch_path`` creates at ``path`` to ``dest`` (the patch must only add it)."""
    body = patch_files(patch_path)[path]
    lines = [ln[1:] for ln in body if ln.startswith("+")]
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    Path(dest).write_text("\n".join(lines) + "\n")
    return Path(dest)
