"""A batch of independent images across all devices, and across a CPU's cores: each computes its own slice,
with no communication.

    out = sharding.map_images(fn, images, params, shared=weights)   # fn(weights, images, params) per device

The batch is split along its leading axis over a 1-D device mesh (axis "batch") with `jax.shard_map`;
`shared` (network weights) is replicated. A batch that does not divide evenly is padded with copies of its
last image, and the padding is dropped from the result. `spgd_jax.samplers.sample_sharded` runs a sampler
this way (its result equals `sample`'s to float32 rounding of the network at a smaller per-device batch).

Multi-host (several processes, e.g. one per GPU host): call `jax.distributed.initialize()` in every
process first; `batch_mesh()` then spans every device of every process, each process passes its own
images (the same number in every process) and gets back the results for those images.

On a CPU a batch also runs in parts side by side: `map_parts(fn, images, parts=cpu_parts(B))` calls fn on each
slice from a thread of its own, at once. One call of a compiled program leaves a core idle whenever it waits
(each operation's hand-off to XLA's threads, the small layers' single-threaded work); two calls fill each
other's gaps. `spgd_jax.sample`, `sweep` and `map_images` on a CPU device do this for concrete batches (not
inside the caller's jit). Measured on a 2-core AMD EPYC, the default prior's SPGD sampler: batch 4 in two
calls of 2 1.10-1.27x faster than in one call, batch 2 in two of 1 1.18x, batch 8 in two of 4 1.12x.
SPGD_JAX_CPU_PARTS=n sets the most parts (default 2; 1 runs every batch in one call).

Training (data parallel) uses the same mesh: put the batch with `shard_batch(batch, mesh)`, the
parameters and optimiser state with `replicate(tree, mesh)`, and `jax.jit` the step: XLA then splits
the batch over the devices and averages the gradients across them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spgd_jax.xla_setup import executables

__all__ = ["BATCH_AXIS", "CPU_PARTS", "batch_mesh", "cpu_parts", "map_images", "map_parts", "replicate",
           "shard_batch"]

BATCH_AXIS = "batch"
CPU_PARTS = 2  # the most parts of a batch on a CPU (measured on 2 cores), unless $SPGD_JAX_CPU_PARTS says
ENV_PARTS = "SPGD_JAX_CPU_PARTS"


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


def cpu_parts(batch: int) -> int:
    """How many equal parts `map_parts` runs a batch of `batch` independent images in on this process's CPU:
    the largest divisor of batch that is at most $SPGD_JAX_CPU_PARTS (default CPU_PARTS) and at most the
    cores this process may use; 1 (one call) where JAX's default backend is not the CPU. ValueError when
    $SPGD_JAX_CPU_PARTS is not a whole number >= 1."""
    if jax.default_backend() != "cpu":
        return 1
    text = os.environ.get(ENV_PARTS, "").strip()
    try:
        most = int(text) if text else CPU_PARTS
    except ValueError:
        most = 0
    if most < 1:
        raise ValueError(f"{ENV_PARTS}={text!r}: give the most parts a CPU batch runs in, a whole number >= 1 "
                         f"(1 runs every batch in one call), or unset it for the default {CPU_PARTS}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = min(most, cores, batch)
    return max(d for d in range(1, max(limit, 1) + 1) if batch % d == 0)


def map_parts(fn: Callable, *per_image: Any, parts: int, in_axes: int | tuple[int, ...] = 0, out_axis: int = 0
              ) -> Any:
    """fn(*slice_k) for k < parts, the calls run at once from threads, and their results joined.

    Every leaf of per_image is cut into `parts` equal slices along its image axis (in_axes: one axis per
    argument, or one for all; None arguments stay None), and every leaf of fn's results is joined along
    out_axis (NumPy or JAX arrays, as fn returns them). fn must treat images independently; each call waits
    for its results, so that the calls' programs run side by side (JAX traces and compiles fn once for
    all). parts 1: fn(*per_image) on the calling thread."""
    if parts == 1:
        return fn(*per_image)
    axes = (in_axes,) * len(per_image) if isinstance(in_axes, int) else tuple(in_axes)
    settings = _thread_settings()

    def cut(leaf, axis: int, k: int):
        size = leaf.shape[axis] // parts
        return leaf[(slice(None),) * axis + (slice(k * size, (k + 1) * size),)]

    # cut here, so that the threads run fn alone (each slicing op compiled once, on this thread)
    pieces = [[jax.tree_util.tree_map(functools.partial(cut, axis=axis, k=k), arg) for arg, axis in zip(per_image, axes)]
              for k in range(parts)]
    part = lambda k: jax.block_until_ready(fn(*pieces[k]))

    def later(k: int) -> Any:  # on a thread of the pool, under the caller's JAX settings; None if they differ
        with _settings_applied(settings) as same:
            return part(k) if same else None

    with concurrent.futures.ThreadPoolExecutor(parts - 1) as pool:
        futures = [pool.submit(later, k) for k in range(1, parts)]
        results = [part(0)] + [future.result() for future in futures]
    results = [part(k) if result is None else result for k, result in enumerate(results)]
    join = lambda *leaves: (jnp.concatenate if isinstance(leaves[0], jax.Array) else np.concatenate)(leaves, out_axis)
    return jax.tree_util.tree_map(join, *results)


def _thread_settings() -> tuple[dict, Any]:
    """This thread's own JAX settings (those set by context managers such as jax.default_matmul_precision) and
    the tracing context they make, which another thread needs to trace and compile the same program."""
    from jax._src import config  # no public API reads a thread's settings

    states = getattr(config, "config_states", {})
    local = {name: state.get_local() for name, state in states.items()}
    return {name: value for name, value in local.items() if value is not config.config_ext.unset}, config.trace_context()


@contextlib.contextmanager
def _settings_applied(settings: tuple[dict, Any]):
    """The settings of _thread_settings on this thread; yields whether its tracing context is then the same."""
    from jax._src import config

    values, context = settings
    with contextlib.ExitStack() as stack:
        try:
            for name, value in values.items():
                stack.enter_context(config.config_states[name](value))
            same = config.trace_context() == context
        except (AttributeError, KeyError, TypeError, ValueError):  # a setting this JAX sets otherwise
            same = False
        yield same


def _pad(leaf: np.ndarray, size: int) -> np.ndarray:
    extra = size - leaf.shape[0]
    return np.concatenate([leaf, np.repeat(leaf[-1:], extra, axis=0)]) if extra else leaf


@functools.lru_cache(maxsize=16)  # each entry keeps its fn alive
def _compiled(fn: Callable, mesh: Mesh, out_axis: int, nargs: int) -> Callable:
    spec = PartitionSpec(*([None] * out_axis + [BATCH_AXIS]))
    in_specs = (PartitionSpec(),) + (PartitionSpec(BATCH_AXIS),) * nargs  # shared, then per-image arguments
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False))


def map_images(fn: Callable, *args: Any, shared: Any = None, mesh: Mesh | None = None, out_axis: int = 0,
               identity: tuple | None = None) -> Any:
    """fn(shared, *args) with every leaf of args split along its leading (image) axis over the mesh's devices
    and `shared` (a pytree of arrays, e.g. network weights, or None) copied whole onto every device.

    fn must treat images independently (each device sees only its slice) and return a pytree whose
    every leaf has the image axis at out_axis. Returns this process's rows as NumPy arrays. The
    compiled computation is reused for the same fn object, mesh, shapes and structure of `shared`
    (its values are arguments, not constants: other weights of the same shapes reuse it).

    identity: optional strings and numbers (a tuple) that name fn, and everything it closes over, the same
    way in every process. Given one, the compiled computation is also kept on disk while JAX's persistent
    cache is on, and a later process reads it back without tracing fn (spgd_jax.xla_setup.executables).
    On a mesh of one CPU device the images run in cpu_parts(B) parts side by side (map_parts).
    """
    mesh = batch_mesh() if mesh is None else mesh
    leaves = jax.tree_util.tree_leaves(args)
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"every input needs the same leading image axis; got leading sizes {sorted(sizes, key=str)}")
    (batch,) = sizes
    local = _local_devices(mesh)
    padded = -(-batch // local) * local
    args = jax.tree_util.tree_map(lambda a: _pad(np.asarray(a), padded), args)
    one_cpu = mesh.devices.size == 1 and mesh.devices.flat[0].platform == "cpu"
    parts = cpu_parts(padded) if one_cpu else 1
    shared = replicate(shared, mesh)
    program = _compiled(fn, mesh, out_axis, len(args))
    spec = PartitionSpec(*([None] * out_axis + [BATCH_AXIS]))
    if identity is not None:
        first = shard_batch(jax.tree_util.tree_map(lambda a: a[: padded // parts], args), mesh)
        program = executables.load_or_compile(program, (shared, *first), ("map_images", identity, out_axis))

    def run(*part):
        out = program(shared, *shard_batch(part, mesh))
        return jax.tree_util.tree_map(np.asarray, multihost_utils.global_array_to_host_local_array(out, mesh, spec))

    out = map_parts(run, *args, parts=parts, out_axis=out_axis)
    index = (slice(None),) * out_axis + (slice(0, batch),)
    return jax.tree_util.tree_map(lambda a: a[index], out)
