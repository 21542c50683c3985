"""Under the default protocol (`fixed`), config values that differ from what BackdoorBench's scripts ran are said in
the log, one line each: a reference YAML's `amp: True` (ft-sam.py never applied it; ours would run bf16 autocast,
even on CPU) and FT's label smoothing (ft.py trains with plain cross-entropy). And each log line reaches the
console once, also when the root logger prints too (BackdoorBench's loader installs logging's default handler)."""

import argparse
import logging
import sys

import pytest

from ftsam_plugin.defense.ftsam import FTSAM, FineTune

# the AMP and device keys of BackdoorBench's config/defense/ft-sam/gtsrb.yaml
REFERENCE_YAML = "device: 'cuda'\namp: True\nepochs: 50\nrho_max: 8.0\nrho_min: 8.0\nlabel_smoothing: 0.0\n"


def notes(cls, *argv):
    parser = cls.add_arguments(argparse.ArgumentParser())
    return cls(parser.parse_args(["--device", "cpu", *argv])).args.protocol_notes


@pytest.fixture()
def reference_yaml(tmp_path):
    path = tmp_path / "gtsrb.yaml"
    path.write_text(REFERENCE_YAML)
    return str(path)


def test_amp_from_a_reference_yaml_is_said(reference_yaml):
    (line,) = notes(FTSAM, "--yaml_path", reference_yaml)
    assert line.startswith("amp is on from the config (bf16 autocast on cpu); BackdoorBench's ft-sam.py never "
                           "applies its YAML's amp"), line
    assert "--amp false" in line and "--protocol backdoorbench" in line
    assert notes(FTSAM, "--yaml_path", reference_yaml, "--amp", "true") == []  # asked for: nothing to say
    assert notes(FTSAM, "--yaml_path", reference_yaml, "--protocol", "backdoorbench") == []  # it runs fp32
    assert notes(FTSAM, "--yaml_path", "cpu") == []  # our configs: amp false


def test_ft_baselines_label_smoothing_is_said(reference_yaml):
    (line,) = notes(FineTune, "--yaml_path", "cpu")
    assert line.startswith("label smoothing 0.1 (config or default); BackdoorBench's ft.py trains with plain "
                           "cross-entropy"), line
    assert notes(FineTune, "--yaml_path", "cpu", "--label_smoothing", "0") == []
    assert notes(FineTune, "--yaml_path", "cpu", "--protocol", "backdoorbench") == []  # plain CE there
    both = notes(FineTune, "--yaml_path", reference_yaml, "--label_smoothing", "0.1")
    assert len(both) == 1 and "ft.py runs fp16 autocast on CUDA only, none on CPU" in both[0]


def test_notes_go_to_the_log(tmp_path, reference_yaml):
    parser = FTSAM.add_arguments(argparse.ArgumentParser())
    defense = FTSAM(parser.parse_args(["--device", "cpu", "--yaml_path", reference_yaml]))
    defense.args.log = str(tmp_path)
    defense.set_logger()
    defense._close_logger()
    log = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert "protocol fixed: amp is on from the config (bf16 autocast on cpu)" in log


def test_console_lines_print_once_when_the_root_logger_prints_too(tmp_path, capsys):
    parser = FTSAM.add_arguments(argparse.ArgumentParser())
    defense = FTSAM(parser.parse_args(["--device", "cpu", "--yaml_path", "cpu"]))
    defense.args.log = str(tmp_path)
    root = logging.getLogger()
    default = logging.StreamHandler(sys.stderr)  # what logging.warning() installs on a root without handlers
    root.addHandler(default)
    try:
        defense.set_logger()
        logging.getLogger("ftsam_plugin.defense").info("a line of the run")
        defense._close_logger()
        assert logging.getLogger("ftsam_plugin").propagate  # restored for whoever logs next
    finally:
        root.removeHandler(default)
    assert capsys.readouterr().err.count("a line of the run") == 1
    assert "a line of the run" in "".join(p.read_text() for p in tmp_path.glob("*.log"))
