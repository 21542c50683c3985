"""Hostile and broken inputs (issue 12): every case a clear one-line `error:` (exit 2, no traceback, nothing written,
a previous result intact) or the correct result.

Cases run through the `ftsam` command (ftsam_plugin.cli.main, in-process) on copies of one tiny record.
"""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

import pytest
import torch
from PIL import Image

from ftsam_plugin.defense.checkpoint import checksum
from ftsam_plugin.io import safe_load
from ftsam_plugin.settings import MAX_CONFIG_NODES, SEED_MAX

from helpers import check_error, clone_record, cpu_yaml, make_attack_record, run_cli

FLAGS = ["--yaml_path", "cpu", "--device", "cpu", "--ratio", "0.5", "--batch_size", "8", "--num_workers", "0",
         "--epochs", "1"]
MAX_ERROR_LINE = 400  # characters: an error line quotes what was given, cut short


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return make_attack_record(tmp_path_factory.mktemp("hostile"), name="rec", n_per_class=4, epochs=1)


def defend(folder, *extra, flags=FLAGS):
    return run_cli(["defend", "--result_file", str(folder), *flags, *extra])


def no_output(folder):
    assert not (pathlib.Path(folder) / "defense").exists()


def out_of(folder):
    return pathlib.Path(folder) / "defense" / "ftsam"


# ---------------------------------------------------------------------------------------------- YAML and values


def write_yaml(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return str(path)


BOMB = "".join(f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9 if p else ['"lol"'] * 9) + "]\n"
               for p, c in zip(["", "a", "b", "c", "d", "e", "f"], "abcdefg"))


def test_alias_bomb_is_refused_quickly_and_quotes_nothing(record, tmp_path):
    folder = clone_record(record, "yaml_bomb")
    path = write_yaml(tmp_path, BOMB + "lr: *g\n")  # 9**7 = 4.8 million strings once expanded
    result = run_cli(["defend", "--result_file", str(folder), "--yaml_path", path, "--device", "cpu"])
    check_error(result, f"expands to more than {MAX_CONFIG_NODES} values through its aliases")
    assert len(result[2]) < MAX_ERROR_LINE and "lol" not in result[2]
    no_output(folder)
    # the same file for `ftsam attack`: refused before any folder exists
    result = run_cli(["attack", "--yaml_path", path, "--record_root", str(tmp_path / "records"),
                      "--save_folder_name", "x", "--device", "cpu"])
    check_error(result, "expands to more than")
    assert not (tmp_path / "records").exists()


def test_small_aliases_still_work_and_long_values_are_quoted_short(record, tmp_path):
    folder = clone_record(record, "yaml_alias_ok")
    text = cpu_yaml(lr="&base 0.02", wd="*base")  # a plain alias: fine
    assert defend(folder, "--yaml_path", write_yaml(tmp_path, text), flags=FLAGS[2:])[0] == 0
    # a bad value made long through aliases is quoted short
    big = "big: &m [" + ", ".join(['"' + "x" * 50 + '"'] * 20) + "]\n"  # an unknown key: ignored
    path = write_yaml(tmp_path, big + cpu_yaml(lr="[*m, *m, *m]"), "long.yaml")
    line = check_error(defend(clone_record(record, "yaml_long"), "--yaml_path", path, flags=FLAGS[2:]),
                       "lr must be a single value, got [[")
    assert len(line) < MAX_ERROR_LINE


@pytest.mark.parametrize("name,text,needle", [
    ("dup", "epochs: 3\nlr: 0.01\nepochs: 1\n", "gives key 'epochs' twice (lines 1 and 3); keep one"),
    ("utf8", b"epochs: 1\n# caf\xe9\n", "is not UTF-8 text (byte 0xe9 at offset 15); save it as UTF-8"),
    ("recursive", "lr: &a [1, *a]\n", "expands to more than"),
    ("toplist", "- epochs: 1\n", "must be a mapping of key: value"),
])
def test_yaml_file_problems(record, tmp_path, name, text, needle):
    folder = clone_record(record, f"yaml_{name}")
    check_error(run_cli(["defend", "--result_file", str(folder), "--yaml_path", write_yaml(tmp_path, text)]), needle)
    no_output(folder)


