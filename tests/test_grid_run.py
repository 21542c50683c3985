"""`ftsam grid` with the local and debug executors on a tiny record: runs, skips what is done, resumes what was
stopped, never starts a second writer on a running cell, reports failures and retries them only when asked, and
`ftsam leaderboard` reads the cells' results. (The same through a real Slurm: test_grid_slurm.py.)"""

import os
import shutil
import signal
import subprocess

import pytest

from grid_helpers import grid_process, grid_run, states, summary, tiny_record, wait_for, write_grid
from helpers import run_cli


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    tiny_record(root)
    return root


def test_local_grid_runs_each_cell_once_and_leaderboard_reads_it(root):
    record = root / "record" / "rec"
    grid = write_grid(root, "- {defense: ftsam, rho: [2, 4], epochs: 1}\n", name="local.yaml")
    code, out = grid_run(grid, "--workers", "2", "--threads", "1")
    assert code == 0, out
    assert "2 of 2 cell(s) done" in out
    for folder in ("ftsam_rho2_epochs1_s0", "ftsam_rho4_epochs1_s0"):
        cell = summary(record, folder)
        assert cell["state"] == "done" and cell["executor"] == "local" and cell["attempts"] == 1
        assert cell["machine"]["threads"] == 1 and cell["machine"]["torch"] and cell["machine"]["cpu"]
        assert cell["slurm"] is None and cell["result"]["acc"] is not None
    code, out = grid_run(grid)  # idempotent: nothing runs again
    assert code == 0 and "nothing to run" in out, out
    assert summary(record, "ftsam_rho2_epochs1_s0")["attempts"] == 1
    assert set(states(grid).values()) == {"done"}
    code, out, err = run_cli(["leaderboard", str(root / "record"), "--out", str(root / "lb")])
    assert code == 0, err
    rows = (root / "lb" / "leaderboard.csv").read_text().splitlines()
    mine = [r for r in rows if ",ftsam_rho2_epochs1_s0," in r]
    assert mine and "summary:defense/ftsam_rho2_epochs1_s0/ftsam_df_summary.csv" in mine[0]  # read, not evaluated
    # the same folders with other settings: a conflict, reported and never touched
    other = write_grid(root, "- {defense: ftsam, rho: [2], epochs: 1}\n", name="other.yaml",
                       common="{dataset_path: data, device: cpu, yaml_path: cpu, num_workers: 0, ratio: 0.5, "
                              "batch_size: 8, lr: 0.1}")
    assert states(other) == {"rec/ftsam_rho2_epochs1_s0": "conflict"}
    code, out = grid_run(other)
    assert code == 0 and "nothing to run" in out and "lr: - there, 0.1 here" in out, out
    assert summary(record, "ftsam_rho2_epochs1_s0")["attempts"] == 1


def test_only_runs_the_cells_matching_a_pattern(root):
    record = root / "record" / "rec"
    grid = write_grid(root, "- {defense: ftsam, rho: [2, 8], epochs: 1}\n", name="only.yaml", seeds="[3]")
    assert states(grid, "--only", "rec/*rho8*") == {"rec/ftsam_rho8_epochs1_s3": "pending"}
    code, out = grid_run(grid, "--only", "rec/*rho8*", "--threads", "1")
    assert code == 0, out
    assert summary(record, "ftsam_rho8_epochs1_s3")["state"] == "done"
    assert not (record / "defense" / "ftsam_rho2_epochs1_s3").exists()  # the other cell never ran
    assert states(grid) == {"rec/ftsam_rho2_epochs1_s3": "pending", "rec/ftsam_rho8_epochs1_s3": "done"}
    code, out = grid_run(grid, "--only", "rec/nothing*")
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 2 and lines == [f"error: no cell of {grid} matches --only rec/nothing*; see the labels with "
                                   "--status"], out


