"""BackdoorBench interoperability (runs only with BACKDOORBENCH_ROOT set to a BackdoorBench checkout).

BackdoorBench's own code runs in a subprocess whose cwd is a temporary copy of the checkout (data/ and record/
inside it), with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 as unpatched BackdoorBench needs under torch >= 2.6. It dumps
what its `load_attack_result` rebuilt; our reader's dump of the same record must be equal.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from bb_helpers import backdoorbench_skip_reason
from helpers import make_gtsrb_folder, run_cli

BB_ROOT = os.environ.get("BACKDOORBENCH_ROOT")
SKIP = backdoorbench_skip_reason(BB_ROOT)  # no checkout, or a module its code imports missing: skipped, named
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

# Used on both sides: summarises a load_attack_result dict (BackdoorBench's or ours) as JSON-able data.
DUMP_SRC = r'''
import hashlib, json
import numpy as np
import torch

def _h(img):
    a = np.asarray(img)
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()[:16]

def _items(ds):
    raw = ds.wrapped_dataset
    out = []
    for i in range(len(raw)):
        img, label, idx, flag, orig = raw[i]
        out.append([int(label), int(idx), int(flag), int(orig), _h(img)])
    return out

def dump(result, model=None):
    torch.manual_seed(0)
    sd = result["model"] if isinstance(result["model"], dict) else result["model"].state_dict()
    d = {
        "lens": [len(result[k]) for k in ("clean_train", "clean_test", "bd_train", "bd_test")],
        "bd_train": _items(result["bd_train"]),
        "bd_test": _items(result["bd_test"]),
        "clean_test": [_h(result["clean_test"][i][0].numpy()) for i in range(len(result["clean_test"]))],
        "bd_test_tensors": [_h(result["bd_test"][i][0].numpy()) for i in range(len(result["bd_test"]))],
        "state": {k: _h(v.cpu().numpy()) for k, v in sd.items()},
    }
    if model is not None:
        model.eval()
        with torch.no_grad():
            d["logits"] = model(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))).tolist()
    return d
'''

BB_SIDE = DUMP_SRC + r'''
import sys
from utils.save_load_attack import load_attack_result
from utils.aggregate_block.model_trainer_generate import generate_cls_model
record, out, with_model = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
r = load_attack_result(record + "/attack_result.pt")
model = None
if with_model:
    model = generate_cls_model(r["model_name"], 43)
    model.load_state_dict(r["model"])
d = {"bb": dump(r, model)}
from ftsam_plugin.data import load_attack_result as ftsam_load
ours = ftsam_load(record)  # cwd is the BackdoorBench root: our loader delegates to BackdoorBench's
d["auto"] = dump(ours, ours["model"] if with_model else None)
d["auto_loader"] = ours["loader"]
bd = ours["bd_test"].wrapped_dataset
d["auto_bd_class"] = type(bd).__name__  # BackdoorBench's own dataset object, kept
ra = ours["bd_test"].with_original_labels().wrapped_dataset
d["auto_ra_ok"] = all(int(ra[i][1]) == int(bd[i][4]) and int(ra[i][4]) == int(bd[i][1]) for i in range(len(bd)))
json.dump(d, open(out, "w"))
'''


def _env():
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", PYTHONWARNINGS="ignore")
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="module")
def bb_copy(tmp_path_factory):
    dest = tmp_path_factory.mktemp("bb") / "BackdoorBench"
    shutil.copytree(BB_ROOT, dest, ignore=shutil.ignore_patterns(".git", "data", "record"))
    (dest / "record").mkdir()
    make_gtsrb_folder(dest / "data" / "gtsrb", n_train_per_class=2, n_test=43, vary_size=True)
    return dest


def _bb_dump(bb_copy, record, tmp_path, with_model):
    out = tmp_path / "bb_dump.json"
    proc = subprocess.run([sys.executable, "-c", BB_SIDE, str(record), str(out), "1" if with_model else "0"],
                          cwd=bb_copy, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _our_dump(record, with_model):
    from ftsam_plugin.data import load_attack_result

    ns = {}
    exec(DUMP_SRC, ns)
    result = load_attack_result(record, use_backdoorbench=False)
    assert result["loader"] == "ftsam"
    return json.loads(json.dumps(ns["dump"](result, result["model"] if with_model else None)))


def _compare(bb, ours):
    for key in ("lens", "bd_train", "bd_test", "clean_test", "bd_test_tensors", "state"):
        assert bb[key] == ours[key], key
    if "logits" in bb:
        import torch

        torch.testing.assert_close(torch.tensor(ours["logits"]), torch.tensor(bb["logits"]), rtol=1e-5, atol=1e-5)


def test_backdoorbench_reads_our_record(bb_copy, tmp_path):
    code, out, err = run_cli([
        "attack", "--attack", "badnet", "--dataset", "gtsrb", "--dataset_path", str(bb_copy / "data"),
        "--record_root", str(bb_copy / "record"), "--save_folder_name", "ours_badnet", "--width", "0.125",
        "--epochs", "1", "--batch_size", "32", "--device", "cpu", "--num_workers", "0", "--progress", "False"])
    assert code == 0, err
    record = bb_copy / "record" / "ours_badnet"
    bb = _bb_dump(bb_copy, record, tmp_path, with_model=False)  # BB cannot build width 0.125; weights compared
    ours = _our_dump(record, with_model=False)
    assert bb["bb"]["lens"] == [86, 43, 86, 42]
    _compare(bb["bb"], ours)
    _compare(bb["auto"], ours)
    assert bb["auto_loader"] == "backdoorbench"
    assert bb["auto_bd_class"] == "prepro_cls_DatasetBD_v2" and bb["auto_ra_ok"]


def test_we_read_a_record_made_by_backdoorbench(bb_copy, tmp_path):
    proc = subprocess.run([
        sys.executable, "attack/badnet.py", "--yaml_path", "./config/attack/prototype/gtsrb.yaml",
        "--bd_yaml_path", "./config/attack/badnet/default.yaml",
        "--patch_mask_path", "./resource/badnet/trigger_image.png", "--save_folder_name", "bb_badnet",
        "--device", "cpu", "--num_workers", "0", "--epochs", "1", "--batch_size", "32", "--dataset_path", "./data"],
        cwd=bb_copy, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = bb_copy / "record" / "bb_badnet"
    bb = _bb_dump(bb_copy, record, tmp_path, with_model=True)
    ours = _our_dump(record, with_model=True)
    _compare(bb["bb"], ours)
    _compare(bb["auto"], ours)
    moved = tmp_path / "moved_record"
    shutil.copytree(record, moved)
    from ftsam_plugin.data import load_attack_result

    again = load_attack_result(moved, dataset_path=str(bb_copy / "data"), use_backdoorbench=False)
    assert len(again["bd_test"]) == len(ours["bd_test"])


def test_badnet_trigger_matches_backdoorbench_png():
    """Our BadNets trigger vs BackdoorBench's resource/badnet/trigger_image.png applied its way (pixels where the
    PNG is non-zero take the PNG's value, the rest are kept)."""
    import numpy as np
    from PIL import Image

    from ftsam_plugin.attacks.triggers import create_trigger

    with Image.open(os.path.join(BB_ROOT, "resource", "badnet", "trigger_image.png")) as png:
        mask = np.asarray(png.convert("RGB").resize((32, 32)))
    rows, cols = np.nonzero(mask.any(axis=2))
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (29, 31, 29, 31)  # the 3x3 patch we reproduce
    img = np.random.default_rng(0).integers(0, 255, size=(32, 32, 3), dtype=np.uint8)  # no 255: patch shows
    expected = np.where(mask > 0, mask, img)
    ours = create_trigger("badnet", (32, 32, 3))(img)
    np.testing.assert_array_equal(ours, expected)
    assert not np.array_equal(ours, img)
