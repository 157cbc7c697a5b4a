"""EDM's own preconditioning (Karras et al. 2022, Table 1, "EDM" column): a network F as D(x; sigma).

  c_skip  = sigma_data^2 / (sigma^2 + sigma_data^2)
  c_out   = sigma * sigma_data / sqrt(sigma^2 + sigma_data^2)
  c_in    = 1 / sqrt(sigma^2 + sigma_data^2)
  c_noise = log(sigma) / 4
  D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)

for networks trained with EDM's loss (sigma_data = 0.5 for images in [-1, 1]). The output of F may carry
more than C channels; the first C are used. sigma must be > 0 (c_noise = log sigma).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from spgd_jax.denoisers._checks import check_inputs, first_channels

__all__ = ["SIGMA_DATA", "edm_preconditioning"]

SIGMA_DATA = 0.5


def edm_preconditioning(network_fn: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, sigma: jax.Array,
                        sigma_data: float = SIGMA_DATA) -> jax.Array:
    """x0_hat = c_skip x + c_out F(c_in x, c_noise); x (B, H, W, C), sigma (B,) noise std > 0.

    network_fn(x_scaled (B, H, W, C), c_noise (B,)) -> (B, H, W, >= C).
    """
    x, sigma = check_inputs(x, sigma)
    total = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / total
    c_out = sigma * sigma_data / jnp.sqrt(total)
    c_in = 1 / jnp.sqrt(total)
    expand = lambda c: c[:, None, None, None]
    out = first_channels(network_fn(expand(c_in) * x, jnp.log(sigma) / 4), x)
    return expand(c_skip) * x + expand(c_out) * out
