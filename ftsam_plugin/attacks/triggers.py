"""Backdoor triggers, applied to raw HWC uint8 images at the dataset's resolution (before any transform).

  badnet   a size×size white patch in the bottom-right corner (BackdoorBench's 3×3 trigger_image.png)
  blended  round((1 - alpha) * x + alpha * t) with a fixed pattern t generated in code (nothing downloaded)

Triggers are looked up by name in `TRIGGERS`; `create_trigger(name, img_size, **options)` builds one. These are
ftsam's own triggers; BackdoorBench's (its hello_kitty Blended, LF, SIG, ...) run from its checkout: backdoorbench.py.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Sequence

import numpy as np

from ftsam_plugin.errors import FtsamError

__all__ = ["BadNetTrigger", "BlendedTrigger", "blended_pattern", "TRIGGERS", "register_trigger", "create_trigger"]


class BadNetTrigger:
    """Set the bottom-right `size`×`size` pixels to `value` (all channels)."""

    def __init__(self, size: int = 3, value: int = 255):
        if size < 1:
            raise ValueError(f"patch size must be >= 1, got {size}")
        if not 0 <= value <= 255:
            raise ValueError(f"patch value must be in 0..255, got {value}")
        self.size, self.value = int(size), int(value)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        out = np.array(img, dtype=np.uint8, copy=True)
        if out.shape[0] < self.size or out.shape[1] < self.size:
            raise ValueError(f"image {out.shape[:2]} is smaller than the {self.size}x{self.size} patch")
        out[-self.size:, -self.size:, ...] = self.value
        return out


def blended_pattern(height: int, width: int, channels: int = 3) -> np.ndarray:
    """A fixed colourful interference pattern (HWC uint8), the same on every machine (plain trigonometry)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    y, x = y / max(height, 1), x / max(width, 1)
    planes = []
    for c in range(channels):
        phase = 2.0 * math.pi * c / 3.0
        # two crossing waves and a ring: t = 127.5 * (1 + (sin(a) + cos(b)) / 2) ... per channel phase
        ring = np.cos(2 * math.pi * 5 * np.hypot(x - 0.5, y - 0.5) - phase)
        wave = np.sin(2 * math.pi * (3 * x + 2 * y) + phase) + ring
        planes.append(np.round(127.5 * (1.0 + wave / 2.0)))
    return np.clip(np.stack(planes, axis=-1), 0, 255).astype(np.uint8)


class BlendedTrigger:
    """Mix the image with `pattern`: round((1 - alpha) * x + alpha * pattern), clipped to uint8."""

    def __init__(self, pattern: np.ndarray, alpha: float = 0.2):
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"blended alpha must be in [0, 1], got {alpha}")
        self.pattern = np.asarray(pattern, dtype=np.float64)
        self.alpha = float(alpha)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        x = np.asarray(img, dtype=np.float64)
        if x.shape != self.pattern.shape:
            raise ValueError(f"image shape {x.shape} differs from the trigger pattern's {self.pattern.shape}")
        return np.clip(np.round((1.0 - self.alpha) * x + self.alpha * self.pattern), 0, 255).astype(np.uint8)


TRIGGERS: Dict[str, Callable] = {}


def register_trigger(fn: Callable) -> Callable:
    """Register a trigger factory `fn(img_size, **options)` under its lower-cased name."""
    TRIGGERS[fn.__name__.lower()] = fn
    return fn


@register_trigger
def badnet(img_size: Sequence[int], patch_size: int = 3, **_ignored) -> BadNetTrigger:
    """white patch_size x patch_size patch in the bottom-right corner (as BackdoorBench's 3x3 trigger_image.png)"""
    return BadNetTrigger(size=patch_size)


@register_trigger
def blended(img_size: Sequence[int], blended_alpha: float = 0.2, **_ignored) -> BlendedTrigger:
    """code-generated pattern (blended_pattern) mixed in with weight blended_alpha"""
    h, w, c = (tuple(img_size) + (3,))[:3]
    return BlendedTrigger(blended_pattern(int(h), int(w), int(c)), alpha=blended_alpha)


def create_trigger(name: str, img_size: Sequence[int], **options):
    """Build the trigger `name` ('badnet', 'blended') for images of `img_size` (H, W, C)."""
    key = str(name).lower()
    if key not in TRIGGERS:
        raise FtsamError(f"unknown attack '{name}'; choose one of {', '.join(sorted(TRIGGERS))}")
    return TRIGGERS[key](img_size, **options)
