"""BackdoorBench's own way to run a defense, after patches/apply.sh: `python ./defense/ftsam.py --result_file R
--yaml_path ./config/defense/ftsam/<dataset>.yaml` (patches/files/, installed by apply.sh), errors as `ftsam defend`
reports them, the documented CPU commands, and BackdoorBench's own trainer's CSV in the leaderboard.

Without BackdoorBench: the installed files, their configs' values, the launchers' error contract (defense/plugin.py
as the patch creates it, in a folder that is not BackdoorBench). With ``BACKDOORBENCH_ROOT`` (read-only; everything
runs in a patched copy): the rest.
"""
import argparse
import csv
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

import bb_helpers
from bb_helpers import LAUNCHER_PATCH, PATCH_DIR, REPO, run
from helpers import make_gtsrb_folder

FILES = PATCH_DIR / "files"
DATASETS = ("cifar10", "cifar100", "gtsrb", "tiny")
RECORD = "badnet_0_1"  # the name the docs use
BB_ROOT = os.environ.get("BACKDOORBENCH_ROOT")
needs_bb = pytest.mark.skipif(not BB_ROOT, reason="BACKDOORBENCH_ROOT is not set (a BackdoorBench checkout, main @ "
                                                  "f02e353)")
PROTOCOL_KEYS = ("epochs", "batch_size", "lr", "lr_scheduler", "client_optimizer", "sgd_momentum", "wd", "ratio",
                 "random_seed", "rho", "rho_schedule", "adaptive", "eta", "alpha", "label_smoothing", "amp",
                 "protocol", "model", "num_workers", "pin_memory", "non_blocking")


def installed(root):
    """What apply.sh installs, copied into `root` (a folder standing in for a checkout)."""
    shutil.copytree(FILES, root, dirs_exist_ok=True)
    return root


def one_error_line(proc, needle, code=2):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    return lines[0]


# --------------------------------------------------------------------------- no BackdoorBench needed


def test_the_installed_files_are_a_launcher_and_four_configs():
    files = sorted(str(p.relative_to(FILES)) for p in FILES.rglob("*") if p.is_file())
    assert files == [f"config/defense/ftsam/{d}.yaml" for d in sorted(DATASETS)] + ["defense/ftsam.py"]
    launcher = (FILES / "defense" / "ftsam.py").read_text()
    code = [ln for ln in launcher.split('"""')[-1].splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert len(code) <= 6 and 'plugin.run_script("ftsam")' in launcher  # thin: through the entry point


@pytest.mark.parametrize("dataset", DATASETS)
def test_backdoorbench_configs_run_our_packaged_values(dataset):
    from ftsam_plugin.defense.ftsam import FTSAM

    def args(yaml_path):
        parser = FTSAM.add_arguments(argparse.ArgumentParser())
        return vars(FTSAM(parser.parse_args(["--yaml_path", str(yaml_path), "--device", "cpu"])).args)

    ours = args(dataset)  # ftsam_plugin/configs/ftsam/<dataset>.yaml
    theirs = args(FILES / "config" / "defense" / "ftsam" / f"{dataset}.yaml")
    assert {k: theirs[k] for k in PROTOCOL_KEYS} == {k: ours[k] for k in PROTOCOL_KEYS}
    assert theirs["dataset"] == dataset and theirs["protocol_notes"] == []


@pytest.fixture()
def launchers(tmp_path):
    """defense/plugin.py as the patch creates it plus the installed files, in a folder that is not BackdoorBench."""
    bb_helpers.extract_added_file(LAUNCHER_PATCH, "defense/plugin.py", tmp_path / "defense" / "plugin.py")
    return installed(tmp_path)


@pytest.mark.parametrize("launcher,flags,needle", [
    ("ftsam.py", ["--adaptive"], "--adaptive needs a value: --adaptive true (ASAM, the default) or --adaptive false "
                                 "(SAM); BackdoorBench's bare --adaptive meant false"),
    ("plugin.py ftsam", ["--adaptive"], "--adaptive needs a value"),
    ("ftsam.py", ["--rho", "-1"], "rho must be a finite number > 0, got -1.0; fix --rho"),
    ("plugin.py ftsam", [], "no attack_result.pt: record folder 'nowhere'"),
])
def test_launcher_errors_are_one_line_exit_2(launchers, launcher, flags, needle):
    cmd = [sys.executable, *f"defense/{launcher}".split(), "--result_file", "nowhere", "--yaml_path", "cpu",
           "--device", "cpu", *flags]
    one_error_line(run(cmd, cwd=launchers, timeout=300, check=False), needle)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_a_missing_gpu_is_one_line(launchers):
    # the configs say device: 'cuda' (BackdoorBench's convention)
    proc = run([sys.executable, "defense/ftsam.py", "--result_file", "nowhere", "--yaml_path",
                "config/defense/ftsam/cifar10.yaml"], cwd=launchers, timeout=300, check=False)
    one_error_line(proc, "no CUDA GPU is available; pass --device cpu")


def test_debug_shows_the_traceback(launchers):
    proc = run([sys.executable, "defense/ftsam.py", "--result_file", "nowhere", "--yaml_path", "cpu", "--device",
                "cpu", "--adaptive", "--debug"], cwd=launchers, timeout=300, check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "FtsamError: --adaptive needs a value" in proc.stderr


def test_ftsam_py_help_lists_the_defense_flags(launchers):
    out = run([sys.executable, "defense/ftsam.py", "--help"], cwd=launchers, timeout=300).stdout
    assert out.startswith("usage: ftsam.py ") and "--keep_checkpoint" in out and "--debug" in out


def test_a_plugin_without_launch_gets_one_line_and_debug(launchers, tmp_path):
    site = tmp_path / "site"
    dist = site / "failing_defense-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: failing-defense\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[backdoorbench.defenses]\nfailing = failing_defense:Failing\n")
    (site / "failing_defense.py").write_text(
        "class Failing:\n    @staticmethod\n    def add_arguments(parser):\n"
        "        parser.add_argument('--result_file')\n    def __init__(self, args):\n        self.args = args\n"
        "    def defense(self, result_file):\n        raise ValueError('the record is\\nbroken')\n")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "defense/plugin.py", "failing", "--result_file", "x"]
    proc = run(cmd, cwd=launchers, env=env, timeout=300, check=False)
    line = one_error_line(proc, "error: ValueError: the record is broken; run with --debug for the traceback", code=1)
    assert line.endswith("traceback")
    proc = run([*cmd, "--debug"], cwd=launchers, env=env, timeout=300, check=False)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ValueError: the record is" in proc.stderr


