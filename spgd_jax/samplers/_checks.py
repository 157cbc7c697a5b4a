"""The checks every sampler config runs on its fields: clear errors naming `Config.field` and the range.

A config's step size is a pytree leaf (spgd_jax.samplers.register_sampler): JAX rebuilds the config with
arrays or tracers in its place (jit, vmap, a sweep), so `check_step_size` checks numbers only.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_bool", "check_int", "check_number", "check_step_size", "check_trajectory_every"]


def check_number(owner: str, name: str, value: Any, low: float = -math.inf, high: float = math.inf, *,
                 open_low: bool = False) -> None:
    """TypeError unless value is a finite number; ValueError unless low <= value <= high (low < value with
    open_low). owner: the config's class name, for the message."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise TypeError(f"{owner}.{name} must be a finite number, got {value!r}")
    if open_low and value <= low:
        raise ValueError(f"{owner}.{name} must be > {low:g}, got {value}")
    if not low <= value <= high:
        bound = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise ValueError(f"{owner}.{name} must be {bound}, got {value}")


def check_step_size(owner: str, name: str, value: Any) -> None:
    """check_number(value > 0) for a Python number or a string, bool or None; arrays and tracers (the
    leaf of a config JAX rebuilt) pass unchecked."""
    if isinstance(value, (int, float, str, bool)) or value is None:
        check_number(owner, name, value, 0.0, open_low=True)


def check_int(owner: str, name: str, value: Any, low: int = 1, high: int | None = None, meaning: str = "") -> None:
    """ValueError unless value is an int in [low, high] (high None: no upper bound); meaning is added to
    the message in parentheses."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        note = f" ({meaning})" if meaning else ""
        raise ValueError(f"{owner}.{name} must be an int {bound}{note}, got {value!r}")


def check_bool(owner: str, name: str, value: Any) -> None:
    """TypeError unless value is True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}.{name} must be True or False, got {value!r}")


def check_trajectory_every(value: int) -> None:
    """Raises ValueError unless value is an int >= 0 (a config's trajectory_every)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"trajectory_every must be an int >= 0 (0 = no trajectory), got {value!r}")
