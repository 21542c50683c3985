"""The retuning set on a tiny synthetic record: exactly `poison_num` poisoned samples (the record's poisoned training
images, backdoor label, no augmentation), the rest clean; a uniform draw reproducible by seed; the control shares
the clean data."""

import numpy as np
import pytest
import torch
from PIL import Image

from ftsam_plugin.data.records import load_attack_result
from ftsam_plugin.data.transforms import get_transform
from ftsam_plugin.errors import FtsamError
from ftsam_plugin.io import safe_load
from ftsam_plugin.retune import RetuneSettings, build_retune_set
from ftsam_plugin.retune.data import draw_retune_indices, poisoned_train_positions

from helpers import make_attack_record, one_torch_thread  # noqa: F401 (autouse fixture)

TARGET = 0  # `ftsam attack`'s default --attack_target


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    root = tmp_path_factory.mktemp("retune_data")
    folder = make_attack_record(root, name="rec", attack="blended", n_per_class=10, epochs=1)
    return folder, load_attack_result(folder)


def test_poisoned_and_clean_samples(record):
    folder, loaded = record
    settings = RetuneSettings(split_ratio=0.5, poison_num=5, random_seed=3)
    data = build_retune_set(loaded, settings)
    n_clean = len(loaded["clean_train"])
    assert len(data) == int(n_clean * 0.5) == 50
    assert data.poisoned.tolist() == [True] * 5 + [False] * 45  # the first poison_num samples are replaced
    assert (data.labels[data.poisoned] == TARGET).all()

    # the record's own poisoned images, read here from the PNGs the attack wrote, with the test transform only
    state = safe_load(folder / "attack_result.pt")["bd_train"]
    indicator = np.asarray(state["poison_indicator"])
    test_tf = get_transform("cifar10", train=False)
    for image, position in zip(data.images[:5], data.index[:5].tolist()):
        assert indicator[position] == 1
        entry = state["bd_data_container"]["data_dict"][position]
        assert entry["other_info"][0] == TARGET
        png = folder / "bd_train_dataset" / entry["path"].split("/")[-2] / entry["path"].split("/")[-1]
        with Image.open(png) as handle:
            assert torch.equal(image, test_tf(handle.convert("RGB")))

    # the clean ones: distinct clean-train indices with their clean labels
    clean_index = data.index[~data.poisoned].tolist()
    targets = loaded["clean_train"].wrapped_dataset.targets
    assert len(set(clean_index)) == 45 and all(0 <= i < n_clean for i in clean_index)
    assert data.labels[~data.poisoned].tolist() == [targets[i] for i in clean_index]


def test_control_has_the_same_clean_data(record):
    _, loaded = record
    attack = build_retune_set(loaded, RetuneSettings(split_ratio=0.5, poison_num=5, random_seed=3))
    control = build_retune_set(loaded, RetuneSettings(split_ratio=0.5, poison_num=0, random_seed=3))
    assert not control.poisoned.any()
    targets = loaded["clean_train"].wrapped_dataset.targets
    assert control.labels.tolist() == [targets[i] for i in control.index.tolist()]
    # same draw, same augmentation: only the first 5 samples differ
    assert torch.equal(control.index[5:], attack.index[5:])
    assert torch.equal(control.images[5:], attack.images[5:]) and torch.equal(control.labels[5:], attack.labels[5:])
    assert not torch.equal(control.images[:5], attack.images[:5])


def test_reproducible_by_seed(record):
    _, loaded = record
    a = build_retune_set(loaded, RetuneSettings(split_ratio=0.5, random_seed=7))
    b = build_retune_set(loaded, RetuneSettings(split_ratio=0.5, random_seed=7))
    c = build_retune_set(loaded, RetuneSettings(split_ratio=0.5, random_seed=8))
    assert torch.equal(a.images, b.images) and torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.index, c.index)
    state = torch.random.get_rng_state()
    build_retune_set(loaded, RetuneSettings(split_ratio=0.5, random_seed=7))
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's torch generator is left alone


def test_draw_is_uniform():
    # 2,000 draws of 100 out of 1,000: every index should be drawn 200 times (binomial sd ~13.4); a class-balanced
    # or biased draw fails the chi-square bound, a uniform one passes it with probability > 0.999
    n, draws = 1000, 2000
    counts = np.zeros(n)
    first = np.zeros(n)
    for seed in range(draws):
        clean, _, _ = draw_retune_indices(RetuneSettings(split_ratio=0.1, poison_num=0, random_seed=seed), n, [])
        assert len(set(clean)) == 100
        counts[clean] += 1
        first[clean[0]] += 1  # the order is random too (the first samples are the ones replaced)
    expected = draws * 0.1
    chi2 = ((counts - expected) ** 2 / (expected * 0.9)).sum()
    assert chi2 < n + 4.5 * np.sqrt(2 * n), chi2
    assert first.max() < 15  # 2,000 draws over 1,000 indices: a fixed first index would show up 2,000 times


def test_poisoned_positions_and_size_errors(record):
    _, loaded = record
    positions = poisoned_train_positions(loaded)
    assert len(positions) == 10  # 10% of the 100 training images
    with pytest.raises(FtsamError, match="more than the record's 10 poisoned training images"):
        build_retune_set(loaded, RetuneSettings(split_ratio=0.5, poison_num=11))
    with pytest.raises(FtsamError, match="more than the 4 retuning samples"):
        build_retune_set(loaded, RetuneSettings(split_ratio=0.04, poison_num=5))
    with pytest.raises(FtsamError, match="0 retuning samples"):
        build_retune_set(loaded, RetuneSettings(split_ratio=0.001, poison_num=0))
    with pytest.raises(FtsamError, match="--split_ratio 1.5 is outside"):
        RetuneSettings(split_ratio=1.5)
    assert len(build_retune_set(dict(loaded, bd_train=None), RetuneSettings(split_ratio=0.2, poison_num=0))) == 20
    with pytest.raises(FtsamError, match="record's 0 poisoned"):
        build_retune_set(dict(loaded, bd_train=None), RetuneSettings(split_ratio=0.2, poison_num=1))
