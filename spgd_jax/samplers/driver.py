"""Running a sampler: the one traced driver `run`, and its three views `sample`, `sweep`, `sample_sharded`.

    result = spgd_jax.sample(denoiser, op.forward, y, key, config, params, x_shape=(64, 64, 3))
    swept = spgd_jax.sweep(denoiser, op.forward, y, key, config, [0.5, 1, 2, 4], params, x_shape=(64, 64, 3))
    split = spgd_jax.samplers.sample_sharded(denoiser, op.forward, y, key, config, params, x_shape=(64, 64, 3))

`run` takes the initial state x_T and per-image keys and runs any registered method (its schedule, its
per-image step in one lax.scan, its init and output); a `Segment` runs part of the schedule. The views
draw x_T from one key per image and compile `run`: `sample` once over the batch, `sweep` vmapped over the
config's step-size leaf (one compilation for every list of the same length), `sample_sharded` over the
devices (spgd_jax.sharding.map_images). Given `progress`, each view runs in segments: a few compiled calls
with progress(i) between them, every program free of host callbacks (JAX's persistent cache keeps them).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spgd_jax import sharding
from spgd_jax.samplers._loop import SampleResult, Segment, SegmentResult, run_schedule, step_keys
from spgd_jax.samplers._registry import sampler_of

__all__ = ["LONGEST_SEGMENT", "SEGMENTS", "check_step_sizes", "image_keys", "initial_noise", "run",
           "run_in_segments", "sample", "sample_sharded", "segment_length", "sweep", "swept", "typed_key"]

SEGMENTS = 10  # a run of T outer steps in segments reports progress about every T / SEGMENTS steps,
LONGEST_SEGMENT = 25  # and at least every LONGEST_SEGMENT steps


def run(denoiser: Callable, forward: Callable | None, y: jax.Array | None, x_init: jax.Array, config: Any,
        params: Any = None, *, keys: jax.Array | None = None, segment: Segment | None = None
        ) -> SampleResult | SegmentResult:
    """The registered sampler of `config` from the initial state x_init (B, H, W, C) (traceable).

    keys: (B,) per-image PRNG keys for the noise a stochastic method draws in its loop (step i of image b
    uses fold_in(keys[b], i)); ValueError without them for such a method, ignored by the others.
    segment: run only part of the schedule (spgd_jax.samplers.Segment); None: all of it.
    Other arguments as `sample`. The config's step size may be a tracer (a sweep vmaps over it)."""
    sampler = sampler_of(config)
    schedule = sampler.schedule(config)
    if schedule.stochastic and keys is None:
        raise ValueError(f"{sampler.name} draws noise at every step: pass keys=(B,) PRNG keys, one per image "
                         "(spgd_jax.samplers.sample does)")
    init = x_init if sampler.init is None else sampler.init(denoiser, forward, y, x_init, config, params)
    return run_schedule(sampler.step(denoiser, forward, config), init, schedule.sigmas, schedule.per_step,
                        (y, params) if sampler.conditional else None, config.trajectory_every,
                        keys=keys if schedule.stochastic else None, output=sampler.output, segment=segment)


