import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ftsam_plugin.metrics import count_correct, der, evaluate, evaluate_backdoor, rir


class TupleSet(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def fixed_model():
    # logits = (x0, x1, -x0 - x1): class 0 if x0 largest, 1 if x1 largest, 2 if both negative enough.
    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        model.bias.zero_()
    return model


POINTS = [  # (x, predicted class by hand)
    ((3.0, 1.0), 0),
    ((1.0, 4.0), 1),
    ((-2.0, -3.0), 2),
    ((5.0, -1.0), 0),
    ((-1.0, 2.0), 1),
    ((-4.0, -4.0), 2),
    ((2.0, 0.5), 0),
]


def clean_items(labels):
    return [(torch.tensor(x), y) for (x, _), y in zip(POINTS, labels)]


def test_evaluate_hand_counted():
    labels = [0, 1, 2, 1, 1, 0, 0]  # wrong at index 3 (pred 0) and 5 (pred 2): 5 of 7 correct
    model = fixed_model()
    assert evaluate(model, TupleSet(clean_items(labels)), batch_size=3) == pytest.approx(5 / 7)
    assert evaluate(model, TupleSet(clean_items(labels)), batch_size=256) == pytest.approx(5 / 7)
    loader = DataLoader(TupleSet(clean_items(labels)), batch_size=2)
    assert evaluate(model, loader) == pytest.approx(5 / 7)


def test_evaluate_label_field():
    items = [(torch.tensor(x), 9, p) for x, p in POINTS]  # field 2 holds the true prediction
    assert evaluate(fixed_model(), TupleSet(items), label_field=2) == 1.0
    assert evaluate(fixed_model(), TupleSet(items), label_field=1) == 0.0


def test_evaluate_backdoor_hand_counted_one_pass():
    clean = TupleSet(clean_items([0, 1, 2, 1, 1, 0, 0]))  # preds 0,1,2,0,1,2,0 -> 5 of 7 correct
    # bd items: (img, bd_label, orig_index, poison_flag, orig_label)
    bd_labels = [0, 0, 0, 0, 0, 0, 0]  # preds 0,1,2,0,1,2,0 -> 3 correct
    orig_labels = [1, 1, 2, 2, 1, 2, 1]  # preds match at 1,2,4,5 -> 4 correct
    bd = TupleSet(
        [(torch.tensor(x), b, i, 1, o) for i, ((x, _), b, o) in enumerate(zip(POINTS, bd_labels, orig_labels))]
    )

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = fixed_model()
            self.seen = 0

        def forward(self, x):
            self.seen += x.shape[0]
            return self.inner(x)

    model = Counting()
    out = evaluate_backdoor(model, clean, bd, batch_size=4)
    assert out == pytest.approx({"acc": 5 / 7, "asr": 3 / 7, "ra": 4 / 7})
    assert model.seen == 7 + 7  # one pass over clean, ONE pass over bd for both ASR and RA


def test_count_correct_multiple_fields():
    items = [(torch.tensor(x), p, 0) for x, p in POINTS]
    (a, b), total = count_correct(fixed_model(), TupleSet(items), (1, 2), batch_size=2)
    assert (a, b, total) == (7, 3, 7)


def test_mode_restored_and_eval_used():
    model = nn.Sequential(nn.Linear(2, 3), nn.Dropout(p=0.999999))
    with torch.no_grad():
        model[0].weight.copy_(fixed_model().weight)
        model[0].bias.zero_()
    model.train()
    model[1].eval()  # mixed modes must come back as they were
    items = [(torch.tensor(x), p) for x, p in POINTS]
    model[1].train()
    assert evaluate(model, TupleSet(items)) == 1.0  # dropout off during evaluation
    assert model.training and model[0].training and model[1].training
    model.eval()
    model[1].train()
    evaluate(model, TupleSet(items))
    assert not model.training and model[1].training


def test_no_grad_during_evaluation():
    model = fixed_model()
    evaluate(model, TupleSet([(torch.tensor(x), p) for x, p in POINTS]))
    assert model.weight.grad is None


def test_amp_and_channels_last_agree_with_plain():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    images = torch.randn(20, 3, 8, 8)
    with torch.no_grad():
        preds = model(images).argmax(1)
    items = [(images[i], int(preds[i])) for i in range(20)]
    assert evaluate(model, TupleSet(items), batch_size=6, channels_last=True) == 1.0
    # bf16 may flip near-ties; compare with a hand count of bf16 predictions
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_preds = model(images).argmax(1)
    expected = (bf16_preds == preds).float().mean().item()
    assert evaluate(model, TupleSet(items), batch_size=20, amp_dtype=torch.bfloat16) == pytest.approx(expected)


def test_empty_dataset_raises():
    with pytest.raises(ValueError, match="empty"):
        evaluate(fixed_model(), TupleSet([]))
    with pytest.raises(ValueError, match="empty"):
        evaluate(fixed_model(), DataLoader(TupleSet([]), batch_size=4))


def test_bad_arguments():
    data = TupleSet([(torch.tensor(x), p) for x, p in POINTS])
    with pytest.raises(ValueError):
        evaluate(fixed_model(), data, batch_size=0)
    with pytest.raises(ValueError):
        evaluate(fixed_model(), data, label_field=0)
    with pytest.raises(ValueError, match="fields"):
        evaluate(fixed_model(), data, label_field=4)


# ---- DER / RIR -------------------------------------------------------------------------------------------


def test_der_paper_spot_check_blended_ftsam():
    # FT-SAM on Blended (CIFAR-10, PreAct-ResNet18): ASR 97.71 -> 4.91, ACC 93.44 -> 92.44 => DER 95.90%.
    value = der(acc_bd=0.9344, acc_def=0.9244, asr_bd=0.9771, asr_def=0.0491)
    assert round(value * 100, 2) == 95.90
    assert value == pytest.approx(((0.9771 - 0.0491) - (0.9344 - 0.9244) + 1) / 2)


def test_der_clamps():
    # ACC going up or ASR going up are clamped to 0 contributions.
    assert der(0.90, 0.95, 0.20, 0.50) == pytest.approx(0.5)
    assert der(0.9, 0.9, 1.0, 0.0) == pytest.approx(1.0)
    assert der(1.0, 0.0, 0.0, 0.0) == pytest.approx(0.0)


def test_rir():
    # RA 10% -> 80%, ACC 93% -> 91%: [0.70 - 0.02 + 1] / 2 = 0.84
    assert rir(0.93, 0.91, 0.10, 0.80) == pytest.approx(0.84)
    assert rir(0.93, 0.95, 0.50, 0.20) == pytest.approx(0.5)  # RA drop and ACC gain clamp to 0


def test_der_rejects_percentages():
    with pytest.raises(ValueError, match="fraction"):
        der(93.44, 92.44, 97.71, 4.91)
    with pytest.raises(ValueError):
        rir(0.9, 0.9, -0.1, 0.5)
    assert math.isclose(der(0.0, 0.0, 0.0, 0.0), 0.5)
