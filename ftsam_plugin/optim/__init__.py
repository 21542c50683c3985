"""Optimizers: SAM/ASAM (davda54/sam protocol) and the BatchNorm freeze used in SAM's second pass."""

from .sam import SAM
from .sam import freeze_bn

__all__ = ["SAM", "freeze_bn"]
