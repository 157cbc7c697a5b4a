"""The image batch across all devices: each device restores its own slice, with no communication.

    from spgd_jax import sharding
    result = sharding.sample_sharded(denoiser, op.forward, y, key, config, params, x_shape=(64, 64, 3))

Images are independent in every sampler (an image's result depends only on its key, y_i and params_i),
so the batch is split along its leading axis over a 1-D device mesh (axis "batch") with
`jax.shard_map`; the network's parameters are replicated. A batch that does not divide evenly is
padded with copies of its last image, and the padding is dropped from the result. The result equals
`sampling.sample` with the same key, to float32 rounding of the network at a smaller per-device batch.

Multi-host (several processes, e.g. one per GPU host): call `jax.distributed.initialize()` in every
process first; `batch_mesh()` then spans every device of every process, each process passes its own
images (the same number in every process) and gets back the results for those images. Per-image keys
come from `jax.random.fold_in(key, jax.process_index())`, so give every process the same key.

Training (data parallel) uses the same mesh: put the batch with `shard_batch(batch, mesh)`, the
parameters and optimiser state with `replicate(tree, mesh)`, and `jax.jit` the step: XLA then splits
the batch over the devices and averages the gradients across them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spgd_jax.samplers._loop import SampleResult, Segment
from spgd_jax.samplers._registry import split_step_size
from spgd_jax.samplers._sample import as_traceable, check_x_shape, run_sampler
from spgd_jax.samplers.segments import run_in_segments
from spgd_jax.samplers.sweep import check_step_sizes

__all__ = ["BATCH_AXIS", "batch_mesh", "shard_batch", "replicate", "map_images", "image_keys", "sample_sharded"]

BATCH_AXIS = "batch"


def batch_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh with axis "batch" over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (BATCH_AXIS,))


def _local_devices(mesh: Mesh) -> int:
    return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Every leaf (B_local, ...) -> a global array split along its leading axis over the mesh.

    B_local (this process's rows) must be a multiple of this process's devices in the mesh;
    map_images pads for you.
    """
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    local = _local_devices(mesh)

    def put(leaf):
        leaf = np.asarray(leaf)
        if leaf.ndim == 0 or leaf.shape[0] % local:
            raise ValueError(f"a leaf of shape {leaf.shape} cannot be split over {local} devices: its leading "
                             f"(batch) axis must be a multiple of {local}; pad the batch (map_images does)")
        return jax.make_array_from_process_local_data(sharding, leaf)

    return jax.tree_util.tree_map(put, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf copied whole onto every device of the mesh (parameters, optimiser state)."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def _pad(leaf: np.ndarray, size: int) -> np.ndarray:
    extra = size - leaf.shape[0]
    return np.concatenate([leaf, np.repeat(leaf[-1:], extra, axis=0)]) if extra else leaf


@functools.lru_cache(maxsize=16)  # each entry keeps its fn alive
def _compiled(fn: Callable, mesh: Mesh, out_axis: int, nargs: int) -> Callable:
    spec = PartitionSpec(*([None] * out_axis + [BATCH_AXIS]))
    in_specs = (PartitionSpec(),) + (PartitionSpec(BATCH_AXIS),) * nargs  # shared, then per-image arguments
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False))


def map_images(fn: Callable, *args: Any, shared: Any = None, mesh: Mesh | None = None, out_axis: int = 0) -> Any:
    """fn(shared, *args) with every leaf of args split along its leading (image) axis over the mesh's devices
    and `shared` (a pytree of arrays, e.g. network weights, or None) copied whole onto every device.

    fn must treat images independently (each device sees only its slice) and return a pytree whose
    every leaf has the image axis at out_axis. Returns this process's rows as NumPy arrays. The
    compiled computation is reused for the same fn object, mesh, shapes and structure of `shared`
    (its values are arguments, not constants: other weights of the same shapes reuse it).
    """
    mesh = batch_mesh() if mesh is None else mesh
    leaves = jax.tree_util.tree_leaves(args)
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"every input needs the same leading image axis; got leading sizes {sorted(sizes, key=str)}")
    (batch,) = sizes
    local = _local_devices(mesh)
    padded = -(-batch // local) * local
    args = shard_batch(jax.tree_util.tree_map(lambda a: _pad(np.asarray(a), padded), args), mesh)
    out = _compiled(fn, mesh, out_axis, len(args))(replicate(shared, mesh), *args)
    spec = PartitionSpec(*([None] * out_axis + [BATCH_AXIS]))
    out = multihost_utils.global_array_to_host_local_array(out, mesh, spec)
    index = (slice(None),) * out_axis + (slice(0, batch),)
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[index], out)


