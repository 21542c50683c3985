import csv
import errno
import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from ftsam_plugin import io as fio
from ftsam_plugin.errors import FtsamError


def _bb_like_record():
    # Mirrors BackdoorBench's attack_result.pt: state_dict, numpy index/indicator arrays, nested state dicts.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    bd_state = {
        "bd_data_container": {
            "save_folder_path": "./record/x/bd_test_dataset",
            "data_dict": {3: {"path": "./record/x/bd_test_dataset/1/3.png", "other_info": [0, 1]}},
            "save_file_format": ".png",
        },
        "getitem_all": True,
        "getitem_all_switch": False,
        "original_index_array": np.array([3, 5, 8], dtype=np.int64),
        "poison_indicator": np.array([0, 0, 0, 1, 0, 1, 0, 0, 1], dtype=np.uint8),
        "save_folder_path": "./record/x/bd_test_dataset",
    }
    return {
        "model_name": "preactresnet18",
        "num_classes": 10,
        "model": model.state_dict(),
        "data_path": "./data/cifar10",
        "img_size": (32, 32, 3),
        "clean_data": "cifar10",
        "bd_train": None,
        "bd_test": bd_state,
        "extras": {
            "f64": np.linspace(0, 1, 5),
            "f32": np.ones(3, dtype=np.float32),
            "i32": np.arange(4, dtype=np.int32),
            "bool": np.array([True, False]),
            "scalar_i": np.int64(7),
            "scalar_f": np.float64(0.5),
            "scalar_b": np.bool_(True),
        },
    }


def _assert_same(a, b):
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert type(a) is type(b) and a == b


@pytest.mark.parametrize("zip_format", [True, False])
def test_round_trip_backdoorbench_like_record(tmp_path, zip_format):
    record = _bb_like_record()
    path = tmp_path / "attack_result.pt"
    if zip_format:
        fio.atomic_save(record, path)
    else:
        torch.save(record, path, _use_new_zipfile_serialization=False)
    _assert_same(record, fio.safe_load(path))


def test_numpy1_spelling_loads(tmp_path):
    # A file written under numpy 1.x names numpy.core.multiarray (the legacy format keeps the pickle as plain bytes).
    buf = io.BytesIO()
    torch.save({"idx": np.arange(4, dtype=np.int64), "s": np.int64(2)}, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    if b"numpy._core.multiarray" in data:
        data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in data
    path = tmp_path / "np1.pt"
    path.write_bytes(data)
    out = fio.safe_load(path)
    np.testing.assert_array_equal(out["idx"], np.arange(4))
    assert out["s"] == 2


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch_zip", "plain_pickle_p2", "plain_pickle_p4"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if writer == "torch_zip":
        torch.save({"model": {"w": torch.ones(1)}, "x": _Evil(str(marker))}, path)
    else:
        payload = {"model_name": "preactresnet18", "x": _Evil(str(marker))}
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=2 if writer.endswith("p2") else 4)
    assert not marker.exists()
    with pytest.raises(FtsamError) as info:
        fio.safe_load(path, what="defense result")
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "defense result" in message
    assert "refused" in message and "not executed" in message
    if writer != "plain_pickle_p4":  # protocol 4 is rejected at its FRAME opcode, before any global is read
        assert "builtins.open" in message or "io.open" in message
    assert not marker.exists()


def test_missing_file(tmp_path):
    with pytest.raises(FtsamError, match="does not exist"):
        fio.safe_load(tmp_path / "nope.pt")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(FtsamError, match=r"empty \(0 bytes\)"):
        fio.safe_load(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "full.pt"
    torch.save(_bb_like_record(), path)
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(FtsamError, match="truncated or corrupt") as info:
        fio.safe_load(cut)
    assert str(cut) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"hello world\n", b"\x00\x01\x02garbage" * 10, b"PK\x03\x04not really a zip"])
def test_not_a_torch_file(tmp_path, content):
    path = tmp_path / "bogus.pt"
    path.write_bytes(content)
    with pytest.raises(FtsamError) as info:
        fio.safe_load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(FtsamError, match="is a folder"):
        fio.safe_load(tmp_path)


def test_allowlist_is_numpy_only():
    names = [name for _, name in fio.numpy_safe_globals()]
    assert all(name.startswith("numpy.") for name in names)
    assert "numpy.core.multiarray._reconstruct" in names and "numpy._core.multiarray._reconstruct" in names
    assert not any("Object" in name or "Void" in name or "Str" in name for name in names)


# ---- atomic writers -------------------------------------------------------------------------------------


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_writers_create_parents_and_write(tmp_path):
    fio.atomic_write_text(tmp_path / "a" / "b" / "t.txt", "héllo\n")
    assert (tmp_path / "a" / "b" / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    fio.atomic_write_bytes(tmp_path / "c" / "d.bin", b"\x00\x01")
    assert (tmp_path / "c" / "d.bin").read_bytes() == b"\x00\x01"
    fio.atomic_save({"w": torch.arange(3)}, tmp_path / "e" / "m.pt")
    assert torch.equal(fio.safe_load(tmp_path / "e" / "m.pt")["w"], torch.arange(3))
    assert _leftovers(tmp_path / "a" / "b") == [] and _leftovers(tmp_path / "e") == []


def test_atomic_write_gives_normal_permissions(tmp_path):
    path = tmp_path / "p.txt"
    fio.atomic_write_text(path, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert (os.stat(path).st_mode & 0o777) == (0o666 & ~umask)


def test_write_csv(tmp_path):
    path = tmp_path / "out" / "m.csv"
    fio.write_csv(path, [{"a": 1, "b": 0.5}, {"a": 2, "c": "x,y"}])
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [["a", "b", "c"], ["1", "0.5", ""], ["2", "", "x,y"]]
    fio.write_csv(path, [{"a": 1}], columns=["b", "a"])
    assert path.read_text() == "b,a\n,1\n"
    with pytest.raises(ValueError):
        fio.write_csv(path, [{"z": 1}], columns=["a"])


@pytest.mark.parametrize("fail_at", ["replace", "fsync", "write"])
def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "result.csv"
    path.write_text("old\n")

    def boom(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if fail_at == "replace":
        monkeypatch.setattr(fio.os, "replace", boom)
    elif fail_at == "fsync":
        monkeypatch.setattr(fio.os, "fsync", boom)
    with pytest.raises(FtsamError) as info:
        if fail_at == "write":
            fio.atomic_save(_Unwritable(), path)
        else:
            fio.write_csv(path, [{"a": 1}])
    message = str(info.value)
    assert str(path) in message and "No space left on device" in message and "free space" in message
    assert path.read_text() == "old\n"
    assert _leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["result.csv"]


class _Unwritable:
    def __reduce__(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_atomic_write_non_oserror_propagates_and_cleans_up(tmp_path):
    path = tmp_path / "m.pt"
    fio.atomic_save({"v": 1}, path)

    class Bad:
        def __reduce__(self):
            raise TypeError("cannot pickle")

    with pytest.raises(TypeError):
        fio.atomic_save({"v": Bad()}, path)
    assert fio.safe_load(path) == {"v": 1}
    assert _leftovers(tmp_path) == []


def test_parent_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FtsamError, match="cannot create folder"):
        fio.atomic_write_text(blocker / "sub" / "a.txt", "y")


def test_target_is_a_folder(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(FtsamError, match="is a folder"):
        fio.atomic_write_text(tmp_path / "d", "y")


def test_saved_file_is_a_torch_zip(tmp_path):
    fio.atomic_save({"a": 1}, tmp_path / "z.pt")
    assert zipfile.is_zipfile(tmp_path / "z.pt")
