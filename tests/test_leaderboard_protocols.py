"""The leaderboard names how each defense column ran: ours under which protocol (from the run's summary), or
BackdoorBench's own script, so `ftsam` (ours, `fixed`) and the reference `ft-sam` are not read as one recipe."""

import csv
import shutil

from ftsam_plugin.data.completion import mark_complete
from ftsam_plugin.leaderboard import run_protocol

from helpers import make_attack_record, one_torch_thread, run_cli  # noqa: F401 (fixture)

SUMMARY = ",test_acc,test_asr,test_ra{extra}\nlast,0.5,0.1,0.4{value}\nvalid_max,0.5,0.1,0.4{value}\n" \
          "exist_nan_value,False,False,False{nan}\n"


def summary(folder, name, protocol=None):
    folder.mkdir(parents=True, exist_ok=True)
    extra = ("", "", "") if protocol is None else (",protocol", f",{protocol}", ",False")
    (folder / name).write_text(SUMMARY.format(extra=extra[0], value=extra[1], nan=extra[2]))
    (folder / "defense_result.pt").write_bytes(b"weights")


def test_run_protocol_reads_the_summary_of_our_runs(tmp_path):
    ours = tmp_path / "ftsam"
    summary(ours, "ftsam_df_summary.csv", "backdoorbench")
    mark_complete(str(ours), ["defense_result.pt", "ftsam_df_summary.csv"])
    assert run_protocol(str(ours)) == "ours, backdoorbench"
    older = tmp_path / "ft-baseline"
    summary(older, "ft-baseline_df_summary.csv")
    mark_complete(str(older), ["defense_result.pt", "ft-baseline_df_summary.csv"])
    assert run_protocol(str(older)) == "ours, protocol not recorded"
    reference = tmp_path / "ft-sam"  # BackdoorBench's own: no completion marker
    summary(reference / "log", "d-sam_df_summary.csv")
    assert run_protocol(str(reference)) == "BackdoorBench's defense/ft-sam.py"


def test_tables_and_csv_name_each_columns_protocol(tmp_path):
    record = make_attack_record(tmp_path, name="rec", n_per_class=10, epochs=1)
    flags = ["--yaml_path", "cpu", "--device", "cpu", "--ratio", "0.2", "--batch_size", "8", "--num_workers", "0",
             "--epochs", "1"]
    for extra in (["--defense", "ftsam"], ["--defense", "ft-baseline", "--protocol", "backdoorbench"]):
        code, _, err = run_cli(["defend", "--result_file", str(record), *flags, *extra])
        assert code == 0, err
    reference = record / "defense" / "ft-sam"  # as BackdoorBench's ft-sam.py leaves it (its summary in log/)
    summary(reference / "log", "d-sam_df_summary.csv")
    shutil.copy(record / "defense" / "ftsam" / "defense_result.pt", reference / "defense_result.pt")
    code, _, err = run_cli(["leaderboard", str(tmp_path / "record"), "--out", str(tmp_path / "board"), "--device",
                            "cpu", "--num_workers", "0"])
    assert code == 0, err
    markdown = (tmp_path / "board" / "leaderboard.md").read_text()
    assert ("Protocols (like-for-like with BackdoorBench's ft-sam / ft: ours with --protocol backdoorbench; `fixed` "
            "is our own recipe): `ft-baseline`: ours, backdoorbench; `ft-sam`: BackdoorBench's defense/ft-sam.py; "
            "`ftsam`: ours, fixed") in markdown
    assert "; ftsam: ours, fixed</p>" in (tmp_path / "board" / "leaderboard.html").read_text()
    with open(tmp_path / "board" / "leaderboard.csv", newline="") as handle:
        cells = {r["defense"]: r["protocol"] for r in csv.DictReader(handle) if r["record"] == "rec"}
    assert cells == {"no defense": "", "ft-baseline": "ours, backdoorbench", "ftsam": "ours, fixed",
                     "ft-sam": "BackdoorBench's defense/ft-sam.py"}
