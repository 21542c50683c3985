"""FT-SAM as a BackdoorBench plugin, end to end.

Without BackdoorBench (CI): the patches are sane, the entry points resolve, and the launcher (taken from the patch)
lists plugins, rejects unknown names and skips broken plugins.

With ``BACKDOORBENCH_ROOT`` set to a checkout of BackdoorBench main @ f02e353 (read-only; everything runs in a
copy): apply the patches with patches/apply.sh, synthesize a tiny GTSRB, make a BadNets record with ``ftsam attack``,
run ``ftsam`` and ``ft-baseline`` through ``defense/plugin.py`` from the BackdoorBench root, and read the result with
BackdoorBench's own ``analysis/visual_metric.py``.
"""
import argparse
import csv
import importlib.util
import os
import shutil
import sys
import types
from importlib import resources
from pathlib import Path

import pytest
import torch

import bb_helpers
from bb_helpers import APPLY_SCRIPT, LAUNCHER_PATCH, PATCH_DIR, REPO, run
from helpers import make_gtsrb_folder

GROUP = "backdoorbench.defenses"
PLUGINS = ("ftsam", "ft-baseline")
RECORD = "badnet_tiny"
BB_ROOT = os.environ.get("BACKDOORBENCH_ROOT")
needs_bb = pytest.mark.skipif(
    not BB_ROOT,
    reason="set BACKDOORBENCH_ROOT to a BackdoorBench checkout (main @ f02e353) to run the integration tests")
SUMMARY_COLUMNS = ["clean_accuracy_attack", "clean_accuracy_defense", "asr_attack", "ra_attack", "asr_defense",
                   "ra_defense", "der", "rir"]


def _group_entry_points(group):
    if sys.version_info >= (3, 10):
        from importlib.metadata import entry_points
        return list(entry_points(group=group))
    try:
        from importlib_metadata import entry_points
        return list(entry_points(group=group))
    except ImportError:
        from importlib.metadata import entry_points
        return list(entry_points().get(group, ()))


# --------------------------------------------------------------------------- no BackdoorBench needed


def test_launcher_patch_only_adds_one_new_file():
    files = bb_helpers.patch_files(LAUNCHER_PATCH)
    assert list(files) == ["defense/plugin.py"]
    body = files["defense/plugin.py"]
    assert body[0].startswith("@@ -0,0 +1,")
    hunk_lines = [ln for ln in body if not ln.startswith("@@")]
    assert hunk_lines and all(ln.startswith("+") for ln in hunk_lines), "the launcher patch may only add lines"
    assert "--- /dev/null" in LAUNCHER_PATCH.read_text()


def test_other_patches_change_single_lines_only():
    for patch in sorted(PATCH_DIR.glob("*.patch")):
        if patch == LAUNCHER_PATCH:
            continue
        for path, body in bb_helpers.patch_files(patch).items():
            removed = [ln for ln in body if ln.startswith("-")]
            added = [ln for ln in body if ln.startswith("+")]
            context = [ln for ln in body if ln.startswith(" ")]
            hunks = [ln for ln in body if ln.startswith("@@")]
            # every hunk replaces lines one for one, with at most one context line each side
            assert len(removed) == len(added) == len(hunks), (patch.name, path)
            assert len(context) <= 2 * len(hunks), (patch.name, path)
            for old, new in zip(removed, added):
                assert "torch.load" in old or "map_location" in old, (patch.name, old)
                assert "weights_only=False" in new and "weights_only" not in old, (patch.name, new)


def test_entry_points_resolve_to_defense_classes():
    eps = {ep.name: ep for ep in _group_entry_points(GROUP)}
    assert set(PLUGINS) <= set(eps), f"installed entry points: {sorted(eps)}; reinstall with `pip install -e .`"
    for name in PLUGINS:
        cls = eps[name].load()
        assert isinstance(cls, type), name
        assert callable(getattr(cls, "defense", None)), name
        parser = argparse.ArgumentParser()
        cls.add_arguments(parser)  # static: BackdoorBench calls it on the class
        dests = {a.dest for a in parser._actions}
        assert {"result_file", "yaml_path", "device", "epochs", "dataset"} <= dests, (name, sorted(dests))


