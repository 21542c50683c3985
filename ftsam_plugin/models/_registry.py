"""Model registry (timm-style): `@register_model` keys a builder by its lower-cased function name."""

from __future__ import annotations

import warnings
from typing import Callable, Dict, List

import torch.nn as nn

from ftsam_plugin.errors import FtsamError

__all__ = ["register_model", "create_model", "list_models"]

_model_entrypoints: Dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register `fn(num_classes, image_size, width, **kwargs) -> nn.Module` under `fn.__name__.lower()`.

    Re-registering a name warns and replaces the previous builder.
    """
    name = fn.__name__.lower()
    if name in _model_entrypoints and _model_entrypoints[name] is not fn:
        warnings.warn(f"model '{name}' is already registered; replacing it", UserWarning, stacklevel=2)
    _model_entrypoints[name] = fn
    return fn


def list_models() -> List[str]:
    """Sorted names of every registered model."""
    return sorted(_model_entrypoints)


def create_model(
    name: str,
    num_classes: int = 10,
    image_size: int = 32,
    width: float = 1.0,
    **kwargs,
) -> nn.Module:
    """Build a registered model with freshly initialised weights (never downloads anything).

    Args:
        name: registry key, case-insensitive (e.g. "preactresnet18", "vgg19_bn").
        num_classes: size of the classifier output.
        image_size: input height/width; models with adaptive pooling accept any size.
        width: channel multiplier (only models that support it; 1.0 = the stock architecture).
        **kwargs: passed to the builder.

    Returns:
        The nn.Module, in training mode, on CPU.

    Raises:
        FtsamError: unknown model name (the message lists the known ones).
        ValueError: bad num_classes / image_size / width.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in _model_entrypoints:
        raise FtsamError(f"unknown model '{name}'; known: {', '.join(list_models())}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if not isinstance(width, (int, float)) or isinstance(width, bool) or not width > 0:
        raise ValueError(f"width must be a positive number, got {width!r}")
    return _model_entrypoints[key](num_classes=num_classes, image_size=image_size, width=float(width), **kwargs)
