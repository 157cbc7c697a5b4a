"""The outer loop shared by all samplers: one `lax.scan` over a noise schedule t_0 > ... > t_T.

Each sampler supplies a per-image step function over its own state (x_i, or a pytree such as an
optimiser's); this module vmaps it over the batch, hands each image a fresh PRNG key per step, freezes
images that become non-finite (without touching the others) and records an optional trajectory of Tweedie
estimates. Given a `Segment`, the same loop runs only part of the schedule, from a carried `LoopState`:
spgd_jax.samplers.driver runs a whole schedule as several such programs and reports progress between them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spgd_jax.samplers.schedule import euler_coefficients

__all__ = ["LoopState", "Recorded", "SampleResult", "Segment", "SegmentResult", "Step", "StepFn", "run_schedule",
           "step_keys"]


class Step(NamedTuple):
    """The schedule at outer step i, shared by the batch (what a step function sees besides its image).

    i: () int32, the outer step (0..T-1). sigma: () float32, t_i. sigma_next: () float32, t_{i+1} (0 at the
    last step). coefficient: () float32, the Euler step size 1 - t_{i+1}/t_i. inputs: per_step[i] (a pytree
    of the sampler's per-step values such as SPGD's eta_i, or None).
    """

    i: jax.Array
    sigma: jax.Array
    sigma_next: jax.Array
    coefficient: jax.Array
    inputs: Any


# step_fn(state, step: Step, key, image_inputs) -> (state_next, x0_hat (H,W,C), loss), for ONE image:
# state is the sampler's per-image state (an (H,W,C) array, or any pytree of arrays such as (x, momentum));
# key is this image's PRNG key for this step (fold_in of its own key and i; None when run without keys);
# image_inputs is the image's slice of per_image; loss is the step's likelihood objective(s), any pytree
# of arrays, or None.
StepFn = Callable[[Any, Step, Any, Any], tuple[Any, jax.Array, Any]]


class SampleResult(NamedTuple):
    """What every sampler returns.

    x:             (B, H, W, C) the final sample x_T (after the step to sigma = 0). A diverged image
                   keeps its last finite state x_i (the input of the step that diverged).
    diverged:      (B,) bool, True where the image became non-finite.
    diverged_step: (B,) int32, the outer step i (0..T-1) whose output x_{i+1} was first non-finite; -1 if never.
    trajectory:    (B, K, H, W, C) the Tweedie estimate x0_hat of outer steps 0, k, 2k, ... (K = ceil(T/k),
                   k = config.trajectory_every), or None when trajectory_every == 0. Entries after an
                   image's diverged_step are computed from its frozen state and carry no meaning.
    losses:        the likelihood objective along the run, per image: (B, T, N) for SPGD
                   (||A(D(x^j; t_i)) - y||^2 at warm-up iteration j of outer step i), (B, T) for DPS
                   (||A(D(x_i; t_i)) - y||), None for the unconditional sampler. Entries after an
                   image's diverged_step carry no meaning.
    diagnostics:   SPGD with config.diagnostics only (else None): {name: (B, T) float32} gradient angles in
                   degrees per outer step, see spgd_jax.samplers.diagnostics. Entries after an image's diverged_step
                   carry no meaning.
    """

    x: jax.Array
    diverged: jax.Array
    diverged_step: jax.Array
    trajectory: jax.Array | None
    losses: jax.Array | None = None
    diagnostics: dict[str, jax.Array] | None = None


class Recorded(NamedTuple):
    """What a step function returns as its loss when it also records diagnostics (SPGD's gradient angles):
    SampleResult then gets losses and diagnostics {name: (B, T)} apart."""

    losses: Any
    diagnostics: dict[str, jax.Array]


class LoopState(NamedTuple):
    """The outer loop's carry: every leaf has leading axis B."""

    state: Any  # the samplers' per-image state
    diverged_step: jax.Array  # (B,) int32, -1 while finite
    trajectory: jax.Array | None  # (B, K, H, W, C) or None
    losses: Any = None  # a final Segment's carry only: every step's loss, leaves (B, T, ...) (run_in_segments)


class Segment(NamedTuple):
    """Run outer steps start .. start + length - 1 only, from `carry` (None: the sampler's initial state).

    start: () int32, may be traced; length: a static int that must fit in the schedule (start + length <= T);
    final: return the SampleResult of `carry` instead (then length must be 0, and carry.losses holds every
    step's loss, the SegmentResult losses of the run's segments joined along their step axis). run_schedule
    then returns a SegmentResult (or, final, the SampleResult)."""

    start: Any
    length: int
    carry: LoopState | None = None
    final: bool = False


class SegmentResult(NamedTuple):
    """What a sampler returns for a non-final Segment: the carry after it, T (the schedule's outer steps) and
    the segment's losses."""

    carry: LoopState
    steps: jax.Array  # (B,) int32, T for every image
    losses: Any  # the loss of each of the segment's steps, leaves (B, length, ...); None for a segment of no steps


def step_keys(keys: jax.Array) -> jax.Array:
    """The loop's per-image keys (B,) from the per-image keys that drew the initial noise: fold_in(key, 1),
    so the noise drawn inside the loop is independent of x_T. Step i then uses fold_in(loop_key, i)."""
    return jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)


