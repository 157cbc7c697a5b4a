"""The PyTorch SPGD baseline, written the way the reference code (74587887/SPGD) runs.

Eager PyTorch, one Python loop iteration per outer step and per warm-up iteration, autograd
through the guided-diffusion UNet, ``torch.optim.SGD`` on x for the warm-up (SPEC section 3):

  for i in 0..T-1 (sigma = t_i, lr_i = lr * (1 + (i/T)(lr_min_ratio - 1))):
      x = x_i.detach().requires_grad_(); opt = SGD([x], lr_i)
      for j in 0..N-1:
          x0hat = D(x; sigma); score = (x0hat - x) / sigma^2
          loss = sum over pixels and batch of (A(x0hat) - y)^2; loss.backward()
          momentum update (computed, then discarded, as in the reference); opt.step(); opt.zero_grad()
          NaN check of x (a host sync per iteration, as in the reference)
      x_{i+1} = x + score * (t_i - t_{i+1}) / t_i          (score of the last iteration, at x^{N-1})

D is EDM's VP preconditioning of the eps-network with the reference's formulas (SPEC section 1):
sigma cast to float32, c_noise = (M - 1) * sigma_inv(sigma) with sigma_inv written as
``(sqrt(beta_min^2 + 2 beta_d log(1 + sigma^2)) - beta_min) / beta_d``, one c_noise for the batch.

Reference details kept because they cost time: the model's weights keep ``requires_grad`` (the
reference's ``requires_grad_`` call is commented out), so every backward also computes weight
gradients; ``cudnn.deterministic = True`` is set by its entry script. ``variant="tuned"``
drops both (frozen weights, cudnn.benchmark) for a stronger eager baseline; ``"tuned-bf16"`` also runs
the UNet under ``torch.autocast(dtype=torch.bfloat16)`` (oneDNN's AMX kernels on a recent Xeon).

Layout NCHW, float32. The model is any ``nn.Module`` called as ``model(x, timesteps)`` (e.g.
spgd_jax.convert.torch_adm's UNetModel); ``forward`` is the measurement operator on a batch.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import numpy as np
import torch

BETA_D, BETA_MIN, M = 19.9, 0.1, 1000
VARIANTS = ("reference", "tuned", "tuned-bf16")
VARIANT_DTYPES = {"reference": "float32", "tuned": "float32", "tuned-bf16": "bfloat16"}


def edm_sigmas(steps: int, sigma_max: float = 100.0, sigma_min: float = 0.1, rho: float = 7.0) -> np.ndarray:
    """The reference Scheduler's 'poly-7' time steps with sigma(t) = t, then 0: float64 (steps + 1,)."""
    ramp = np.linspace(0, 1, steps)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return np.append((inv_max + ramp * (inv_min - inv_max)) ** rho, 0.0)


def tweedie(model: torch.nn.Module, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """EDM VPPrecond: x0hat = x - sigma * eps(c_in x, c_noise)[:, :C]; x (B, C, H, W), sigma a float."""
    sigma = torch.as_tensor(sigma).to(x.device).to(torch.float32).reshape(-1, 1, 1, 1)
    c_in = 1 / (sigma**2 + 1).sqrt()
    sigma_inv = ((BETA_MIN**2 + 2 * BETA_D * (1 + sigma**2).log()).sqrt() - BETA_MIN) / BETA_D
    eps = model(c_in * x, ((M - 1) * sigma_inv).flatten())
    return x - sigma * eps[:, : x.shape[1]]


def _momentum(grad: torch.Tensor, previous: torch.Tensor | None, beta: float) -> torch.Tensor:
    """The reference's _update_gradient: its result is kept as state and never used for the step."""
    if previous is None:
        return grad
    alpha = ((torch.cosine_similarity(grad, previous, dim=1).mean(dim=(1, 2)) + 1) / 2).view(-1, 1, 1, 1)
    return alpha * beta * previous + (1 - alpha * beta) * grad


def spgd(
    model: torch.nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    y: torch.Tensor,
    x_start: torch.Tensor,
    *,
    lr: float,
    steps: int = 100,
    warmup: int = 5,
    beta: float = 0.9,
    lr_min_ratio: float = 0.01,
    sigma_max: float = 100.0,
    sigma_min: float = 0.1,
    rho: float = 7.0,
) -> torch.Tensor:
    """SPGD with ADM off (the reference's effective update) from x_start (B, C, H, W) ~ N(0, sigma_max^2).

    forward(x (B, C, H, W)) -> (B, ...) like y. Returns x after the last step (to sigma = 0), detached.
    Raises ValueError on a NaN, as the reference does.
    """
    sigmas = edm_sigmas(steps, sigma_max, sigma_min, rho)
    x_t = x_start
    for i in range(steps):
        sigma = sigmas[i]
        lr_i = lr * (1 + (i / steps) * (lr_min_ratio - 1))
        x = x_t.detach().requires_grad_(True)
        optimizer = torch.optim.SGD([x], lr_i)
        previous = None
        for j in range(warmup):
            x0hat = tweedie(model, x, sigma)
            score = (x0hat - x) / sigma**2
            loss = (forward(x0hat) - y).pow(2).flatten(1).sum(-1).sum()
            loss.backward()
            previous = _momentum(x.grad.detach(), previous, beta)
            optimizer.step()
            optimizer.zero_grad()
            if torch.isnan(x).any():
                raise ValueError("NaN detected. Consider tuning (decreasing) learning rate.")
        with torch.no_grad():
            x_t = x + score * (2 * sigma * (sigma - sigmas[i + 1])) * 0.5
    return x_t.detach()


def precision_flags() -> dict:
    """PyTorch's precision and algorithm-selection settings as they stand."""
    newer = {  # the fp32_precision settings of newer PyTorch releases, where present
        f"{name}.fp32_precision": getattr(module, "fp32_precision")
        for name, module in (("torch.backends.cuda.matmul", torch.backends.cuda.matmul),
                             ("torch.backends.cudnn.conv", getattr(torch.backends.cudnn, "conv", None)))
        if hasattr(module, "fp32_precision")
    }
    return newer | {
        "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "torch.get_float32_matmul_precision()": torch.get_float32_matmul_precision(),
        "torch.backends.cudnn.deterministic": torch.backends.cudnn.deterministic,
        "torch.backends.cudnn.benchmark": torch.backends.cudnn.benchmark,
        "torch.get_num_threads()": torch.get_num_threads(),
    }


@contextlib.contextmanager
def settings(model: torch.nn.Module, variant: str, true_float32: bool = False) -> Iterator[None]:
    """Set up `model` and the cuDNN flags for a variant; restores both afterwards.

    reference: weights require grad, cudnn.deterministic = True (as the reference runs).
    tuned: weights frozen, cudnn.benchmark = True, deterministic off.
    tuned-bf16: tuned, under torch.autocast(dtype=torch.bfloat16) on the model's device.
    true_float32: also switch TF32 off for convolutions and matmuls (for cross-checks on GPUs).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    grads = [p.requires_grad for p in model.parameters()]
    try:
        cudnn.deterministic, cudnn.benchmark = (True, False) if variant == "reference" else (False, True)
        if true_float32:
            cudnn.allow_tf32 = matmul.allow_tf32 = False
        model.requires_grad_(variant == "reference")
        device = next(model.parameters()).device.type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=variant == "tuned-bf16"):
            yield
    finally:
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
