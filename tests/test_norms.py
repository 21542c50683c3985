"""`ftsam norms`: weight norms, TAC (against a hand-written computation), rank correlation, layer choice, CLI."""

import csv
import math

import numpy as np
import pytest
import torch
from torch import nn

from ftsam_plugin.data.records import load_attack_result, save_defense_result
from ftsam_plugin.errors import FtsamError
from ftsam_plugin.models import create_model
from ftsam_plugin.norms import (
    channel_weight_norms,
    pearson,
    rankdata,
    resolve_layer,
    spearman,
    trigger_activated_change,
)

from helpers import make_attack_record, one_torch_thread, run_cli  # noqa: F401 (autouse fixture)

# ---- Reference ----


def reference_tac(features, clean, poisoned, reduction):
    """TAC_k = mean_i of ||f_k(x_i') - f_k(x_i)||_2 over positions ('l2') or of mean |.| ('mean_abs'), in fp64."""
    with torch.no_grad():
        diff = (features(poisoned) - features(clean)).double()
    out = []
    for k in range(diff.shape[1]):
        per_image = []
        for i in range(diff.shape[0]):
            d = diff[i, k].flatten()
            per_image.append(math.sqrt(float((d * d).sum())) if reduction == "l2" else float(d.abs().mean()))
        out.append(sum(per_image) / len(per_image))
    return np.array(out)


def tiny_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))


@pytest.mark.parametrize("reduction", ["l2", "mean_abs"])
def test_tac_and_norms_match_reference(reduction):
    model = tiny_net()
    with torch.no_grad():  # non-trivial BN statistics, so eval mode matters
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model.train()
    bn_state = {k: v.clone() for k, v in model[1].state_dict().items()}
    clean = torch.randn(7, 3, 6, 5)
    poisoned = clean.clone()
    poisoned[:, :, :2, :2] = 3.0  # a patch trigger
    pairs = list(zip(clean, poisoned))
    got = trigger_activated_change(model, "3", pairs, reduction=reduction, batch_size=3)  # 3 batches: 3+3+1
    assert model.training and model[1].training  # flags restored
    for k, v in model[1].state_dict().items():
        assert torch.equal(v, bn_state[k])  # eval mode: no running-stat update
    model.eval()
    np.testing.assert_allclose(got, reference_tac(model[:4], clean, poisoned, reduction), rtol=1e-5, atol=1e-7)
    weight = model[3].weight.detach().double()
    norms = [math.sqrt(float((weight[k] ** 2).sum())) for k in range(weight.shape[0])]
    np.testing.assert_allclose(channel_weight_norms(model[3]), norms, rtol=1e-12)


def test_rank_correlation_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=40).astype(float)  # many ties
    y = x + rng.normal(size=40)
    np.testing.assert_allclose(rankdata(x), stats.rankdata(x))
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], rel=1e-12)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_default_layer_and_unknown_layer():
    model = create_model("preactresnet18", 10, width=0.125)
    name, conv = resolve_layer(model)
    assert name == "layer4.1.conv2" and conv is model.layer4[1].conv2
    with pytest.raises(FtsamError, match=r"no conv layer 'linear'.*layer4\.1\.conv2"):
        resolve_layer(model, "linear")


def test_cli_matches_direct_computation(tmp_path):
    record = make_attack_record(tmp_path, name="rec", n_per_class=4, epochs=1)
    loaded = load_attack_result(record)
    noisy = create_model("preactresnet18", 10, width=0.125)
    noisy.load_state_dict(loaded["model"].state_dict())
    with torch.no_grad():
        noisy.layer4[1].conv2.weight.mul_(torch.rand_like(noisy.layer4[1].conv2.weight) + 0.5)
    pt = save_defense_result("preactresnet18", 10, noisy, str(record / "defense" / "noisy"))

    out = tmp_path / "out"
    code, stdout, err = run_cli(["norms", "--record", str(record), "--models", "attack", "--result", pt,
                                 "--num_samples", "5", "--out", str(out), "--device", "cpu"])
    assert code == 0, err
    assert "layer4.1.conv2" in stdout
    with open(out / "norms_channels.csv") as handle:
        rows = list(csv.DictReader(handle))
    with open(out / "norms_summary.csv") as handle:
        summary = {r["model"]: r for r in csv.DictReader(handle)}
    assert set(summary) == {"attack", "noisy"}
    for png in ("norms_scatter.png", "norms_hist.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # direct: the first 5 bd_test items with the clean_test items they came from (field 2), hook on the conv
    bd, clean = loaded["bd_test"], loaded["clean_test"]
    poisoned_x = torch.stack([bd[i][0] for i in range(5)])
    clean_x = torch.stack([clean[int(bd[i][2])][0] for i in range(5)])
    for label, model in (("attack", loaded["model"]), ("noisy", noisy)):
        model.eval()
        feats = []
        hook = model.layer4[1].conv2.register_forward_hook(lambda m, i, o: feats.append(o))
        with torch.no_grad():
            model(clean_x), model(poisoned_x)
        hook.remove()
        diff = (feats[1] - feats[0]).double()
        tac = diff.flatten(2).abs().mean(dim=2).mean(0).numpy()  # default --tac mean_abs
        norm = model.layer4[1].conv2.weight.detach().double().flatten(1).norm(dim=1).numpy()
        mine = [r for r in rows if r["model"] == label]
        np.testing.assert_allclose([float(r["tac"]) for r in mine], tac, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose([float(r["norm"]) for r in mine], norm, rtol=1e-6)
        assert float(summary[label]["pearson"]) == pytest.approx(np.corrcoef(norm, tac)[0, 1], abs=1e-5)
        assert float(summary[label]["std_norm"]) == pytest.approx(norm.std(), rel=1e-6)
        assert int(summary[label]["num_samples"]) == 5

    code, _, err = run_cli(["norms", "--record", str(record), "--models", "nope", "--out", str(out)])
    assert code == 2 and "no defense result 'nope'" in err
