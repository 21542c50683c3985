"""The retuning attack (Min et al., "Uncovering, Explaining, and Mitigating the Superficial Safety of Backdoor
Defense", NeurIPS 2024): fine-tune a purified model on a few clean samples holding a handful of poisoned ones and
see whether the backdoor comes back. O-ASR is the ASR before, P-ASR after; a `poison_num` 0 control on the same
clean data tells relearning from mere forgetting.

    settings.py  RetuneSettings (defaults from the reference script, each with its source) and its flags
    data.py      build_retune_set: the uniform clean draw with `poison_num` poisoned training images put in
    train.py     retune_model, measure_pasr: the attack in-process
    runs.py      the attacked result, the output folder beside it, the cache key, the written outputs
    cli.py       `ftsam retune`
"""

from .data import RetuneSet, build_retune_set
from .settings import RetuneSettings
from .train import RetuneResult, measure_pasr, retune_model

__all__ = ["RetuneSettings", "RetuneSet", "build_retune_set", "RetuneResult", "retune_model", "measure_pasr"]