def sample(denoiser: Callable, forward: Callable | None, y: jax.Array | None, key: jax.Array, config: Any,
           params: Any = None, *, x_shape: tuple[int, int, int], progress: Callable[[int], None] | None = None
           ) -> SampleResult:
    """Restores (or, with EulerConfig, generates) a batch of images.

    denoiser: D(x (B,H,W,C), sigma (B,)) -> x0_hat (B,H,W,C), the Tweedie estimate; pure, differentiable.
    forward:  A(x (H,W,C), params_i) -> y_i for ONE image (differentiable); None for EulerConfig.
    y:        (B, ...) measurements in [-1, 1] space; None for EulerConfig.
    key:      one PRNG key (split into B per-image keys) or a batch of B keys, one per image; an image's
              result then depends only on its own key, y_i and params_i. Typed or raw uint32 keys.
    config:   a registered sampler's config: SPGDConfig, DPSConfig, EulerConfig, ... (spgd_jax.samplers.SAMPLERS).
    params:   per-image operator parameters, a pytree with leading axis B, or None (forward gets None).
    x_shape:  (H, W, C) of ONE restored image (differs from y's shape for e.g. super-resolution).
    progress: optional host function called with i once per outer step i, in order, between the compiled
              segments of the run (outside the caller's jit only; an exception from it stops the run); it
              does not change the result.
    The whole run is one jax.jit with the denoiser (a Denoiser pytree, or any callable: then static, by
    identity) and the config's step size as traced arguments; forward is static (pass the same object to
    reuse the compilation). Without progress, `sample` also works inside the caller's jit, vmap and grad.
    On a CPU, a batch of concrete arrays runs in sharding.cpu_parts(B) calls side by side from threads (each
    image with the same key; results equal one call's to float32 round-off); SPGD_JAX_CPU_PARTS=1: one call.
    Precision is JAX's: called under jax.default_matmul_precision("bfloat16"), a float32 ADM UNet computes its
    3x3 convolutions from bfloat16 operands where the CPU has oneDNN's route (--conv-precision bfloat16).
    Returns SampleResult(x (B,H,W,C), diverged (B,) bool, diverged_step (B,) int32, trajectory or None, ...).
    """
    sampler_of(config)  # a TypeError naming the registered configs, before tracing
    arguments = (_traceable(denoiser), y, key, config, params)
    return _views(forward, check_x_shape(x_shape), False, arguments, config.steps, progress)


def sweep(denoiser: Callable, forward: Callable, y: jax.Array, key: jax.Array, config: Any,
          values: Sequence[float] | jax.Array, params: Any = None, *, x_shape: tuple[int, int, int],
          progress: Callable[[int], None] | None = None) -> SampleResult:
    """The sampler of `config` at each of the L step sizes in `values` (the config's own is not used): a
    vmap over the config's step-size leaf (SPGD's lr, DPS's zeta; Sampler.step_size), batched over images.

    Every value starts from the same noise and measurements, so result.x[k] equals `sample` with the config
    at values[k] (to float32 rounding of the batched network). Arguments as `sample`. Returns a SampleResult
    whose every array has a leading axis L: x (L, B, H, W, C), diverged (L, B), ..."""
    return _views(forward, check_x_shape(x_shape), True, (_traceable(denoiser), y, key, swept(config, values), params),
                  config.steps, progress)


def swept(config: Any, values: Sequence[float] | jax.Array) -> Any:
    """`config` with its step-size leaf replaced by the (L,) float32 values (checked unless traced)."""
    if sampler_of(config).step_size is None or not sampler_of(config).conditional:
        raise TypeError(f"{type(config).__name__} has no step size to sweep")
    if isinstance(values, jax.core.Tracer):  # inside the caller's jit: checked by whoever made them
        if values.ndim != 1:
            raise ValueError(f"step sizes must be one value per run, shape (L,); got shape {values.shape}")
        values = values.astype(jnp.float32)
    else:
        values = jnp.asarray(check_step_sizes(values), jnp.float32)
    return jax.tree_util.tree_map(lambda _: values, config)