# --------------------------------------------------------------------------- BackdoorBench checkout needed


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A patched copy of BACKDOORBENCH_ROOT with a tiny GTSRB (20 images per class: the configs' 5% is one per
    class) and a full-width BadNets record ``record/badnet_0_1``."""
    if not BB_ROOT:
        pytest.skip("BACKDOORBENCH_ROOT is not set")
    reason = bb_helpers.backdoorbench_skip_reason(BB_ROOT, analysis=True)
    if reason:
        pytest.skip(reason)
    # BackdoorBench finds the data by cutting the record path at 'record': keep that word out of the tmp path
    root = bb_helpers.copy_checkout(BB_ROOT, tmp_path_factory.mktemp("bench") / "BackdoorBench")
    proc = bb_helpers.apply_patches(root)
    assert "defense/ftsam.py: installed" in proc.stdout, proc.stdout
    make_gtsrb_folder(root / "data" / "gtsrb", n_train_per_class=20, n_test=86)
    run([sys.executable, "-m", "ftsam_plugin", "attack", "--attack", "badnet", "--dataset", "gtsrb",
         "--dataset_path", "./data/gtsrb", "--model", "preactresnet18", "--width", "1.0", "--epochs", "1",
         "--device", "cpu", "--num_workers", "0", "--save_folder_name", RECORD, "--record_root", "./record"], cwd=root)
    return root


@needs_bb
def test_apply_installs_the_files_once(bench):
    proc = bb_helpers.apply_patches(bench)
    for path in sorted(FILES.rglob("*.*")):
        assert f"{path.relative_to(FILES)}: already installed" in proc.stdout, proc.stdout


@needs_bb
def test_apply_refuses_to_overwrite_another_file(tmp_path):
    root = tmp_path / "BackdoorBench"
    shutil.copytree(BB_ROOT, root, ignore=shutil.ignore_patterns(".git", "__pycache__", "resource", "record"))
    (root / "config" / "defense" / "ftsam").mkdir(parents=True)
    (root / "config" / "defense" / "ftsam" / "gtsrb.yaml").write_text("epochs: 3\n")  # the user's own
    proc = bb_helpers.apply_patches(root, check=False)
    assert proc.returncode == 1 and "config/defense/ftsam/gtsrb.yaml: exists with other contents" in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "move it away and rerun; nothing was changed" in lines[0], proc.stderr
    assert not (root / "defense" / "plugin.py").exists() and not (root / "defense" / "ftsam.py").exists()
    assert (root / "config" / "defense" / "ftsam" / "gtsrb.yaml").read_text() == "epochs: 3\n"


@needs_bb
@pytest.mark.parametrize("dataset", DATASETS)
def test_configs_have_the_references_keys(dataset):
    reference = Path(BB_ROOT) / "config" / "defense" / "ft-sam" / f"{dataset}.yaml"
    if not reference.is_file():  # ft-sam has no cifar100.yaml: the cifar10 one's keys
        reference = reference.with_name("cifar10.yaml")
    ours = yaml.safe_load((FILES / "config" / "defense" / "ftsam" / f"{dataset}.yaml").read_text())
    assert list(ours) == list(yaml.safe_load(reference.read_text()))


def documented_cpu_commands():
    """The `python ...` lines with `--device cpu` in the code blocks of README.md and docs/backdoorbench.md, in order
    (defense launchers and BackdoorBench's analysis)."""
    found = []
    for doc in (REPO / "README.md", REPO / "docs" / "backdoorbench.md"):
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.splitlines():
                command = line.split("#")[0].strip()
                if command.startswith("python ") and "--device cpu" in command:
                    found.append((doc.name, command))
    return found


@needs_bb
def test_documented_cpu_commands_run(bench):
    commands = documented_cpu_commands()
    kinds = {c.split()[1] for _, c in commands}
    assert {"./defense/ftsam.py", "./defense/plugin.py", "analysis/visual_metric.py"} <= kinds, commands
    for doc, command in commands:
        argv = command.replace("cifar10", "gtsrb").split()[1:]  # the test record is GTSRB
        if "analysis/" in argv[0]:
            run([sys.executable, *argv], cwd=bench, timeout=900)
            summary = bench / "record" / argv[argv.index("--result_file_defense") + 1] / "visual" / "metric_summary.csv"
            with open(summary, newline="") as handle:
                assert len(list(csv.DictReader(handle))) == 1
            continue
        name = argv[1] if argv[0].endswith("plugin.py") else "ftsam"
        proc = run([sys.executable, *argv, "--epochs", "1", "--num_workers", "0"], cwd=bench, timeout=900)  # short
        console, out = proc.stdout + proc.stderr, bench / "record" / RECORD / "defense" / name
        assert console.count(f"saved record/{RECORD}/defense/{name}/defense_result.pt") == 1, (doc, console[-3000:])
        assert "loader failed" not in console, "BackdoorBench's own loader should read the record"
        assert (out / "defense_result.pt").is_file() and not (out / "checkpoint" / "last.pt").exists()


@needs_bb
def test_the_references_ft_csv_is_read_with_its_epochs(bench, tmp_path):
    """BackdoorBench's own defense/ft.py writes a 0-based `epoch`: two epochs are 1 and 2 (not 0 of 1)."""
    from ftsam_plugin.purify import read_history, time_to_purify

    run([sys.executable, "./defense/ft.py", "--result_file", RECORD, "--yaml_path", "./config/defense/ft/gtsrb.yaml",
         "--dataset", "gtsrb", "--device", "cpu", "--epochs", "2", "--num_workers", "0"], cwd=bench, timeout=900)
    rows = read_history(str(bench / "record" / RECORD / "defense" / "ft" / "ft_df.csv"))
    assert [r["epoch"] for r in rows] == ["0", "1"]  # its trainer's count
    purify = time_to_purify(rows)
    assert (purify.epochs, purify.evaluated, purify.eval_every) == (2, 2, 1)
    assert purify.epoch in (None, 1, 2)
    board = tmp_path / "board"
    run([sys.executable, "-m", "ftsam_plugin", "leaderboard", str(bench / "record"), "--out", str(board),
         "--device", "cpu", "--num_workers", "0"], cwd=bench, timeout=900)
    with open(board / "leaderboard.csv", newline="") as handle:
        cells = {r["defense"]: r for r in csv.DictReader(handle) if r["record"] == RECORD}
    assert cells["ft"]["total_epochs"] == "2" and cells["ft"]["protocol"] == "BackdoorBench's defense/ft.py"
    assert cells["ftsam"]["protocol"] == "ours, fixed"
    markdown = (board / "leaderboard.md").read_text()
    assert "`ft`: BackdoorBench's defense/ft.py" in markdown and "`ftsam`: ours, fixed" in markdown
