"""Hostile and careless inputs, third round (issue 33): the leaderboard's provenance, one bad file, runaway threads,
messages that lead somewhere, and the test suite with BackdoorBench.

Each test reproduces one item of the probe (it failed on the code before the fix; the item's number is in its
section title). Kills and ignored signals use real subprocesses; the rest go through `ftsam_plugin.cli.main`.
"""

import configparser
import csv
import json
import math
import multiprocessing
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ftsam_plugin import demo
from ftsam_plugin.data.completion import mark_complete
from ftsam_plugin.data.records import save_defense_result, write_metrics_csv, write_metrics_summary_csv
from ftsam_plugin.errors import FtsamError
from ftsam_plugin.io import safe_load

import bb_helpers
from helpers import one_torch_thread  # noqa: F401 (autouse fixture)
from helpers import check_error, clone_record, make_attack_record, make_image_folder, run_cli
from test_reliability_round2 import FLAGS, defend, out_of, start_paused, stop

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return make_attack_record(tmp_path_factory.mktemp("round3"), name="rec", n_per_class=4, epochs=1)


def board(tmp_path, root, *extra, name="board"):
    """`ftsam leaderboard` on `root`: ({(record, defense): csv row}, stderr, markdown)."""
    out = tmp_path / name
    code, _, err = run_cli(["leaderboard", str(root), "--device", "cpu", "--out", str(out), *map(str, extra)])
    assert code == 0, err
    with open(out / "leaderboard.csv", newline="") as handle:
        rows = {(r["record"], r["defense"]): r for r in csv.DictReader(handle)}
    return rows, err, (out / "leaderboard.md").read_text()


def copy_of_attack(folder, name):
    """A defense result holding the record's own weights (no summary, no marker: as BackdoorBench's defenses)."""
    from ftsam_plugin.models import create_model

    model = create_model("preactresnet18", 10, width=0.125)
    model.load_state_dict(safe_load(folder / "attack_result.pt")["model"])
    save_defense_result("preactresnet18", 10, model, str(folder / "defense" / name))
    return folder / "defense" / name


PURIFY = ("purify_epoch", "total_epochs", "purify_eval_every")


# ---------------------------------------------------------------------------------------------- 1. provenance


