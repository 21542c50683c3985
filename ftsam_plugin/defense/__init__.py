"""Defenses with BackdoorBench's interface: FT-SAM (`ftsam`) and the vanilla fine-tuning baseline (`ft-baseline`).

The classes live in `ftsam_plugin.defense.ftsam` and `.finetune`; `registry.DEFENSES` maps names to them. They are
imported lazily, so `python -m ftsam_plugin.defense.ftsam` runs without importing itself first.
"""

__all__ = ["FTSAM", "FineTune"]


def __getattr__(name):
    if name in __all__:
        from .registry import DEFENSES

        return next(cls for cls in DEFENSES.values() if cls.__name__ == name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
