"""Trigger pixels: BadNets patch and Blended mixing, against independent references."""

import numpy as np
import pytest
import torch
from PIL import Image

from ftsam_plugin.attacks import BadNetTrigger, BlendedTrigger, blended_pattern, create_trigger, poison_image
from ftsam_plugin.attacks.poison import select_poison_indices
from ftsam_plugin.errors import FtsamError


def test_badnet_bottom_right_3x3_white_rest_unchanged():
    x = np.random.default_rng(1).integers(0, 200, size=(32, 32, 3), dtype=np.uint8)
    y = create_trigger("badnet", (32, 32, 3))(x)
    assert (y[29:, 29:] == 255).all()
    mask = np.ones((32, 32), bool)
    mask[29:, 29:] = False
    assert np.array_equal(y[mask], x[mask]) and not np.shares_memory(x, y)


def test_blended_is_rounded_mix():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, size=(8, 9, 3), dtype=np.uint8)
    t = rng.integers(0, 256, size=(8, 9, 3), dtype=np.uint8)
    a = 0.2
    ref = torch.round((1 - a) * torch.from_numpy(x).double() + a * torch.from_numpy(t).double()).to(torch.uint8)
    assert np.array_equal(BlendedTrigger(t, a)(x), ref.numpy())


def test_blended_pattern_is_fixed_and_varied():
    p = blended_pattern(32, 32)
    assert p.dtype == np.uint8 and p.shape == (32, 32, 3)
    assert np.array_equal(p, blended_pattern(32, 32)) and p.std() > 40
    assert create_trigger("blended", (32, 32, 3), blended_alpha=0.3).alpha == 0.3


def test_poison_image_resizes_to_dataset_resolution():
    img = Image.fromarray(np.zeros((30, 35, 3), np.uint8))
    out = poison_image(img, BadNetTrigger(), (32, 32))
    assert out.size == (32, 32) and np.asarray(out)[31, 31, 0] == 255


def test_poison_index_rules():
    labels = [0, 1, 2, 0, 1] * 20
    train = select_poison_indices(labels, 0, True, 0.1, np.random.default_rng(0))
    assert train.sum() == 10 and set(np.unique(train)) == {0.0, 1.0}
    test = select_poison_indices(labels, 0, False)
    assert np.array_equal(test, (np.asarray(labels) != 0).astype(float))
    with pytest.raises(FtsamError):
        select_poison_indices([0, 0], 0, False)
    with pytest.raises(FtsamError, match="unknown attack"):
        create_trigger("wanet", (32, 32, 3))
