"""Degradation operators (forward models) for image restoration, SPGD/DPS/DAPS conventions.

An ``Operator`` bundles a forward model ``forward(x, params)`` acting on ONE image (H, W, C)
in [-1, 1], ``init_params(key, batch, image_size)`` for per-image parameters (masks, motion
kernels; leading batch axis), the reference's measurement noise ``sigma_y`` and
``measure(key, x, params, sigma_y=None)`` over NHWC batches. ``get(task, image_size)``
builds the registered tasks (``TASKS``, by name; ``register_task`` adds one); any differentiable JAX function of (x, params) can
be used as a forward model instead. The building blocks are exported for direct use, and so is the
linear algebra the projection and splitting samplers need of a linear operator (``adjoint``,
``proximal``, ``project``), and ``svd(operator)``: the operator carrying its SVD, for DDRM.
"""

from ._blur import blur, gaussian_kernel
from ._inpaint import box_mask, inpaint, random_mask
from ._linear import adjoint, project, proximal
from ._motion import motion_kernel, motion_kernel_from_rng, motion_kernels
from ._operator import Operator
from ._nonlinear import hdr, phase_retrieval
from ._registry import TASKS, Task, get, get_task, options, register_task
from ._resize import downsample, resize, resize_matrix
from ._svd import SVDForward, svd

__all__ = [
    "Operator", "TASKS", "Task", "get", "get_task", "options", "register_task",
    "blur", "gaussian_kernel", "motion_kernel", "motion_kernel_from_rng", "motion_kernels",
    "inpaint", "random_mask", "box_mask",
    "resize", "resize_matrix", "downsample",
    "phase_retrieval", "hdr",
    "adjoint", "project", "proximal",
    "SVDForward", "svd",
]
