"""Helpers for the BackdoorBench integration tests: a checkout copy, the patch script, subprocesses, patch parsing,
and whether BackdoorBench's code can run here at all (`backdoorbench_skip_reason`).

(The tiny GTSRB folder comes from tests/helpers.py: make_gtsrb_folder.)
"""
import functools
import json
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


# what BackdoorBench's loaders and attacks import (module -> requirement): setup.cfg's [backdoorbench] extra
BACKDOORBENCH_DEPS = {
    "tqdm": "tqdm", "pandas": "pandas", "matplotlib": "matplotlib", "seaborn": "seaborn", "imageio": "imageio",
    "cv2": "opencv-python-headless", "scipy": "scipy", "kornia": "kornia", "pytorch_wavelets": "pytorch-wavelets",
    "pywt": "PyWavelets", "pkg_resources": "setuptools<81",  # pytorch_wavelets imports pkg_resources
}
# what its analysis/ scripts import besides (analysis/visual_utils.py), for the tests that run them
ANALYSIS_DEPS = {"umap": "umap-learn", "sklearn": "scikit-learn"}
INSTALL_EXTRA = "pip install -e '.[backdoorbench]'"


@functools.lru_cache(maxsize=None)
def _missing_dependencies():
    modules = [*BACKDOORBENCH_DEPS, *ANALYSIS_DEPS]
    code = ("import importlib, json, sys\nmissing = []\nfor name in sys.argv[1:]:\n    try:\n"
            "        importlib.import_module(name)\n    except Exception:\n        missing.append(name)\n"
            "print(json.dumps(missing))")
    proc = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    return set(json.loads(proc.stdout.strip().splitlines()[-1])) if proc.returncode == 0 else set(modules)


def missing_modules(modules):
    """Which of `modules` (keys of BACKDOORBENCH_DEPS, ANALYSIS_DEPS) this interpreter cannot import: all checked
    once per session, in a subprocess (BackdoorBench's code runs in one too, and importing them here would slow
    every test)."""
    return [m for m in modules if m in _missing_dependencies()]


def backdoorbench_skip_reason(root, analysis=False):
    """Why the tests that run BackdoorBench's code cannot run here (`root`: BACKDOORBENCH_ROOT), or None: no
    checkout, or a dependency of its code missing (named with the extra that installs it). Never a failure."""
    if not root:
        return "BACKDOORBENCH_ROOT is not set (a BackdoorBench checkout, main @ f02e353)"
    deps = {**BACKDOORBENCH_DEPS, **(ANALYSIS_DEPS if analysis else {})}
    missing = missing_modules(deps)
    if not missing:
        return None
    fixes = [INSTALL_EXTRA] if any(m in BACKDOORBENCH_DEPS for m in missing) else []
    extra = [deps[m] for m in missing if m in ANALYSIS_DEPS]
    fixes += [f"pip install {' '.join(extra)}"] if extra else []
    return f"BackdoorBench's code needs {', '.join(deps[m] for m in missing)}, missing here: {' and '.join(fixes)}"


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