@pytest.fixture()
def launcher_only(tmp_path):
    """defense/plugin.py as the patch creates it, in a folder that is not BackdoorBench."""
    bb_helpers.extract_added_file(LAUNCHER_PATCH, "defense/plugin.py", tmp_path / "defense" / "plugin.py")
    return tmp_path


def test_launcher_lists_plugins(launcher_only):
    proc = run([sys.executable, "defense/plugin.py", "--list"], cwd=launcher_only, timeout=300)
    assert set(PLUGINS) <= set(proc.stdout.split()), proc.stdout + proc.stderr


def test_launcher_unknown_name_is_one_line_error(launcher_only):
    proc = run([sys.executable, "defense/plugin.py", "no-such-defense"], cwd=launcher_only, timeout=300, check=False)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "no-such-defense" in lines[0] and all(name in lines[0] for name in PLUGINS), lines[0]


def test_launcher_reports_and_skips_broken_plugins(launcher_only, tmp_path):
    site = tmp_path / "site"
    dist = site / "broken_defenses-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-defenses\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{GROUP}]\nbroken = ftsam_no_such_module_xyz:Defense\nnot-a-defense = os.path:join\n")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    proc = run([sys.executable, "defense/plugin.py", "--list"], cwd=launcher_only, env=env, timeout=300)
    listed = proc.stdout.split()
    assert set(PLUGINS) <= set(listed) and "broken" not in listed and "not-a-defense" not in listed, proc.stdout
    assert "'broken'" in proc.stderr and "ModuleNotFoundError" in proc.stderr and "skipped" in proc.stderr
    assert "'not-a-defense'" in proc.stderr
    # asking for a skipped plugin is an unknown name
    proc = run([sys.executable, "defense/plugin.py", "broken"], cwd=launcher_only, env=env, timeout=300, check=False)
    assert proc.returncode == 2 and "unknown defense 'broken'" in proc.stderr


def test_launcher_refuses_to_run_outside_the_backdoorbench_root(launcher_only):
    proc = run([sys.executable, str(launcher_only / "defense" / "plugin.py"), "ftsam", "--result_file", "x"],
               cwd=launcher_only / "defense", timeout=300, check=False)
    assert proc.returncode == 2 and "BackdoorBench root" in proc.stderr, proc.stderr


