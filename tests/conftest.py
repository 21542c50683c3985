# Triton's interpreter must be chosen before any @triton.jit function is decorated, i.e. before
# ftsam_plugin.kernels is imported: kernels then run on CPU tensors (small sizes only, ~1 ms/program).
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny tests: one thread avoids oversubscribing 2 shared cores


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