@pytest.mark.parametrize("key,value,needle", [
    ("epochs", ".inf", "epochs must be an integer >= 1, got inf"),
    ("epochs", "true", "epochs must be an integer >= 1, got True"),
    ("epochs", "1.9", "epochs must be an integer >= 1, got 1.9"),
    ("random_seed", ".inf", "random_seed must be an integer in [0, 4294967295], got inf"),
    ("random_seed", "-1", "random_seed must be an integer in [0, 4294967295], got -1"),
    ("random_seed", str(SEED_MAX + 1), f"got {SEED_MAX + 1}"),
    ("rho", ".nan", "rho must be a finite number > 0, got nan"),
    ("rho", ".inf", "rho must be a finite number > 0, got inf"),
    ("lr", ".nan", "lr must be a finite number in (0, 1000], got nan"),
    ("lr", ".inf", "lr must be a finite number in (0, 1000], got inf"),
    ("wd", ".nan", "wd must be a finite number >= 0, got nan"),
    ("sgd_momentum", ".inf", "sgd_momentum must be a finite number in [0, 1), got inf"),
    ("sgd_momentum", "5", "sgd_momentum must be a finite number in [0, 1), got 5"),
    ("eta", ".nan", "eta must be a finite number >= 0, got nan"),
    ("steplr_gamma", ".nan", "steplr_gamma must be a finite number in (0, 1], got nan"),
    ("ReduceLROnPlateau_factor", "2", "ReduceLROnPlateau_factor must be a finite number in (0, 1), got 2"),
    ("steplr_milestones", '"a,b"', "steplr_milestones must be increasing epoch numbers like 50,75"),
    ("steplr_milestones", "[1, x]", "got [1, 'x']"),
    ("label_smoothing", "true", "label_smoothing must be a finite number in [0, 1), got True"),
])
def test_bad_yaml_values(record, tmp_path, key, value, needle):
    folder = clone_record(record, f"val_{key}_{abs(hash(value))}")
    path = write_yaml(tmp_path, cpu_yaml(**{key: value}))
    line = check_error(defend(folder, "--yaml_path", path, flags=FLAGS[2:-2]), needle)
    assert f"fix --{key}" in line
    no_output(folder)


@pytest.mark.parametrize("flags,needle", [
    (["--rho", "nan"], "rho must be a finite number > 0, got nan"),
    (["--lr", "inf"], "lr must be a finite number in (0, 1000], got inf"),
    (["--random_seed", "-1"], "random_seed must be an integer in [0, 4294967295]"),
])
def test_bad_flag_values(record, flags, needle):
    folder = clone_record(record, "flag_" + "_".join(f.strip("-") for f in flags))
    check_error(defend(folder, *flags), needle)
    no_output(folder)


@pytest.mark.parametrize("flags,needle", [
    (["--patch_size", "0"], "patch_size must be an integer >= 1, got 0"),
    (["--patch_size", "100"], "--patch_size 100 is larger than the 32x32 images of cifar10; pass 1..32"),
    (["--width", "inf"], "width must be a finite number in (0, 16], got inf"),
    (["--random_seed", "-1"], "random_seed must be an integer in [0, 4294967295], got -1"),
    (["--lr", "nan"], "lr must be a finite number in (0, 1000], got nan"),
    (["--lr", "1e300"], "lr must be a finite number in (0, 1000], got 1e+300"),
    (["--sgd_momentum", "1"], "sgd_momentum must be a finite number in [0, 1), got 1.0"),
])
def test_attack_flags_checked_before_the_record_folder_exists(record, flags, needle):
    root = record.parent
    argv = ["attack", "--dataset_path", str(root.parent / "data"), "--record_root", str(root), "--device", "cpu",
            "--save_folder_name", "bad_attack", "--num_workers", "0", *flags]
    check_error(run_cli(argv), needle)
    assert not (root / "bad_attack").exists()  # the name stays free


# ---------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_poisoned_images_in_other_modes_are_converted_to_rgb(record, mode):
    folder = clone_record(record, f"mode_{mode}")
    for png in (folder / "bd_test_dataset").rglob("*.png"):
        Image.open(png).convert(mode).save(png)
    code, _, err = defend(folder)
    assert code == 0, err
    assert (out_of(folder) / "defense_result.pt").exists()


def _junk(path):
    path.write_bytes(b"this is not an image at all")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", [_junk, _truncate])
