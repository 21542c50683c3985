"""`ftsam attack` with BackdoorBench's trigger code against BackdoorBench itself (needs BACKDOORBENCH_ROOT).

Both sides poison the same real CIFAR-10 images (the first 10 train / 3 test images of each class in
../shared/data/cifar10-jpeg.tar.xz; class-tinted noise when the archive is absent): `ftsam attack` writes a record,
BackdoorBench's own attack class runs its stage1 (tests/bb_attacks.py). Indices, labels and every poisoned image
must be equal, byte for byte. Both run in subprocesses: importing BackdoorBench puts its `utils`/`models` packages
into sys.modules, which must not leak into the other tests.
"""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import make_gtsrb_folder, make_image_folder

BB_ROOT = os.environ.get("BACKDOORBENCH_ROOT")
pytestmark = pytest.mark.skipif(not BB_ROOT, reason="BACKDOORBENCH_ROOT is not set")

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"
N_TRAIN, N_TEST = 10, 3  # images per class
SEED, TARGET = 3, 2
BB = ["--trigger_from", "backdoorbench"]
# attack -> (BackdoorBench's module, class, attack YAML folder, pratio, `ftsam attack` flags choosing it)
CASES = {
    "lf": ("attack.lf", "LowFrequency", "lf", 0.1, ["--attack", "lf"]),
    "sig": ("attack.sig", "SIG", "sig", 0.05, ["--attack", "sig"]),
    "blended": ("attack.blended", "Blended", "blended", 0.1, ["--attack", "blended", *BB]),
    "badnet": ("attack.badnet", "BadNet", "badnet", 0.1, ["--attack", "badnet", *BB]),
    "ctrl": ("attack.ctrl", "ctrl", "ctrl", 0.05, ["--attack", "ctrl"]),
    "ftrojann": ("attack.ftrojann", "Ftrojann", "ftrojannn", 0.1, ["--attack", "ftrojann"]),
}
CLEAN_LABEL = ("sig", "ctrl")
OURS = r'''
import json, sys
from ftsam_plugin.cli import main
for argv in json.loads(sys.argv[1]):
    code = main(argv)
    if code:
        sys.exit(f"ftsam {' '.join(argv)} exited {code}")
'''


def _env(**extra):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(BB_ROOT).resolve()), str(REPO)])
    return env


def _run(args, cwd, timeout=900):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=str(cwd), env=_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _real_cifar(dest: Path) -> Path:
    """The first N_TRAIN / N_TEST images of each class from the shared archive (else synthetic): dest/cifar10."""
    data = dest / "cifar10"
    if not ARCHIVE.is_file():
        return make_image_folder(data, n_per_class=N_TRAIN, n_test_per_class=N_TEST, ext="png")
    with tarfile.open(ARCHIVE) as tar:
        for member in tar:  # cifar10-jpeg/<split>/<class>/NNNN.jpg
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 4 and int(parts[3][:4]) < (N_TRAIN if parts[1] == "train"
                                                                              else N_TEST):
                target = data.joinpath(*parts[1:])
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    return data


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """{attack: (our record folder, BackdoorBench's stage1 npz)} for every case, and the data folder."""
    root = tmp_path_factory.mktemp("bb_attacks")
    data = _real_cifar(root / "data")
    argvs, jobs = [], []
    for name, (module, cls, folder, pratio, flags) in CASES.items():
        common = ["--pratio", str(pratio), "--attack_target", str(TARGET), "--random_seed", str(SEED),
                  "--dataset", "cifar10", "--model", "preactresnet18"]
        argvs.append(["attack", *flags, *common, "--dataset_path", str(data), "--width", "0.125", "--epochs", "1",
                      "--batch_size", "32", "--device", "cpu", "--num_workers", "0", "--progress", "False",
                      "--record_root", str(root / "record"), "--save_folder_name", name])
        jobs.append({"out": str(root / f"bb_{name}.npz"), "work_dir": str(root / "bb_work" / name), "module": module,
                     "cls": cls, "argv": ["--yaml_path", "./config/attack/prototype/cifar10.yaml", "--bd_yaml_path",
                                          f"./config/attack/{folder}/default.yaml", *common]})
    _run(["-c", OURS, json.dumps(argvs)], cwd=root)
    (root / "jobs.json").write_text(json.dumps({"data_dir": str(data), "jobs": jobs}))
    _run([REPO / "tests" / "bb_attacks.py", "stage1", root / "jobs.json"], cwd=BB_ROOT)
    return {name: (root / "record" / name, np.load(root / f"bb_{name}.npz")) for name in CASES}, data


