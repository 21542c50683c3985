"""`ftsam defend` on bad inputs and untrusted files: one `error:` line, exit code 2, no traceback, no partial output.

Every case runs through the `ftsam` command (ftsam_plugin.cli.main, in-process) on copies of one tiny record whose
class 9 has only 2 training images (so a class-balanced subset can be made impossible).
"""

import errno
import logging
import os
import pathlib
import shutil

import pytest
import torch

from ftsam_plugin.defense.config import packaged_config
from ftsam_plugin.defense.ftsam import FTSAM
from ftsam_plugin.io import safe_load

from helpers import Evil, check_error, clone_record, make_attack_record, make_image_folder, run_cli

FLAGS = ["--yaml_path", "cpu", "--device", "cpu", "--ratio", "0.6", "--batch_size", "8", "--num_workers", "0"]


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    data = make_image_folder(root / "data" / "cifar10", n_per_class=4, classes=10, n_test_per_class=2)
    for name in ("0002.png", "0003.png"):
        os.remove(data / "train" / "c09" / name)  # class 9: 2 training images, the others 4
    return make_attack_record(root, name="rec", n_per_class=4, epochs=1)


def clone(record, name, mutate=None):
    return clone_record(record, name, mutate)


def defend(folder, *extra):
    return run_cli(["defend", "--result_file", str(folder), *FLAGS, *extra])


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in pathlib.Path(folder).rglob("*") if p.is_file())


def no_output(folder):
    assert not (pathlib.Path(folder) / "defense").exists(), files_under(folder)


# ---------------------------------------------------------------------------------------------- the record


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("case,needle", [
    ("no_folder", "record folder '{folder}' does not exist"),
    ("no_file", "no attack_result.pt in record folder '{folder}' (did the attack finish?)"),
    ("empty", "is empty (0 bytes)"),
    ("truncated", "is truncated or corrupt"),
    ("not_torch", "is not a torch file (it starts with b'mode')"),
])
def test_broken_attack_result_file(record, case, needle):
    folder = clone(record, f"file_{case}")
    pt = folder / "attack_result.pt"
    if case == "no_folder":
        shutil.rmtree(folder)
    elif case == "no_file":
        pt.unlink()
    elif case == "empty":
        pt.write_bytes(b"")
    elif case == "truncated":
        _truncate(pt)
    else:
        pt.write_text("model_name: preactresnet18\n")
    line = check_error(defend(folder), needle.format(folder=folder))
    assert ("re-create" in line) or ("pass" in line)  # names the fix
    if folder.exists():
        no_output(folder)


def _slice_classifier(raw):
    key = [k for k in raw["model"] if k.endswith("weight")][-1]
    bias = key[: -len("weight")] + "bias"
    raw["model"][key], raw["model"][bias] = raw["model"][key][:7], raw["model"][bias][:7]


@pytest.mark.parametrize("name,mutate,needle", [
    ("keys", lambda raw: raw.pop("bd_test"), "missing keys ['bd_test']"),
    ("model", lambda raw: raw.update(model_name="foonet"), "unknown model 'foonet'; known: "),
    ("ncls_data", lambda raw: raw.update(num_classes=7), "num_classes=7 but cifar10 has 10 classes"),
    ("ncls_weights", _slice_classifier, "(the weights have 7 classes)"),
    ("width", lambda raw: raw.update(width=0.25), "do not fit model preactresnet18 (num_classes 10, width 0.25)"),
])
def test_bad_record_contents(record, name, mutate, needle):
    folder = clone(record, f"raw_{name}", mutate)
    check_error(defend(folder), needle)
    no_output(folder)


def test_dataset_missing_or_incomplete(record, tmp_path):
    folder = clone(record, "data_bad")
    check_error(defend(folder, "--dataset_path", str(tmp_path / "nowhere")), "no cifar10 data found")
    data = tmp_path / "partial"
    shutil.copytree(record.parent.parent / "data", data)
    shutil.rmtree(data / "cifar10" / "test")
    check_error(defend(folder, "--dataset_path", str(data)), "no cifar10 data found")
    shutil.copytree(record.parent.parent / "data" / "cifar10" / "test", data / "cifar10" / "test")
    os.remove(data / "cifar10" / "test" / "c04" / "0001.png")
    check_error(defend(folder, "--dataset_path", str(data)), "clean data has 19; point dataset_path at")
    no_output(folder)


