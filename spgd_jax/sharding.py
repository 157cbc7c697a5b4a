"""A batch of independent images across all devices: each device computes its own slice, with no communication.

    out = sharding.map_images(fn, images, params, shared=weights)   # fn(weights, images, params) per device

The batch is split along its leading axis over a 1-D device mesh (axis "batch") with `jax.shard_map`;
`shared` (network weights) is replicated. A batch that does not divide evenly is padded with copies of its
last image, and the padding is dropped from the result. `spgd_jax.samplers.sample_sharded` runs a sampler
this way (its result equals `sample`'s to float32 rounding of the network at a smaller per-device batch).

Multi-host (several processes, e.g. one per GPU host): call `jax.distributed.initialize()` in every
process first; `batch_mesh()` then spans every device of every process, each process passes its own
images (the same number in every process) and gets back the results for those images.

Training (data parallel) uses the same mesh: put the batch with `shard_batch(batch, mesh)`, the
parameters and optimiser state with `replicate(tree, mesh)`, and `jax.jit` the step: XLA then splits
the batch over the devices and averages the gradients across them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spgd_jax.xla_setup import executables

__all__ = ["BATCH_AXIS", "batch_mesh", "shard_batch", "replicate", "map_images"]

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
    args = (replicate(shared, mesh), *args)
    program = _compiled(fn, mesh, out_axis, len(args) - 1)
    if identity is not None:
        program = executables.load_or_compile(program, args, ("map_images", identity, out_axis))
    out = program(*args)
    spec = PartitionSpec(*([None] * out_axis + [BATCH_AXIS]))
    out = multihost_utils.global_array_to_host_local_array(out, mesh, spec)
    index = (slice(None),) * out_axis + (slice(0, batch),)
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[index], out)