def test_bad_poisoned_image_fails_before_anything_is_written(record, damage):
    folder = clone_record(record, f"bad_poison_{damage.__name__}")
    victims = sorted((folder / "bd_test_dataset").rglob("*.png"))[:3]
    for victim in victims:
        damage(victim)
    check_error(defend(folder), f"3 of the 62 image files this run reads cannot be used (first: poisoned image "
                                f"{victims[0]}: ")
    no_output(folder)


@pytest.fixture()
def private_data(record, tmp_path):
    """A copy of the record's data, so clean images can be damaged without touching the shared copy."""
    data = tmp_path / "data"
    shutil.copytree(record.parent.parent / "data", data)
    return data


@pytest.mark.parametrize("split,name", [("train", "c03/0000.png"), ("test", "c07/0001.png")])
def test_bad_clean_image_fails_before_anything_is_written(record, private_data, split, name):
    folder = clone_record(record, f"bad_clean_{split}")
    victim = private_data / "cifar10" / split / name
    _truncate(victim)
    if split == "train":  # make sure the run trains on it: an --index file naming every image of class 3
        index = private_data / "index.txt"
        index.write_text("".join(f"{i}\n" for i in range(12, 16)))
        extra = ["--index", str(index)]
    else:
        extra = []
    line = check_error(defend(folder, "--dataset_path", str(private_data), *extra), "image files this run reads "
                       f"cannot be used (first: clean image {victim}: ")
    assert line.startswith("error: 1 of the ")
    no_output(folder)


def test_leaderboard_eval_and_norms_check_images_too(record, private_data, tmp_path):
    folder = clone_record(record, "bad_clean_eval")
    victim = private_data / "cifar10" / "test" / "c02" / "0000.png"
    _junk(victim)
    code, out, err = run_cli(["leaderboard", str(folder), "--source", "eval", "--dataset_path", str(private_data),
                              "--device", "cpu", "--out", str(tmp_path / "board")])
    assert code == 0 and "Traceback" not in err
    warnings = [line for line in err.splitlines() if line.strip()]
    assert len(warnings) == 1 and f"clean image {victim}: cannot identify image file" in warnings[0], err
    assert not (folder / "ftsam_eval.json").exists()  # nothing cached for a record that could not be evaluated
    result = run_cli(["norms", "--record", str(folder), "--dataset_path", str(private_data), "--device", "cpu",
                      "--num_samples", "30", "--out", str(tmp_path / "norms")])
    check_error(result, f"clean image {victim}: cannot identify image file")
    assert not (tmp_path / "norms").exists()


# ---------------------------------------------------------------------------------------------- finite weights


def _nan_weight(raw):
    key = next(k for k, v in raw["model"].items() if v.is_floating_point())
    raw["model"][key] = raw["model"][key].clone()
    raw["model"][key].view(-1)[0] = float("nan")


def test_record_with_nan_weights_is_refused(record):
    folder = clone_record(record, "nan_record", _nan_weight)
    check_error(defend(folder), "holds NaN or infinite weights (1 tensor(s), first: ")
    no_output(folder)


def test_checkpoint_with_nan_weights_or_a_bad_epoch_is_refused(record):
    folder = clone_record(record, "nan_ckpt")
    assert defend(folder, "--keep_checkpoint")[0] == 0
    out = out_of(folder)
    before = (out / "defense_result.pt").read_bytes()
    ckpt_path = out / "checkpoint" / "last.pt"
    good = safe_load(ckpt_path)
    for change, needle in ((lambda s: _nan_weight(s), "defense checkpoint"),
                           (lambda s: s.update(epoch=-3), "says it holds epoch -3, not one of this run's 1..1")):
        state = dict(good, model=dict(good["model"]))
        change(state)
        state["checksum"] = checksum({k: v for k, v in state.items() if k != "checksum"})  # sound, but wrong inside
        torch.save(state, ckpt_path)
        check_error(defend(folder, "--resume"), needle, whole=False)  # (after the run's log lines)
        assert (out / "defense_result.pt").read_bytes() == before


def test_attack_that_diverges_writes_no_record(record, monkeypatch):
    class DivergingSGD(torch.optim.SGD):  # a run whose weights blow up (as a too-large --lr does)
        def step(self, closure=None):
            out = super().step(closure)
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
            return out

    monkeypatch.setattr(torch.optim, "SGD", DivergingSGD)
    root = record.parent
    argv = ["attack", "--dataset_path", str(root.parent / "data"), "--record_root", str(root), "--device", "cpu",
            "--save_folder_name", "diverged", "--num_workers", "0", "--width", "0.125", "--epochs", "1",
            "--progress", "false"]
    check_error(run_cli(argv), "training diverged in epoch 1: the weights became NaN or infinite; lower --lr")
    assert not (root / "diverged" / "attack_result.pt").exists()