def _import_launcher(path):
    spec = importlib.util.spec_from_file_location("bb_plugin_launcher_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _FakeEntryPoint:
    def __init__(self, name, obj=None, error=None):
        self.name, self.value, self._obj, self._error = name, f"fake:{name}", obj, error

    def load(self):
        if self._error is not None:
            raise self._error
        return self._obj


class _Defense:
    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--result_file")

    def __init__(self, args):
        self.args = args

    def defense(self, result_file):
        return {"model": None}


def test_launcher_reads_the_python38_dict_api(launcher_only, monkeypatch, capsys):
    # Python 3.8/3.9 (no backport): entry_points() is a dict of group -> entry points, without .select
    fake = types.ModuleType("importlib_metadata")
    eps = [_FakeEntryPoint("good", _Defense), _FakeEntryPoint("bad", error=ImportError("boom")),
           _FakeEntryPoint("good", object)]
    fake.entry_points = lambda: {GROUP: eps, "other.group": [_FakeEntryPoint("x", _Defense)]}
    monkeypatch.setitem(sys.modules, "importlib_metadata", fake)
    launcher = _import_launcher(launcher_only / "defense" / "plugin.py")
    assert launcher.load_plugins() == {"good": _Defense}  # first registration of a name wins
    err = capsys.readouterr().err
    assert "'bad'" in err and "ImportError: boom" in err and "skipped" in err


def test_apply_script_rejects_a_folder_that_is_not_backdoorbench(tmp_path):
    proc = run(["bash", APPLY_SCRIPT, tmp_path], cwd=REPO, check=False)
    assert proc.returncode == 2 and "not a BackdoorBench checkout" in proc.stderr


# --------------------------------------------------------------------------- BackdoorBench checkout needed


def _tiny_yaml(path, **overrides):
    """A small CPU defense config (BackdoorBench's keys) for a few-second run."""
    cfg = dict(device="cpu", amp=False, pin_memory=False, non_blocking=False, prefetch=False, dataset="gtsrb",
               dataset_path="./data", batch_size=64, num_workers=0, lr=0.01, lr_scheduler="CosineAnnealingLR",
               epochs=1, model="preactresnet18", client_optimizer="sgd", sgd_momentum=0.9, wd=5.0e-4,
               frequency_save=0, random_seed=0, ratio=1.0, index=None)
    cfg.update(overrides)
    lines = [f"{k}: {'null' if v is None else v}" for k, v in cfg.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    """A patched copy of BACKDOORBENCH_ROOT with tiny GTSRB data and a BadNets record ``record/badnet_tiny``."""
    if not BB_ROOT:
        pytest.skip("set BACKDOORBENCH_ROOT to a BackdoorBench checkout (main @ f02e353) to run the integration tests")
    missing = bb_helpers.backdoorbench_skip_reason(BB_ROOT)
    if missing:
        pytest.skip(missing)
    src = Path(BB_ROOT)
    if not (src / "utils" / "save_load_attack.py").is_file():
        pytest.fail(f"BACKDOORBENCH_ROOT={BB_ROOT} is not a BackdoorBench checkout (no utils/save_load_attack.py)")
    root = bb_helpers.copy_checkout(src, tmp_path_factory.mktemp("bench") / "BackdoorBench")
    proc = bb_helpers.apply_patches(root)
    assert proc.stdout.count("applied") == len(list(PATCH_DIR.glob("*.patch"))), proc.stdout
    make_gtsrb_folder(root / "data" / "gtsrb", n_train_per_class=2, n_test=43)
    # BackdoorBench's analysis builds the stock-width preactresnet18, so the record uses width 1
    run([sys.executable, "-m", "ftsam_plugin", "attack", "--attack", "badnet", "--dataset", "gtsrb",
         "--dataset_path", "./data/gtsrb", "--model", "preactresnet18", "--width", "1.0", "--epochs", "1",
         "--device", "cpu", "--num_workers", "0", "--save_folder_name", RECORD, "--record_root", "./record"],
        cwd=root)
    assert (root / "record" / RECORD / "attack_result.pt").is_file()
    return root


def _launch(root, name, *extra, check=True):
    return run([sys.executable, "./defense/plugin.py", name, *map(str, extra)], cwd=root, check=check)


def _check_defense_result(path):
    assert path.is_file(), f"no defense result at {path}"
    result = torch.load(path, map_location="cpu", weights_only=True)
    assert set(result) == {"model_name", "num_classes", "model"}
    assert result["model_name"] == "preactresnet18" and result["num_classes"] == 43
    assert not any(k.startswith("module.") for k in result["model"])
    return result


@needs_bb
def test_apply_is_idempotent(bb):
    proc = bb_helpers.apply_patches(bb)
    for patch in PATCH_DIR.glob("*.patch"):
        assert f"{patch.name}: already applied" in proc.stdout, proc.stdout


@needs_bb
def test_apply_reports_a_conflicting_checkout(tmp_path):
    root = tmp_path / "BackdoorBench"
    shutil.copytree(BB_ROOT, root, ignore=shutil.ignore_patterns(".git", "__pycache__", "resource", "record"))
    target = root / "utils" / "save_load_attack.py"
    text = target.read_text()
    assert text.count("torch.load(save_path)") == 1
    target.write_text(text.replace("torch.load(save_path)", "torch.load(save_path, map_location='cpu')"))
    proc = bb_helpers.apply_patches(root, check=False)
    assert proc.returncode == 1
    assert "0002-torch-load-weights-only.patch: does not apply cleanly" in proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1 and "nothing was changed" in proc.stderr
    assert not (root / "defense" / "plugin.py").exists(), "a failed run must not apply the other patches"


@needs_bb
@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 6),
                    reason="torch < 2.6 loads with weights_only=False by default")
