"""Time to purify (ftsam_plugin.purify) from per-epoch rows: ours (with time columns) and BackdoorBench's."""

import math

import pytest

from ftsam_plugin.purify import RunClock, read_history, time_to_purify


def rows_of(asrs, eval_every=2, epochs=None, seconds=10.0):
    """Rows as a defense writes them: every epoch has times, every eval_every-th (and the last) ACC/ASR."""
    epochs = epochs or eval_every * len(asrs)
    evaluated = iter(asrs)
    rows = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "train_time_s": seconds * e, "wall_time_s": 1.5 * seconds * e}
        if e % eval_every == 0 or e == epochs:
            row.update(test_acc=0.8, test_asr=next(evaluated))
        rows.append(row)
    return rows


def test_first_epoch_from_which_asr_stays_low():
    p = time_to_purify(rows_of([0.9, 0.04, 0.2, 0.03, 0.01]))  # epochs 2..10; dips at 4, back up at 6
    assert p.purified and p.epoch == 8 and (p.train_s, p.wall_s) == (80.0, 120.0)
    assert (p.epochs, p.total_train_s, p.total_wall_s, p.eval_every, p.evaluated) == (10, 100.0, 150.0, 2, 5)
    assert (p.final_acc, p.final_asr) == (0.8, 0.01)
    assert p.when() == "epoch 8 (80 s)" and p.total() == "10 epochs (100 s)"
    assert "epoch 8 of 10, 80 s of 100 s training (120 s of 150 s wall)" in p.describe()
    assert "evaluated every 2 epoch(s)" in p.describe()
    assert p.summary_columns() == {"purify_epoch": 8, "purify_train_time_s": 80.0, "purify_wall_time_s": 120.0,
                                   "purify_eval_every": 2}


def test_threshold_is_inclusive_and_a_late_relapse_is_never():
    assert time_to_purify(rows_of([0.5, 0.05, 0.05])).epoch == 4
    p = time_to_purify(rows_of([0.01, 0.02, 0.06]))
    assert not p.purified and p.when() == "never" and "never in 6 epochs (60 s training, 90 s wall)" in p.describe()
    assert p.summary_columns()["purify_epoch"] == "never" and p.summary_columns()["purify_train_time_s"] == "never"
    assert time_to_purify(rows_of([0.01, 0.02])).epoch == 2 and time_to_purify(rows_of([0.01]), 0.0).epoch is None


def test_nan_asr_is_not_purified():
    rows = rows_of([0.01, 0.01, 0.01])
    rows[3]["test_asr"] = "nan_value"  # BackdoorBench's spelling of NaN
    assert time_to_purify(rows).epoch == 6
    rows[5]["test_asr"] = math.nan
    assert time_to_purify(rows).epoch is None


def test_granularity_is_the_largest_gap_between_evaluations():
    assert time_to_purify(rows_of([0.5, 0.5, 0.01], eval_every=4, epochs=10)).eval_every == 4  # 4, 8, 10
    assert time_to_purify(rows_of([0.5, 0.01], eval_every=1)).eval_every == 1


def test_no_evaluation_is_unknown_not_never():
    p = time_to_purify([{"epoch": 1, "train_time_s": 1.0, "wall_time_s": 1.0}])
    assert p.evaluated == 0 and p.when() == "—" and "unknown" in p.describe()
    assert set(p.summary_columns().values()) == {None}
    assert time_to_purify([]).evaluated == 0


def test_backdoorbench_csv_without_time_columns(tmp_path):
    path = tmp_path / "d-sam_df.csv"  # BackdoorBench's Metric_Aggregator layout: index column, strings
    path.write_text(",epoch,test_acc,test_asr,test_ra\n0,0,0.9,0.6,0.3\n1,1,0.88,0.04,0.8\n2,2,0.87,0.03,0.8\n")
    p = time_to_purify(read_history(str(path)))  # its trainer counts epochs from 0: three epochs, 1-based 1..3
    assert (p.epoch, p.train_s, p.total_train_s, p.epochs) == (2, None, None, 3)
    assert p.when() == "epoch 2" and p.total() == "3 epochs"
    assert "epoch 2 of 3;" in p.describe()
    no_epoch = [{"test_asr": "0.5"}, {"test_asr": "0.01"}]  # no epoch column: the row's position
    assert time_to_purify(no_epoch).epoch == 2


def test_run_clock_accumulates_and_continues_a_resumed_history():
    clock = RunClock()
    first = clock.columns(2.0)
    second = clock.columns(3.0)
    assert (first["train_time_s"], second["train_time_s"]) == (2.0, 5.0)
    assert 0 <= first["wall_time_s"] <= second["wall_time_s"]
    resumed = RunClock([{"epoch": 1}, {"epoch": 2, **second}])
    third = resumed.columns(1.0)
    assert third["train_time_s"] == 6.0 and third["wall_time_s"] >= second["wall_time_s"]
    assert RunClock([{"epoch": 1, "test_asr": 0.5}]).columns(1.0) == {}  # an older history: totals unknown
    early = RunClock()
    early.add(4.0)  # work before the epoch loop (--unlearn's scan): in both totals
    cols = early.columns(1.0)
    assert cols["train_time_s"] == 5.0 and cols["wall_time_s"] >= 4.0


@pytest.mark.parametrize("value,seconds", [(5.0, "5 s"), (0.123, "0.12 s"), (1234.4, "1234 s")])
def test_seconds_are_readable(value, seconds):
    p = time_to_purify([{"epoch": 1, "test_asr": 0.0, "test_acc": 0.9, "train_time_s": value, "wall_time_s": value}])
    assert p.when() == f"epoch 1 ({seconds})"
