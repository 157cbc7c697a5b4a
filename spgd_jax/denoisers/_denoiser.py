"""A denoiser = a preconditioning around a network, as a pytree whose leaves are the parameters.

The samplers take a `Denoiser` as a traced argument: the parameters enter the compiled program as
inputs, not constants, so a second checkpoint of the same config (same shapes and dtypes) reuses the
compiled sampler. The network and the preconditioning are static (hashable) parts of the pytree.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from spgd_jax import models
from spgd_jax.denoisers.ddpm import vp_ddpm_preconditioning
from spgd_jax.denoisers.edm import edm_preconditioning
from spgd_jax.denoisers.vp import vp_preconditioning

__all__ = ["PRECONDITIONINGS", "Denoiser", "make_denoiser"]

# name -> preconditioning(network_fn (x_scaled, noise_labels) -> out, x (B,H,W,C), sigma (B,)) -> x0_hat
PRECONDITIONINGS: dict[str, Callable[[Callable, jax.Array, jax.Array], jax.Array]] = {
    "vp": vp_preconditioning,
    "vp_ddpm": vp_ddpm_preconditioning,  # the trained integer timesteps (denoisers/ddpm.py; issue 25)
    "edm": edm_preconditioning,
}


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params", "class_labels"],
                   meta_fields=["network", "preconditioning"])
@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity, so jax.jit(denoiser) works
class Denoiser:
    """D(x (B, H, W, C), sigma (B,)) -> x0_hat (B, H, W, C): PRECONDITIONINGS[preconditioning] around
    network(params, ., ., class_labels). Pure and jit/vmap/grad-able; a pytree (leaves: params, labels)."""

    network: models.Network
    params: Any
    preconditioning: str = "vp"
    class_labels: jax.Array | None = None

    def __call__(self, x: jax.Array, sigma: jax.Array) -> jax.Array:
        network_fn = lambda scaled, noise: self.network(self.params, scaled, noise, self.class_labels)
        return PRECONDITIONINGS[self.preconditioning](network_fn, x, sigma)


def make_denoiser(config: Any, params: Any, *, preconditioning: str | None = None,
                  class_labels: jax.Array | None = None, dtype: str | None = None) -> Denoiser:
    """The denoiser of a registered network family's config with its params (the 'params' collection).

    preconditioning: a PRECONDITIONINGS name (default: the family's, 'vp' for the ADM UNet).
    class_labels: (B,) int labels, required iff config.class_cond (then the denoiser only accepts
    batches of that size). dtype: optional compute dtype override, 'float32' or 'bfloat16' (params stay
    float32); default: the config's dtype.
    """
    family = models.family_of(config)
    if isinstance(params, dict) and set(params) == {"params"}:
        raise TypeError("pass the params collection itself (variables['params']), not the variables dict")
    preconditioning = family.preconditioning if preconditioning is None else preconditioning
    if preconditioning not in PRECONDITIONINGS:
        raise ValueError(f"unknown preconditioning {preconditioning!r}; choose one of {', '.join(PRECONDITIONINGS)}")
    if dtype is not None:
        config = dataclasses.replace(config, dtype=dtype)
    if getattr(config, "class_cond", False) != (class_labels is not None):
        raise ValueError(
            "class_labels (B,) ints are required for a class-conditional model and must be None otherwise "
            f"(class_cond={getattr(config, 'class_cond', False)})"
        )
    labels = None if class_labels is None else jnp.asarray(class_labels)
    return Denoiser(family.network(config), params, preconditioning, labels)
