"""What a network family is, and the registry of families.

A family is a config type (a frozen, hashable dataclass with `to_dict` / `from_dict`) and what the rest of
the library needs from it: the network apply function of a config, initial parameters, the parameter
shapes (to check a checkpoint without building anything), and the preconditioning its networks were
trained for. Checkpoints record the family by name; `spgd_jax.denoisers.make_denoiser` builds a denoiser
from any registered family's config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax

__all__ = ["Family", "Network", "family_of", "get_family", "register_family", "FAMILIES"]


class Network(Protocol):
    """A network apply function: network(params, x (B,H,W,C), noise_labels (B,), class_labels (B,) | None)
    -> (B, H, W, >= C). Hashable and equal for equal configs, so that a compiled sampler is reused across
    checkpoints of one config (the params are traced arguments, the network is static)."""

    def __call__(self, params: Any, x: jax.Array, noise_labels: jax.Array,
                 class_labels: jax.Array | None = None) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class Family:
    """A network family.

    name:           recorded in checkpoints (config.json "family").
    config_type:    the family's frozen config dataclass; `to_dict()` / `from_dict(d)` round-trip it as JSON.
    network:        config -> Network.
    init:           (config, key) -> params, the family's initial parameters.
    param_shapes:   config -> {path (tuple of str): shape}, the params tree a checkpoint must hold.
    preconditioning: the denoisers.PRECONDITIONINGS name its networks are trained for ('vp', 'edm').
    """

    name: str
    config_type: type
    network: Callable[[Any], Network]
    init: Callable[[Any, jax.Array], Any]
    param_shapes: Callable[[Any], dict[tuple[str, ...], tuple[int, ...]]]
    preconditioning: str


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Adds `family` to FAMILIES (ValueError if its name or config type is taken); returns it."""
    if family.name in FAMILIES or any(f.config_type is family.config_type for f in FAMILIES.values()):
        raise ValueError(f"a network family named {family.name!r} or with config type "
                         f"{family.config_type.__name__} is already registered")
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    """The registered family `name`; ValueError listing the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown network family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def family_of(config: Any) -> Family:
    """The registered family whose config type `config` is; TypeError otherwise."""
    for family in FAMILIES.values():
        if type(config) is family.config_type:
            return family
    known = ", ".join(f.config_type.__name__ for f in FAMILIES.values())
    raise TypeError(f"{type(config).__name__} is not the config of a registered network family (known: {known})")
