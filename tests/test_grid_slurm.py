"""`ftsam grid --executor slurm` against a real Slurm: the single-node cluster of `.ci/slurm.sh start` (CI starts it
and sets FTSAM_REQUIRE_SLURM=1, so there a missing cluster fails instead of skipping).

A job array really goes through sbatch (its job ids and SLURM_ARRAY_TASK_ID are in the cells' summaries); a
resubmitted grid never starts a second writer on a queued (held) or running cell; a cancelled queued job's cells
are taken over; a job cancelled mid-run (scancel) is reported with Slurm's word for it and the next run resumes it.
Each test uses its own submitit folder: job ids restart at 1 whenever the cluster starts on a fresh state."""

import os
import shutil
import subprocess

import pytest

from grid_helpers import grid_run, states, summary, tiny_record, wait_for, write_grid

DEFAULT_CONF = "/tmp/ftsam-slurm/etc/slurm.conf"  # where .ci/slurm.sh puts it
SLURM = ["--executor", "slurm", "--time", "10", "--cpus_per_task", "1", "--threads", "1"]


def _slurm_problem():
    if shutil.which("sbatch") is None:
        return "Slurm is not installed (bash .ci/slurm.sh install)"
    if not os.environ.get("SLURM_CONF") and os.path.isfile(DEFAULT_CONF):
        os.environ["SLURM_CONF"] = DEFAULT_CONF
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"scontrol ping failed: {exc}"
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return "no Slurm controller answers (eval \"$(bash .ci/slurm.sh start)\")"
    return None


PROBLEM = _slurm_problem()
if PROBLEM and os.environ.get("FTSAM_REQUIRE_SLURM") == "1":
    raise RuntimeError(f"FTSAM_REQUIRE_SLURM=1 but {PROBLEM}")
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "")


def squeue():
    out = subprocess.run(["squeue", "-h", "--array", "-o", "%i|%T"], capture_output=True, text=True, check=True)
    return dict(line.split("|") for line in out.stdout.split())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    tiny_record(root)
    return root


def test_job_array_through_sbatch_and_no_second_writer_on_queued_cells(root):
    record = root / "record" / "rec"
    grid = write_grid(root, "- {defense: ftsam, rho: [2, 4], epochs: 1}\n", name="array.yaml")
    # held at submission: the array stays queued until released
    code, out = grid_run(grid, *SLURM, "--sbatch", "hold")
    assert code == 0 and "as job" in out and "array of 2" in out, out
    queued = squeue()
    assert len(queued) == 2 and set(queued.values()) == {"PENDING"}, queued
    assert set(states(grid).values()) == {"queued"}
    code, out = grid_run(grid, *SLURM)  # resubmitted while queued: nothing new reaches Slurm
    assert code == 0 and "nothing to run" in out, out
    assert squeue() == queued
    array = next(iter(queued)).split("_")[0]
    subprocess.run(["scancel", array], check=True)  # the queued array is cancelled: its locks go stale
    wait_for(lambda: not squeue(), 60, "the cancelled array to leave the queue")
    assert set(states(grid).values()) == {"pending"}
    code, out = grid_run(grid, *SLURM, "--wait", timeout=600)
    assert code == 0 and "took over" in out and "2 of 2 cell(s) done" in out, out
    tasks = set()
    for folder in ("ftsam_rho2_epochs1_s0", "ftsam_rho4_epochs1_s0"):
        cell = summary(record, folder)
        assert cell["state"] == "done" and cell["executor"] == "slurm"
        job = cell["slurm"]
        assert job["array_job_id"] and job["array_job_id"] != array and job["job_id"] == \
            f"{job['array_job_id']}_{job['array_task_id']}" and job["cpus_per_task"] == "1"
        assert cell["machine"]["threads"] == 1
        tasks.add(job["array_task_id"])
    assert tasks == {"0", "1"}
    accounted = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job["array_job_id"], "-o", "JobID,State"],
                               capture_output=True, text=True, check=True).stdout.split()
    assert sorted(accounted) == [f"{job['array_job_id']}_0|COMPLETED", f"{job['array_job_id']}_1|COMPLETED"]


def submit_paused(root, entry: str, name: str, folder: str):
    """Submit a one-cell grid whose run waits at the start of epoch 2 (after epoch 1's checkpoint) until a signal
    stops it; returns (grid file, marker file, Slurm job id) once it waits."""
    grid = write_grid(root, entry, name=name)
    marker = root / f"{name}.paused"
    code, out = grid_run(grid, *SLURM, env_extra={"FTSAM_TEST_PAUSE": f"2:0:{marker}"})
    assert code == 0, out
    wait_for(marker.exists, 300, "the job to reach epoch 2")
    return grid, marker, summary(root / "record" / "rec", folder)["slurm"]["job_id"]


def test_cancel_mid_run_is_reported_and_the_next_run_resumes(root):
    record = root / "record" / "rec"
    grid, _, job = submit_paused(root, "- {defense: ft-baseline, epochs: 3}\n", "cancel.yaml", "ft-baseline_epochs3_s0")
    assert states(grid) == {"rec/ft-baseline_epochs3_s0": "running"}
    code, out = grid_run(grid, *SLURM)  # resubmitted while it runs: no second writer
    assert code == 0 and "nothing to run" in out and f"Slurm job {job}" in out, out
    assert list(squeue()) == [job]
    subprocess.run(["scancel", job], check=True)
    wait_for(lambda: not squeue(), 120, "the cancelled job to end")
    code, out = grid_run(grid, "--status")
    assert "interrupted" in out and f"Slurm job {job}: CANCELLED" in out and "epoch 2 of 3 done" in out, out
    cell = summary(record, "ft-baseline_epochs3_s0")
    assert cell["state"] == "interrupted" and cell["exit_code"] == 143 and cell["epochs_done"] == 2
    code, out = grid_run(grid, *SLURM, "--wait", timeout=600)
    assert code == 0 and "1 of 1 cell(s) done" in out, out
    cell = summary(record, "ft-baseline_epochs3_s0")
    assert cell["state"] == "done" and cell["resumed_from_epoch"] == 2 and cell["attempts"] == 2
    assert cell["slurm"]["job_id"] != job and cell["epochs_done"] == 3


def test_a_preempted_or_timed_out_task_is_requeued_and_resumes(root):
    record = root / "record" / "rec"
    grid, marker, job = submit_paused(root, "- {defense: ftsam, rho: 2, epochs: 3}\n", "requeue.yaml",
                                      "ftsam_rho2_epochs3_s0")
    marker.unlink()
    # what Slurm sends before a time limit or a preemption (submitit's signal): the job is requeued, keeps the cell
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_for(lambda: summary(record, "ftsam_rho2_epochs3_s0")["state"] == "interrupted", 120, "the requeue")
    assert summary(record, "ftsam_rho2_epochs3_s0")["error"] == "requeued (time limit or preemption)"
    assert states(grid) == {"rec/ftsam_rho2_epochs3_s0": "queued"}  # the same job, pending again: not resubmitted
    wait_for(marker.exists, 400, "the requeued job to resume")  # it pauses again at epoch 2: the test's hook
    cell = summary(record, "ftsam_rho2_epochs3_s0")
    assert cell["slurm"]["job_id"] == job and cell["slurm"]["restart_count"] == "1"
    assert cell["state"] == "running" and cell["resumed_from_epoch"] == 1 and cell["attempts"] == 2
    subprocess.run(["scancel", job], check=True)
    wait_for(lambda: not squeue(), 120, "the cancelled job to end")
    assert states(grid) == {"rec/ftsam_rho2_epochs3_s0": "interrupted"}