def sample_sharded(denoiser: Callable, forward: Callable, y: jax.Array, key: jax.Array, config: Any,
                   params: Any = None, *, x_shape: tuple[int, int, int], mesh: Any = None,
                   progress: Callable[[int], None] | None = None,
                   step_sizes: Sequence[float] | None = None, forward_identity: tuple | None = None
                   ) -> SampleResult:
    """`sample` (or, with step_sizes, `sweep`) with the batch split over the mesh's devices (default: all).

    Returns a SampleResult of NumPy arrays for this process's images; with step_sizes every array has a
    leading axis L. Several processes (jax.distributed): each passes its own images and the same key; image
    keys come from fold_in(key, process_index). See spgd_jax.sharding.

    forward_identity: optional strings and numbers (a tuple) that name `forward` the same way in every
    process, as the command line names a registered task's operator. Given one, and a denoiser that is a
    pytree (a Denoiser), the compiled programs are kept on disk while JAX's persistent cache is on, and the
    next process runs them without tracing (spgd_jax.xla_setup.executables); the results are the same."""
    key = typed_key(key)
    if key.ndim == 0 and jax.process_count() > 1:
        key = jax.random.fold_in(key, jax.process_index())
    keys = jax.random.key_data(image_keys(key, np.shape(y)[0]))  # raw: map_images splits NumPy arrays
    sweeping = step_sizes is not None
    config = swept(config, step_sizes) if sweeping else config
    denoiser = _traceable(denoiser)
    if isinstance(denoiser, jax.tree_util.Partial):  # a plain callable has no name that holds across processes
        forward_identity = None
    program = functools.partial(_sharded, mesh, (forward, check_x_shape(x_shape), sweeping), forward_identity,
                                (denoiser, config), (y, keys, params))
    if progress is None:
        return program(None, None)
    return run_in_segments(program, config.steps, progress)


def _sharded(mesh, static, forward_identity, shared, per_image, segment, carry):
    """One call of sample_sharded: the whole run (segment None) or segment = (start, length, final)."""
    part = None if segment is None else segment[1:]
    identity = None if forward_identity is None else ("sample_sharded", forward_identity, *static[1:], part)
    if carry is not None and static[2]:  # host arrays of a sweep: (L, B, ...) -> (B, L, ...) for map_images
        carry = jax.tree_util.tree_map(lambda a: np.moveaxis(a, 1, 0), carry)
    start = () if segment is None else (np.int32(segment[0]),)
    return sharding.map_images(_per_device(*static, part), *per_image, carry, shared=shared + start, mesh=mesh,
                               out_axis=1 if static[2] else 0, identity=identity)


@functools.lru_cache(maxsize=16)
def _per_device(forward, x_shape, sweeping, part) -> Callable:
    """One function object per setting, so that map_images reuses its compiled computation."""

    def restore(shared, y, keys, params, carry):
        denoiser, config, *start = shared
        if sweeping:  # (B, L, ...) -> (L, B, ...)
            carry = jax.tree_util.tree_map(lambda a: jnp.moveaxis(a, 1, 0), carry)
        return _images(denoiser, forward, y, keys, config, params, x_shape, sweeping, part, *start, carry=carry)

    return restore


def _views(forward, x_shape, sweeping, arguments, steps, progress) -> SampleResult:
    """sample's and sweep's compiled call: the whole run, or segments with progress between them. On a CPU a
    batch of concrete images runs in sharding.cpu_parts(B) calls side by side, each on its slice of the images
    (the same per-image keys; each image's result equals the whole batch's to float32 round-off)."""
    denoiser, y, key, config, params = arguments
    parts, keys = _cpu_parts(y, key, params)

    def call(segment, carry):
        part, start = (None, None) if segment is None else (segment[1:], segment[0])
        one = lambda y, key, params, carry: _compiled(denoiser, forward, y, key, config, params, x_shape, sweeping,
                                                      part, start, carry)
        axis = 1 if sweeping else 0  # a sweep's carry and results are (L, B, ...)
        return sharding.map_parts(one, y, keys, params, carry, parts=parts, in_axes=(0, 0, 0, axis), out_axis=axis)

    if progress is None:
        return call(None, None)
    return run_in_segments(call, steps, progress)