def test_poisoned_images_missing(record):
    folder = clone(record, "bd_missing")
    victim = sorted((folder / "bd_test_dataset").rglob("*.png"))[0]
    victim.unlink()
    check_error(defend(folder), f"1 of the 62 image files this run reads cannot be used (first: poisoned image "
                                 f"{victim}: missing); restore the record's bd_*_dataset folders")
    no_output(folder)


# ---------------------------------------------------------------------------------------------- the config


def test_yaml_that_does_not_parse(record, tmp_path):
    folder = clone(record, "yaml_bad")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    check_error(run_cli(["defend", "--result_file", str(folder), "--yaml_path", str(bad)]), "is not valid YAML (line 2)")
    no_output(folder)


def test_unknown_yaml_keys_are_named_in_a_warning(record, tmp_path, caplog):
    folder = clone(record, "yaml_unknown")
    path = tmp_path / "extra.yaml"
    path.write_text(packaged_config("cpu").read_text() + "\nrhoo: 3\nfoo_bar: 1\n")
    with caplog.at_level(logging.WARNING, logger="ftsam_plugin"):
        result = run_cli(["defend", "--result_file", str(folder), "--yaml_path", str(path), "--rho", "0"])
    check_error(result, "rho must be a finite number > 0")
    assert "unknown keys ignored: foo_bar, rhoo" in caplog.text
    no_output(folder)


@pytest.mark.parametrize("flags,needle", [
    (["--rho", "0"], "rho must be a finite number > 0, got 0.0; fix --rho"),
    (["--rho", "-2"], "rho must be a finite number > 0"),
    (["--ratio", "0"], "ratio must be a finite number in (0, 1], got 0.0; fix --ratio"),
    (["--ratio", "1.5"], "ratio must be a finite number in (0, 1]"),
    (["--epochs", "0"], "epochs must be an integer >= 1, got 0; fix --epochs"),
    (["--batch_size", "0"], "batch_size must be an integer >= 1, got 0; fix --batch_size"),
    (["--device", "tpu9"], "unknown device 'tpu9'; use --device cpu"),
    (["--device", "cuda:57"], "'cuda:57'"),
    (["--lr_scheduler", "cosine"], "unknown lr_scheduler 'cosine'; use one of CosineAnnealingLR, ReduceLROnPlateau, "
                                   "StepLR, MultiStepLR, none"),
    (["--client_optimizer", "rmsprop"], "unknown client_optimizer 'rmsprop'; use one of sgd, adam, adamw"),
    (["--sgd_momentum", "-0.9"], "sgd_momentum must be a finite number in [0, 1), got -0.9; fix --sgd_momentum"),
    (["--wd=-1e-4"], "wd must be a finite number >= 0, got -0.0001; fix --wd"),
    (["--ratio", "0.9"], "class 9 has 2 training samples, fewer than the 3 a class-balanced subset needs; lower --ratio"),
])
def test_bad_values(record, flags, needle):
    folder = clone(record, "values_" + "_".join(f.strip("-").replace(":", "") for f in flags))
    check_error(defend(folder, *flags), needle)
    no_output(folder)


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def done(record):
    """A finished 1-epoch run (checkpoint and defense result present)."""
    folder = clone(record, "done")
    code, _, err = defend(folder, "--epochs", "1", "--keep_checkpoint")
    assert code == 0, err
    return folder


def copy_done(done, name):
    target = done.parent / name
    shutil.copytree(done, target)
    return target, target / "defense" / "ftsam"


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(record, monkeypatch):
    folder = clone(record, "nan_loss")
    original = FTSAM.train_step

    def train_step(self, model, x, y):
        loss, logits = original(self, model, x, y)
        return (loss * float("nan") if self.args.epochs == 2 and getattr(self, "_last_checkpoint", 0) == 1 else loss,
                logits)

    monkeypatch.setattr(FTSAM, "train_step", train_step)
    line = check_error(defend(folder, "--epochs", "2"), "non-finite loss at epoch 2 step 1; stopped", whole=False)
    assert "the last good checkpoint (epoch 1) is kept in" in line and "lower --lr or --rho" in line
    out = folder / "defense" / "ftsam"
    ckpt = safe_load(out / "checkpoint" / "last.pt", what="checkpoint")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (out / "defense_result.pt").exists()
    assert not [f for f in files_under(out) if f.endswith(".tmp")]