def test_a_model_with_nan_weights_is_never_saved(tmp_path):
    from ftsam_plugin.data.records import save_attack_result, save_defense_result
    from ftsam_plugin.errors import FtsamError

    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(FtsamError, match="holds NaN or infinite weights"):
        save_attack_result("preactresnet18", 10, model, "./data", (32, 32, 3), "cifar10", None, str(tmp_path))
    with pytest.raises(FtsamError, match="holds NaN or infinite weights"):
        save_defense_result("preactresnet18", 10, model, str(tmp_path))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- confinement


def _plant(tmp_path, folder):
    """A folder outside the record, named like the record's own, with junk 'images' at the record's entry paths."""
    planted = tmp_path / "elsewhere" / "bd_test_dataset"
    for png in (folder / "bd_test_dataset").rglob("*.png"):
        target = planted / png.parent.name / png.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"planted")
    return planted


@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_poisoned_image_folder_outside_the_record_is_never_read(record, tmp_path, how):
    folder = clone_record(record, f"confine_{how}")
    planted = _plant(tmp_path, folder)
    stored = str(planted) if how == "absolute" else os.path.relpath(planted, folder.parent.parent)

    def point_outside(raw):
        raw["bd_test"]["save_folder_path"] = raw["bd_test"]["bd_data_container"]["save_folder_path"] = stored

    raw = safe_load(folder / "attack_result.pt")
    point_outside(raw)
    torch.save(raw, folder / "attack_result.pt")
    # the record's own bd_test_dataset is used (the planted junk would fail the image check)
    code, _, err = defend(folder)
    assert code == 0, err
    # without its own folder the record cannot be read: an error naming the stored path, not the planted files
    shutil.rmtree(folder / "bd_test_dataset")
    shutil.rmtree(folder / "defense")
    check_error(defend(folder), f"poisoned-image folder {stored} not found inside the record folder {folder}")
    no_output(folder)


def test_record_folder_of_symlinks_to_another_record_works(record, tmp_path):
    """As the CPU benchmark's per-run folders: every entry a symlink to the original record's files."""
    folder = clone_record(record, "symlink_source")
    run = tmp_path / "runs" / "one" / "rec"
    run.mkdir(parents=True)
    for entry in folder.iterdir():
        os.symlink(entry.resolve(), run / entry.name)
    code, _, err = defend(run, "--dataset_path", str(record.parent.parent / "data"))
    assert code == 0, err
    assert (run / "defense" / "ftsam" / "defense_result.pt").exists() and not (folder / "defense").exists()


# ---------------------------------------------------------------------------------------------- minor


def test_index_file_with_duplicates_or_empty(record, tmp_path):
    folder = clone_record(record, "index_bad")
    dup = tmp_path / "dup.txt"
    dup.write_text("1\n2\n5\n2\n")
    check_error(defend(folder, "--index", str(dup)), f"index file {dup} lists index 2 more than once")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    check_error(defend(folder, "--index", str(empty)), f"index file {empty} is empty; fix --index")  # one line only
    no_output(folder)


def test_leaderboard_follows_symlinked_records_and_survives_huge_csv_fields(record, tmp_path):
    folder = clone_record(record, "board_src")
    assert defend(folder)[0] == 0
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(folder, root / "linked")
    summary = folder / "defense" / "ftsam" / "ftsam_df_summary.csv"
    summary.write_text(summary.read_text().replace("last", "last" + "x" * 200_000, 1))  # a 200 KB field
    code, out, err = run_cli(["leaderboard", str(root), "--device", "cpu", "--out", str(tmp_path / "board")])
    assert code == 0, err
    assert "Traceback" not in err
    metrics_table = out.split("### Time to purify")[0]  # (the time-to-purify table below it names the record too)
    rows = [line for line in metrics_table.splitlines() if line.startswith("| linked")]
    assert len(rows) == 1 and rows[0].count("—") == 0, out  # the symlinked record, both cells filled (by eval)