def test_records_need_the_weights_only_patch(bb):
    # why 0002 exists: on torch >= 2.6 a plain torch.load refuses BackdoorBench's record (numpy arrays inside)
    code = f"import torch; torch.load('record/{RECORD}/attack_result.pt')"
    proc = run([sys.executable, "-c", code], cwd=bb, check=False)
    assert proc.returncode != 0 and "weights_only" in proc.stderr, proc.stderr[-2000:]


@needs_bb
def test_launcher_list_and_unknown_name_in_backdoorbench(bb):
    assert set(PLUGINS) <= set(_launch(bb, "--list").stdout.split())
    proc = _launch(bb, "nope", check=False)
    assert proc.returncode == 2 and "unknown defense 'nope'" in proc.stderr
    assert all(name in proc.stderr for name in PLUGINS)


@needs_bb
def test_ftsam_through_launcher_and_backdoorbench_metrics(bb, tmp_path):
    cfg = resources.files("ftsam_plugin") / "configs" / "ftsam" / "cpu.yaml"  # the packaged CPU config
    assert cfg.is_file()
    # ratio 1: the tiny set has 2 images per class (the config's 5% would leave none)
    proc = _launch(bb, "ftsam", "--result_file", RECORD, "--yaml_path", cfg, "--dataset", "gtsrb", "--device", "cpu",
                   "--num_workers", "0", "--epochs", "1", "--ratio", "1.0")
    defense_dir = bb / "record" / RECORD / "defense" / "ftsam"
    logs = "".join(p.read_text() for p in (defense_dir / "log").glob("*.log"))
    assert "loader failed" not in proc.stdout + proc.stderr + logs, "BackdoorBench's own loader should read the record"
    _check_defense_result(defense_dir / "defense_result.pt")

    missing = bb_helpers.backdoorbench_skip_reason(BB_ROOT, analysis=True)
    if missing:  # the launcher part above ran; BackdoorBench's analysis script needs more
        pytest.skip(missing)
    run([sys.executable, "analysis/visual_metric.py", "--result_file_attack", RECORD,
         "--result_file_defense", f"{RECORD}/defense/ftsam", "--dataset", "gtsrb", "--model", "preactresnet18",
         "--device", "cpu", "--num_workers", "0", "--batch_size", "128"], cwd=bb)
    summary = defense_dir / "visual" / "metric_summary.csv"
    assert summary.is_file()
    with open(summary, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and list(rows[0]) == SUMMARY_COLUMNS
    values = {k: float(v) for k, v in rows[0].items()}
    # DER as BackdoorBench defines it, from the row's own accuracies
    expect_der = (max(0.0, values["asr_attack"] - values["asr_defense"])
                  - max(0.0, values["clean_accuracy_attack"] - values["clean_accuracy_defense"]) + 1) / 2
    assert values["der"] == pytest.approx(expect_der)


@needs_bb
def test_ft_baseline_through_launcher(bb, tmp_path):
    before = set((bb / "record" / RECORD).glob("defense/*/defense_result.pt"))
    cfg = _tiny_yaml(tmp_path / "ft.yaml")
    _launch(bb, "ft-baseline", "--result_file", RECORD, "--yaml_path", cfg, "--dataset", "gtsrb", "--device", "cpu",
            "--num_workers", "0", "--epochs", "1")
    new = set((bb / "record" / RECORD).glob("defense/*/defense_result.pt")) - before
    assert len(new) == 1, f"expected one new defense result, got {sorted(map(str, new))}"
    (path,) = new
    assert path.parent.name != "ftsam"
    _check_defense_result(path)