def test_local_cancel_resume_and_never_two_writers(root):
    record = root / "record" / "rec"
    grid = write_grid(root, "- {defense: ftsam, rho: 1, epochs: 3}\n", name="cancel.yaml")
    marker = root / "paused"
    # the run waits at the start of epoch 2; stopped there, it ends after epoch 2's checkpoint
    first = grid_process(grid, env_extra={"FTSAM_TEST_PAUSE": f"2:0:{marker}"})
    try:
        wait_for(marker.exists, 240, "the cell to reach epoch 2")
        assert states(grid) == {"rec/ftsam_rho1_epochs3_s0": "running"}
        lock = (record / "defense" / "ftsam_rho1_epochs3_s0" / ".grid.lock").read_text()
        code, out = grid_run(grid)  # a second submission while the cell runs: it must not start a writer
        assert code == 0 and "nothing to run" in out and "running" in out, out
        assert (record / "defense" / "ftsam_rho1_epochs3_s0" / ".grid.lock").read_text() == lock
        assert summary(record, "ftsam_rho1_epochs3_s0")["attempts"] == 1
        first.send_signal(signal.SIGINT)  # Ctrl-C: the grid cancels its running cell
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:  # the test failed before stopping it: stop its cell too, not only the grid
            first.send_signal(signal.SIGINT)
            try:
                first.wait(60)
            except subprocess.TimeoutExpired:
                first.kill()
    assert first.returncode == 130, out
    assert states(grid) == {"rec/ftsam_rho1_epochs3_s0": "interrupted"}
    assert summary(record, "ftsam_rho1_epochs3_s0")["epochs_done"] == 2
    code, out = grid_run(grid)
    assert code == 0 and "1 interrupted" in out, out
    cell = summary(record, "ftsam_rho1_epochs3_s0")
    assert cell["state"] == "done" and cell["resumed"] and cell["resumed_from_epoch"] == 2 and cell["attempts"] == 2
    assert cell["epochs_done"] == 3


def test_failed_cell_is_reported_and_retried_only_when_asked(root):
    record = root / "record" / "rec"
    grid = write_grid(root, "- {defense: ft-baseline, epochs: 1}\n", name="fail.yaml",
                      common="{dataset_path: later, device: cpu, yaml_path: cpu, num_workers: 0, ratio: 0.5, "
                             "batch_size: 8}")
    code, out = grid_run(grid, "--executor", "debug")
    assert code == 1 and "0 of 1 cell(s) done, 1 failed" in out, out
    cell = summary(record, "ft-baseline_epochs1_s0")
    assert cell["state"] == "failed" and cell["exit_code"] == 2 and cell["error"].startswith("error: ")
    assert states(grid) == {"rec/ft-baseline_epochs1_s0": "failed"}
    code, out = grid_run(grid, "--executor", "debug")
    assert code == 0 and "--retry_failed runs them again" in out and "nothing to run" in out, out
    os.symlink(root / "data", root / "later")  # the data appears: now it can run
    try:
        code, out = grid_run(grid, "--executor", "debug", "--retry_failed")
    finally:
        os.unlink(root / "later")
    assert code == 0, out
    cell = summary(record, "ft-baseline_epochs1_s0")
    assert cell["state"] == "done" and cell["attempts"] == 2 and cell["executor"] == "debug"


def test_bad_executor_options_are_one_line_errors(root):
    grid = write_grid(root, "- {defense: ftsam, epochs: 1}\n", name="opts.yaml")
    for args, needle in ((["--workers", "0"], "workers must be a whole number >= 1"),
                         (["--executor", "slurm"], "needs each task's time limit"),
                         (["--sbatch", "=x", "--executor", "slurm", "--time", "5"], "--sbatch takes KEY=VALUE"),
                         (["--workers", "1", "--threads", str(os.cpu_count() * 64)], "usable CPU core(s); lower")):
        code, out = grid_run(grid, *args)
        lines = [line for line in out.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in out, out
    shutil.rmtree(root / "opts.grid", ignore_errors=True)
