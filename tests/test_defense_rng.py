"""A defense run depends only on its training settings: how often it evaluates does not change the model it trains
(evaluation's DataLoaders would otherwise draw from the global generator that the train augmentations use)."""

import pytest
import torch

from ftsam_plugin.io import safe_load

from helpers import clone_record, make_attack_record, run_cli

FLAGS = ["--yaml_path", "cpu", "--device", "cpu", "--ratio", "0.2", "--batch_size", "8", "--num_workers", "0",
         "--epochs", "3"]


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return make_attack_record(tmp_path_factory.mktemp("rng"), name="rec", n_per_class=10, epochs=1)


@pytest.mark.parametrize("defense", ["ft-baseline", "ftsam"])
def test_eval_every_does_not_change_the_trained_weights(record, defense):
    weights = []
    for every in ("1", "3"):
        rec = clone_record(record, f"rec_{defense}_{every}")
        code, _, err = run_cli(["defend", "--result_file", str(rec), "--defense", defense, *FLAGS,
                                "--eval_every", every])
        assert code == 0, err
        weights.append(safe_load(rec / "defense" / defense / "defense_result.pt")["model"])
    often, once = weights
    assert often.keys() == once.keys()
    for key in often:
        assert torch.equal(often[key], once[key]), key


def test_evaluation_leaves_the_global_generator_alone(record):
    from ftsam_plugin.metrics import evaluate_backdoor
    from ftsam_plugin.models import create_model

    result = safe_load(record / "attack_result.pt")
    from ftsam_plugin.data.records import load_attack_result

    loaded = load_attack_result(str(record))
    model = create_model(result["model_name"], num_classes=10, width=0.125)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    evaluate_backdoor(model, loaded["clean_test"], loaded["bd_test"], batch_size=16)
    assert torch.equal(torch.rand(3), expected)
