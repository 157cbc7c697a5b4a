"""The registry of samplers: each config type names the pure function that runs it.

`sample` dispatches through here, so a new method is one module (its frozen config and its run function)
plus one `register_sampler` line in spgd_jax/samplers/__init__.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

__all__ = ["SAMPLERS", "Sampler", "forward_for", "nfe", "register_sampler", "sampler_for", "split_step_size"]


class Sampler(NamedTuple):
    """A registered sampler.

    name:        its name on the command line (--sampler NAME).
    config_type: its frozen config dataclass (with sigma_max, steps and trajectory_every).
    run:         conditional: run(denoiser, forward, y (B,...), x_init (B,H,W,C), config, params, progress, *,
                 keys, <step_size>=value) -> SampleResult; unconditional: run(denoiser, x_init, config, progress,
                 *, keys) -> SampleResult. x_init = sigma_max * N(0, I) from the images' own keys; keys: (B,)
                 per-image PRNG keys for the noise a stochastic method draws inside its loop (pass them to
                 run_schedule; a deterministic method ignores them).
    conditional: whether it restores measurements (False: it samples the prior).
    linear_only: whether it needs a linear forward operator (projections, proximal steps, SVDs); the
                 command line refuses a non-linear task for it before running.
    forward:     forward(operator) -> the forward model the sampler runs with, from a task's Operator (DDRM:
                 spgd_jax.operators.svd, the forward carrying its SVD; ValueError for a task without one);
                 None: operator.forward. See forward_for.
    nfe:         nfe(config) -> the denoiser evaluations per image of a run (None: config.steps, one per step).
    step_size:   the config field that `run` also takes as a keyword, a scalar that may be traced (SPGD's
                 'lr', DPS's 'zeta'), or None. `sample` passes it traced, so runs that differ only in it
                 share one compilation, and `sweep` vmaps over it.
    """

    name: str
    config_type: type
    run: Callable[..., Any]
    conditional: bool = True
    step_size: str | None = None
    linear_only: bool = False
    nfe: Callable[[Any], int] | None = None
    forward: Callable[[Any], Callable] | None = None


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


def nfe(config: Any) -> int:
    """Denoiser evaluations per image (network forwards; a gradient through the network counts once) of a
    run with `config`."""
    count = sampler_for(config).nfe
    return config.steps if count is None else count(config)


def forward_for(config: Any, operator: Any) -> Callable:
    """The forward model to pass to `sample` with `config` for a task's Operator (operators.get): its
    forward, or what the sampler derives from the operator (DDRM: its SVD). ValueError if the sampler cannot
    run on it (e.g. DDRM on motion deblurring)."""
    derive = sampler_for(config).forward
    return operator.forward if derive is None else derive(operator)


def split_step_size(config: Any) -> tuple[Any, float | None]:
    """(config with its step size set to 1.0, the step size): the static and the traced part of a config.

    For a sampler without a step size: (config, None)."""
    name = sampler_for(config).step_size
    if name is None:
        return config, None
    return dataclasses.replace(config, **{name: 1.0}), getattr(config, name)
