"""Hostile and careless inputs, second round (issue 19): nothing lost, nothing silently wrong.

Each test reproduces one defect of the probe (it fails on the code before the fix). Where the defect needs two
processes (locks, kills) they are real subprocesses; the rest go through `ftsam_plugin.cli.main` in-process.
"""

import csv
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from ftsam_plugin.io import safe_load

from helpers import check_error, clone_record, cpu_yaml, make_attack_record, run_cli

FLAGS = ["--yaml_path", "cpu", "--device", "cpu", "--ratio", "0.5", "--batch_size", "8", "--num_workers", "0",
         "--epochs", "1"]


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return make_attack_record(tmp_path_factory.mktemp("round2"), name="rec", n_per_class=4, epochs=1)


def defend(folder, *extra, flags=FLAGS):
    return run_cli(["defend", "--result_file", str(folder), *flags, *map(str, extra)])


def out_of(folder, name="ftsam"):
    return pathlib.Path(folder) / "defense" / name


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in pathlib.Path(folder).rglob("*") if p.is_file())


def ftsam(*argv, env=None, **kw):
    """`python -m ftsam_plugin <argv>` as a real process."""
    return subprocess.run([sys.executable, "-m", "ftsam_plugin", *map(str, argv)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), timeout=300, **kw)


def start_paused(argv, marker, pause="1:1"):
    """Start `ftsam <argv>` (a defense) as a process that pauses at epoch:step `pause`, holding its folders; return
    it once it is there."""
    env = dict(os.environ, FTSAM_TEST_PAUSE=f"{pause}:{marker}", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "ftsam_plugin", *map(str, argv)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not pathlib.Path(marker).exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before pausing: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run did not reach its pause")
        time.sleep(0.05)
    return proc


def stop(proc):
    proc.kill()
    proc.communicate(timeout=120)


def one_line(result, needle, code=2):
    """Exit `code`, no traceback, one stderr line (an `error:` line) holding `needle`."""
    if code == 2:
        return check_error(result, needle)
    rc, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == code and "Traceback" not in err and len(lines) == 1 and needle in lines[0], err
    return lines[0]


# ---------------------------------------------------------------------------------------------- 1. demo


def fake_demo_record(out, record=None):
    """An earlier demo's record at <out>/demo_blended: a real record (when given) or a stand-in, with a defense
    result, marked as the demo's."""
    import shutil

    target = pathlib.Path(out) / "demo_blended"
    if record is not None:
        shutil.copytree(record, target, ignore=shutil.ignore_patterns("defense"))
    (target / "defense" / "ftsam").mkdir(parents=True, exist_ok=True)
    (target / "defense" / "ftsam" / "defense_result.pt").write_bytes(b"an earlier result")
    (target / "demo_info.txt").write_text("made by ftsam demo\n")
    return target


@pytest.mark.parametrize("flags,needle", [
    (["--rho", "-1"], "rho must be a finite number > 0, got -1.0; fix --rho"),
    (["--batch_size", "-3"], "batch_size must be an integer >= 1, got -3; fix --batch_size"),
    (["--threads", "-1"], "threads must be an integer in [1, "),  # up to the usable cores (round 3)
    (["--epochs", "0"], "epochs must be an integer >= 1, got 0; fix --epochs"),
    (["--ratio", "1.5"], "ratio must be a finite number in (0, 1], got 1.5; fix --ratio"),
    (["--device", "banana"], "unknown device 'banana'"),
    (["--device", "cuda:99"], "cuda"),
])
def test_demo_checks_its_flags_before_it_touches_an_earlier_record(tmp_path, flags, needle):
    pytest.importorskip("sklearn")
    out, cache = tmp_path / "t" / "demo", tmp_path / "cache"
    earlier = fake_demo_record(out)
    before = files_under(out)
    check_error(run_cli(["demo", "--tiny", "--offline", "--no_retune", "--out", str(out), "--cache_dir", str(cache),
                         "--progress", "false", *flags]), needle)
    assert files_under(out) == before and (earlier / "defense" / "ftsam" / "defense_result.pt").exists()
    assert not cache.exists()  # nothing prepared either


def test_demo_never_removes_a_record_a_live_run_uses_and_keeps_an_earlier_one(record, tmp_path):
    """Two real processes: a `ftsam defend` holds demo_blended/defense/ftsam; the demo refuses to touch the record.
    Once it is free, the demo moves it aside (kept, with its defense result) instead of deleting it."""
    pytest.importorskip("sklearn")
    out, cache = tmp_path / "t" / "demo", tmp_path / "cache"
    earlier = fake_demo_record(out, record)
    data = ["--dataset_path", record.parent.parent / "data"]
    defense = start_paused(["defend", "--result_file", earlier, *FLAGS, *data], tmp_path / "paused")
    argv = ["demo", "--tiny", "--offline", "--no_retune", "--out", str(out), "--cache_dir", str(cache),
            "--progress", "false"]
    try:
        check_error(run_cli(argv), f"{earlier / 'defense' / 'ftsam'} (in the earlier demo record) is in use by "
                                   f"another run (PID {defense.pid}, started ", whole=False)
        assert (earlier / "attack_result.pt").exists() and (earlier / "defense" / "ftsam" / "log").is_dir()
    finally:
        stop(defense)
    code, stdout, err = run_cli(argv)
    assert code == 0, err
    kept = [p for p in out.iterdir() if p.name.startswith("demo_blended.")]
    assert len(kept) == 1 and f"kept the earlier demo record as {kept[0]}" in stdout
    assert (kept[0] / "attack_result.pt").exists() and (kept[0] / "defense" / "ftsam" / "log").is_dir()
    assert (out / "demo_blended" / "defense" / "ftsam" / "defense_result.pt").exists()  # the new run's


# ---------------------------------------------------------------------------------------------- 2. resume identity


def _other_weights(raw):
    key = next(k for k, v in raw["model"].items() if v.is_floating_point() and v.dim() == 4)
    raw["model"][key] = raw["model"][key] * 1.5


def test_resume_refuses_another_records_checkpoint(record, tmp_path):
    """Two records that differ only in their weights, one --checkpoint_save folder: the second --resume must not
    adopt the first record's defended model."""
    a, b = clone_record(record, "same_a"), clone_record(record, "same_b", _other_weights)
    shared = tmp_path / "shared_ckpt"
    assert defend(a, "--checkpoint_save", shared, "--keep_checkpoint")[0] == 0
    line = check_error(defend(b, "--checkpoint_save", shared, "--resume"), f"checkpoint {shared / 'last.pt'} was "
                       f"made from another backdoored model (weights sha256 ", whole=False)
    assert "run without --resume, or give each record its own --checkpoint_save" in line
    assert not (out_of(b) / "defense_result.pt").exists()


@pytest.mark.parametrize("flag", ["--checkpoint_save", "--log"])
def test_two_runs_cannot_share_a_custom_checkpoint_or_log_folder(record, tmp_path, flag):
    """Two real processes on two records, one --checkpoint_save (or --log) folder: the second is refused at once,
    naming the first; the first's checkpoint is untouched."""
    a, b = clone_record(record, f"share_a{flag}"), clone_record(record, f"share_b{flag}")
    shared = tmp_path / "shared"
    first = start_paused(["defend", "--result_file", a, *FLAGS, "--epochs", "2", flag, shared], tmp_path / "p",
                         pause="2:0")  # after epoch 1's checkpoint
    try:
        second = ftsam("defend", "--result_file", b, *FLAGS, flag, shared)
    finally:
        stop(first)
    what = "checkpoint folder" if flag == "--checkpoint_save" else "log folder"
    one_line((second.returncode, second.stdout, second.stderr),
             f"{what} {shared} is in use by another run (PID {first.pid}, started ")
    assert not (out_of(b) / "defense_result.pt").exists()
    if flag == "--checkpoint_save":
        assert safe_load(shared / "last.pt", what="checkpoint")["epoch"] == 1


# ---------------------------------------------------------------------------------------------- 3. final writes


KILL_AT_RESULT = textwrap.dedent("""
    import os, signal, sys
    import ftsam_plugin.io as io
    write = io._atomic_write
    def killed_at_result(path, *args):
        if os.fspath(path).endswith("defense_result.pt"):
            os.kill(os.getpid(), signal.SIGKILL)  # the process dies while writing its result
        return write(path, *args)
    io._atomic_write = killed_at_result
    from ftsam_plugin.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def board(tmp_path, root, *extra):
    code, out, err = run_cli(["leaderboard", str(root), "--device", "cpu", "--out", str(tmp_path / "board"), *extra])
    assert code == 0, err
    with open(tmp_path / "board" / "leaderboard.csv", newline="") as handle:
        rows = {r["defense"]: r for r in csv.DictReader(handle) if r["record"] != "average"}
    return rows, err


def test_a_run_killed_while_writing_its_result_looks_unfinished_to_the_leaderboard(record, tmp_path):
    folder = clone_record(record, "killed_final")
    assert defend(folder)[0] == 0  # a finished run
    out = out_of(folder)
    old = (out / "defense_result.pt").read_bytes()
    # a second run, other settings, killed while writing its defense_result.pt (a real SIGKILL)
    proc = subprocess.run([sys.executable, "-c", KILL_AT_RESULT, "defend", "--result_file", str(folder), *FLAGS,
                           "--lr", "0.3", "--epochs", "2", "--ratio", "1.0"],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out / "defense_result.pt").read_bytes() == old  # the earlier result is what the folder holds
    truth, _ = board(tmp_path, folder, "--source", "eval", "--no_cache")
    rows, err = board(tmp_path, folder)
    assert rows["ftsam"]["source"] in ("eval", "cache"), rows["ftsam"]
    assert [rows["ftsam"][k] for k in ("test_acc", "test_asr", "test_ra")] == \
           [truth["ftsam"][k] for k in ("test_acc", "test_asr", "test_ra")]
    assert f"the run in {out} did not finish" in err
    # a finished rerun makes the folder complete again: its summary is used
    assert defend(folder)[0] == 0
    rows, err = board(tmp_path, folder)
    assert rows["ftsam"]["source"].startswith("summary:") and "did not finish" not in err


# ---------------------------------------------------------------------------------------------- 4. leaderboard --out


HOLD = textwrap.dedent("""
    import sys, time
    from ftsam_plugin.lock import FolderLock
    lock = FolderLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def hold_lock(folder):
    """Another process holding `folder`'s lock (as a run writing there does); returns it once it holds it."""
    pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_leaderboard_out_folder_has_one_writer(record, tmp_path):
    board_dir = tmp_path / "board"
    holder = hold_lock(board_dir)
    try:
        result = run_cli(["leaderboard", str(record), "--device", "cpu", "--out", str(board_dir)])
    finally:
        stop(holder)
    check_error(result, f"leaderboard folder {board_dir} is in use by another run (PID {holder.pid}, started ")
    assert [p.name for p in board_dir.iterdir()] == [".ftsam.lock"]  # nothing written
    code, _, err = run_cli(["leaderboard", str(record), "--device", "cpu", "--out", str(board_dir)])
    assert code == 0 and (board_dir / "leaderboard.md").exists(), err


# ---------------------------------------------------------------------------------------------- 5, 11. images


def limited(argv, mem_gb=4, timeout=180):
    """`ftsam <argv>` as a process with at most `mem_gb` GB of address space (a defect that reads forever or
    allocates tens of GB fails fast, without starving the machine) and a time limit."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (mem_gb << 30, mem_gb << 30))

    try:
        proc = subprocess.run([sys.executable, "-m", "ftsam_plugin", *map(str, argv)], capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"), preexec_fn=limit, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ftsam {argv[0]} still running after {timeout} s")
    return proc.returncode, proc.stdout, proc.stderr


def _victim(folder):
    return sorted((folder / "bd_test_dataset").rglob("*.png"))[0]


def _to_dev_zero(path):
    path.unlink()
    os.symlink("/dev/zero", path)


def _to_fifo(path):
    path.unlink()
    os.mkfifo(path)


def _huge_png(path, side=20000):
    """A valid grayscale PNG of side x side pixels (about 1 MB on disk, 400 MB decoded), written without decoding."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    packer, row = zlib.compressobj(9), b"\x00" * (side + 1)  # filter byte + a row of black pixels
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.mark.parametrize("damage,needle", [
    (_to_dev_zero, "not a regular file but a character device"),
    (_to_fifo, "not a regular file but a FIFO"),
    (_huge_png, "20000x20000 pixels, more than the 16777216 this pipeline decodes"),
])
def test_image_check_refuses_devices_fifos_and_decompression_bombs(record, damage, needle):
    folder = clone_record(record, f"img_{damage.__name__}")
    victim = _victim(folder)
    damage(victim)
    check_error(limited(["defend", "--result_file", folder, *FLAGS]), f"(first: poisoned image {victim}: {needle}); ")
    assert not (folder / "defense").exists()


# ---------------------------------------------------------------------------------------------- 6. record metadata


def _set(key, value):
    def mutate(raw):
        raw[key] = value
    mutate.__name__ = f"{key}={value!r}"[:40]
    return mutate


def _bd_index(raw):
    raw["bd_test"]["original_index_array"] = raw["bd_test"]["original_index_array"].copy()
    raw["bd_test"]["original_index_array"][0] = 10**6


def _bd_label(value):
    def mutate(raw):
        entry = next(iter(raw["bd_test"]["bd_data_container"]["data_dict"].values()))
        entry["other_info"] = [value, entry["other_info"][1]]
    mutate.__name__ = f"bd_label_{value}"
    return mutate


SIZE_RULE = "it must be (height, width, channels) with sides in 1..4096 and 1..4 channels"


@pytest.mark.parametrize("mutate,needle", [
    (_set("img_size", (100000, 100000, 3)), f"says img_size (100000, 100000, 3); {SIZE_RULE}"),
    (_set("img_size", "abc"), f"says img_size 'abc'; {SIZE_RULE}"),
    (_set("img_size", None), f"says img_size None; {SIZE_RULE}"),
    (_set("width", 1e4), "width must be a finite number in (0, 16], got 10000.0"),
    (_set("width", -1.0), "width must be a finite number in (0, 16], got -1.0"),
    (_set("width", float("nan")), "width must be a finite number in (0, 16], got nan"),
    (_set("width", "wide"), "width must be a finite number in (0, 16], got 'wide'"),
    (_set("model_name", ["preactresnet18"]), "model_name must be a model name (text), got ['preactresnet18']"),
    (_set("num_classes", True), "num_classes must be an integer in [1, 100000], got True"),
    (_bd_index, "its bd_test set holds item index 1000000, outside the dataset's 0..19"),
    (_bd_label(999), "with label 999, not a class of 0..9"),
    (_bd_label(-5), "with label -5, not a class of 0..9"),
])
def test_record_metadata_is_checked_before_it_is_used(record, mutate, needle):
    folder = clone_record(record, f"meta_{mutate.__name__}", mutate)
    line = check_error(limited(["defend", "--result_file", folder, *FLAGS]), needle)
    assert "re-create" in line or "fix" in line
    assert not (folder / "defense").exists()


def test_every_reader_uses_the_record_check(record, tmp_path):
    folder = clone_record(record, "meta_readers", _bd_label(999))
    code, _, err = run_cli(["leaderboard", str(folder), str(record), "--device", "cpu", "--out", str(tmp_path / "b")])
    assert code == 0 and f"warning: skipping {folder}: " in err and "with label 999" in err, err
    check_error(run_cli(["norms", "--record", str(folder), "--device", "cpu", "--out", str(tmp_path / "n")]),
                "with label 999")
    check_error(run_cli(["retune", "--result_file", str(folder), "--defense", "none", "--device", "cpu"]),
                "with label 999")
    # the config choice reads the record too: a list in attack_result.pt is named as such
    listed = clone_record(record, "meta_list")
    torch.save([1, 2, 3], listed / "attack_result.pt")
    check_error(run_cli(["defend", "--result_file", str(listed), "--device", "cpu"]),
                f"{listed / 'attack_result.pt'} is not an attack result (holds a list)")


# ---------------------------------------------------------------------------------------------- 7. disk full


def file_size_limited(argv, max_bytes):
    """`ftsam <argv>` as a process that may write files of at most `max_bytes` (ulimit -f)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    proc = subprocess.run([sys.executable, "-m", "ftsam_plugin", *map(str, argv)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), preexec_fn=limit, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("max_bytes,needle", [
    (100_000, "checkpoint{sep}last.pt (File too large); free space or choose another output folder"),  # mid-run
    (0, "(File too large); free space or choose another output folder"),  # full from the start
])
def test_disk_full_is_one_line(record, max_bytes, needle):
    folder = clone_record(record, f"disk_full_{max_bytes}")
    code, out, err = file_size_limited(["defend", "--result_file", folder, *FLAGS], max_bytes)
    check_error((code, out, err), "error: disk full: cannot write ", whole=False)
    assert needle.format(sep=os.sep) in err.strip().splitlines()[-1]
    assert "Logging error" not in err
    if max_bytes == 0:
        assert err.count("warning: cannot write log file") == 1, err


# ---------------------------------------------------------------------------------------------- 8. retune SIGTERM


def test_retune_stopped_by_sigterm_exits_143(record, tmp_path):
    from ftsam_plugin.lock import FolderLock

    folder = clone_record(record, "retune_term")
    argv = [sys.executable, "-m", "ftsam_plugin", "retune", "--result_file", str(folder), "--defense", "none",
            "--device", "cpu", "--split_ratio", "1", "--poison_num", "2", "--epochs", "100000", "--eval_every", "1000"]
    proc = subprocess.Popen(argv, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    run_dir = folder / "retune" / "p2_r1_e100000_lr0.01_m0.9_wd0_b128_s42"
    deadline = time.monotonic() + 240
    while FolderLock(run_dir).holder() is None and not (run_dir / "retune_df.csv").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the retune run never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith(f"interrupted: stopped; {run_dir} has no summary.json")


# ---------------------------------------------------------------------------------------------- 9. one line


@pytest.mark.parametrize("key,value,needle", [
    ("restore", "nope", "restore must be one of copy, subtract, got 'nope'; fix --restore (or restore in the YAML)"),
    ("checkpoint_save", "5", "checkpoint_save must be a path (text), got 5; fix --checkpoint_save"),
    ("log", "true", "log must be a path (text), got True; fix --log"),
    ("index", "5", "index must be a path (text), got 5; fix --index"),
    ("index", "0", "index must be a path (text), got 0; fix --index"),
])
def test_defend_yaml_values_of_the_wrong_kind(record, tmp_path, key, value, needle):
    folder = clone_record(record, f"kind_{key}_{value}")
    path = tmp_path / "cfg.yaml"
    path.write_text(cpu_yaml(**{key: value}))
    check_error(run_cli(["defend", "--result_file", str(folder), "--yaml_path", str(path), "--device", "cpu",
                         "--epochs", "1"]), needle)
    assert not (folder / "defense").exists()


@pytest.mark.parametrize("text,needle", [
    ("record_root: 5", "record_root must be a path (text), got 5; fix --record_root"),
    ("dataset_path: 5", "dataset_path must be a path (text), got 5; fix --dataset_path"),
    ("dataset_path: [data]", "dataset_path must be a path (text), got ['data']; fix --dataset_path"),
    ("save_folder_name: 123", "save_folder_name must be a folder name (text), got 123; fix --save_folder_name"),
])
def test_attack_yaml_values_of_the_wrong_kind(record, tmp_path, text, needle):
    path = tmp_path / "attack.yaml"
    path.write_text(text + "\n")
    root = tmp_path / "records"
    argv = ["attack", "--yaml_path", str(path), "--device", "cpu", "--epochs", "1", "--width", "0.125"]
    argv += [] if text.startswith("dataset_path") else ["--dataset_path", str(record.parent.parent / "data")]
    argv += [] if text.startswith("record_root") else ["--record_root", str(root)]
    argv += [] if text.startswith("save_folder_name") else ["--save_folder_name", "x"]
    cwd = os.getcwd()
    os.chdir(tmp_path)  # a record_root of 5 would be ./5
    try:
        check_error(run_cli(argv), needle)
    finally:
        os.chdir(cwd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attack.yaml"]


@pytest.mark.parametrize("argv,needle", [
    (["leaderboard", "{record}", "--device", "banana"], "unknown device 'banana'; use --device cpu, cuda or cuda:N"),
    (["leaderboard", "{record}", "--device", "cuda:99"], "cuda"),
    (["leaderboard", "{record}", "--num_workers", "-1"], "num_workers must be an integer >= 0, got -1"),
    (["norms", "--record", "{record}", "--device", "cuda:99"], "cuda"),
    (["norms", "--record", "{record}", "--batch_size", "0"], "batch_size must be an integer >= 1, got 0"),
    (["retune", "--result_file", "{record}", "--defense", "none", "--random_seed", str(10**23)],
     "--random_seed 100000000000000000000000 must be in [0, 4294967295]"),
])
def test_command_flags_are_checked_first(record, tmp_path, argv, needle):
    out = tmp_path / "out"
    argv = [a.format(record=record) for a in argv] + (["--out", str(out)] if argv[0] != "retune" else [])
    before = files_under(record)
    check_error(run_cli(argv), needle)
    assert not out.exists() and files_under(record) == before


def test_an_unexpected_exception_is_one_line(monkeypatch):
    import ftsam_plugin.norms

    def broken(args):
        return 1 / 0

    monkeypatch.setattr(ftsam_plugin.norms, "run", broken)
    one_line(run_cli(["norms", "--record", "x"]), "error: unexpected ZeroDivisionError: division by zero; run with "
                                                  "--debug for the traceback", code=1)
    with pytest.raises(ZeroDivisionError):
        run_cli(["--debug", "norms", "--record", "x"])


# ---------------------------------------------------------------------------------------------- 10. record names


@pytest.mark.parametrize("name", [os.fsdecode(b"rec_\xff\xfe"), r"rec_$\nope{x}^$"])
def test_leaderboard_survives_odd_record_folder_names(record, tmp_path, name):
    import shutil

    folder = record.parent / name
    shutil.copytree(record, folder, ignore=shutil.ignore_patterns("defense"))
    code, out, err = run_cli(["leaderboard", str(folder), "--device", "cpu", "--out", str(tmp_path / "b")])
    assert code == 0 and "Traceback" not in err, err
    shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    assert f"| {shown} |" in out and f"| {shown} |" in (tmp_path / "b" / "leaderboard.md").read_text()
    assert list((tmp_path / "b").glob("heatmap_*_asr.png"))


# ---------------------------------------------------------------------------------------------- 11. checkpoints


def _flip_a_weight_bit(path):
    """Flip one bit in the middle of the largest tensor stored in a torch zip file (torch does not check the CRC)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    local = info.header_offset
    name_len, extra_len = int.from_bytes(data[local + 26:local + 28], "little"), \
        int.from_bytes(data[local + 28:local + 30], "little")
    start = local + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x04
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_refused_not_resumed(record):
    folder = clone_record(record, "bitflip")
    assert defend(folder, "--keep_checkpoint")[0] == 0
    ckpt = out_of(folder) / "checkpoint" / "last.pt"
    _flip_a_weight_bit(ckpt)
    safe_load(ckpt, what="checkpoint")  # still loads: only the checksum tells
    before = (out_of(folder) / "defense_result.pt").read_bytes()
    check_error(defend(folder, "--resume"), f"checkpoint {ckpt} is damaged (its contents do not match its checksum); "
                                            f"delete it or run without --resume", whole=False)
    assert (out_of(folder) / "defense_result.pt").read_bytes() == before


def test_a_truncated_checkpoint_says_what_to_do(record):
    folder = clone_record(record, "trunc_ckpt")
    assert defend(folder, "--keep_checkpoint")[0] == 0
    ckpt = out_of(folder) / "checkpoint" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:5000])
    check_error(defend(folder, "--resume"), "is truncated or corrupt", whole=False)
    line = check_error(defend(folder, "--resume"), "; delete it or run without --resume", whole=False)
    assert "re-create" not in line


