"""The registry of samplers: each config type names the pure function that runs it.

`sample` dispatches through here, so a new method is one module (its frozen config and its run function)
plus one `register_sampler` line in spgd_jax/samplers/__init__.py.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

__all__ = ["SAMPLERS", "Sampler", "register_sampler", "sampler_for"]


class Sampler(NamedTuple):
    """A registered sampler.

    name:        its name on the command line (--sampler NAME).
    config_type: its frozen config dataclass (with sigma_max, steps and trajectory_every).
    run:         conditional: run(denoiser, forward, y (B,...), x_init (B,H,W,C), config, params, progress)
                 -> SampleResult; unconditional: run(denoiser, x_init, config, progress) -> SampleResult.
    conditional: whether it restores measurements (False: it samples the prior).
    """

    name: str
    config_type: type
    run: Callable[..., Any]
    conditional: bool = True


SAMPLERS: dict[str, Sampler] = {}


def register_sampler(sampler: Sampler) -> Sampler:
    """Adds `sampler` (ValueError if its name or config type is taken); returns it."""
    if sampler.name in SAMPLERS or any(s.config_type is sampler.config_type for s in SAMPLERS.values()):
        raise ValueError(f"a sampler named {sampler.name!r} or with config {sampler.config_type.__name__} "
                         "is already registered")
    SAMPLERS[sampler.name] = sampler
    return sampler


def sampler_for(config: Any) -> Sampler:
    """The registered sampler of `config`'s type; TypeError naming the registered config types."""
    for sampler in SAMPLERS.values():
        if type(config) is sampler.config_type:
            return sampler
    names = ", ".join(s.config_type.__name__ for s in SAMPLERS.values())
    raise TypeError(f"config must be one of {names}, got {type(config).__name__}")
