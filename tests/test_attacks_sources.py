"""`ftsam attack`'s choice of trigger code (ftsam's or BackdoorBench's), without a BackdoorBench checkout."""

import pytest

from ftsam_plugin.attacks import catalog
from ftsam_plugin.io import safe_load
from helpers import check_error, make_attack_record, make_image_folder, run_cli

NEEDS_BB = "set BACKDOORBENCH_ROOT to a BackdoorBench checkout"


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.delenv("BACKDOORBENCH_ROOT", raising=False)
    make_image_folder(tmp_path / "data" / "cifar10", n_per_class=2, classes=10)
    return tmp_path


def _attack(root, *flags):
    return run_cli(["attack", *flags, "--dataset_path", str(root / "data"), "--record_root", str(root / "record"),
                    "--save_folder_name", "x", "--device", "cpu", "--num_workers", "0", "--progress", "False"])


@pytest.mark.parametrize("flags, line", [
    (["--attack", "lf"], f"error: attack lf uses BackdoorBench's trigger code; {NEEDS_BB}"),
    (["--attack", "sig"], f"error: attack sig uses BackdoorBench's trigger code; {NEEDS_BB}"),
    (["--attack", "blended", "--trigger_from", "backdoorbench"],
     f"error: attack blended uses BackdoorBench's trigger code; {NEEDS_BB}"),
])
def test_an_attack_needing_backdoorbench_says_so_in_one_line(data, flags, line):
    assert check_error(_attack(data, *flags), "") == line
    assert not (data / "record").exists()


def test_a_folder_that_is_not_backdoorbench_is_named(data, monkeypatch):
    monkeypatch.setenv("BACKDOORBENCH_ROOT", str(data / "data"))
    check_error(_attack(data, "--attack", "lf"), f"BACKDOORBENCH_ROOT={data / 'data'} is not a BackdoorBench checkout "
                                                  f"(no utils/aggregate_block/bd_attack_generate.py); {NEEDS_BB}")


@pytest.mark.parametrize("flags, needle", [
    (["--attack", "lf", "--trigger_from", "ftsam"], "attack lf has no ftsam trigger, only backdoorbench's"),
    (["--attack", "blended", "--trigger_from", "backdoorbench", "--blended_alpha", "0.3"],
     "--blended_alpha sets ftsam's triggers, but attack blended runs backdoorbench's"),
    (["--attack", "badnet", "--bd_yaml_path", "x.yaml"],
     "--bd_yaml_path sets BackdoorBench's triggers, but attack badnet runs ftsam's"),
])
def test_settings_for_the_other_trigger_code_are_refused(data, flags, needle):
    check_error(_attack(data, *flags), needle)
    assert not (data / "record").exists()


def test_blended_is_ftsams_with_or_without_backdoorbench(tmp_path, monkeypatch):
    """The default does not depend on the environment: with BACKDOORBENCH_ROOT set (here to a folder that is not a
    checkout, so any use of it would fail), `--attack blended` is still ftsam's pattern, and the record says so."""
    monkeypatch.setenv("BACKDOORBENCH_ROOT", str(tmp_path))
    record = make_attack_record(tmp_path, name="b", attack="blended", n_per_class=4)
    info = safe_load(record / "info.pickle", what="info")
    assert info["trigger_from"] == "ftsam"
    assert info["trigger_source"] == ("ftsam-plugin 0.1.0 attacks/triggers.py: code-generated pattern "
                                      "(blended_pattern) mixed in with weight blended_alpha")
    assert info["trigger_settings"] == "attack_target=0, blended_alpha=0.2, pratio=0.1"


def test_help_lists_the_attacks_with_and_without_backdoorbench(capsys):
    code, out, _ = run_cli(["attack", "--help"])
    assert code == 0
    assert "without BackdoorBench (ftsam's own triggers): badnet, blended" in out
    for name in ("lf", "sig", "ctrl", "ftrojann", "ssba", "lc", "badnet", "blended"):
        assert f"\n    {name:10s}" in out, name
    assert "--attack blended --trigger_from backdoorbench" in out
    assert set(catalog.names()) == {"badnet", "blended", "ctrl", "ftrojann", "lc", "lf", "sig", "ssba"}
