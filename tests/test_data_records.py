"""Attack records written by `ftsam attack` read back identically; safe loading; defense results; metric CSVs."""

import csv
import os
import pathlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ftsam_plugin.data import load_attack_result, save_defense_result
from ftsam_plugin.data.datasets import build_clean_datasets
from ftsam_plugin.data.records import summarize_metrics, write_metrics_csv, write_metrics_summary_csv
from ftsam_plugin.errors import FtsamError
from ftsam_plugin.models import create_model
from helpers import make_attack_record

KEYS = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test")


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    return make_attack_record(root, name="badnet_tiny", attack="badnet")


def _raw(record):
    return torch.load(record / "attack_result.pt", weights_only=False)  # trusted: written by this test


def test_file_has_backdoorbench_keys_and_state_layout(record):
    raw = _raw(record)
    assert set(KEYS) <= set(raw) and raw["width"] == 0.125
    assert raw["data_path"] == "./data/cifar10" and raw["img_size"] == (32, 32, 3) and raw["clean_data"] == "cifar10"
    state = raw["bd_train"]
    assert state["save_folder_path"] == "./record/badnet_tiny/bd_train_dataset"
    assert state["getitem_all"] is True and state["getitem_all_switch"] is False
    assert len(state["poison_indicator"]) == 200 and state["poison_indicator"].sum() == 20  # round(0.1 * 200)
    for idx, entry in state["bd_data_container"]["data_dict"].items():
        assert entry["path"] == f"./record/badnet_tiny/bd_train_dataset/{entry['other_info'][1]}/{idx}.png"
        assert entry["other_info"][0] == 0 and (record / "bd_train_dataset" / str(entry["other_info"][1]) / f"{idx}.png").is_file()
    assert not any(k.startswith("module.") for k in raw["model"])


def test_reads_back_identically(record):
    result = load_attack_result(record)
    raw = _raw(record)
    train, test = build_clean_datasets("cifar10", record.parent.parent / "data" / "cifar10")
    assert result["loader"] == "ftsam" and result["num_classes"] == 10 and result["width"] == 0.125
    assert len(result["clean_train"]) == 200 and len(result["clean_test"]) == 100 and len(result["bd_train"]) == 200
    # bd test = every non-target test sample, in order, BadNets patch on the raw image
    expected_idx = [i for i, t in enumerate(test.targets) if t != 0]
    bd_test = result["bd_test"].wrapped_dataset
    assert len(bd_test) == len(expected_idx) == 90
    for pos in (0, 7, 89):
        img, label, idx, flag, orig = bd_test[pos]
        assert (label, idx, flag, orig) == (0, expected_idx[pos], 1, test.targets[expected_idx[pos]])
        clean = np.asarray(test[idx][0]).copy()
        clean[-3:, -3:] = 255
        assert np.array_equal(np.asarray(img), clean)
    bd_train = result["bd_train"].wrapped_dataset
    poisoned = np.flatnonzero(raw["bd_train"]["poison_indicator"])
    for i in range(200):
        _, label, idx, flag, orig = bd_train[i]
        assert (idx, flag, orig) == (i, int(i in poisoned), train.targets[i]) and label == (0 if flag else orig)
    # the RA view carries the original labels
    assert result["bd_test"].with_original_labels()[3][1] == test.targets[expected_idx[3]]
    # the model: same outputs as one built from the stored state dict
    ref = create_model("preactresnet18", 10, image_size=32, width=0.125)
    ref.load_state_dict(raw["model"])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(result["model"](x), ref.eval()(x), rtol=0, atol=0)
    x_t = result["bd_test"][0][0]
    assert x_t.shape == (3, 32, 32)  # the test transform is applied