def _cpu_parts(y, key, params) -> tuple[int, jax.Array]:
    """(parts, key): sharding.cpu_parts(B) and the images' own keys for a batch of concrete, well-formed
    arguments (key then the (B,) image keys, which split with the images); (1, key) inside the caller's
    transformations or jax.disable_jit() (op by op: nothing to run side by side), and for any argument that the
    whole call would reject (it then says why)."""
    leaves = jax.tree_util.tree_leaves((y, key, params))
    if jax.config.jax_disable_jit or any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        return 1, key
    try:
        keys = typed_key(key)
    except TypeError:
        return 1, key
    batch = np.shape(y)[0] if y is not None and np.ndim(y) else (keys.shape[0] if keys.ndim == 1 else None)
    per_image = jax.tree_util.tree_leaves((y, params))
    if batch is None or batch < 2 or any(np.ndim(leaf) == 0 or np.shape(leaf)[0] != batch for leaf in per_image):
        return 1, key
    parts = sharding.cpu_parts(batch)
    return (1, key) if parts == 1 else (parts, image_keys(keys, batch))


@functools.partial(jax.jit, static_argnums=(1, 6, 7, 8))
def _compiled(denoiser, forward, y, key, config, params, x_shape, sweeping, part=None, start=None, carry=None):
    return _images(denoiser, forward, y, key, config, params, x_shape, sweeping, part, start, carry)


def _images(denoiser, forward, y, key, config, params, x_shape, sweeping, part, start=None, carry=None):
    """The body of every view (traceable): x_T from the images' keys, then `run`, vmapped over the config's
    step-size leaf when sweeping. part: None (the whole run) or (length, final) of a Segment from start."""
    sampler = sampler_of(config)
    if not sampler.conditional and (forward is not None or y is not None):
        raise ValueError(f"{type(config).__name__} samples unconditionally: pass forward=None and y=None "
                         "(and a batch of keys)")
    if sampler.conditional and (forward is None or y is None):
        raise ValueError(f"{type(config).__name__} needs a forward operator and measurements y; got None")
    batch = y.shape[0] if sampler.conditional else None
    if sampler.conditional:
        check_measurements(forward, y, params, batch, x_shape)
    keys = image_keys(key, batch)
    x_init = initial_noise(keys, batch, x_shape, config.sigma_max)

    def one(config, carry):
        segment = None if part is None else Segment(start, part[0], carry, part[1])
        return run(denoiser, forward, y, x_init, config, params, keys=step_keys(keys), segment=segment)

    return jax.vmap(one)(config, carry) if sweeping else one(config, carry)