def test_an_unfinished_run_is_kept_unless_forced(record, tmp_path):
    folder = clone_record(record, "unfinished")
    flags = [*FLAGS[:-1], "2"]  # two epochs
    stop(start_paused(["defend", "--result_file", folder, *flags], tmp_path / "p", pause="2:0"))
    ckpt = out_of(folder) / "checkpoint" / "last.pt"
    kept = ckpt.read_bytes()
    check_error(defend(folder, flags=flags), f"checkpoint {ckpt} holds an unfinished run (epoch 1 of 2); continue it "
                                             f"with --resume, or pass --force to start over", whole=False)
    assert ckpt.read_bytes() == kept
    code, _, err = defend(folder, "--force", flags=flags)
    assert code == 0, err
    assert (out_of(folder) / "defense_result.pt").is_file() and not ckpt.exists()  # finished: checkpoint removed


def test_retune_folder_has_one_writer(record):
    folder = clone_record(record, "retune_lock")
    run_dir = folder / "retune" / "p2_r1_e1_lr0.01_m0.9_wd0_b128_s42"
    argv = ["retune", "--result_file", str(folder), "--defense", "none", "--device", "cpu", "--split_ratio", "1",
            "--poison_num", "2", "--epochs", "1"]
    holder = hold_lock(run_dir)
    try:
        result = run_cli(argv)
    finally:
        stop(holder)
    check_error(result, f"retune folder {run_dir} is in use by another run (PID {holder.pid}, started ")
    assert not (run_dir / "summary.json").exists()
    code, _, err = run_cli(argv)
    assert code == 0 and (run_dir / "summary.json").exists(), err