def test_non_finite_weights_are_never_checkpointed(record, monkeypatch):
    folder = clone(record, "nan_weights")
    original = FTSAM.train_step

    def train_step(self, model, x, y):
        out = original(self, model, x, y)
        if x.shape[0] < self.args.batch_size:  # the last (short) step of epoch 1: loss finite, weights not
            with torch.no_grad():
                next(model.parameters()).fill_(float("inf"))
        return out

    monkeypatch.setattr(FTSAM, "train_step", train_step)
    line = check_error(defend(folder, "--epochs", "2"), "non-finite weights at epoch 1 step 3 (its last)", whole=False)
    assert "no checkpoint was written" in line
    out = folder / "defense" / "ftsam"
    assert not (out / "checkpoint" / "last.pt").exists() and not (out / "defense_result.pt").exists()


def test_output_folder_cannot_be_created(record):
    folder = clone(record, "out_blocked")
    (folder / "defense").write_text("a file where the output folder should be")
    check_error(defend(folder), "cannot create output folder")
    assert (folder / "defense").read_text().startswith("a file")


def test_disk_full_while_writing_the_result_keeps_the_previous_one(done, monkeypatch):
    folder, out = copy_done(done, "disk_full")
    before = (out / "defense_result.pt").read_bytes()
    real_save = torch.save

    def save(obj, handle, *args, **kwargs):
        if isinstance(obj, dict) and set(obj) == {"model_name", "num_classes", "model"}:  # the defense result
            handle.write(b"PK\x03\x04 half a zip")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    # the run is finished, so --resume only rewrites the outputs: the write of defense_result.pt fails
    line = check_error(defend(folder, "--epochs", "1", "--resume"), "No space left on device", whole=False)
    assert "defense_result.pt" in line and "free space" in line
    assert (out / "defense_result.pt").read_bytes() == before
    assert not [f for f in files_under(out) if f.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------- untrusted files


def test_attack_result_with_code_is_refused(record, tmp_path):
    marker = tmp_path / "ran"

    def plant(raw):
        raw["model"] = Evil(marker)

    folder = clone(record, "evil_attack", plant)
    check_error(defend(folder), "it was refused and not executed")
    assert not marker.exists()
    no_output(folder)


def test_checkpoint_with_code_is_refused(done, tmp_path):
    marker = tmp_path / "ran"
    folder, out = copy_done(done, "evil_checkpoint")
    result_before = (out / "defense_result.pt").read_bytes()
    torch.save({"format": "ftsam-defense-checkpoint", "epoch": 1, "model": Evil(marker)}, out / "checkpoint" / "last.pt")
    line = check_error(defend(folder, "--epochs", "1", "--resume"), "it was refused and not executed", whole=False)
    assert "defense checkpoint" in line
    assert not marker.exists()
    assert (out / "defense_result.pt").read_bytes() == result_before


def test_defense_result_with_code_is_refused(done, tmp_path):
    marker = tmp_path / "ran"
    folder, out = copy_done(done, "evil_result")
    torch.save({"model_name": "preactresnet18", "num_classes": 10, "model": Evil(marker)}, out / "defense_result.pt")
    result = run_cli(["norms", "--record", str(folder), "--result", str(out / "defense_result.pt"),
                      "--device", "cpu", "--num_samples", "4", "--out", str(tmp_path / "norms")])
    line = check_error(result, "it was refused and not executed", whole=False)
    assert "defense result" in line
    assert not marker.exists()


def test_error_from_a_dataloader_worker_is_still_one_line():
    from torch._utils import ExceptionWrapper

    from ftsam_plugin.cli import one_line
    from ftsam_plugin.errors import FtsamError

    try:
        raise FtsamError("poisoned image x.png is missing; the record folder is incomplete")
    except FtsamError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(FtsamError) as info:
        wrapped.reraise()  # what DataLoader does: the message now holds the worker's traceback
    assert "Traceback" in str(info.value)
    assert one_line(info.value) == "poisoned image x.png is missing; the record folder is incomplete"