def _all_finite(state: Any) -> jax.Array:
    """(B,) True where every inexact leaf of the batched state is finite."""
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(state) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    finite = [jnp.all(jnp.isfinite(leaf), axis=tuple(range(1, leaf.ndim))) for leaf in leaves]
    return functools.reduce(jnp.logical_and, finite)


def run_schedule(
    step_fn: StepFn,
    init: Any,
    sigmas: np.ndarray,
    per_step: Any = None,
    per_image: Any = None,
    trajectory_every: int = 0,
    *,
    keys: jax.Array | None = None,
    output: Callable[[Any], jax.Array] | None = None,
    segment: Segment | None = None,
) -> SampleResult | SegmentResult:
    """Runs step_fn for i = 0..T-1 over the batch and returns a SampleResult.

    init: the batched initial state, an (B, H, W, C) array (x_T) or a pytree whose leaves have leading axis B.
    sigmas: host float64 (T + 1,) noise levels, e.g. edm_sigmas. per_step: pytree with leading axis T (or
    None). per_image: pytree with leading axis B (or None). keys: (B,) PRNG keys, one per image, or None
    (step_fn then gets key None); step i of image b gets fold_in(keys[b], i). output(state) -> (B, H, W, C),
    the restored images of a batched state (default: the state itself). segment: run only part of the
    schedule (see Segment); None: all of it. An image whose new state has a non-finite value keeps its last
    finite state.
    """
    output = (lambda state: state) if output is None else output
    steps = len(sigmas) - 1
    batch_step = jax.vmap(step_fn, in_axes=(0, None, 0 if keys is not None else None, 0))
    xs = Step(
        jnp.arange(steps, dtype=jnp.int32),
        jnp.asarray(sigmas[:-1], dtype=jnp.float32),
        jnp.asarray(sigmas[1:], dtype=jnp.float32),
        jnp.asarray(euler_coefficients(sigmas), dtype=jnp.float32),
        per_step,
    )

    def outer_step(carry: LoopState, step: Step) -> tuple[LoopState, Any]:
        keys_i = None if keys is None else jax.vmap(lambda k: jax.random.fold_in(k, step.i))(keys)
        state_next, x0_hat, loss = batch_step(carry.state, step, keys_i, per_image)
        diverged_step = jnp.where((carry.diverged_step < 0) & ~_all_finite(state_next), step.i, carry.diverged_step)
        frozen = diverged_step >= 0
        state = jax.tree_util.tree_map(
            lambda old, new: jnp.where(frozen.reshape((-1,) + (1,) * (new.ndim - 1)), old, new), carry.state, state_next
        )
        trajectory = carry.trajectory
        if trajectory_every:
            slot = step.i // trajectory_every
            keep = trajectory[:, slot]
            trajectory = trajectory.at[:, slot].set(jnp.where(step.i % trajectory_every == 0, x0_hat, keep))
        return carry._replace(state=state, diverged_step=diverged_step, trajectory=trajectory), loss

    x_init = output(init)
    batch = x_init.shape[0]
    trajectory = None
    if trajectory_every:
        slots = -(-steps // trajectory_every)
        trajectory = jnp.zeros((batch, slots) + x_init.shape[1:], x_init.dtype)
    initial = LoopState(init, jnp.full((batch,), -1, jnp.int32), trajectory)
    if segment is not None:
        return _run_segment(outer_step, initial, xs, segment, output)
    final, losses = jax.lax.scan(outer_step, initial, xs)
    return _result(final, _image_major(losses), output)


def _image_major(losses: Any) -> Any:
    """A scan's losses (T, B, ...) -> (B, T, ...)."""
    return jax.tree_util.tree_map(lambda a: jnp.moveaxis(a, 0, 1), losses)


def _result(final: LoopState, losses: Any, output: Callable[[Any], jax.Array]) -> SampleResult:
    diagnostics = None
    if isinstance(losses, Recorded):
        losses, diagnostics = losses
    return SampleResult(output(final.state), final.diverged_step >= 0, final.diverged_step, final.trajectory, losses,
                        diagnostics)


def _run_segment(outer_step, initial: LoopState, xs: Step, segment: Segment, output) -> SampleResult | SegmentResult:
    """run_schedule's body for a Segment; initial is the run's first carry (used when segment.carry is None)."""
    steps = xs.i.shape[0]
    if segment.final:
        if segment.length != 0 or segment.carry is None:
            raise ValueError("a final Segment has length 0 and the carry of the run's last segment")
        return _result(segment.carry, segment.carry.losses, output)
    if not 0 <= segment.length <= steps:
        raise ValueError(f"a Segment of {segment.length} outer steps does not fit in a schedule of {steps}")
    carry = initial if segment.carry is None else segment.carry
    losses = None
    if segment.length:  # a segment of no steps (the run's first carry) traces no step: ~2 s for the default prior
        part = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, segment.start, segment.length), xs)
        carry, losses = jax.lax.scan(outer_step, carry, part)
        losses = _image_major(losses)
    return SegmentResult(carry, jnp.full((carry.diverged_step.shape[0],), steps, jnp.int32), losses)
