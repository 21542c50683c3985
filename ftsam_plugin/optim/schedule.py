"""Which steps of a SAM run are SAM steps; the others are plain steps of the base optimizer (half the cost).

A step is a SAM step when all three hold (step = the run's 0-based step counter, epoch = the caller's `set_epoch`):
  - `epochs` is None or first <= epoch <= last (late/early-phase SAM: plain steps outside the window);
  - step % every == 0 (SAM on every k-th step; in between, plain steps on the local gradient);
  - u(seed, step) < prob, u a counter-based uniform in [0, 1) (splitmix64 of the seed and the step: RST's random
    choice without an RNG stream, so every DDP rank takes the same decision at the same step, and resuming needs
    only the counter).
The defaults (every 1, prob 1, no window) make every step a SAM step and never compute u.
"""

from __future__ import annotations

from typing import Optional, Tuple

__all__ = ["SamSchedule", "step_uniform"]

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(z: int) -> int:
    # splitmix64's finaliser (Steele et al., 2014): a bijection of 64-bit integers with good avalanche
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def step_uniform(seed: int, step: int) -> float:
    """u(seed, step) in [0, 1): 53 bits of splitmix64(mix(seed) + (step + 1) * golden ratio)."""
    z = _mix64((_mix64(int(seed) & _MASK) + (int(step) + 1) * _GOLDEN) & _MASK)
    return (z >> 11) * 2.0 ** -53


class SamSchedule:
    """The step-selection rule of a SAM optimizer (see the module docstring); its state is two counters.

    Args:
        every: SAM on steps 0, k, 2k, ... of the run (int >= 1; 1: every step).
        prob: of those, each one with this probability (0 < prob <= 1), drawn from (seed, step).
        epochs: (first, last) 1-based inclusive epoch window, or None (every epoch); needs `set_epoch`.
        seed: the draw's seed (prob < 1 only).

    The optimizer asks `is_sam_step()` before each step and calls `advance(sam)` once the step is done;
    `state_dict` / `load_state_dict` keep the counters (the settings are the caller's to keep equal).
    """

    def __init__(self, every: int = 1, prob: float = 1.0, epochs: Optional[Tuple[int, int]] = None, seed: int = 0):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        if not 0.0 < float(prob) <= 1.0:
            raise ValueError(f"prob must be in (0, 1], got {prob!r}")
        if epochs is not None:
            first, last = (int(e) for e in epochs)
            if not 1 <= first <= last:
                raise ValueError(f"epochs must be (first, last) with 1 <= first <= last, got {epochs!r}")
            epochs = (first, last)
        self.every, self.prob, self.epochs, self.seed = every, float(prob), epochs, int(seed)
        self.step = 0  # steps taken (SAM and plain)
        self.sam_steps = 0  # SAM steps taken
        self.epoch: Optional[int] = None

    @property
    def always(self) -> bool:
        """Every step is a SAM step (the default: plain SAM)."""
        return self.every == 1 and self.prob == 1.0 and self.epochs is None

    def set_epoch(self, epoch: int) -> None:
        """The 1-based epoch the next steps belong to (used by the epoch window)."""
        self.epoch = int(epoch)

    def is_sam_step(self) -> bool:
        """Whether the coming step (number `self.step`) is a SAM step; no state changes."""
        if self.epochs is not None:
            if self.epoch is None:
                raise ValueError("a SAM schedule with an epoch window needs set_epoch(epoch) before the first step")
            if not self.epochs[0] <= self.epoch <= self.epochs[1]:
                return False
        if self.step % self.every:
            return False
        return self.prob == 1.0 or step_uniform(self.seed, self.step) < self.prob

    def advance(self, sam: bool) -> None:
        """Count the step just taken (`sam`: whether it was a SAM step)."""
        self.step += 1
        self.sam_steps += bool(sam)

    def describe(self) -> str:
        if self.always:
            return "SAM on every step"
        parts = []
        if self.every > 1:
            parts.append(f"every {self.every} steps")
        if self.prob < 1.0:
            parts.append(f"with probability {self.prob:g} (seed {self.seed})")
        if self.epochs is not None:
            parts.append(f"in epochs {self.epochs[0]}-{self.epochs[1]}")
        return "SAM " + ", ".join(parts) + "; plain steps otherwise"

    def state_dict(self) -> dict:
        return {"step": self.step, "sam_steps": self.sam_steps}

    def load_state_dict(self, state: dict) -> None:
        step, sam_steps = int(state["step"]), int(state["sam_steps"])
        if not 0 <= sam_steps <= step:
            raise ValueError(f"SAM schedule state out of range: {sam_steps} SAM steps of {step}")
        self.step, self.sam_steps = step, sam_steps

    def __repr__(self) -> str:
        return (f"SamSchedule(every={self.every}, prob={self.prob:g}, epochs={self.epochs}, seed={self.seed}, "
                f"step={self.step}, sam_steps={self.sam_steps})")
