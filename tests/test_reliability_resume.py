"""Interrupted `ftsam defend` runs: SIGKILL or SIGINT at chosen points, then `--resume`, equal an uninterrupted run.

The killed runs are real subprocesses. The test-only hook FTSAM_TEST_PAUSE="EPOCH:STEP:MARKER" makes a run create
MARKER and wait after step STEP of epoch EPOCH (STEP 0: at the epoch's start, right after the previous epoch's
checkpoint), so the signal lands at an exact point. The uninterrupted reference and the resumed runs go through
ftsam_plugin.cli.main in-process (CPU, same seed, same thread count).
"""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from ftsam_plugin.io import safe_load

from helpers import make_attack_record, run_cli, without_clock_columns

# The SIGINT handler this process started with (default_int_handler in a terminal; SIG_IGN when started in the
# background by a non-interactive shell): a run must give it back, whatever it was.
SIGINT_AT_START = signal.getsignal(signal.SIGINT)

# 20-sample subset, batch 8: steps of 8, 8, 4 per epoch; 3 epochs
FLAGS = ["--yaml_path", "cpu", "--device", "cpu", "--ratio", "0.5", "--batch_size", "8", "--num_workers", "0",
         "--epochs", "3"]


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return make_attack_record(tmp_path_factory.mktemp("resume"), name="rec", n_per_class=4, epochs=1)


def copy_record(record, name):
    target = record.parent / name
    shutil.copytree(record, target, ignore=shutil.ignore_patterns("defense"))
    return target, target / "defense" / "ftsam"


def outputs(out):
    """What must match an uninterrupted run: the final weights (bitwise) and the metric CSVs (text, but the run-time
    columns)."""
    result = safe_load(out / "defense_result.pt", what="defense result")
    return result, *(without_clock_columns((out / name).read_text()) for name in ("ftsam_df.csv",
                                                                                  "ftsam_df_summary.csv"))


def assert_same(got, expected):
    assert set(got[0]["model"]) == set(expected[0]["model"])
    for key, value in expected[0]["model"].items():
        assert torch.equal(got[0]["model"][key], value), key
    assert (got[0]["model_name"], got[0]["num_classes"]) == (expected[0]["model_name"], expected[0]["num_classes"])
    assert got[1] == expected[1] and got[2] == expected[2]


@pytest.fixture(scope="module")
def reference(record):
    """The uninterrupted run. It is started with --resume on a fresh folder: with no checkpoint yet, --resume warns
    and starts from epoch 1 (the documented behaviour)."""
    folder, out = copy_record(record, "reference")
    code, _, err = run_cli(["defend", "--result_file", str(folder), *FLAGS, "--resume"])
    assert code == 0, err
    assert "--resume: no checkpoint at" in err and "starting from epoch 1" in err
    assert [line.split(",")[1] for line in (out / "ftsam_df.csv").read_text().splitlines()[1:]] == ["1", "2", "3"]
    return outputs(out)


def start_paused(folder, pause, tmp_path):
    """Start `ftsam defend` in a subprocess that pauses at `pause` ("EPOCH:STEP"); return it once it is there."""
    marker = tmp_path / f"paused-{pause.replace(':', '-')}"
    env = dict(os.environ, FTSAM_TEST_PAUSE=f"{pause}:{marker}", OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, "-m", "ftsam_plugin", "defend", "--result_file", str(folder), *FLAGS],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before pausing at {pause}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run did not reach {pause}")
        time.sleep(0.05)
    return proc


def assert_nothing_half_written(out, checkpoint_epoch):
    """No result yet, the checkpoint is the last completed epoch's, every file present is complete."""
    assert not (out / "defense_result.pt").exists()
    assert safe_load(out / "checkpoint" / "last.pt", what="checkpoint")["epoch"] == checkpoint_epoch
    rows = (out / "ftsam_df.csv").read_text().splitlines()
    assert len(rows) - 1 in (checkpoint_epoch, checkpoint_epoch + 1)


