"""`ftsam leaderboard` on a tiny records tree: numbers vs direct evaluation, summaries, cache, filters, outputs."""

import argparse
import csv
import json
import os
import re
import shutil

import pytest
import torch

from ftsam_plugin import leaderboard, metrics
from ftsam_plugin.data.records import (load_attack_result, save_defense_result, write_metrics_csv,
                                       write_metrics_summary_csv)
from ftsam_plugin.io import safe_load
from ftsam_plugin.models import create_model

from helpers import make_attack_record, one_torch_thread, run_cli  # noqa: F401 (autouse fixture)

DEFEND = ["--yaml_path", "cpu", "--device", "cpu", "--ratio", "0.5", "--batch_size", "8", "--num_workers", "0",
          "--epochs", "1"]


def _save_noisy(record, name, scale, seed):
    """A defense result without summary: the attacked weights plus noise."""
    state = safe_load(record / "attack_result.pt")["model"]
    gen = torch.Generator().manual_seed(seed)
    state = {k: v + scale * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
             for k, v in state.items()}
    model = create_model("preactresnet18", 10, width=0.125)
    model.load_state_dict(state)
    return save_defense_result("preactresnet18", 10, model, str(record / "defense" / name))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("lb")
    bad = make_attack_record(root, name="rec_bad", attack="badnet", n_per_class=4, epochs=1)
    blend = make_attack_record(root, name="rec_blend", attack="blended", n_per_class=4, epochs=1)
    try:  # prefer the real defenses; fall back to perturbed copies written like a defense would
        import ftsam_plugin.defense.cli  # noqa: F401

        for name in ("ftsam", "ft-baseline"):
            code, _, err = run_cli(["defend", "--defense", name, "--result_file", str(bad), *DEFEND])
            assert code == 0, err
    except ImportError:
        for seed, name in enumerate(("ftsam", "ft-baseline")):
            _save_noisy(bad, name, 0.02, seed)
    _save_noisy(bad, "noisy", 0.05, 10)
    _save_noisy(blend, "noisy", 0.05, 11)
    return root


def opts(*argv):
    parser = argparse.ArgumentParser()
    leaderboard.add_arguments(parser)
    args = parser.parse_args(["unused", "--device", "cpu", *argv])
    return args


def direct(record, defense=None):
    """ACC/ASR/RA by evaluate_backdoor on the record's test sets, the model built independently."""
    loaded = load_attack_result(record)
    model = loaded["model"]
    if defense is not None:
        model = create_model("preactresnet18", 10, width=0.125)
        model.load_state_dict(safe_load(record / "defense" / defense / "defense_result.pt")["model"])
    return metrics.evaluate_backdoor(model, loaded["clean_test"], loaded["bd_test"], device="cpu")


