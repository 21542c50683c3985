"""BadNets and Blended attacks that write BackdoorBench attack records (`ftsam attack`)."""

from .poison import make_backdoor_datasets, poison_image, select_poison_indices
from .triggers import TRIGGERS, BadNetTrigger, BlendedTrigger, blended_pattern, create_trigger, register_trigger

__all__ = [
    "TRIGGERS",
    "BadNetTrigger",
    "BlendedTrigger",
    "blended_pattern",
    "create_trigger",
    "register_trigger",
    "make_backdoor_datasets",
    "poison_image",
    "select_poison_indices",
]