@pytest.mark.parametrize("pause,checkpoint_epoch", [
    ("2:0", 1),  # right after the first checkpoint was written
    ("3:2", 2),  # mid-epoch: two steps of epoch 3 done, not checkpointed
])
def test_sigkill_then_resume_equals_uninterrupted(record, reference, tmp_path, pause, checkpoint_epoch):
    folder, out = copy_record(record, f"kill_{pause.replace(':', '_')}")
    proc = start_paused(folder, pause, tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert_nothing_half_written(out, checkpoint_epoch)
    code, _, err = run_cli(["defend", "--result_file", str(folder), *FLAGS, "--resume"])
    assert code == 0, err
    assert f"resumed from {out / 'checkpoint' / 'last.pt'} after epoch {checkpoint_epoch}" in err
    assert_same(outputs(out), reference)


def test_sigint_finishes_the_epoch_checkpoints_exits_130_and_resumes_identically(record, reference, tmp_path):
    folder, out = copy_record(record, "sigint")
    proc = start_paused(folder, "2:1", tmp_path)  # one step into epoch 2
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.count("SIGINT: stopping after this epoch's checkpoint") == 1
    lines = [line for line in err.splitlines() if line.startswith(("interrupted", "error"))]
    assert lines == [f"interrupted: stopped after epoch 2 of 3; its checkpoint is {out / 'checkpoint' / 'last.pt'}; "
                     f"continue with the same command plus --resume"]
    # epoch 2 was finished: its checkpoint and its CSV row are written, no result yet
    assert_nothing_half_written(out, 2)
    assert [line.split(",")[1] for line in (out / "ftsam_df.csv").read_text().splitlines()[1:]] == ["1", "2"]
    # a checkpoint from other settings is refused
    code, _, err = run_cli(["defend", "--result_file", str(folder), *FLAGS, "--resume", "--lr", "0.02"])
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (f"error: checkpoint {out / 'checkpoint' / 'last.pt'} was made with lr=0.01, now "
                                    f"0.02; use the same settings or run without --resume")
    assert not (out / "defense_result.pt").exists()
    code, _, err = run_cli(["defend", "--result_file", str(folder), *FLAGS, "--resume"])
    assert code == 0, err
    assert_same(outputs(out), reference)


def test_sigint_handler_is_removed_after_the_run(record, reference):
    assert signal.getsignal(signal.SIGINT) is SIGINT_AT_START


def test_second_sigint_aborts_at_once():
    from ftsam_plugin.defense.signals import StopOnSigint

    with StopOnSigint() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # first: only a request
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # second: at once
            time.sleep(1)  # (the handler runs between bytecodes; never reached)
    assert signal.getsignal(signal.SIGINT) is SIGINT_AT_START


def test_sigterm_is_handled_like_sigint_exit_143(record, reference, tmp_path):
    """What Slurm and Kubernetes send first: finish the epoch, checkpoint, exit 143 with the resume hint."""
    folder, out = copy_record(record, "sigterm")
    proc = start_paused(folder, "2:1", tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert err.count("SIGTERM: stopping after this epoch's checkpoint") == 1
    lines = [line for line in err.splitlines() if line.startswith(("interrupted", "error"))]
    assert lines == [f"interrupted: stopped after epoch 2 of 3; its checkpoint is {out / 'checkpoint' / 'last.pt'}; "
                     f"continue with the same command plus --resume"]
    assert_nothing_half_written(out, 2)
    assert not [p for p in out.rglob("*.tmp")]
    code, _, err = run_cli(["defend", "--result_file", str(folder), *FLAGS, "--resume"])
    assert code == 0, err
    assert_same(outputs(out), reference)


def test_a_second_run_on_the_same_folder_fails_at_once_naming_the_first(record, reference, tmp_path):
    """Two real processes: B is refused while A holds the defense folder; A's run is untouched and resumes."""
    folder, out = copy_record(record, "two_runs")
    first = start_paused(folder, "1:1", tmp_path)  # A: in epoch 1, holding the folder
    try:
        second = subprocess.run([sys.executable, "-m", "ftsam_plugin", "defend", "--result_file", str(folder), *FLAGS,
                                 "--lr", "0.05"], env=dict(os.environ), capture_output=True, text=True, timeout=240)
    finally:
        first.send_signal(signal.SIGINT)  # A finishes epoch 1, checkpoints, exits 130
        _, first_err = first.communicate(timeout=120)
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    assert len(lines) == 1 and lines[0].startswith(
        f"error: defense folder {out}{os.sep} is in use by another run (PID {first.pid}, started "), lines
    assert first.returncode == 130, first_err
    assert len(list((out / "log").glob("*.log"))) == 1  # B wrote nothing, not even a log
    assert_nothing_half_written(out, 1)
    code, _, err = run_cli(["defend", "--result_file", str(folder), *FLAGS, "--resume"])
    assert code == 0, err
    assert_same(outputs(out), reference)


def test_stale_temp_files_of_killed_runs_are_removed_at_start(record, reference, tmp_path):
    folder, out = copy_record(record, "stale_tmp")
    proc = start_paused(folder, "2:0", tmp_path)
    proc.kill()  # as if killed while writing: plant what a kill mid-write leaves
    proc.communicate(timeout=60)
    old = time.time() - 3600
    ours = [out / "checkpoint" / ".last.pt.a1b2c3d_.tmp", out / ".ftsam_df.csv.zz99zz99.tmp"]
    others = [out / "notes.tmp", out / ".short.abc.tmp", out / ".last.pt.ABCDEFGH.tmp", out / "log" / "keep.txt"]
    for path in ours + others:
        path.write_bytes(b"partial")
        os.utime(path, (old, old))
    code, _, err = run_cli(["defend", "--result_file", str(folder), *FLAGS, "--resume"])
    assert code == 0, err
    assert [p.exists() for p in ours] == [False, False] and all(p.exists() for p in others)
    assert f"removed {ours[0]}, a temp file left by a killed run" in err
    assert_same(outputs(out), reference)
