"""`ftsam grid`'s grid file: expansion into cells, folder names, identity, and one-line errors (no run starts)."""

import os
import textwrap

import pytest

from ftsam_plugin.errors import FtsamError
from ftsam_plugin.grid.spec import load_grid


def fake_record(root, name):
    folder = root / "record" / name
    folder.mkdir(parents=True)
    (folder / "attack_result.pt").write_bytes(b"")  # the spec only looks for the file
    return folder


@pytest.fixture
def grid(tmp_path):
    fake_record(tmp_path, "badnet_0_1")
    fake_record(tmp_path, "blended_0_1")

    def write(text: str, name: str = "grid.yaml"):
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return str(path)

    return write


def test_expansion_order_names_and_settings(grid, tmp_path):
    spec = load_grid(grid("""
        records: [record/*]
        seeds: [0, 1]
        common: {dataset_path: data, device: cpu, epochs: 5}
        defenses:
          - defense: ftsam
            rho: [2, 4]
            epochs: 20
          - defense: ft-baseline
            seeds: [3]
            records: [blended_0_1]
            name: "ft_e{epochs}"
    """))
    labels = [c.label for c in spec.cells]
    assert labels == [
        "badnet_0_1/ftsam_rho2_epochs20_s0", "badnet_0_1/ftsam_rho4_epochs20_s0",
        "blended_0_1/ftsam_rho2_epochs20_s0", "blended_0_1/ftsam_rho4_epochs20_s0",
        "badnet_0_1/ftsam_rho2_epochs20_s1", "badnet_0_1/ftsam_rho4_epochs20_s1",
        "blended_0_1/ftsam_rho2_epochs20_s1", "blended_0_1/ftsam_rho4_epochs20_s1",
        "blended_0_1/ft_e5_s3",
    ]
    first = dict(spec.cells[0].settings)
    assert first["epochs"] == 20 and first["random_seed"] == 0  # an entry's own flag wins over common
    assert first["dataset_path"] == os.path.join(str(tmp_path), "data")  # relative to the grid file
    assert spec.cells[0].folder == os.path.join(str(tmp_path), "record", "badnet_0_1", "defense",
                                                "ftsam_rho2_epochs20_s0")
    argv = spec.cells[-1].argv("VIEW")
    assert argv[:4] == ["--defense", "ft-baseline", "--result_file", "VIEW"]
    assert "--random_seed" in argv and argv[argv.index("--random_seed") + 1] == "3"


def test_identity_follows_every_setting(grid):
    one = load_grid(grid("records: [record/badnet_0_1]\ndefenses: [{defense: ftsam, rho: 4}]\n", "a.yaml")).cells[0]
    same = load_grid(grid("records: [record/badnet_0_1]\ndefenses: [{defense: ftsam, rho: 4.0}]\n", "b.yaml")).cells[0]
    other = load_grid(grid("records: [record/badnet_0_1]\ncommon: {lr: 0.1}\ndefenses: [{defense: ftsam, rho: 4}]\n",
                           "c.yaml")).cells[0]
    assert one.folder_name == same.folder_name == other.folder_name == "ftsam_rho4_s0"
    assert one.settings_digest == same.settings_digest  # 4 and 4.0 are the same flag value
    assert other.settings_digest != one.settings_digest  # a common flag changes the run: another cell


@pytest.mark.parametrize("text, needle", [
    ("defenses: [{defense: ftsam}]", "`records` must list"),
    ("records: [record/nothing*]\ndefenses: [{defense: ftsam}]", "matches no record folder"),
    ("records: [record/*]\ndefenses: [{defense: fts}]", "unknown defense 'fts' (did you mean ftsam?)"),
    ("records: [record/*]\ndefenses: [{defense: ftsam, rhoo: 2}]", "'rhoo' is not an `ftsam defend` flag (did you "
                                                                   "mean rho?)"),
    ("records: [record/*]\ndefenses: [{defense: ftsam, resume: true}]", "resume is set by the grid"),
    ("records: [record/*]\ndefenses: [{defense: ftsam, random_seed: 1}]", "list the seeds under `seeds`"),
    ("records: [record/*]\ndefenses: [{defense: ftsam, epochs: many}]", "argument --epochs: invalid int value"),
    ("records: [record/*]\ndefenses: [{defense: ftsam, rho: []}]", "an empty list expands to no cell"),
    ("records: [record/*]\ncommon: {rho: [1, 2]}\ndefenses: [{defense: ftsam}]", "a list expands only inside"),
    ("records: [record/*]\nseeds: [-1]\ndefenses: [{defense: ftsam}]", "seeds must be seeds in 0..2^32-1"),
    ("records: [record/*]\ndefenses: [{defense: ftsam, records: [nope]}]", "'nope' is not one of the grid's records"),
    ("records: [record/*]\ndefenses: [{defense: ftsam, rho: [2, 4], name: same}]", "both name the folder"),
    ("records: [record/*]\ndefenses: [{defense: ftsam, name: 'a/{rho}', rho: 2}]", "may hold only letters"),
    ("records: [record/*]\ndefenses: [{defense: ftsam, name: 'x{lr}'}]", "which is not a flag of the cell"),
    ("records: [record/*]\ndefenses: [{defense: ftsam}]\nextra: 1", "unknown key 'extra'"),
])
def test_bad_grid_files_are_one_line_errors(grid, text, needle):
    with pytest.raises(FtsamError) as err:
        load_grid(grid(text))
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_same_cell_twice_is_kept_once(grid):
    spec = load_grid(grid("records: [record/badnet_0_1]\ndefenses: [{defense: ftsam, rho: 2}, {defense: ftsam, "
                          "rho: 2}]\n"))
    assert [c.label for c in spec.cells] == ["badnet_0_1/ftsam_rho2_s0"]


def test_long_names_are_cut_with_a_digest(grid):
    spec = load_grid(grid("records: [record/badnet_0_1]\ndefenses: [{defense: ftsam, rho_auto_grid: '"
                          + ",".join(str(k) for k in range(1, 60)) + "'}]\n"))
    name = spec.cells[0].folder_name
    assert len(name) == 100 and name.startswith("ftsam_rho_auto_grid1-2-3")
