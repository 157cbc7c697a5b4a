"""The PyTorch SPGD baseline (benchmarks/torch_spgd.py) against the JAX sampler, and speed.py's helpers.

The baseline is written independently (eager PyTorch, torch.optim.SGD, the reference code's VP
formulas and schedule); with ADM off the JAX sampler must reproduce it to float32 accuracy.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import torch_reference as tr
from convert.guided_diffusion import to_flax_params
from spgd_jax import operators
from spgd_jax.denoiser import make_denoiser
from spgd_jax.schedule import edm_sigmas
from spgd_jax.spgd import SPGDConfig, spgd
from spgd_jax.unet import CONFIGS, UNet

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks/
from benchmarks import speed, torch_spgd  # noqa: E402


def nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def test_torch_baseline_matches_jax_sampler_with_adm_off():
    config = CONFIGS["tiny16"]  # learned sigma, scale-shift norm, resblock up/down, attention
    model = tr.from_config(config, seed=3)
    params = to_flax_params({k: v.numpy().copy() for k, v in model.state_dict().items()}, config)
    inputs = speed.make_inputs(batch=2, size=config.image_size, seed=1)
    steps, warmup, lr = 3, 2, 1.0

    mask = nchw(inputs["mask"])
    with torch_spgd.settings(model, "reference"):
        expected = torch_spgd.spgd(model, lambda z: z * mask, nchw(inputs["y"]), nchw(inputs["x_T"]),
                                   lr=lr, steps=steps, warmup=warmup).numpy().transpose(0, 2, 3, 1)

    op = operators.get("inpaint", config.image_size)
    sampler_config = SPGDConfig(lr=lr, steps=steps, warmup=warmup, adm="off")
    run = jax.jit(lambda p, x_t, y, m: spgd(make_denoiser(UNet(config), p), op.forward, y, x_t, sampler_config,
                                            {"mask": m}).x)
    got = np.asarray(run(params, inputs["x_T"], inputs["y"], inputs["mask"]))

    assert np.isfinite(expected).all()
    assert np.abs(expected - inputs["x_T"]).max() > 1.0  # the run moved far from x_T
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= speed.XCHECK_RTOL * scale


def test_baseline_schedule_is_the_samplers():
    for steps in (2, 10, 100):
        np.testing.assert_allclose(torch_spgd.edm_sigmas(steps), edm_sigmas(steps), rtol=1e-12, atol=0)


def test_settings_apply_and_restore_flags():
    model = torch.nn.Linear(2, 2)
    cudnn = torch.backends.cudnn
    before = (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    with torch_spgd.settings(model, "reference"):
        assert cudnn.deterministic and not cudnn.benchmark
        assert all(p.requires_grad for p in model.parameters())
    with torch_spgd.settings(model, "tuned", true_float32=True):
        assert cudnn.benchmark and not cudnn.deterministic and not cudnn.allow_tf32
        assert not any(p.requires_grad for p in model.parameters())
    after = (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    assert after == before and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="variant"):
        with torch_spgd.settings(model, "fast"):
            pass


def test_largest_batch_estimate():
    # 1 GiB fixed + 2 GiB per image, limit 40 GiB -> 19 images fit; multiples of 8 -> 16.
    gib = 2**30
    memory = {1: 3 * gib, 16: 33 * gib}
    assert speed.largest_batch(memory, 0, 40 * gib, 1, 1024) == 19
    assert speed.largest_batch(memory, 0, 40 * gib, 8, 1024) == 16
    assert speed.largest_batch(memory, 0, 40 * gib, 1, 12) == 12
    assert speed.largest_batch(memory, 0, 2 * gib, 1, 1024) == 0
    # One measurement: a line through the fixed bytes at batch 0.
    assert speed.largest_batch({4: 9 * gib}, 1 * gib, 41 * gib, 1, 1024) == 20