def test_time_to_purify_comes_from_the_run_the_leaderboard_scores(record, tmp_path):
    """A finished run, then a `--force` rerun (another lr) killed after its first epoch: the metrics cell is the
    finished model's, so the time to purify must not be the killed rerun's (it was: 1 epoch, its ASR)."""
    folder = clone_record(record, "provenance")
    assert defend(folder, "--epochs", "2")[0] == 0
    out = out_of(folder)
    rows, err, _ = board(tmp_path, folder)
    assert rows[("provenance", "ftsam")]["total_epochs"] == "2", err
    rerun = start_paused(["defend", "--result_file", folder, *FLAGS, "--epochs", "3", "--lr", "0.05", "--force"],
                         tmp_path / "paused", pause="2:0")  # epoch 1's CSV row and checkpoint written
    stop(rerun)  # SIGKILL
    with open(out / "ftsam_df.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 1  # the killed rerun's per-epoch CSV
    rows, err, md = board(tmp_path, folder)
    cell = rows[("provenance", "ftsam")]
    assert [cell[k] for k in PURIFY] == ["", "", ""], cell
    assert f"{out / 'ftsam_df.csv'}" in err and "time to purify not shown" in err, err
    assert "Time to purify" not in md
    assert defend(folder, "--epochs", "2", "--force")[0] == 0  # a finished run again: its CSV, checked
    rows, err, md = board(tmp_path, folder)
    cell = rows[("provenance", "ftsam")]
    assert cell["total_epochs"] == "2" and cell["purify_checked"] == "true" and "†" not in md, (cell, err)


def test_a_per_epoch_csv_changed_after_the_run_is_not_used(record, tmp_path):
    folder = clone_record(record, "changed_csv")
    assert defend(folder, "--epochs", "2")[0] == 0
    path = out_of(folder) / "ftsam_df.csv"
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    column = rows[0].index("test_asr")
    rows[-1][column] = "0.5" if rows[-1][column] != "0.5" else "0.25"  # still a sound CSV: another run's
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    rows, err, _ = board(tmp_path, folder)
    assert [rows[("changed_csv", "ftsam")][k] for k in PURIFY] == ["", "", ""]
    assert f"{path}" in err and "changed since" in err, err


def test_a_per_epoch_csv_no_marker_covers_is_flagged(record, tmp_path):
    """Runs whose marker does not list the per-epoch CSV (written before it did) and folders without a marker
    (BackdoorBench's defenses) still show a time to purify, flagged as unchecked in every output."""
    folder = clone_record(record, "unchecked")
    assert defend(folder, "--epochs", "2")[0] == 0
    out = out_of(folder)
    mark_complete(str(out), ["defense_result.pt", "ftsam_df_summary.csv"])  # a marker as older runs wrote it
    rows, err, md = board(tmp_path, folder)
    cell = rows[("unchecked", "ftsam")]
    assert cell["total_epochs"] == "2" and cell["purify_checked"] == "false", cell
    assert "not covered by the run's completion marker" in md and "†" in md


# ---------------------------------------------------------------------------------------------- 2, 4. retune summaries


def retune_argv(folder):
    return ["retune", "--result_file", str(folder), "--defense", "none", "--device", "cpu", "--split_ratio", "0.5",
            "--poison_num", "2", "--epochs", "1"]


def damage_retune_summary(folder, damage):
    """Damage the after.asr of the folder's `p2_*` retuning run: NaN, 7.5, or missing; returns the summary's path."""
    (path,) = pathlib.Path(folder).glob("retune/p2_*/summary.json")
    summary = json.loads(path.read_text())
    if damage == "missing":
        del summary["after"]["asr"]
    else:
        summary["after"]["asr"] = float(damage)
    path.write_text(json.dumps(summary))  # NaN is written as NaN, as json.dump does
    return path


@pytest.mark.parametrize("damage", ["nan", "7.5", "missing"])
def test_a_damaged_retune_summary_is_named_and_run_again(record, tmp_path, damage):
    folder = clone_record(record, f"retune_{damage}")
    assert run_cli(retune_argv(folder))[0] == 0
    path = damage_retune_summary(folder, damage)
    code, out, err = run_cli(retune_argv(folder))
    assert code == 0, err
    assert f"warning: {path}" in err and "run again" in err, err
    pasr = float(out.split("(P-ASR ")[1].split(")")[0])
    assert 0.0 <= pasr <= 100.0, out
    assert 0.0 <= json.loads(path.read_text())["after"]["asr"] <= 1.0  # the run again wrote a sound one


@pytest.mark.parametrize("damage", ["nan", "7.5", "missing"])
def test_the_leaderboard_names_a_damaged_retune_summary_and_writes_the_rest(record, tmp_path, damage):
    folder = clone_record(record, f"board_retune_{damage}")
    args = ("--retune", "--retune_args", "--split_ratio 0.5 --poison_num 2 --epochs 1")
    board(tmp_path, folder, *args)  # runs and caches both retuning runs
    path = damage_retune_summary(folder, damage)
    rows, err, md = board(tmp_path, folder, *args)
    assert f"{path}" in err, err
    pasr = float(rows[(f"board_retune_{damage}", "no defense")]["p_asr"])
    assert 0.0 <= pasr <= 1.0 and "750.00" not in md


# ---------------------------------------------------------------------------------------------- 3. per-epoch CSVs


def _history(asr, epochs=None):
    epochs = epochs or list(range(1, len(asr) + 1))
    return [dict(epoch=e, test_acc=0.9, test_asr=a, test_ra=0.05) for e, a in zip(epochs, asr)]


@pytest.mark.parametrize("rows,needle", [
    (_history([0.5, 0.03, 0.02, 0.01], epochs=[1, 2, 2, 3]), "epoch 2 twice"),
    (_history([50.0, 3.0, 2.0]), "test_asr 50.0"),  # percent, not a fraction
    (_history([0.5, -0.01, 0.0]), "test_asr -0.01"),
])
def test_per_epoch_csv_values_are_checked(record, tmp_path, rows, needle):
    folder = clone_record(record, f"history_{abs(hash(needle))}")
    out = copy_of_attack(folder, "other")
    write_metrics_csv(str(out / "other_df.csv"), rows)
    write_metrics_summary_csv(str(out / "other_df_summary.csv"), _history([0.5, 0.01]))
    cells, err, md = board(tmp_path, folder)
    assert [cells[(folder.name, "other")][k] for k in PURIFY] == ["", "", ""]
    assert f"{out / 'other_df.csv'}" in err and needle in err, err


# ---------------------------------------------------------------------------------------------- 4. evaluation cache


def test_a_nan_in_one_evaluation_cache_is_named_and_reevaluated(record, tmp_path):
    folder = clone_record(record, "nan_cache")
    out = copy_of_attack(folder, "other")
    first, _, _ = board(tmp_path, folder, "--source", "eval")
    cache = out / "ftsam_eval.json"
    stored = json.loads(cache.read_text())
    stored["metrics"]["asr"] = math.nan
    cache.write_text(json.dumps(stored))
    rows, err, _ = board(tmp_path, folder, "--source", "eval")
    assert f"{cache}" in err, err
    cell = rows[("nan_cache", "other")]
    assert cell["source"] == "eval" and cell["test_asr"] == first[("nan_cache", "other")]["test_asr"]


# ---------------------------------------------------------------------------------------------- 5. crafted metadata


def _vgg(raw):
    raw["model_name"] = "vgg19_bn"


def _listed(raw):
    raw["model"] = [1, 2]


@pytest.mark.parametrize("mutate,needle", [(_vgg, "vgg19_bn"), (_listed, "model")])
def test_crafted_model_metadata_is_one_line(record, mutate, needle):
    folder = clone_record(record, f"crafted_{mutate.__name__}", mutate)
    line = check_error(defend(folder), needle, whole=False)
    assert "unexpected" not in line and "; " in line


# ---------------------------------------------------------------------------------------------- 6. threads


def _untouched(*args, **kwargs):
    raise AssertionError("the demo went on past its flag checks")


@pytest.mark.parametrize("extra", [1, 997])
def test_demo_threads_above_the_usable_cores_are_refused(tmp_path, monkeypatch, extra):
    monkeypatch.setattr(demo, "select_data", _untouched)
    cores = len(os.sched_getaffinity(0))
    check_error(run_cli(["demo", "--threads", str(cores + extra), "--out", str(tmp_path / "out"), "--offline"]),
                f"threads must be an integer in [1, {cores}]")


# ---------------------------------------------------------------------------------------------- 7. ignored SIGINT


def test_sigint_stops_a_command_that_started_with_it_ignored():
    from ftsam_plugin.signals import sigterm_as_interrupt

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell starts a background job
    try:
        with pytest.raises(KeyboardInterrupt):
            with sigterm_as_interrupt():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # put back afterwards
    finally:
        signal.signal(signal.SIGINT, previous)


def test_retune_started_with_sigint_ignored_stops_on_sigint(record):
    from ftsam_plugin.lock import FolderLock

    folder = clone_record(record, "retune_ign")
    argv = [sys.executable, "-m", "ftsam_plugin", "retune", "--result_file", str(folder), "--defense", "none",
            "--device", "cpu", "--split_ratio", "1", "--poison_num", "2", "--epochs", "100000", "--eval_every", "1000"]
    proc = subprocess.Popen(argv, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    run_dir = folder / "retune" / "p2_r1_e100000_lr0.01_m0.9_wd0_b128_s42"
    deadline = time.monotonic() + 240
    try:
        while not (run_dir / "retune.log").exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the retune run never started"
            time.sleep(0.05)
        assert FolderLock(run_dir).holder() is not None
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err


# ---------------------------------------------------------------------------------------------- 8, 9. demo stops


def tiny_data(tmp_path):
    path = make_image_folder(tmp_path / "images", n_per_class=4, n_test_per_class=2)
    return demo.DemoData(str(path), "folder", "test images", 40, 20)


def demo_argv(out, *extra):
    return ["demo", "--out", str(out), "--offline", "--no_retune", "--progress", "false", "--epochs", "1",
            "--width", "0.125", "--ratio", "0.5", "--side_by_side", "false", "--device", "cpu", *extra]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_demo_stopped_during_a_defense_says_what_works(tmp_path, monkeypatch, signum):
    from ftsam_plugin.defense.signals import Interrupted

    def stopped(**job):
        raise Interrupted("stopped after epoch 1's checkpoint; continue with the same command plus --resume", signum)

    monkeypatch.setattr(demo, "select_data", lambda *a, **k: tiny_data(tmp_path))
    monkeypatch.setattr(demo, "run_defense", stopped)
    out = tmp_path / "out"
    code, _, err = run_cli(demo_argv(out))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 128 + signum and len(lines) == 1, err
    assert "--resume" not in lines[0] and str(out / "demo_blended") in lines[0], lines[0]
    assert "same command" in lines[0]


def _stopped_by_ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt


def _refused(*args, **kwargs):
    raise FtsamError("the attack stops here")


def test_a_demo_stopped_during_its_attack_leaves_a_record_the_next_demo_replaces(tmp_path, monkeypatch):
    from ftsam_plugin.attacks import cli as attack_cli

    monkeypatch.setattr(demo, "select_data", lambda *a, **k: tiny_data(tmp_path))
    monkeypatch.setattr(attack_cli, "_write_record", _stopped_by_ctrl_c)  # Ctrl-C once the record folder exists
    out = tmp_path / "out"
    code, _, err = run_cli(demo_argv(out))
    assert code == 130 and "--resume" not in err, err
    assert (out / "demo_blended" / demo.MARKER).is_file()
    monkeypatch.setattr(attack_cli, "_write_record", _refused)
    code, stdout, err = run_cli(demo_argv(out))
    assert "not made by `ftsam demo`" not in err and "kept the earlier demo record as" in stdout, err


HOLD = textwrap.dedent("""
    import os, sys, time
    from ftsam_plugin.lock import FolderLock
    os.makedirs(sys.argv[1])
    lock = FolderLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def test_a_second_demo_during_the_first_ones_attack_names_it(tmp_path, monkeypatch):
    """The first demo's attack holds <out>/demo_blended (a new folder, not marked yet): the second demo must say
    that a live run holds it, not that the demo did not make it."""
    monkeypatch.setattr(demo, "select_data", lambda *a, **k: tiny_data(tmp_path))
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / "demo_blended")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        check_error(run_cli(demo_argv(out)), f"is in use by another run (PID {holder.pid}, started ", whole=False)
    finally:
        stop(holder)


# ---------------------------------------------------------------------------------------------- 10. killed child


def test_a_killed_side_by_side_defense_is_reported_at_once_with_its_cause(tmp_path, monkeypatch):
    """The second process dies by SIGKILL while this one trains: this one stops (it is interrupted, it does not
    train on to its end) and the error names the kill, not the side-by-side mode."""
    seen = {}

    def long_defense(**job):
        child = next(p for p in multiprocessing.active_children() if p.name == "ftsam-demo-ftsam")
        os.kill(child.pid, signal.SIGKILL)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                time.sleep(0.05)
        except KeyboardInterrupt:
            seen["interrupted"] = True
            raise
        return {"defense": job["defense"]}

    monkeypatch.setattr(demo, "run_defense", long_defense)
    job = dict(defense="ftsam", record=str(tmp_path / "no_record"), epochs=1, ratio=0.5, rho="2", device="cpu",
               seed=0)
    with pytest.raises(FtsamError) as info:
        demo.run_defenses_side_by_side(dict(job, defense="ft-baseline"), job, 1)
    assert seen.get("interrupted"), "this process trained on after the other one died"
    assert "SIGKILL" in str(info.value) and "side_by_side" not in str(info.value), info.value


# ---------------------------------------------------------------------------------------------- 11. demo messages


def test_demo_unwritable_out_names_out(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "select_data", _untouched)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for out in (blocker / "out", pathlib.Path("/proc/ftsam_no_such_folder")):
        line = check_error(run_cli(demo_argv(out)), "--out")
        assert "--record_root" not in line and str(out) in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_demo_read_only_out_names_out(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "select_data", _untouched)
    out = tmp_path / "read_only"
    out.mkdir()
    out.chmod(0o555)
    try:
        check_error(run_cli(demo_argv(out)), f"--out {out}")
    finally:
        out.chmod(0o755)


def test_demo_too_few_training_images_names_the_flag(tmp_path, monkeypatch):
    data = tiny_data(tmp_path)
    monkeypatch.setattr(demo, "select_data", lambda *a, **k: demo.DemoData(data.path, "folder", "test", 10, 20))
    monkeypatch.setattr(demo, "run_attack", _untouched)
    line = check_error(run_cli(demo_argv(tmp_path / "out", "--train_per_class", "1")), "--train_per_class")
    assert "0 images per class" in line


SIDE_BY_SIDE = textwrap.dedent("""
    import multiprocessing.process, sys
    from ftsam_plugin import demo
    terminate = multiprocessing.process.BaseProcess.terminate
    def reported(self):
        print("terminated", flush=True)
        terminate(self)
    multiprocessing.process.BaseProcess.terminate = reported
    if __name__ == "__main__":
        demo.run_defense = lambda **job: {"defense": job["defense"]}
        job = dict(defense="ftsam", record=sys.argv[1], epochs=1, ratio=0.5, rho="2", device="cpu", seed=0)
        for _ in range(2):  # the second run warns about the first one's folder: another timing
            print(demo.run_defenses_side_by_side(dict(job, defense="ft-baseline"), job, 1)[1]["test_acc"])
""")


def test_a_side_by_side_defense_ends_by_itself_and_leaks_nothing(record, tmp_path):
    """The second process runs the real FT-SAM (a tqdm bar) and sends its result: it must be let to exit by itself
    (it was sent SIGTERM while exiting, which left its tqdm semaphore to the resource tracker's warning)."""
    folder = clone_record(record, "semaphore")
    script = tmp_path / "side_by_side.py"
    script.write_text(SIDE_BY_SIDE)
    proc = subprocess.run([sys.executable, str(script), str(folder)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    assert "terminated" not in proc.stdout, proc.stdout
    assert "leaked semaphore" not in proc.stderr and "resource_tracker" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------- 12. SAM flags in FT


@pytest.mark.parametrize("flags,needle", [
    (["--sam_every", "-1"], "sam_every must be an integer >= 1, got -1"),
    (["--sam_prob", "nan"], "sam_prob must be a finite number in (0, 1], got nan"),
    (["--sam_epochs", "garbage"], "sam_epochs must be an epoch window FIRST-LAST like 1-5, got 'garbage'"),
    (["--rho", "-5"], "rho must be a finite number > 0, got -5.0"),
])
def test_plain_ft_still_checks_sam_values(record, flags, needle):
    check_error(defend(record, "--defense", "ft-baseline", *flags), needle, whole=False)


def test_plain_ft_warns_that_sam_flags_do_not_apply(caplog):
    from ftsam_plugin.defense.config import validate

    with caplog.at_level("WARNING", logger="ftsam_plugin.defense"):
        validate({"rho": 2.0, "sam_every": 2}, uses_sam=False, given={"rho", "sam_every", "epochs"})
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "--rho" in warning and "--sam_every" in warning and "do not apply" in warning, warning
    assert "--epochs" not in warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="ftsam_plugin.defense"):
        validate({"rho": 2.0}, uses_sam=False, given=())  # the shared YAML's SAM keys: no word
        validate({"rho": 2.0}, uses_sam=True, given={"rho"})
    assert not caplog.records


# ---------------------------------------------------------------------------------------------- 13. BackdoorBench deps


def test_the_backdoorbench_extra_lists_what_its_code_imports():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    extra = [line.strip() for line in cfg["options.extras_require"]["backdoorbench"].splitlines() if line.strip()]
    assert sorted(extra, key=str.lower) == sorted(bb_helpers.BACKDOORBENCH_DEPS.values(), key=str.lower)


def test_a_missing_backdoorbench_dependency_is_a_skip_naming_the_extra(monkeypatch):
    monkeypatch.setattr(bb_helpers, "missing_modules", lambda modules: [m for m in modules if m == "pandas"])
    reason = bb_helpers.backdoorbench_skip_reason("/some/BackdoorBench")
    assert "pandas" in reason and "pip install -e '.[backdoorbench]'" in reason, reason
    assert bb_helpers.backdoorbench_skip_reason(None).startswith("BACKDOORBENCH_ROOT is not set")
    monkeypatch.setattr(bb_helpers, "missing_modules", lambda modules: [])
    assert bb_helpers.backdoorbench_skip_reason("/some/BackdoorBench") is None


HIDDEN = "raise ImportError(\"No module named 'pandas' (hidden by the test)\")\n"


@pytest.mark.skipif(not os.environ.get("BACKDOORBENCH_ROOT"), reason="BACKDOORBENCH_ROOT is not set")
def test_backdoorbench_tests_skip_where_pandas_is_missing(tmp_path):
    """The issue's case: BACKDOORBENCH_ROOT set, pandas not installed. An interpreter that sees this one's packages
    but not pandas (a venv whose site-packages hold a `pandas` that fails to import, then this venv's) runs the
    BackdoorBench reader test: it must skip, naming the extra, not fail."""
    import site
    import sysconfig

    env_dir = tmp_path / "no_pandas"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    purelib = pathlib.Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                          capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "pandas").mkdir(parents=True)
    (purelib / "pandas" / "__init__.py").write_text(HIDDEN)
    ours = [p for p in site.getsitepackages() + [sysconfig.get_path("purelib")] if os.path.isdir(p)]
    (purelib / "zz_parent.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in ours))
    proc = subprocess.run([str(python), "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "tests/test_data_bbcompat.py::test_backdoorbench_reads_our_record"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert "1 skipped" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "pandas" in proc.stdout and ".[backdoorbench]" in proc.stdout, proc.stdout[-3000:]
