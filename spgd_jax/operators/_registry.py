"""The task registry: ``get(task, image_size, **overrides) -> Operator``.

A task is a name and a builder `build(image_size, **options) -> Operator` (a `Task`), registered beside
the builder with `register_task`; the registry has the shape of the samplers' (spgd_jax.samplers) and the
network families' (spgd_jax.models): a record, a dict by name (TASKS), `register_task`, `get_task`.

At 256 px every default is the reference's (SPGD/DAPS task configs, SPEC section 4). Other
sizes get defaults that keep each task about as hard as at 256 px, measured as the PSNR of
the degraded image against the original on faces; see
benchmarks/results/operator_calibration.md (benchmarks/operator_calibration.py).

| task            | 256 px (reference)       | 128 px             | 64 px              | sigma_y |
|-----------------|--------------------------|--------------------|--------------------|---------|
| sr4             | factor 4                 | factor 4           | factor 4 (*)       | 0.01    |
| inpaint         | keep 20% of pixels       | same               | same               | 0.01    |
| inpaint_box     | 128 px box, margin 32    | 64, margin 16      | 32, margin 8       | 0.05    |
| gauss_deblur    | 61x61, std 3.0           | 31x31, std 2.13    | 15x15, std 1.18    | 0.01    |
| motion_deblur   | 61x61, intensity 0.5     | 45x45, 0.5         | 23x23, 0.5         | 0.01    |
| phase_retrieval | oversample 2             | same               | same               | 0.05    |
| hdr             | clip(2x, -1, 1)          | same               | same               | 0.05    |

(*) x4 at 64 px is harder than at 256 px (22.8 vs 28.7 dB after bicubic upsampling back);
factor=2 matches 256 px difficulty. Other sizes: std and motion kernel size are interpolated
log-log between 64, 128 and 256 and scaled proportionally outside; the Gaussian kernel side
is the odd number nearest 61 * size / 256; box side = size / 2, margin = size / 8.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ._blur import blur, gaussian_kernel
from ._inpaint import box_mask, inpaint, random_mask
from ._motion import motion_kernels
from ._operator import Operator
from ._nonlinear import hdr, phase_retrieval
from ._resize import downsample

__all__ = ["TASKS", "Task", "get", "get_task", "options", "register_task"]


@dataclasses.dataclass(frozen=True)
class Task:
    """A registered task: its name and build(image_size, **options) -> Operator (options with defaults,
    None where the default depends on the image size; `options(name)` lists them)."""

    name: str
    build: Callable[..., Operator]


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Adds `task` to TASKS (ValueError if its name is taken); returns it."""
    if task.name in TASKS:
        raise ValueError(f"a task named {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task `name`; ValueError listing the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]

# size: (Gaussian std, motion kernel size). 256 is the reference; 64 and 128 match its
# degraded-image PSNR on held-out faces (Gaussian 25.87 dB, motion 20.83 dB at 256 px;
# 25.88 / 20.68 dB at 64, 25.89 / 20.79 dB at 128): benchmarks/results/operator_calibration.md.
_CALIBRATED = {
    64: (1.18, 23),
    128: (2.13, 45),
    256: (3.0, 61),
}


def _odd(value: float) -> int:
    return max(1, 2 * int(round((value - 1) / 2)) + 1)


def _interpolate(image_size: int, column: int) -> float:
    """A calibrated value at image_size: log-log interpolation between calibrated sizes,
    proportional scaling beyond them."""
    sizes = sorted(_CALIBRATED)
    if image_size in _CALIBRATED:
        return float(_CALIBRATED[image_size][column])
    if image_size < sizes[0] or image_size > sizes[-1]:
        end = sizes[0] if image_size < sizes[0] else sizes[-1]
        return _CALIBRATED[end][column] * image_size / end
    upper = next(s for s in sizes if s > image_size)
    lower = max(s for s in sizes if s < image_size)
    t = (math.log(image_size) - math.log(lower)) / (math.log(upper) - math.log(lower))
    return math.exp((1 - t) * math.log(_CALIBRATED[lower][column]) + t * math.log(_CALIBRATED[upper][column]))


def _sr4(image_size: int, factor: int = 4, sigma_y: float = 0.01) -> Operator:
    if int(factor) != factor or not 1 <= factor <= image_size:
        raise ValueError(f"factor must be an integer in [1, image_size={image_size}], got {factor}")
    return Operator("sr4", sigma_y, True, lambda x, params: downsample(x, int(factor)),
                    settings=(("factor", int(factor)),))


register_task(Task("sr4", _sr4))


def _inpaint(image_size: int, keep_fraction: float = 0.2, sigma_y: float = 0.01) -> Operator:
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")

    def init_params(key, batch, size):
        masks = jax.vmap(lambda k: random_mask(k, size, size, keep_fraction))(jax.random.split(key, batch))
        return {"mask": masks}

    return Operator("inpaint", sigma_y, True, lambda x, params: inpaint(x, params["mask"]), init_params,
                    (("keep_fraction", keep_fraction),))


register_task(Task("inpaint", _inpaint))


def _inpaint_box(image_size: int, box_size: int | None = None, margin: int | None = None,
                 sigma_y: float = 0.05) -> Operator:
    # 128 px box with a 32 px margin at 256 (DAPS), the same fractions of the side elsewhere.
    box_size = max(1, round(image_size / 2)) if box_size is None else int(box_size)
    margin = round(image_size / 8) if margin is None else int(margin)
    if image_size - margin - box_size <= margin:
        raise ValueError(f"a {box_size} px box with margin {margin} does not fit a {image_size} px image; "
                         f"choose box_size + 2 * margin < image_size")

    def init_params(key, batch, size):
        masks = jax.vmap(lambda k: box_mask(k, size, size, box_size, margin))(jax.random.split(key, batch))
        return {"mask": masks}

    return Operator("inpaint_box", sigma_y, True, lambda x, params: inpaint(x, params["mask"]), init_params,
                    (("box_size", box_size), ("margin", margin)))


register_task(Task("inpaint_box", _inpaint_box))


def _gauss_deblur(image_size: int, kernel_size: int | None = None, std: float | None = None,
                  truncate: float = 4.0, sigma_y: float = 0.01) -> Operator:
    kernel_size = _odd(61 * image_size / 256) if kernel_size is None else kernel_size
    std = round(_interpolate(image_size, 0), 3) if std is None else float(std)
    kernel = jnp.asarray(gaussian_kernel(kernel_size, std, truncate))
    if kernel_size // 2 >= image_size:
        raise ValueError(f"a {kernel_size}x{kernel_size} kernel needs images larger than {kernel_size // 2} px "
                         f"(reflect padding); use a smaller kernel_size")
    return Operator("gauss_deblur", sigma_y, True, lambda x, params: blur(x, kernel),
                    settings=(("kernel_size", kernel_size), ("std", std), ("truncate", truncate)))


register_task(Task("gauss_deblur", _gauss_deblur))


def _motion_deblur(image_size: int, kernel_size: int | None = None, intensity: float = 0.5,
                   sigma_y: float = 0.01) -> Operator:
    kernel_size = _odd(_interpolate(image_size, 1)) if kernel_size is None else kernel_size
    if int(kernel_size) != kernel_size or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    if kernel_size // 2 >= image_size:
        raise ValueError(f"a {kernel_size}x{kernel_size} kernel needs images larger than {kernel_size // 2} px "
                         f"(reflect padding); use a smaller kernel_size")
    if not 0 <= intensity <= 1:
        raise ValueError(f"intensity must be in [0, 1], got {intensity}")

    def init_params(key, batch, size):
        return {"kernel": jnp.asarray(motion_kernels(key, batch, kernel_size, intensity))}

    return Operator("motion_deblur", sigma_y, True, lambda x, params: blur(x, params["kernel"]), init_params,
                    (("kernel_size", int(kernel_size)), ("intensity", intensity)))


register_task(Task("motion_deblur", _motion_deblur))


def _phase_retrieval(image_size: int, oversample: float = 2.0, sigma_y: float = 0.05) -> Operator:
    if oversample < 0:
        raise ValueError(f"oversample must be >= 0, got {oversample}")
    return Operator("phase_retrieval", sigma_y, False, lambda x, params: phase_retrieval(x, oversample),
                    settings=(("oversample", oversample),))


register_task(Task("phase_retrieval", _phase_retrieval))


def _hdr(image_size: int, scale: float = 2.0, sigma_y: float = 0.05) -> Operator:
    return Operator("hdr", sigma_y, False, lambda x, params: hdr(x, scale), settings=(("scale", scale),))


register_task(Task("hdr", _hdr))


def options(task: str) -> dict[str, object]:
    """The overridable settings of a task and their defaults (None: chosen by image size)."""
    parameters = inspect.signature(get_task(task).build).parameters
    return {name: p.default for name, p in parameters.items() if name != "image_size"}


def get(task: str, image_size: int, **overrides) -> Operator:
    """The operator of a registered task for square images of ``image_size`` pixels.

    Tasks: sr4, inpaint, inpaint_box, gauss_deblur, motion_deblur, phase_retrieval, hdr.
    ``overrides`` set any of the task's options (``options(task)`` lists them; every task
    takes ``sigma_y``), e.g. ``get("gauss_deblur", 64, std=2.0)``.
    """
    builder = get_task(task).build
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer (pixels per side), got {image_size!r}")
    allowed = options(task)
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for task {task!r}; "
                         f"it takes {', '.join(allowed)}")
    if "sigma_y" in overrides and not overrides["sigma_y"] >= 0:
        raise ValueError(f"sigma_y must be >= 0, got {overrides['sigma_y']}")
    return builder(int(image_size), **overrides)
