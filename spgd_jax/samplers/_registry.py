"""What a sampler is, and the registry of samplers.

A sampler is its config and two functions: `schedule(config)`, the noise levels and per-step values on
the host, and `step(denoiser, forward, config)`, the per-image step one lax.scan runs over them
(spgd_jax.samplers.driver runs every method). `init` and `output` are there for a method whose state is
not the image itself. The config is a frozen dataclass and a pytree: its step size (SPGD's lr, DPS's
zeta) is the one data leaf, every other field static, so runs that differ only in the step size share
one compilation and a sweep is a vmap over that leaf. Adding a method is one module (config, schedule,
step, presets) ending in one `register_sampler` call, as spgd_jax/samplers/spgd.py does. The registry
has the shape of the network families' (spgd_jax.models) and the tasks' (spgd_jax.operators):
a record, a dict by name, `register_*`, `get_*` by name and `*_of` by config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

__all__ = ["SAMPLERS", "Sampler", "Schedule", "forward_for", "get_sampler", "nfe", "register_sampler",
           "sampler_of"]


class Schedule(NamedTuple):
    """A run's schedule, computed on the host from the config (the step size may be a traced leaf).

    sigmas:     (T + 1,) float64 noise levels t_0 > ... > t_T (t_T = 0 for most methods).
    per_step:   a pytree with leading axis T of the step's values (SPGD's eta_i), or None.
    stochastic: whether the step draws noise from its key (then a run needs one key per image).
    """

    sigmas: np.ndarray
    per_step: Any = None
    stochastic: bool = False


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A registered sampler.

    name:        its name on the command line (--sampler NAME).
    config_type: its frozen config dataclass (with sigma_max, steps and trajectory_every, fields or
                 properties); register_sampler makes it a pytree whose one data leaf is `step_size`.
    schedule:    schedule(config) -> Schedule.
    step:        step(denoiser, forward, config) -> step_fn(state, step: Step, key, (y, params)) ->
                 (state_next, x0_hat (H,W,C), loss) for ONE image (spgd_jax.samplers.Step).
    init:        init(denoiser, forward, y (B,...), x_init (B,H,W,C), config, params) -> the batched
                 initial state (None: x_init itself, x_T = sigma_max * N(0, I)).
    output:      output(state) -> (B,H,W,C) the images of a batched state (None: the state itself).
    step_size:   the config field that is the method's step size (a data leaf; may be traced, swept),
                 or None.
    hint:        what to change when a run diverges, with the field to change (the command line turns a
                 field into its flag); None: "a smaller <step_size>".
    conditional: whether it restores measurements (False: it samples the prior; forward and y are None).
    linear_only: whether it needs a linear forward operator (projections, proximal steps, SVDs).
    forward:     forward(operator) -> the forward model the method runs a task's Operator with (DDRM:
                 spgd_jax.operators.svd); None: operator.forward. See forward_for.
    nfe:         nfe(config) -> denoiser evaluations per image (None: config.steps).
    paper:       {task: {field: value}}, the settings of the method's paper or release (presets.config).
    tuned:       {task: {field: value}}, those changed for the default 64 px prior.
    """

    name: str
    config_type: type
    schedule: Callable[[Any], Schedule]
    step: Callable[..., Callable]
    init: Callable[..., Any] | None = None
    output: Callable[[Any], jax.Array] | None = None
    step_size: str | None = None
    hint: str | None = None
    conditional: bool = True
    linear_only: bool = False
    forward: Callable[[Any], Callable] | None = None
    nfe: Callable[[Any], int] | None = None
    paper: dict = dataclasses.field(default_factory=dict)
    tuned: dict = dataclasses.field(default_factory=dict)


SAMPLERS: dict[str, Sampler] = {}


def register_sampler(sampler: Sampler) -> Sampler:
    """Adds `sampler` to SAMPLERS (ValueError if its name or config type is taken) and registers its config
    type as a pytree (the step size its data leaf, every other field static); returns it."""
    if sampler.name in SAMPLERS or any(s.config_type is sampler.config_type for s in SAMPLERS.values()):
        raise ValueError(f"a sampler named {sampler.name!r} or with config {sampler.config_type.__name__} "
                         "is already registered")
    fields = [f.name for f in dataclasses.fields(sampler.config_type)]
    if sampler.step_size is not None and sampler.step_size not in fields:
        raise ValueError(f"{sampler.config_type.__name__} has no field {sampler.step_size!r} (step_size)")
    data = [] if sampler.step_size is None else [sampler.step_size]
    jax.tree_util.register_dataclass(sampler.config_type, data_fields=data,
                                     meta_fields=[f for f in fields if f not in data])
    SAMPLERS[sampler.name] = sampler
    return sampler


def get_sampler(name: str) -> Sampler:
    """The registered sampler `name`; ValueError listing the known ones."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sampler_of(config: Any) -> Sampler:
    """The registered sampler of `config`'s type; TypeError naming the registered config types."""
    for sampler in SAMPLERS.values():
        if type(config) is sampler.config_type:
            return sampler
    names = ", ".join(s.config_type.__name__ for s in SAMPLERS.values())
    raise TypeError(f"config must be one of {names}, got {type(config).__name__}")


def nfe(config: Any) -> int:
    """Denoiser evaluations per image (network forwards; a gradient through the network counts once) of a
    run with `config`."""
    count = sampler_of(config).nfe
    return config.steps if count is None else count(config)


def forward_for(config: Any, operator: Any) -> Callable:
    """The forward model to pass to `sample` with `config` for a task's Operator (operators.get): its
    forward, or what the sampler derives from the operator (DDRM: its SVD). ValueError if the sampler cannot
    run on it (e.g. DDRM on motion deblurring)."""
    derive = sampler_of(config).forward
    return operator.forward if derive is None else derive(operator)
