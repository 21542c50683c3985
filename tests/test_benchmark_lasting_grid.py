"""Issue 29's 100-epoch table as a grid (benchmarks/grids/lasting.yaml): every cell runs to 100 epochs with the
fixed evaluation subsets, and the rule's cells run the frozen config itself on its held-out seeds only."""

from pathlib import Path

from ftsam_plugin.grid.spec import load_grid

GRID = Path(__file__).resolve().parents[1] / "benchmarks" / "grids" / "lasting.yaml"


def test_every_cell_runs_100_epochs_on_the_fixed_subsets():
    cells = load_grid(str(GRID), need_records=False).cells
    assert len(cells) == 54 and len({c.folder for c in cells}) == 54
    for cell in cells:
        settings = dict(cell.settings)
        assert (settings["epochs"], settings["eval_every"], settings["eval_subset"]) == (100, 5, 2000), cell
        assert cell.folder_name.startswith("lasting_")  # never the CPU study's folders in the same records
    by_group = {}
    for cell in cells:
        by_group.setdefault(cell.group, set()).add((Path(cell.record).name.split("_")[-2], dict(cell.settings)
                                                    ["random_seed"]))
    attacks = {"badnet", "blended", "lf"}
    assert by_group.pop("rule") == {(a, s) for a in attacks for s in (3, 4, 5)}
    assert set(by_group) == {"reference", "default", "paper-cpu", "cpu-recommendation", "path-aware"}
    assert all(pairs == {(a, s) for a in attacks for s in (0, 1, 2)} for pairs in by_group.values())


def test_the_rule_cells_take_the_frozen_config_not_a_copy_of_its_values():
    rule = [c for c in load_grid(str(GRID), need_records=False).cells if c.group == "rule"]
    for cell in rule:
        settings = dict(cell.settings)
        assert settings["yaml_path"] == "cifar10_lasting" and cell.defense == "ftsam"
        copied = {"rho", "sam_epochs", "unlearn", "unlearn_eps", "unlearn_frac", "perturbation"} & set(settings)
        assert not copied, cell
