"""The ADM UNet as a network family: its apply function, initial parameters and parameter shapes."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from spgd_jax.models._family import Family, register_family
from spgd_jax.models.adm._config import UNetConfig
from spgd_jax.models.adm._network import UNet, init_shapes

__all__ = ["ADM", "AdmNetwork"]


@dataclasses.dataclass(frozen=True)
class AdmNetwork:
    """eps-network apply function of UNet(config): (params, x (B,H,W,C), timesteps (B,) in [0, 999],
    class_labels (B,) | None) -> (B, H, W, C or 2C). Hashable: equal configs give equal networks."""

    config: UNetConfig

    def __call__(self, params: Any, x: jax.Array, noise_labels: jax.Array,
                 class_labels: jax.Array | None = None) -> jax.Array:
        return UNet(self.config).apply({"params": params}, x, noise_labels, class_labels)


def _init(config: UNetConfig, key: jax.Array) -> Any:
    size = config.image_size
    x = jnp.zeros((1, size, size, config.in_channels))
    labels = jnp.zeros((1,), jnp.int32) if config.class_cond else None
    return UNet(config).init(key, x, jnp.zeros((1,)), labels)["params"]


def _param_shapes(config: UNetConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    params = init_shapes(config)["params"]
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(params).items()}


ADM = Family(name="adm", config_type=UNetConfig, network=AdmNetwork, init=_init, param_shapes=_param_shapes,
             preconditioning="vp")
register_family(ADM)  # the registry of network families, beside the family's definition