def test_dataset_path_override_and_moved_record(record, tmp_path):
    moved = tmp_path / "elsewhere" / "my_record"
    shutil.copytree(record, moved)
    with pytest.raises(FtsamError, match="not found"):
        load_attack_result(moved)
    result = load_attack_result(moved / "attack_result.pt", dataset_path=str(record.parent.parent / "data"))
    original = load_attack_result(record)
    assert len(result["bd_test"]) == len(original["bd_test"])
    a, b = result["bd_test"].wrapped_dataset[5], original["bd_test"].wrapped_dataset[5]
    assert a[1:] == b[1:] and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    rec = tmp_path / "record" / "evil"
    rec.mkdir(parents=True)
    torch.save({k: Evil() if k == "model" else None for k in KEYS}, rec / "attack_result.pt")
    with pytest.raises(FtsamError, match="refused"):
        load_attack_result(rec)
    assert not marker.exists()


def test_not_an_attack_result(tmp_path):
    torch.save({"model_name": "x"}, tmp_path / "attack_result.pt")
    with pytest.raises(FtsamError, match="missing keys"):
        load_attack_result(tmp_path)


def test_save_defense_result_strips_module_prefix(tmp_path):
    model = torch.nn.DataParallel(torch.nn.Linear(3, 2))
    path = save_defense_result("preactresnet18", 10, model, str(tmp_path / "d"))
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"model_name", "num_classes", "model"}
    assert set(saved["model"]) == {"weight", "bias"} and saved["model"]["weight"].device.type == "cpu"
    assert not [p for p in os.listdir(tmp_path / "d") if p.endswith(".tmp")]


def test_metric_csvs_follow_backdoorbench(tmp_path):
    rows = [{"test_acc": 0.5, "test_asr": 0.9, "test_ra": None},
            {"test_acc": 0.7, "test_asr": float("nan"), "test_ra": 0.1},
            {"test_acc": 0.6, "test_asr": 0.2, "test_ra": 0.05}]
    write_metrics_csv(tmp_path / "d-sam_df.csv", rows)
    write_metrics_summary_csv(tmp_path / "d-sam_df_summary.csv", rows)
    with open(tmp_path / "d-sam_df.csv") as f:
        table = list(csv.reader(f))
    assert table[0] == ["", "test_acc", "test_asr", "test_ra"]
    assert table[1] == ["0", "0.5", "0.9", ""] and table[2] == ["1", "0.7", "nan_value", "0.1"]
    with open(tmp_path / "d-sam_df_summary.csv") as f:
        summary = {r[0]: r[1:] for r in csv.reader(f)}
    assert summary["last"] == ["0.6", "0.2", "0.05"]
    assert summary["valid_max"] == ["0.7", "0.9", "0.1"]
    assert summary["exist_nan_value"] == ["False", "True", "False"]
    assert summarize_metrics(rows)["valid_max"]["test_asr"] == 0.9


@pytest.fixture
def failing_backdoorbench(tmp_path, monkeypatch):
    """A stand-in BackdoorBench root (the current folder) whose loader fails as BB's does offline (a download)."""
    import sys

    bb = tmp_path / "bb"
    (bb / "utils").mkdir(parents=True)
    (bb / "utils" / "__init__.py").write_text("")
    (bb / "utils" / "bd_dataset_v2.py").write_text("")
    (bb / "utils" / "save_load_attack.py").write_text(
        "def load_attack_result(path):\n    raise OSError('<urlopen error [Errno -3] Temporary failure in name "
        "resolution>')\n")
    for name in [m for m in sys.modules if m == "utils" or m.startswith("utils.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(bb))
    monkeypatch.chdir(bb)
    yield bb
    for name in [m for m in sys.modules if m == "utils" or m.startswith("utils.")]:
        del sys.modules[name]  # the stand-in's modules; monkeypatch then puts back any earlier ones


def test_backdoorbench_loader_failure_falls_back_or_names_the_fix(record, failing_backdoorbench, caplog):
    with caplog.at_level("WARNING", logger="ftsam_plugin.data.records"):
        result = load_attack_result(record)  # auto: BackdoorBench's loader first, ours after its failure
    assert result["loader"] == "ftsam" and len(result["bd_test"]) > 0
    assert "BackdoorBench's loader failed (OSError" in caplog.text
    with pytest.raises(FtsamError, match=r"BackdoorBench's loader failed on .*OSError.*use_backdoorbench=False") as exc:
        load_attack_result(record, use_backdoorbench=True)
    assert "\n" not in str(exc.value)
