"""Defenses with BackdoorBench's interface: FT-SAM (`ftsam`) and the vanilla fine-tuning baseline (`ft-baseline`).

The classes live in `ftsam_plugin.defense.ftsam` (imported lazily, so `python -m ftsam_plugin.defense.ftsam` runs
without a double import).
"""

__all__ = ["FTSAM", "FineTune"]


def __getattr__(name):
    if name in __all__:
        from . import ftsam

        return getattr(ftsam, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