def _ours(record: Path) -> dict:
    """Our record's poisoned samples in tests/bb_attacks.py's layout (images read from its PNG files)."""
    from ftsam_plugin.io import safe_load

    raw = safe_load(record / "attack_result.pt", what="attack result")
    out = {"train_indicator": np.asarray(raw["bd_train"]["poison_indicator"]),
           "test_order": np.asarray(raw["bd_test"]["original_index_array"])}
    for split in ("train", "test"):
        entries = raw[f"bd_{split}"]["bd_data_container"]["data_dict"]
        indices = sorted(int(i) for i in entries)
        out[f"{split}_indices"] = np.array(indices, dtype=np.int64)
        out[f"{split}_bd_labels"] = np.array([entries[i]["other_info"][0] for i in indices], dtype=np.int64)
        out[f"{split}_orig_labels"] = np.array([entries[i]["other_info"][1] for i in indices], dtype=np.int64)
        out[f"{split}_images"] = np.stack([
            np.asarray(Image.open(record / f"bd_{split}_dataset" / str(entries[i]["other_info"][1]) / f"{i}.png")
                       .convert("RGB")) for i in indices])
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_poisoned_images_equal_backdoorbench_byte_for_byte(both, name):
    from ftsam_plugin.data.datasets import build_clean_datasets

    records, data = both
    record, bb = records[name]
    ours = _ours(record)
    assert sorted(ours) == sorted(k for k in bb.files)
    for key in sorted(ours):
        np.testing.assert_array_equal(ours[key], bb[key], err_msg=f"{name}: {key}")
    assert len(ours["train_indices"]) == round(CASES[name][3] * 10 * N_TRAIN)
    assert set(ours["test_bd_labels"]) == {TARGET} and TARGET not in set(ours["test_orig_labels"])
    train, _ = build_clean_datasets("cifar10", data)
    clean = np.stack([np.asarray(train[int(i)][0]) for i in ours["train_indices"]])
    assert (clean != ours["train_images"]).reshape(len(clean), -1).any(axis=1).all()  # the trigger is there


@pytest.mark.parametrize("name", CLEAN_LABEL)
def test_clean_label_poisons_only_target_class_images(both, name):
    records, _ = both
    ours = _ours(records[name][0])
    assert len(ours["train_indices"]) == round(CASES[name][3] * 10 * N_TRAIN) < N_TRAIN  # a draw from the class
    assert set(ours["train_orig_labels"]) == {TARGET} and set(ours["train_bd_labels"]) == {TARGET}


def test_record_names_its_trigger_source(both):
    from ftsam_plugin.io import safe_load

    records, _ = both
    info = {name: safe_load(records[name][0] / "info.pickle", what="info") for name in ("lf", "sig", "blended")}
    assert info["lf"]["trigger_from"] == "backdoorbench"
    assert info["lf"]["trigger_source"].startswith("backdoorbench ")
    assert "resource/lowFrequency/cifar10_preactresnet18_0_255.npy sha256:" in info["lf"]["trigger_source"]
    assert "resource/blended/hello_kitty.jpeg sha256:" in info["blended"]["trigger_source"]
    assert "attack=sig" in info["sig"]["trigger_source"] and "sig_f=6" in info["sig"]["trigger_settings"]


def test_backdoorbench_loader_reads_our_lf(tmp_path):
    """A record made by `ftsam attack --attack lf` through BackdoorBench's own load_attack_result: it rebuilds what our
    reader does. Its loader reads torchvision's CIFAR-10 files only (md5-checked), so this record is GTSRB, with
    BackdoorBench's GTSRB pattern (resource/lowFrequency/gtsrb_preactresnet18_0_255.npy). (No 'record' in the test's
    name: BackdoorBench cuts the path at the first 'record' in it.)"""
    from ftsam_plugin.data import load_attack_result

    make_gtsrb_folder(tmp_path / "data" / "gtsrb", n_train_per_class=2, n_test=43)
    argv = ["attack", "--attack", "lf", "--dataset", "gtsrb", "--dataset_path", "./data", "--model",
            "preactresnet18", "--width", "0.125", "--epochs", "1", "--batch_size", "32", "--device", "cpu",
            "--num_workers", "0", "--progress", "False", "--record_root", "./record", "--save_folder_name", "lf"]
    _run(["-c", OURS, json.dumps([argv])], cwd=tmp_path)
    record = tmp_path / "record" / "lf"
    _run([REPO / "tests" / "bb_attacks.py", "load", tmp_path / "bb.npz", record / "attack_result.pt"], cwd=tmp_path)
    bb = np.load(tmp_path / "bb.npz")
    assert list(bb["lens"]) == [86, 43, 86, 42]
    ours = _ours(record)
    result = load_attack_result(record, use_backdoorbench=False)
    assert [len(result[k]) for k in ("clean_train", "clean_test", "bd_train", "bd_test")] == list(bb["lens"])
    for key in ("train_indices", "train_bd_labels", "train_orig_labels", "train_images", "test_indices",
                "test_bd_labels", "test_orig_labels", "test_images", "test_order"):
        np.testing.assert_array_equal(ours[key], bb[key], err_msg=key)


def test_ssba_says_which_file_is_missing(tmp_path):
    from helpers import check_error

    make_image_folder(tmp_path / "data" / "cifar10", n_per_class=1, classes=10)
    proc = subprocess.run([sys.executable, "-m", "ftsam_plugin", "attack", "--attack", "ssba", "--dataset_path",
                           str(tmp_path / "data"), "--record_root", str(tmp_path / "record"), "--device", "cpu"],
                          cwd=str(tmp_path), env=_env(), capture_output=True, text=True, timeout=600)
    check_error((proc.returncode, proc.stdout, proc.stderr),
                "BackdoorBench's ssba needs resource/ssba/cifar10_ssba_test_b1.npy (attack_test_replace_imgs_path), "
                "which is not in")
    assert not (tmp_path / "record").exists()