def segment_length(steps: int, parts: int = SEGMENTS, longest: int = LONGEST_SEGMENT) -> int:
    """The largest divisor of `steps` that is at most steps / parts and at most `longest` (at least 1):
    equal segments, so one program runs them all."""
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"a schedule has at least one outer step, got {steps!r}")
    limit = max(1, min(int(steps) // parts, longest))
    return max(d for d in range(1, limit + 1) if steps % d == 0)


def run_in_segments(call: Callable[[tuple | None, Any], Any], steps: int,
                    progress: Callable[[int], None] | None = None) -> SampleResult:
    """A run of `steps` outer steps as three programs: the initial carry (a segment of no steps), the steps
    start .. start + L - 1 (L = segment_length(steps)), called steps / L times, and the SampleResult of the
    last carry. call((start, length, final), carry) runs one; progress(i) is called once for every outer
    step i, in order, after the segment that ran it (an exception from progress stops the run there).
    The segments' losses are joined here, on the host, and given to the last program in its carry.
    The result equals one whole call's to float32 round-off; on a CPU it is the same bits."""
    carry = call((0, 0, False), None).carry
    length = segment_length(steps)
    losses = []
    for start in range(0, steps, length):
        part = call((start, length, False), carry)
        carry = part.carry
        step_axis = np.ndim(part.steps)  # losses (B, length, ...), or (L, B, length, ...) in a sweep
        losses.append(jax.tree_util.tree_map(np.asarray, part.losses))
        for i in range(start, start + length):
            if progress is not None:
                progress(i)
    joined = jax.tree_util.tree_map(lambda *parts: np.concatenate(parts, axis=step_axis), *losses)
    return call((0, 0, True), carry._replace(losses=joined))


def check_step_sizes(values: Sequence[float]) -> tuple[float, ...]:
    """The step sizes as a tuple of floats; ValueError unless a non-empty list of finite numbers > 0."""
    try:
        values = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"step sizes must be a list of numbers, e.g. [0.5, 1, 2, 4]; got {values!r}") from None
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if not values or bad:
        raise ValueError(f"step sizes must be finite and > 0 (at least one); got {list(values)}")
    return values


def _traceable(denoiser: Callable) -> Any:
    """The denoiser as a jit argument: a pytree whose leaves are all arrays (a Denoiser) as it is, any other
    callable wrapped in jax.tree_util.Partial (the function becomes static, compared by identity)."""
    leaves = jax.tree_util.tree_leaves(denoiser)
    if leaves and all(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves):
        return denoiser
    return jax.tree_util.Partial(denoiser)


def check_x_shape(x_shape) -> tuple[int, int, int]:
    """x_shape as a tuple; ValueError unless (H, W, C), three positive ints."""
    shape_ok = isinstance(x_shape, (tuple, list)) and len(x_shape) == 3
    if not (shape_ok and all(isinstance(d, int) and d > 0 for d in x_shape)):
        raise ValueError(f"x_shape must be (H, W, C) of one image, three positive ints, got {x_shape!r}")
    return tuple(x_shape)


def typed_key(key: jax.Array) -> jax.Array:
    """A typed PRNG key (or batch of keys): raw uint32 keys (jax.random.PRNGKey) wrapped; TypeError otherwise."""
    key = jnp.asarray(key)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if key.dtype != jnp.uint32:
        raise TypeError(f"key must be a PRNG key (jax.random.key or PRNGKey), got dtype {key.dtype}")
    return jax.random.wrap_key_data(key)


def image_keys(key: jax.Array, batch: int | None) -> jax.Array:
    """(B,) typed PRNG keys, one per image: `key` split into `batch` keys, or `key` itself when it is a
    batch of keys (then batch may be None). Raw uint32 keys are wrapped. TypeError/ValueError otherwise."""
    key = typed_key(key)
    if key.ndim == 0:
        if batch is None:
            raise ValueError("without measurements y the batch size comes from the key: pass a batch of B keys")
        return jax.random.split(key, batch)
    if key.ndim == 1 and batch in (None, key.shape[0]):
        return key
    raise ValueError(f"key must be one key or a batch of {batch} keys (one per image), got key shape {key.shape}")


def initial_noise(key: jax.Array, batch: int | None, x_shape: tuple[int, ...], sigma_max: float) -> jax.Array:
    """x_T = sigma_max * N(0, I) of shape (B,) + x_shape, image b drawn from its own key.

    key: one key (split into `batch` keys) or a batch of keys (then batch may be None); see image_keys."""
    keys = image_keys(key, batch)
    noise = jax.vmap(lambda k: jax.random.normal(k, x_shape, jnp.float32))(keys)
    return sigma_max * noise


def check_measurements(forward, y, params, batch: int, x_shape: tuple[int, ...]) -> None:
    """ValueError unless every params leaf has the batch axis and forward maps one image of x_shape to y[0]'s shape."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != batch:
            raise ValueError(
                f"params{jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}; every params leaf needs the "
                f"leading batch axis B = {batch} (y.shape[0])"
            )
    one_params = jax.tree_util.tree_map(lambda p: jax.ShapeDtypeStruct(jnp.shape(p)[1:], jnp.result_type(p)), params)
    try:
        out = jax.eval_shape(forward, jax.ShapeDtypeStruct(x_shape, jnp.float32), one_params)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"forward fails on one image of x_shape {x_shape} with one image's params ({error}); "
            "pass x_shape = the shape of one restored image and params with a leading batch axis"
        ) from error
    if out.shape != y.shape[1:]:
        raise ValueError(
            f"forward maps one image of x_shape {x_shape} to {out.shape}, but y has per-image shape {y.shape[1:]}; "
            "pass x_shape = the shape of one restored image"
        )
