"""EDM time steps and the Euler step of the probability-flow ODE (SPEC section 2).

The schedule is computed on the host in float64 (NumPy); samplers pass it to the
device as float32 arrays. sigma(t) = t, so time steps and noise levels coincide.
"""

from __future__ import annotations

import math

import jax
import numpy as np

__all__ = ["edm_sigmas", "euler_coefficients", "euler_step", "check_schedule"]


def check_schedule(steps: int, sigma_max: float, sigma_min: float, rho: float) -> None:
    """Raises TypeError/ValueError naming the problem when the EDM schedule settings are unusable."""
    if not isinstance(steps, int) or isinstance(steps, bool):
        raise TypeError(f"steps must be an int, got {steps!r}")
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the EDM schedule divides by steps - 1), got {steps}")
    for name, value in (("sigma_max", sigma_max), ("sigma_min", sigma_min), ("rho", rho)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise TypeError(f"{name} must be a finite number, got {value!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")


def edm_sigmas(steps: int, sigma_max: float = 100.0, sigma_min: float = 0.1, rho: float = 7.0) -> np.ndarray:
    """EDM noise levels t_0 > ... > t_{T-1} followed by t_T = 0; float64, shape (steps + 1,).

    t_i = (sigma_max^(1/rho) + i/(T-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
    """
    check_schedule(steps, sigma_max, sigma_min, rho)
    ramp = np.arange(steps, dtype=np.float64) / (steps - 1)
    inv_max, inv_min = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho
    return np.append(sigmas, 0.0)


def euler_coefficients(sigmas: np.ndarray) -> np.ndarray:
    """Euler step sizes 1 - t_{i+1} / t_i, float64, shape (T,), from edm_sigmas' (T + 1,) output.

    The last one is 1 (the step to sigma = 0 lands on the Tweedie estimate).
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    return 1.0 - sigmas[1:] / sigmas[:-1]


def euler_step(x: jax.Array, x0_hat: jax.Array, coefficient: jax.Array) -> jax.Array:
    """One Euler step of the probability-flow ODE: x + (1 - t_{i+1}/t_i) * (D(x; t_i) - x).

    x and x0_hat = D(x; t_i) have the same shape; coefficient = euler_coefficients(...)[i] (scalar).
    """
    return x + coefficient * (x0_hat - x)