def test_quote_cuts_long_values():
    from ftsam_plugin.settings import quote

    assert len(quote("x" * 10_000)) <= 100 and len(quote([["x" * 50] * 20] * 3)) <= 100
    assert quote(float("nan")) == "nan" and quote("ab") == "'ab'"


# ---------------------------------------------------------------------------------------------- one writer


def test_two_attacks_on_one_record_name(record, tmp_path):
    """Two real processes: the second `ftsam attack` on a name fails at once naming the first; SIGTERM stops the
    first with exit 143 and no temp file left; the unfinished record then keeps its name, saying so."""
    from ftsam_plugin.lock import FolderLock

    root = tmp_path / "records"
    argv = [sys.executable, "-m", "ftsam_plugin", "attack", "--dataset_path", str(record.parent.parent / "data"),
            "--record_root", str(root), "--save_folder_name", "same", "--device", "cpu", "--num_workers", "0",
            "--width", "0.125", "--epochs", "500", "--batch_size", "8", "--progress", "false"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = FolderLock(root / "same")
        deadline = time.monotonic() + 240
        while lock.holder() is None:
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first attack never took its record folder"
            time.sleep(0.05)
        second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)
    finally:
        first.send_signal(signal.SIGTERM)
        _, first_err = first.communicate(timeout=120)
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert lines[0].startswith(f"error: record folder {root / 'same'} is in use by another run (PID {first.pid}, "
                               f"started "), lines
    assert first.returncode == 143, first_err
    assert first_err.strip().splitlines()[-1] == "interrupted: stopped by SIGTERM"
    assert not list((root / "same").rglob("*.tmp")) and not (root / "same" / "attack_result.pt").exists()
    check_error(run_cli(argv[3:]), f"record folder {root / 'same'} already exists (an unfinished record: no "
                                   f"attack_result.pt); choose another --save_folder_name or remove it")


def test_leaderboard_does_not_write_its_cache_into_a_folder_in_use(record, tmp_path):
    from ftsam_plugin.lock import FolderLock

    folder = clone_record(record, "board_locked")
    stale = folder / ".ftsam_eval.json.abcdefgh.tmp"  # left by a leaderboard killed mid-write
    stale.write_text("{")
    os.utime(stale, (time.time() - 3600,) * 2)
    argv = ["leaderboard", str(folder), "--source", "eval", "--device", "cpu", "--out", str(tmp_path / "board")]
    with FolderLock(folder, what="result folder"):  # as a run writing there would
        code, out, err = run_cli(argv)
    assert code == 0 and "Traceback" not in err, err
    assert f"warning: cache not written: result folder {folder} is in use by another run (PID {os.getpid()}" in err
    assert "| board_locked |" in out and not (folder / "ftsam_eval.json").exists() and stale.exists()
    code, _, err = run_cli(argv)  # free again: cached, the stale temp file removed
    assert code == 0 and (folder / "ftsam_eval.json").exists() and not stale.exists(), err


# ---------------------------------------------------------------------------------------------- resume identity


def test_resume_refuses_other_data(record, private_data):
    folder = clone_record(record, "identity")
    data_flag = ["--dataset_path", str(private_data)]
    assert defend(folder, *data_flag, "--keep_checkpoint")[0] == 0
    out = out_of(folder)
    before = (out / "defense_result.pt").read_bytes()
    ckpt = out / "checkpoint" / "last.pt"
    # another copy of the data, every pixel inverted, same counts and names
    inverted = private_data.parent / "inverted"
    shutil.copytree(private_data, inverted)
    for png in inverted.rglob("*.png"):
        Image.fromarray(255 - np.asarray(Image.open(png).convert("RGB"))).save(png)
    check_error(defend(folder, "--dataset_path", str(inverted), "--resume"),
                f"checkpoint {ckpt} was made on other data: the data came from {private_data / 'cifar10'}, now from "
                f"{inverted / 'cifar10'}; use the same data (--dataset_path) or run without --resume", whole=False)
    # the same folder with two class folders swapped in place
    train = private_data / "cifar10" / "train"
    os.rename(train / "c03", train / "tmp")
    os.rename(train / "c05", train / "c03")
    os.rename(train / "tmp", train / "c05")
    line = check_error(defend(folder, *data_flag, "--resume"), "was made on other data: the content of 4 clean "
                       "training image(s) changed (first: train/c03/", whole=False)
    assert (out / "defense_result.pt").read_bytes() == before and line
