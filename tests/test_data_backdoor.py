"""BackdoorDataset / TransformDataset: items, RA view, subset, state in BackdoorBench's layout."""

import pickle

import numpy as np
import torch
from PIL import Image

from ftsam_plugin.data.backdoor import BackdoorDataset, TransformDataset


class Raw(torch.utils.data.Dataset):
    def __init__(self, n=6):
        self.targets = [i % 3 for i in range(n)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return Image.fromarray(np.full((4, 4, 3), i, dtype=np.uint8)), self.targets[i]


def make(tmp_path):
    ds = BackdoorDataset(Raw(), save_folder_path="./record/r/bd_train_dataset", folder=str(tmp_path / "bd"))
    ds.add_poisoned(4, np.full((4, 4, 3), 200, dtype=np.uint8), bd_label=0, orig_label=1)
    return ds


def test_items_are_five_tuples_and_poisoned_png_is_exact(tmp_path):
    ds = make(tmp_path)
    img, label, idx, flag, orig = ds[4]
    assert (label, idx, flag, orig) == (0, 4, 1, 1)
    assert np.array_equal(np.asarray(img), np.full((4, 4, 3), 200, dtype=np.uint8))
    assert ds[2][1:] == (2, 2, 0, 2)
    assert (tmp_path / "bd" / "1" / "4.png").is_file()
    assert ds.data_dict[4] == {"path": "./record/r/bd_train_dataset/1/4.png", "other_info": [0, 1]}


def test_original_label_view_swaps_fields(tmp_path):
    ds = make(tmp_path)
    ra = ds.with_original_labels()
    assert ra[4][1:] == (1, 4, 1, 0) and ds[4][1:] == (0, 4, 1, 1)  # the original is untouched
    ds.getitem_all_switch = True
    assert ds[4][1:] == (1, 4, 1, 0)


def test_subset_and_state_roundtrip(tmp_path):
    ds = make(tmp_path).subset([4, 5])
    state = ds.retrieve_state()
    before = [ds[i][1:] for i in range(2)]
    assert set(state) == {"bd_data_container", "getitem_all", "getitem_all_switch", "original_index_array",
                          "poison_indicator", "save_folder_path"}
    assert set(state["bd_data_container"]) == {"save_folder_path", "data_dict", "save_file_format"}
    assert state["bd_data_container"]["save_file_format"] == ".png"
    # relative folder resolved against a base, as a record under <base>/record/r/
    (tmp_path / "record" / "r").mkdir(parents=True)
    (tmp_path / "bd").rename(tmp_path / "record" / "r" / "bd_train_dataset")
    back = BackdoorDataset(Raw()).set_state(state, bases=[str(tmp_path)])
    assert len(back) == 2 and [back[i][1:] for i in range(2)] == before
    assert np.array_equal(np.asarray(back[0][0]), np.full((4, 4, 3), 200, dtype=np.uint8))


def test_transform_dataset_forwards_and_pickles(tmp_path):
    ds = make(tmp_path)
    wrapped = TransformDataset(ds, lambda im: torch.from_numpy(np.asarray(im).copy()))
    assert wrapped.poison_indicator is ds.poison_indicator and len(wrapped) == 6
    x, label, *rest = wrapped[4]
    assert x.shape == (4, 4, 3) and label == 0 and rest == [4, 1, 1]
    assert wrapped.with_original_labels()[4][1] == 1
    clone = pickle.loads(pickle.dumps(TransformDataset(ds)))  # DataLoader workers pickle datasets
    assert clone[4][1:] == ds[4][1:]
