"""What the `ftsam grid` tests share: a tiny record, grid files over it, the CLI as a process, and waiting."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from helpers import make_attack_record

REPO = Path(__file__).resolve().parent.parent
# one cell of the tiny record takes a few seconds: 40 clean images, batch 8, PreAct-ResNet18 at width 0.125
CELL_FLAGS = "{dataset_path: data, device: cpu, yaml_path: cpu, num_workers: 0, ratio: 0.5, batch_size: 8}"


def tiny_record(root: Path) -> Path:
    return make_attack_record(root, name="rec", n_per_class=8, epochs=1, width=0.125)


def write_grid(root: Path, defenses: str, name: str = "grid.yaml", common: str = CELL_FLAGS, seeds: str = "[0]") -> str:
    path = root / name
    path.write_text(textwrap.dedent(f"""\
        records: [record/rec]
        seeds: {seeds}
        common: {common}
        defenses:
        """) + textwrap.indent(textwrap.dedent(defenses), "  "))
    return str(path)


def grid_process(grid: str, *args: str, env_extra=None, **kwargs) -> subprocess.Popen:
    """`ftsam grid GRID args...` as its own process (its output in a pipe)."""
    env = {k: v for k, v in os.environ.items() if k != "FTSAM_TEST_PAUSE"}
    env.update(OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "ftsam_plugin", "grid", grid, *args], env=env, cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def grid_run(grid: str, *args: str, env_extra=None, timeout: float = 300) -> tuple:
    """(exit code, output) of `ftsam grid GRID args...` run to its end."""
    proc = grid_process(grid, *args, env_extra=env_extra)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def summary(record: Path, folder: str) -> dict:
    return json.loads((record / "defense" / folder / "grid_cell.json").read_text())


def states(grid: str, *args: str) -> dict:
    """{cell label: state} from `ftsam grid GRID --status`."""
    code, out = grid_run(grid, "--status", *args)
    assert code == 0, out
    return {line.split()[1]: line.split()[0] for line in out.splitlines()[1:] if line.strip()}


def wait_for(check, timeout: float, what: str, every: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