def image_keys(key: jax.Array, batch: int) -> jax.Array:
    """The raw per-image keys (B, ...) uint32 that `sample` draws from one typed key, for this process."""
    if jax.process_count() > 1:
        key = jax.random.fold_in(key, jax.process_index())
    return jax.random.key_data(jax.random.split(key, batch))


def sample_sharded(
    denoiser: Callable[[jax.Array, jax.Array], jax.Array],
    forward: Callable[[jax.Array, Any], jax.Array],
    y: jax.Array,
    key: jax.Array,
    config: Any,
    params: Any = None,
    *,
    x_shape: tuple[int, int, int],
    mesh: Mesh | None = None,
    progress: Callable[[int], None] | None = None,
    step_sizes: Sequence[float] | None = None,
) -> SampleResult:
    """spgd_jax.sample with the batch split over the mesh (default: all devices); arguments as sample.

    key: one key (split into one per image as sample does) or a batch of keys. step_sizes: optional step
    sizes (SPGD's lr, DPS's zeta): runs spgd_jax.sweep instead, and every array gets a leading axis L.
    Returns a SampleResult of NumPy arrays for this process's images. With progress, the run goes in
    segments (spgd_jax.samplers.segments: progress(i) once per outer step, between compiled calls that JAX's
    persistent cache keeps); an exception raised by progress stops it there.
    """
    key = jnp.asarray(key)
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # raw uint32 keys (jax.random.PRNGKey)
    keys = image_keys(key, np.shape(y)[0]) if key.ndim == 0 else jax.random.key_data(key)

    static, step_size = split_step_size(config)  # the step size is an argument: other values reuse the program
    sweeping = step_sizes is not None
    step = jnp.asarray(check_step_sizes(step_sizes), jnp.float32) if sweeping else step_size
    x_shape, denoiser, out_axis = check_x_shape(x_shape), as_traceable(denoiser), 1 if sweeping else 0
    if progress is None:
        restore = _per_device(forward, static, x_shape, None, sweeping)
        return map_images(restore, y, keys, params, shared=(denoiser, step), mesh=mesh, out_axis=out_axis)

    def call(segment: Segment):
        restore = _per_device(forward, static, x_shape, (segment.length, segment.final), sweeping)
        carry = segment.carry  # host arrays with the image axis at out_axis; map_images splits axis 0
        if carry is not None and sweeping:
            carry = jax.tree_util.tree_map(lambda a: np.moveaxis(a, 1, 0), carry)
        return map_images(restore, y, keys, params, carry, shared=(denoiser, step, np.int32(segment.start)),
                          mesh=mesh, out_axis=out_axis)

    return run_in_segments(call, progress)


@functools.lru_cache(maxsize=16)
def _per_device(forward, config, x_shape, segment: tuple[int, bool] | None, sweeping: bool) -> Callable:
    """One function object per setting, so that map_images reuses its compiled computation.

    segment: None for a whole run; else (length, final) of the Segment run (its start and carry are arguments)."""

    def restore(shared, y, keys, params, carry=None):
        denoiser, step, *start = shared

        def run(value, carry):
            part = None if segment is None else Segment(start[0], segment[0], carry, segment[1])
            return run_sampler(denoiser, forward, y, keys, config, value, params, x_shape, part)

        if not sweeping:
            return run(step, carry)
        carry = jax.tree_util.tree_map(lambda a: jnp.moveaxis(a, 1, 0), carry)  # (B, L, ...) -> (L, B, ...)
        return jax.vmap(run)(step, carry)

    return restore
