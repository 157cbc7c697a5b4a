"""The outer loop shared by all samplers: one `lax.scan` over the EDM schedule.

Each sampler supplies a per-image step function; this module vmaps it over the
batch, freezes images that become non-finite (without touching the others),
records an optional trajectory of Tweedie estimates and reports progress.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spgd_jax.samplers.schedule import euler_coefficients

__all__ = ["SampleResult", "StepFn", "check_trajectory_every", "run_schedule"]

# step_fn(x (H,W,C), sigma (), coefficient (), step_inputs, image_inputs) -> (x_next (H,W,C), x0_hat (H,W,C), loss)
# for ONE image (loss: the step's likelihood objective(s), any pytree of arrays, or None) at outer step i: sigma = t_i, coefficient = 1 - t_{i+1}/t_i, step_inputs = per_step[i]
# (shared by the batch), image_inputs = that image's slice of per_image.
StepFn = Callable[[jax.Array, jax.Array, jax.Array, Any, Any], tuple[jax.Array, jax.Array]]


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


def check_trajectory_every(value: int) -> None:
    """Raises ValueError unless value is an int >= 0 (a config's trajectory_every)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"trajectory_every must be an int >= 0 (0 = no trajectory), got {value!r}")


class LoopState(NamedTuple):
    x: jax.Array  # (B, H, W, C)
    diverged_step: jax.Array  # (B,) int32, -1 while finite
    trajectory: jax.Array | None  # (B, K, H, W, C) or None


def run_schedule(
    step_fn: StepFn,
    x_init: jax.Array,
    sigmas: np.ndarray,
    per_step: Any = None,
    per_image: Any = None,
    trajectory_every: int = 0,
    progress: Callable[[int], None] | None = None,
) -> SampleResult:
    """Runs step_fn for i = 0..T-1 over the batch x_init (B, H, W, C) and returns a SampleResult.

    sigmas: host float64 (T + 1,) from edm_sigmas. per_step: pytree with leading axis T (or None).
    per_image: pytree with leading axis B (or None). progress(i) is called on the host once per outer
    step, from inside the compiled loop (call order not guaranteed); it does not change the result.
    """
    steps = len(sigmas) - 1
    batch_step = jax.vmap(step_fn, in_axes=(0, None, None, None, 0))
    xs = (
        jnp.arange(steps, dtype=jnp.int32),
        jnp.asarray(sigmas[:-1], dtype=jnp.float32),
        jnp.asarray(euler_coefficients(sigmas), dtype=jnp.float32),
        per_step,
    )

    def outer_step(state: LoopState, xs) -> tuple[LoopState, Any]:
        i, sigma, coefficient, step_inputs = xs
        x_next, x0_hat, loss = batch_step(state.x, sigma, coefficient, step_inputs, per_image)
        finite = jnp.all(jnp.isfinite(x_next), axis=tuple(range(1, x_next.ndim)))
        diverged_step = jnp.where((state.diverged_step < 0) & ~finite, i, state.diverged_step)
        frozen = (diverged_step >= 0).reshape((-1,) + (1,) * (x_next.ndim - 1))
        x = jnp.where(frozen, state.x, x_next)
        trajectory = state.trajectory
        if trajectory_every:
            slot = i // trajectory_every
            keep = trajectory[:, slot]
            trajectory = trajectory.at[:, slot].set(jnp.where(i % trajectory_every == 0, x0_hat, keep))
        if progress is not None:
            jax.debug.callback(lambda step: progress(int(step)), i)
        return LoopState(x, diverged_step, trajectory), loss

    batch = x_init.shape[0]
    trajectory = None
    if trajectory_every:
        slots = -(-steps // trajectory_every)
        trajectory = jnp.zeros((batch, slots) + x_init.shape[1:], x_init.dtype)
    init = LoopState(x_init, jnp.full((batch,), -1, jnp.int32), trajectory)
    final, losses = jax.lax.scan(outer_step, init, xs)
    losses = jax.tree_util.tree_map(lambda a: jnp.moveaxis(a, 0, 1), losses)  # (T, B, ...) -> (B, T, ...)
    return SampleResult(final.x, final.diverged_step >= 0, final.diverged_step, final.trajectory, losses)
