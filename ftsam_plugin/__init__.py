"""FT-SAM (Zhu et al., ICCV 2023) as a BackdoorBench defense plugin.

Where things live:
  optim/     SAM / ASAM optimizer (davda54 protocol)
  kernels/   fused norm / perturb / restore: Triton kernels beside torch twins
  models/    model registry with BackdoorBench's names (preactresnet18, vgg19_bn, ...)
  data/      datasets, transforms, backdoor datasets, attack-record reading and writing
  attacks/   `ftsam attack`: makes BadNets / Blended records in BackdoorBench's format
  defense/   the FT-SAM defense and the vanilla fine-tuning baseline
  metrics.py ACC / ASR / RA / DER / RIR
  io.py      safe loading (no pickled code) and atomic writes
  cli.py     the `ftsam` command
"""

__version__ = "0.1.0"
