"""Optimizers: SAM/ASAM (davda54/sam protocol), its step schedule, and the BatchNorm freeze of SAM's second pass."""

from .sam import SAM
from .sam import freeze_bn
from .schedule import SamSchedule

__all__ = ["SAM", "SamSchedule", "freeze_bn"]
