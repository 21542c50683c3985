"""checkpoint/last.pt exists to resume an unfinished run: kept while the run is unfinished, removed once its result
is written (86 MB for PreAct-ResNet18; BackdoorBench's defenses keep none), kept on request (--keep_checkpoint)."""

import pytest

from ftsam_plugin.defense.ftsam import FTSAM
from ftsam_plugin.io import safe_load

from helpers import check_error, make_attack_record, one_torch_thread, run_cli  # noqa: F401 (fixture)

FLAGS = ["--yaml_path", "cpu", "--device", "cpu", "--ratio", "0.2", "--batch_size", "8", "--num_workers", "0",
         "--epochs", "2"]


class Interrupt(KeyboardInterrupt):
    pass


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return make_attack_record(tmp_path_factory.mktemp("ckpt"), name="rec", n_per_class=10, epochs=1)


def defend(record, *extra):
    return run_cli(["defend", "--result_file", str(record), *FLAGS, *extra])


def test_a_finished_run_keeps_no_checkpoint_and_resume_says_why(record):
    code, _, err = defend(record)
    assert code == 0, err
    out = record / "defense" / "ftsam"
    assert (out / "defense_result.pt").is_file() and (out / "checkpoint").is_dir()
    assert not (out / "checkpoint" / "last.pt").exists()
    assert f"removed the checkpoint {out / 'checkpoint' / 'last.pt'}: the run finished" in err
    # nothing to resume: one line naming the fix, the finished run untouched
    before = (out / "defense_result.pt").read_bytes()
    line = check_error(defend(record, "--resume"), "holds a finished run", whole=False)
    assert "nothing to resume: run without --resume to run it again" in line and "--keep_checkpoint true" in line
    assert (out / "defense_result.pt").read_bytes() == before


def test_keep_checkpoint_keeps_it(record):
    code, _, err = defend(record, "--defense", "ft-baseline", "--keep_checkpoint")
    assert code == 0, err
    ckpt = safe_load(record / "defense" / "ft-baseline" / "checkpoint" / "last.pt", what="checkpoint")
    assert ckpt["epoch"] == 2 and "removed the checkpoint" not in err


def test_an_unfinished_run_keeps_it_and_resumes(record, monkeypatch):
    def stop(self, epoch):
        if epoch == 1:
            raise Interrupt()

    with monkeypatch.context() as patch:
        patch.setattr(FTSAM, "_after_epoch", stop)
        assert defend(record, "--force")[0] == 130
    out = record / "defense" / "ftsam"
    assert safe_load(out / "checkpoint" / "last.pt", what="checkpoint")["epoch"] == 1
    code, _, err = defend(record, "--resume")
    assert code == 0, err
    assert "resumed from" in err and "after epoch 1" in err
    assert not (out / "checkpoint" / "last.pt").exists()  # now finished
