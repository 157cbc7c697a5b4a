"""SPGD and DPS outputs pinned across refactorings: a short run on a random-weight tiny UNet.

tests/data/short_runs.npz first held the outputs of the code before the layout change (commit 948d111: the
flat modules, the denoiser's weights closed over as constants). It was recorded again, on the same kind of
machine, in session 18 (2026-12-06): GroupNorm32's hand-written gradient (930ea63, measured faster and tested
against jax.grad) had changed the outputs by float32 round-off, 7.6e-7 (SPGD) and 6.8e-7 (DPS) of their
scale, and the bits were checked only on machines of another kind since. It was recorded again in session 21
(2026-12-06, same kind of machine): GroupNorm32's sums became native CPU kernels (spgd_jax.xla_setup.
group_norm_kernels, 7 % faster, tested against jax.grad of flax's GroupNorm), which moved the outputs by
7.1e-7 (SPGD) and 5.4e-7 (DPS) of their scale. It was recorded again in session 24 (2026-12-06, same kind of
machine): float32 3x3 convolutions became a direct AVX-512 kernel (spgd_jax.xla_setup.direct_conv, tested
against a float64 convolution and lax's gradients), which moved the outputs by 7.4e-7 (SPGD) and 5.1e-7 (DPS) of
their scale. It was recorded again in session 25 (2026-12-06, same kind of machine): that kernel computes the
convolutions of images of 16 x 12 px or more as Winograd's F(2x2, 3x3) (tested the same way, and closer to float64
than the direct sums) and takes the RGB convolutions too, which moved the outputs by 8.1e-7 (SPGD) and 7.3e-7
(DPS) of their scale. It was recorded again in session 26 (2026-12-06, same kind of machine): float32 attention
became native CPU kernels (spgd_jax.xla_setup.attention_kernels, tested against jax.grad of the plain formulation
and float64), which moved the outputs by 6.1e-7 (SPGD) and 3.1e-7 (DPS) of their scale. It was recorded again in
session 29 (2026-12-07) on another kind of machine, a 2-core AMD EPYC (Zen 4), where the sessions since 28 ran:
float32 convolutions of images with sides in 4s became Winograd's F(4x4, 3x3) (1.29x faster SPGD at batch 4,
tested against float64 and lax's gradients; about 1e-5 of a convolution's scale), and the GroupNorm kernels took
the activations in their own shape; the outputs moved by 2.6e-6 (SPGD) and 1.7e-6 (DPS) of their scale from the
Xeon's recording (both changes and the machine's). It was recorded again in session 30 (2026-12-07, same kind of
machine): GroupNorm32 followed by SiLU (and the scale-shift between them) became native CPU kernels both ways
(spgd_jax.xla_setup.group_norm_kernels, tested against jax.grad of the composition; their sigmoid's e^x is
Cephes' expf) and the GroupNorm sums run in tasks of whole rows, which moved the outputs by 3.3e-6 (SPGD) and
1.9e-6 (DPS) of their scale. It was recorded again in session 31 (2026-12-07, same kind of machine): the output
blocks' ResBlocks take their input's two halves unjoined (the GroupNorm kernels read them in place, the 1x1 skip
convolution is the sum of one per half), which moved the outputs by 2.8e-6 (SPGD) and 1.6e-6 (DPS) of their
scale, and once more in the same session: the SiLU gradient kernel's sums stay in registers (its arithmetic written
for 16 values at once, which GCC contracts into fused multiply-adds a little differently; as close to float64),
2.6e-6 (SPGD) and 4.8e-7 (DPS). A denoiser given
as a plain function
(its weights closed over, so constants of the compiled program, as then) must reproduce them bit for bit
on the kind of machine that wrote them (RECORDED_ON): a refactoring changes no arithmetic; a change that
means to (a faster formulation) records them again and says so here. A
`Denoiser` passes its weights as arguments of the compiled program instead (compiled once per config,
not per checkpoint), and XLA then fuses and folds differently: those outputs agree to float32 round-off
amplified by the run. On other CPUs XLA may vectorise reductions differently (AVX2 vs AVX-512), and Eigen
blocks its products by the CPU's cache sizes and splits them over its cores, so the bits are pinned only
for the same CPU model and core count as well as instruction set; elsewhere the round-off bound applies
(1e-4 relative: gradient steps through an untrained network; a wrong step size or sign changes the
outputs by orders of magnitude more). XLA limited to AVX2 or AVX on the recording machine moves them by
up to 6e-7 of their scale, 1/150 of that bound.
"""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_unet import random_params

import spgd_jax
from spgd_jax import operators
from spgd_jax.models.adm import CONFIGS

REFERENCE = Path(__file__).parent / "data" / "short_runs.npz"
# the machine that wrote REFERENCE: its CPU flags, model (AMD family 25, model 17) and the cores XLA uses
RECORDED_ON = {"avx512f": True, "avx2": True, "fma": True, "cpu family": "25", "model": "17", "cores": 2}


def _this_machine() -> dict:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    first = text.split("\n\n", 1)[0]  # the first processor's entry
    info = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first.splitlines())}
    flags = set(info.get("flags", "").split())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {**{name: name in flags for name in ("avx512f", "avx2", "fma")},
            "cpu family": info.get("cpu family"), "model": info.get("model"), "cores": cores}


def _short_runs(weights_as: str) -> dict[str, np.ndarray]:
    config = CONFIGS["tiny16"]
    denoiser = spgd_jax.make_denoiser(config, jax.tree_util.tree_map(jnp.asarray, random_params(config, 0)))
    if weights_as == "constants":
        denoiser = lambda x, sigma, traced=denoiser: traced(x, sigma)  # noqa: E731 (a plain function)
    op = operators.get("sr4", 16)
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
    params = op.init_params(jax.random.key(2), 2, 16)
    y = op.measure(jax.random.key(3), x, params)
    configs = {"spgd": spgd_jax.SPGDConfig(lr=1.0, steps=4, warmup=2), "dps": spgd_jax.DPSConfig(zeta=0.5, steps=6)}
    return {name: np.asarray(spgd_jax.sample(denoiser, op.forward, y, jax.random.key(4), config, params,
                                             x_shape=(16, 16, 3)).x) for name, config in configs.items()}


@pytest.mark.parametrize("weights_as", ["constants", "arguments"])
def test_outputs_equal_the_recorded_ones(weights_as):
    runs = _short_runs(weights_as)
    with np.load(REFERENCE) as data:
        for name in ("spgd", "dps"):
            reference = data[name]
            assert np.isfinite(runs[name]).all()
            if weights_as == "constants" and jax.default_backend() == "cpu" and _this_machine() == RECORDED_ON:
                np.testing.assert_array_equal(runs[name], reference)
            else:
                np.testing.assert_allclose(runs[name], reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