def last_row(path):
    with open(path) as handle:
        row = next(r for r in csv.DictReader(handle) if r[""] == "last")
    return {m: float(row[f"test_{m}"]) for m in ("acc", "asr", "ra")}


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_evaluated_numbers_and_outputs(tree, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run_cli(["leaderboard", str(tree / "record"), "--out", str(out), "--device", "cpu",
                                 "--source", "eval", "--no_cache"])
    assert code == 0, err
    rows = read_csv(out / "leaderboard.csv")
    cells = {(r["record"], r["defense"]): r for r in rows}
    assert {r["defense"] for r in rows} == {"no defense", "ft-baseline", "ftsam", "noisy"}
    assert cells[("rec_bad", "no defense")]["attack"] == "badnet"
    assert cells[("rec_blend", "no defense")]["attack"] == "blended"
    assert cells[("rec_blend", "ftsam")]["source"] == "missing"
    expected = {}
    for rec, defense in [("rec_bad", None), ("rec_bad", "ftsam"), ("rec_bad", "ft-baseline"), ("rec_bad", "noisy"),
                         ("rec_blend", None), ("rec_blend", "noisy")]:
        want = direct(tree / "record" / rec, defense)
        got = cells[(rec, defense or "no defense")]
        assert got["source"] == "eval"
        for m in ("acc", "asr", "ra"):
            assert float(got[f"test_{m}"]) == pytest.approx(want[m], abs=1e-12)
        expected[(rec, defense or "no defense")] = want
    for rec, defense in [("rec_bad", "ftsam"), ("rec_bad", "noisy"), ("rec_blend", "noisy")]:
        bd, df = expected[(rec, "no defense")], expected[(rec, defense)]
        want = (max(0, bd["asr"] - df["asr"]) - max(0, bd["acc"] - df["acc"]) + 1) / 2
        assert float(cells[(rec, defense)]["der"]) == pytest.approx(want, abs=1e-12)
    # average row: mean over the attacks holding the defense
    want = (float(cells[("rec_bad", "noisy")]["test_asr"]) + float(cells[("rec_blend", "noisy")]["test_asr"])) / 2
    assert float(cells[("average", "noisy")]["test_asr"]) == pytest.approx(want)
    # best marker (per row among defenses): the highest DER of rec_bad's defenses carries 'der'
    ders = {d: float(cells[("rec_bad", d)]["der"]) for d in ("ftsam", "ft-baseline", "noisy")}
    top = max(ders.values())
    for d, v in ders.items():
        assert ("der" in cells[("rec_bad", d)]["best"].split(";")) == (v == top)

    md = (out / "leaderboard.md").read_text()
    assert "## cifar10 / preactresnet18" in md
    assert "| record | attack | no defense | ft-baseline | ftsam | noisy |" in md
    assert f"**{100 * top:.2f}**" in md
    page = (out / "leaderboard.html").read_text()
    assert "<style>" in page and "<b>" in page and "data:image/png;base64," in page
    assert not re.search(r"(src|href)=['\"](https?:|//)", page)  # no external assets
    for metric in ("asr", "der"):
        assert (out / f"heatmap_cifar10_preactresnet18_{metric}.png").read_bytes()[:4] == b"\x89PNG"

    # the CSV holds exactly the numbers of the in-memory tables
    tables = leaderboard.build_leaderboard([str(tree / "record")], opts("--source", "eval"))
    for r in rows:
        for m, col in leaderboard.CSV_COLUMNS.items():
            v = tables[0].value(r["record"], r["defense"], m)
            assert (r[col] == "") == (v is None) and (v is None or float(r[col]) == v)


def test_summaries_used_when_present(tree):
    table = leaderboard.build_leaderboard([str(tree / "record")], opts("--no_cache"))[0]
    bad = tree / "record" / "rec_bad"
    attack = table.cells[("rec_bad", "no defense")]
    assert attack.source == "summary:attack_df_summary.csv:last"
    assert {m: attack.get(m) for m in ("acc", "asr", "ra")} == last_row(bad / "attack_df_summary.csv")
    if (bad / "defense" / "ftsam" / "ftsam_df_summary.csv").exists():  # the real defense ran
        cell = table.cells[("rec_bad", "ftsam")]
        assert cell.source.startswith("summary:defense/ftsam/ftsam_df_summary.csv")
        assert {m: cell.get(m) for m in ("acc", "asr", "ra")} == last_row(bad / "defense/ftsam/ftsam_df_summary.csv")
    assert table.cells[("rec_bad", "noisy")].source in ("eval", "cache")

    # BackdoorBench's ft-sam: folder ft-sam/, summary log/d-sam_df_summary.csv; `last` vs `valid_max` rows
    bb = bad / "defense" / "ft-sam"
    try:
        _save_noisy(bad, "ft-sam", 0.01, 5)
        write_metrics_summary_csv(str(bb / "log" / "d-sam_df_summary.csv"),
                                  [{"test_acc": 0.5, "test_asr": 0.75, "test_ra": 0.125},
                                   {"test_acc": 0.25, "test_asr": 0.5, "test_ra": 0.375}])
        for row, want in (("last", (0.25, 0.5, 0.375)), ("valid_max", (0.5, 0.75, 0.375))):
            table = leaderboard.build_leaderboard([str(tree / "record")],
                                                  opts("--attack", "rec_bad", "--defense", "ft-sam",
                                                       "--summary_row", row))[0]
            cell = table.cells[("rec_bad", "ft-sam")]
            assert cell.source == f"summary:defense/ft-sam/log/d-sam_df_summary.csv:{row}"
            assert (cell.acc, cell.asr, cell.ra) == want
    finally:
        shutil.rmtree(bb, ignore_errors=True)

    # a summary far older than its result belongs to an earlier run: ignored
    summary = bad / "attack_df_summary.csv"
    st = os.stat(summary)
    os.utime(summary, ns=(st.st_atime_ns, st.st_mtime_ns - (leaderboard.SUMMARY_MAX_AGE_S + 60) * 10**9))
    try:
        table = leaderboard.build_leaderboard([str(tree / "record")], opts("--attack", "rec_bad", "--defense", "x"))[0]
        assert table.cells[("rec_bad", "no defense")].source in ("eval", "cache")
    finally:
        os.utime(summary, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_time_to_purify_from_each_results_per_epoch_csv(tree, tmp_path):
    from ftsam_plugin.purify import read_history, time_to_purify

    bad = tree / "record" / "rec_bad"
    bb = bad / "defense" / "ft-sam"  # BackdoorBench's ft-sam: log/d-sam_df.csv, no time columns
    try:
        _save_noisy(bad, "ft-sam", 0.01, 5)
        write_metrics_csv(str(bb / "log" / "d-sam_df.csv"),
                          [{"epoch": 1, "test_acc": 0.5, "test_asr": 0.5},
                           {"epoch": 2, "test_acc": 0.6, "test_asr": 0.03},
                           {"epoch": 3, "test_acc": 0.7, "test_asr": 0.04}])
        table = leaderboard.build_leaderboard([str(tree / "record")], opts("--attack", "rec_bad"))[0]
        cell = table.cells[("rec_bad", "ft-sam")]
        assert cell.purify_source == "defense/ft-sam/log/d-sam_df.csv"
        assert (cell.purify.epoch, cell.purify.train_s, cell.purify.epochs, cell.purify.eval_every) == (2, None, 3, 1)
        assert table.cells[("rec_bad", "noisy")].purify is None  # no per-epoch CSV
        assert table.cells[("rec_bad", "no defense")].purify is None
        ours = bad / "defense" / "ftsam" / "ftsam_df.csv"
        if ours.exists():  # the real defense ran: its time columns give seconds
            want = time_to_purify(read_history(str(ours)))
            assert table.cells[("rec_bad", "ftsam")].purify == want and want.total_train_s > 0
        out = tmp_path / "out"
        code, _, err = run_cli(["leaderboard", str(tree / "record"), "--attack", "rec_bad", "--out", str(out),
                                "--device", "cpu"])
        assert code == 0, err
        rows = {r["defense"]: r for r in read_csv(out / "leaderboard.csv") if r["record"] == "rec_bad"}
        assert {k: rows["ft-sam"][k] for k in leaderboard.PURIFY_COLUMNS} == {
            "purify_epoch": "2", "purify_train_time_s": "", "total_epochs": "3", "total_train_time_s": "",
            "purify_eval_every": "1", "purify_checked": "false"}  # BackdoorBench's: no completion marker covers it
        assert rows["noisy"]["purify_epoch"] == ""
        if ours.exists():
            assert rows["ftsam"]["purify_checked"] == "true"  # our run's marker fingerprints its CSV
        md = (out / "leaderboard.md").read_text()
        assert "### Time to purify" in md
        assert "| rec_bad | ft-sam | epoch 2 † | 3 epochs | 70.00 | 4.00 | 1 epoch(s) |" in md
        assert "Time to purify" in (out / "leaderboard.html").read_text()
    finally:
        shutil.rmtree(bb, ignore_errors=True)


def test_cache_hits_and_invalidation(tree, monkeypatch):
    calls = []
    real = metrics.evaluate_backdoor

    def counting(model, *args, **kwargs):
        calls.append(1)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(metrics, "evaluate_backdoor", counting)
    args = opts("--source", "eval", "--attack", "rec_blend")
    leaderboard.build_leaderboard([str(tree / "record")], args)  # fills the caches (2 models)
    calls.clear()
    table = leaderboard.build_leaderboard([str(tree / "record")], args)[0]
    assert calls == [] and table.cells[("rec_blend", "noisy")].source == "cache"
    folder = tree / "record" / "rec_blend" / "defense" / "noisy"
    cache = json.loads((folder / leaderboard.CACHE_NAME).read_text())
    assert set(cache["key"]["result"]) == {"size", "mtime_ns", "sha256"}

    _save_noisy(tree / "record" / "rec_blend", "noisy", 0.5, 99)  # rewritten result: re-evaluated, new numbers
    table = leaderboard.build_leaderboard([str(tree / "record")], args)[0]
    assert len(calls) == 1 and table.cells[("rec_blend", "noisy")].source == "eval"
    want = direct(tree / "record" / "rec_blend", "noisy")
    assert table.value("rec_blend", "noisy", "acc") == pytest.approx(want["acc"], abs=1e-12)
    assert table.value("rec_blend", "noisy", "ra") == pytest.approx(want["ra"], abs=1e-12)

    calls.clear()
    pt = folder / "defense_result.pt"
    st = os.stat(pt)
    os.utime(pt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: re-evaluated
    leaderboard.build_leaderboard([str(tree / "record")], args)
    assert len(calls) == 1
    calls.clear()
    leaderboard.build_leaderboard([str(tree / "record")], opts("--source", "eval", "--attack", "rec_blend",
                                                               "--no_cache"))
    assert len(calls) == 2


def test_filters_sort_and_metric(tree, tmp_path):
    root = str(tree / "record")
    table = leaderboard.build_leaderboard([root], opts("--defense", "ft*"))[0]
    assert table.defenses == ["no defense", "ft-baseline", "ftsam"]
    assert [r.label for r in table.rows] == ["rec_bad", "rec_blend"]
    table = leaderboard.build_leaderboard([root], opts("--attack", "BLEND*", "--defense", "noisy"))[0]
    assert [r.label for r in table.rows] == ["rec_blend"]  # matched by attack type, case-insensitive
    table = leaderboard.build_leaderboard([root], opts("--defense", "noisy", "--sort", "asr:noisy"))[0]
    asr = [table.value(r.label, "noisy", "asr") for r in table.rows]
    assert asr == sorted(asr)  # lowest ASR first
    table = leaderboard.build_leaderboard([root], opts("--defense", "noisy", "--sort", "asr:noisy", "--reverse"))[0]
    assert [table.value(r.label, "noisy", "asr") for r in table.rows] == sorted(asr, reverse=True)

    out = tmp_path / "asr"
    code, stdout, err = run_cli(["leaderboard", root, "--out", str(out), "--device", "cpu", "--metric", "asr",
                                 "--model", "preact*", "--dataset", "cifar10"])
    assert code == 0, err
    line = next(x for x in (out / "leaderboard.md").read_text().splitlines() if x.startswith("| rec_blend"))
    assert re.fullmatch(r"\| rec_blend \| blended \| [\d.]+ \| — \| — \| \**[\d.]+\** \|", line), line

    code, _, err = run_cli(["leaderboard", root, "--out", str(out), "--dataset", "cifar100"])
    assert code == 2 and "match the filters" in err
    code, _, err = run_cli(["leaderboard", str(tmp_path / "nothing"), "--out", str(out)])
    assert code == 2 and "not a folder" in err


RETUNE = "--split_ratio 0.5 --epochs 1 --poison_num 2"
TAGS = {"p_asr": "p2_r0.5_e1_lr0.01_m0.9_wd0_b128_s42", "control_asr": "p0_r0.5_e1_lr0.01_m0.9_wd0_b128_s42"}


def test_retune_columns_equal_the_retune_summaries(tree, tmp_path, monkeypatch):
    from ftsam_plugin.retune import runs

    root = tree / "record"
    out = tmp_path / "retune"
    argv = ["leaderboard", str(root), "--out", str(out), "--device", "cpu", "--retune", "--retune_args", RETUNE]
    code, stdout, err = run_cli(argv)
    assert code == 0, err
    rows = read_csv(out / "leaderboard.csv")
    cells = {(r["record"], r["defense"]): r for r in rows}
    checked = 0
    for (rec, defense), row in cells.items():
        if rec == "average" or row["source"] == "missing":
            continue
        folder = root / rec if defense == "no defense" else root / rec / "defense" / defense
        for column, tag in TAGS.items():
            summary = json.loads((folder / "retune" / tag / "summary.json").read_text())
            assert float(row[column]) == summary["after"]["asr"]
            assert summary["retune_set"]["poisoned"] == (2 if column == "p_asr" else 0)
            checked += 1
        assert row["retune_source"] == "run;run"
    assert checked == 2 * 6
    want = (float(cells[("rec_bad", "noisy")]["p_asr"]) + float(cells[("rec_blend", "noisy")]["p_asr"])) / 2
    assert float(cells[("average", "noisy")]["p_asr"]) == pytest.approx(want)
    assert "P-ASR / control ASR after the retuning attack" in (out / "leaderboard.md").read_text()
    assert (out / "heatmap_cifar10_preactresnet18_pasr.png").read_bytes()[:4] == b"\x89PNG"

    # the same number as `ftsam retune` run by hand on that cell
    code, _, err = run_cli(["retune", "--result_file", str(root / "rec_bad"), "--defense", "noisy", "--device", "cpu",
                            *RETUNE.split(), "--force"])
    assert code == 0, err
    by_hand = json.loads((root / "rec_bad/defense/noisy/retune" / TAGS["p_asr"] / "summary.json").read_text())
    assert by_hand["after"]["asr"] == float(cells[("rec_bad", "noisy")]["p_asr"])

    # a second leaderboard reads the summaries (no attack run); a replaced result file is attacked again
    calls = []
    real = runs.retune_model
    monkeypatch.setattr(runs, "retune_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    code, _, err = run_cli(argv)
    assert code == 0, err
    assert calls == [] and {r["retune_source"] for r in read_csv(out / "leaderboard.csv")
                            if r["source"] not in ("missing", "mean")} == {"summary;summary"}
    _save_noisy(root / "rec_blend", "noisy", 0.05, 12)
    code, _, err = run_cli(argv)
    assert code == 0, err
    assert len(calls) == 2
    code, _, err = run_cli(["leaderboard", str(root), "--out", str(out), "--metric", "pasr"])
    assert code == 2 and "--metric pasr needs --retune" in err
    code, _, err = run_cli([*argv[:-1], "--poison_num x"])
    assert code == 2 and "--retune_args" in err and "invalid int value" in err
