"""Numerical parity: Flax UNet / denoiser vs the independent PyTorch reference.

Relative error is max|a - b| / max|b| with b the PyTorch result; float32 throughout.
Every parameter is random (zero-initialised ones included), so each layer matters.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from spgd_jax.convert import torch_adm as tr
from spgd_jax.convert.guided_diffusion import convert, to_flax_params
from spgd_jax.io import checkpoint
from spgd_jax.denoisers import make_denoiser, sigma_to_timestep, vp_preconditioning
from spgd_jax.models.adm import CONFIGS, UNet, UNetConfig

# Flax (XLA) against torch: two float32 implementations whose reductions run in unrelated orders in
# every layer. Measured max|a - b| / max|b| <= 3.4e-6 with XLA and torch built for AVX-512, AVX2 and
# AVX without FMA (XLA_FLAGS=--xla_cpu_max_isa, ATEN_CPU_CAPABILITY), tiny16 to ffhq256 at 256 px; since the
# native float32 convolutions became Winograd's F(4x4, 3x3) (session 29, a 2-core AMD EPYC) up to 5.1e-6 for
# the tiny configs and 7.3e-6 for the 64 px UNet against deepinv's DiffUNet; since GroupNorm + SiLU became native
# kernels (session 30, same machine) 5.3e-6 for the tiny configs and the 64 px UNet, 7.9e-6 (from 6.5e-6) for
# the converted ffhq256 UNet; since the output blocks take their two halves unjoined (session 31, same machine:
# the 1x1 skip convolution a sum of two; the SiLU gradient kernel's sums in registers) 5.3e-6 for the tiny
# configs, 5.9e-6 for the 64 px UNet and 6.1e-6 for the converted ffhq256 UNet.
# A 1e-3 relative error in one conv kernel gives 3e-5 to 5e-4, GroupNorm eps 1e-6 for 1e-5 2.3e-5.
RTOL = 1e-5

# Options the named test configs leave out: fractional channel_mult (create_model's 512px
# default starts at 0.5), one input channel, new attention order with num_heads, resblock
# up/down without scale-shift, several res blocks with resblock_updown.
EXTRA_CONFIGS = {
    "half_mult": UNetConfig(
        image_size=16, num_channels=64, num_res_blocks=2, channel_mult=(0.5, 1, 1),
        attention_resolutions=(8,), num_heads=2, num_heads_upsample=1, resblock_updown=True,
        use_new_attention_order=True, learn_sigma=True, in_channels=1,
    ),
}
SMALL_CONFIGS = {**{k: v for k, v in CONFIGS.items() if v.image_size <= 32}, **EXTRA_CONFIGS}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def nchw(a) -> np.ndarray:
    return np.asarray(a).transpose(0, 3, 1, 2)


def nhwc(a) -> np.ndarray:
    return np.asarray(a).transpose(0, 2, 3, 1)


def reference_and_params(config: UNetConfig, seed: int = 0):
    """Random torch reference model and the Flax params converted from its state dict."""
    model = tr.from_config(config, seed)
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    return model, to_flax_params(state, config)


def test_small_configs_cover_every_option():
    configs = SMALL_CONFIGS.values()
    for option in ("use_scale_shift_norm", "resblock_updown", "use_new_attention_order", "learn_sigma",
                   "class_cond"):
        assert {getattr(c, option) for c in configs} == {False, True}, option
    assert any(c.num_head_channels != -1 for c in configs) and any(c.num_head_channels == -1 for c in configs)
    assert any(c.num_heads_upsample not in (-1, c.num_heads) and c.num_head_channels == -1 for c in configs)
    assert {c.num_res_blocks for c in configs} >= {1, 2}
    assert any(any(m != int(m) for m in c.channel_mult) for c in configs)


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
def test_unet_matches_torch_reference(name):
    config = SMALL_CONFIGS[name]
    model, params = reference_and_params(config, seed=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, config.in_channels, config.image_size, config.image_size)).astype(np.float32)
    t = np.array([0.0, 17.25, 998.6], np.float32)  # fractional timesteps, as the VP wrapper feeds
    y = np.array([0, 421, 999]) if config.class_cond else None
    with torch.no_grad():
        expected = model(torch.from_numpy(x), torch.from_numpy(t), None if y is None else torch.from_numpy(y))
    got = jax.jit(UNet(config).apply)({"params": params}, nhwc(x), t, y)
    assert got.shape == (3, config.image_size, config.image_size, config.out_channels)
    assert rel_err(nchw(got), expected.numpy()) <= RTOL


# -- denoiser -------------------------------------------------------------------------

SIGMAS = (100.0, 5.0, 0.1, 0.01)
BETA_D, BETA_MIN, M = 19.9, 0.1, 1000


def torch_c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """SPEC section 1: c_noise = (M - 1) * sigma_inv(sigma), in sigma's dtype."""
    sigma_inv = (torch.sqrt(BETA_MIN**2 + 2 * BETA_D * torch.log1p(sigma**2)) - BETA_MIN) / BETA_D
    return (M - 1) * sigma_inv


def torch_vp_denoiser(model, x: torch.Tensor, sigma: torch.Tensor, c_noise: torch.Tensor, y=None):
    """SPEC section 1 written out independently: D = x - sigma * eps(c_in x, c_noise)."""
    c_in = 1 / torch.sqrt(sigma**2 + 1)
    eps = model(c_in[:, None, None, None] * x, c_noise, y)[:, : x.shape[1]]
    return x - sigma[:, None, None, None] * eps


def test_sigma_to_timestep_matches_float64():
    """c_noise in float32 (jitted) vs the float64 formula, sigma in [1e-3, 100]: within 2 ulp, or 1e-6
    absolute for small c_noise (where sqrt(...) - beta_min cancels; 1e-6 rad is nothing to the embedding)."""
    sigma = np.geomspace(1e-3, 100, 41).astype(np.float32)
    exact = torch_c_noise(torch.from_numpy(sigma).double()).numpy()
    got = np.asarray(jax.jit(sigma_to_timestep)(sigma), np.float64)
    assert np.all(np.abs(got - exact) <= np.maximum(2 * np.spacing(exact.astype(np.float32)), 1e-6))


@pytest.mark.parametrize("name", ["tiny16", "tiny16_cond"])
def test_denoiser_and_its_gradient_match_torch(name):
    """make_denoiser's D, and the gradient of <w, D> w.r.t. x, against torch autograd.

    A 1-ulp change of c_noise near 1000 (float32 spacing 6e-5, where XLA's fused float32
    arithmetic and torch's may round differently) moves a random-weight network's
    gradient by about 1e-5 relative; so the gradient is compared with both sides fed
    the same float32 c_noise, and c_noise itself is tested above.
    """
    config = CONFIGS[name]
    model, params = reference_and_params(config, seed=2)
    rng = np.random.default_rng(1)
    shape = (len(SIGMAS), config.in_channels, config.image_size, config.image_size)
    sigma = np.array(SIGMAS, np.float32)
    x = (rng.uniform(-1, 1, shape) + sigma[:, None, None, None] * rng.standard_normal(shape)).astype(np.float32)
    w = rng.standard_normal(shape).astype(np.float32)
    y = np.array([3, 14, 159, 265]) if config.class_cond else None

    sigma_t = torch.from_numpy(sigma)
    c_noise = torch_c_noise(sigma_t)
    x_t = torch.from_numpy(x).requires_grad_(True)
    d_t = torch_vp_denoiser(model, x_t, sigma_t, c_noise, None if y is None else torch.from_numpy(y))
    (grad_t,) = torch.autograd.grad((d_t * torch.from_numpy(w)).sum(), x_t)

    d_j = jax.jit(make_denoiser(config, params, class_labels=y))(nhwc(x), sigma)

    def eps_at_torch_c_noise(x_scaled, _timesteps):
        return UNet(config).apply({"params": params}, x_scaled, c_noise.numpy(), y)

    def inner(v):
        return jnp.sum(vp_preconditioning(eps_at_torch_c_noise, v, sigma) * nhwc(w))

    grad_j = jax.jit(jax.grad(inner))(jnp.asarray(nhwc(x)))

    for i, s in enumerate(SIGMAS):  # per noise level: each has its own scale
        assert rel_err(nchw(d_j)[i], d_t[i].detach().numpy()) <= RTOL, f"D at sigma={s}"
        assert rel_err(nchw(grad_j)[i], grad_t[i].numpy()) <= RTOL, f"grad at sigma={s}"


# -- full size ---------------------------------------------------------------------------


@pytest.mark.slow
def test_converted_ffhq256_matches_torch(tmp_path):
    """A random full-size ffhq256 state dict through torch.save -> convert -> load -> forward."""
    config = CONFIGS["ffhq256"]
    model = tr.from_config(config, seed=3)
    assert sum(p.numel() for p in model.parameters()) == 93_563_910
    torch.save(model.state_dict(), tmp_path / "ffhq.pt")
    convert(tmp_path / "ffhq.pt", config, tmp_path / "ffhq256")
    params, loaded = checkpoint.load(tmp_path / "ffhq256")
    assert loaded.config == config and (loaded.family, loaded.preconditioning) == ("adm", "vp")

    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 3, 256, 256)).astype(np.float32)
    t = np.array([421.7], np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    del model
    got = jax.jit(UNet(config).apply)({"params": params}, nhwc(x), t)
    assert rel_err(nchw(got), expected) <= RTOL


# -- cross-check of the reference itself against deepinv's copy of guided-diffusion ----
# deepinv ships guided-diffusion's UNetModel as DiffUNet, with one change: attention via
# F.scaled_dot_product_attention (same maths, different float32 rounding).
#
# Both sides are torch on the same CPU, so every layer but attention runs the same kernels bit for
# bit; only attention rounds differently, and only where torch picks another SDPA kernel (its AVX2
# build: blocked online softmax). One block then differs by about 1 ulp (6e-8 seen): 1e-6 is 16 ulp,
# and a 1e-3 error in one weight moves a block's output by >= 2e-4 (bar the first conv of a ResBlock,
# which the GroupNorm after it normalises away). Through the whole 64 px FFHQ network that ulp
# grows to 1.4e-6 (AVX2; 0 on AVX-512 and AVX): 5e-6 keeps 3.5x of headroom, while one weight tensor
# off by 1e-3 gives >= 7.6e-5 (15x), GroupNorm eps 1e-6 for 1e-5 2.3e-5 (4.6x), t off by 0.1 1e-2.
DEEPINV_TOL = 1e-6
DEEPINV_NET_TOL = 5e-6


@functools.cache
def _load_deepinv_diffunet():
    """deepinv's models/diffunet.py, unchanged, or None when deepinv is not installed.

    It is loaded without deepinv's package __init__, which imports torchvision: torchvision's PyPI
    wheels need the CUDA build of torch, and the tests run on the CPU build. diffunet.py needs only
    torch, numpy and its siblings models/utils.py and models/base.py; utils.py imports one exception
    class from deepinv.utils.io for its weight download (unused here), stubbed while loading."""
    spec = importlib.util.find_spec("deepinv")
    if spec is None:
        return None
    package = types.ModuleType("_deepinv_models")
    package.__path__ = [str(Path(spec.submodule_search_locations[0]) / "models")]
    io_stub = types.ModuleType("deepinv.utils.io")
    io_stub.DownloadError = type("DownloadError", (RuntimeError,), {})
    sys.modules["_deepinv_models"] = package
    sys.modules["deepinv.utils.io"] = io_stub
    try:
        return importlib.import_module("_deepinv_models.diffunet")
    finally:
        del sys.modules["deepinv.utils.io"]


def _deepinv():
    module = _load_deepinv_diffunet()
    if module is None:
        pytest.skip("deepinv is not installed (pip install -e '.[test]')")
    return module


def _load_theirs_into_ours(theirs, ours, extra=()):
    """Key names and shapes must match exactly (apart from ``extra`` keys of theirs)."""
    state, expected = theirs.state_dict(), ours.state_dict()
    assert set(state) - set(expected) == set(extra)
    assert set(expected) <= set(state)
    for key, value in expected.items():
        assert state[key].shape == value.shape, key
    ours.load_state_dict({k: v for k, v in state.items() if k not in extra}, strict=True)


def test_reference_matches_deepinv_diffunet():
    """DiffUNet(large_model=False) is the FFHQ 256 model (ffhq_10m.pt); its state dict holds two
    extra buffers (its DDPM schedule) that guided-diffusion's does not."""
    dm = _deepinv()
    theirs = tr.randomize_(dm.DiffUNet(large_model=False, pretrained=None).eval(), seed=4)
    ours = tr.create_model(
        image_size=256, num_channels=128, num_res_blocks=1, attention_resolutions=(16,), num_heads=4,
        num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True)
    _load_theirs_into_ours(theirs, ours, extra={"sqrt_alphas_cumprod", "sqrt_1m_alphas_cumprod"})
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((2, 3, 64, 64)).astype(np.float32))
    t = torch.tensor([3.5, 901.0])
    with torch.no_grad():
        expected = theirs.forward_diffusion(x, t)
        got = ours(x, t)
    assert rel_err(got.numpy(), expected.numpy()) <= DEEPINV_NET_TOL


@pytest.mark.parametrize("new_order", [False, True])
@pytest.mark.parametrize("heads", [(2, -1), (1, 16)])  # (num_heads, num_head_channels)
def test_reference_attention_matches_deepinv(new_order, heads):
    dm = _deepinv()
    theirs = tr.randomize_(dm.AttentionBlock(64, heads[0], heads[1], use_new_attention_order=new_order), 5)
    ours = tr.AttentionBlock(64, heads[0], heads[1], new_order)
    _load_theirs_into_ours(theirs, ours)
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((2, 64, 4, 4)).astype(np.float32))
    with torch.no_grad():
        assert rel_err(ours(x).numpy(), theirs(x).numpy()) <= DEEPINV_TOL


@pytest.mark.parametrize("scale_shift", [False, True])
@pytest.mark.parametrize("cout,resample", [(64, None), (32, None), (32, "up"), (32, "down")])
def test_reference_resblock_matches_deepinv(scale_shift, cout, resample):
    dm = _deepinv()
    theirs = tr.randomize_(dm.ResBlock(32, 128, 0.0, out_channels=cout, use_scale_shift_norm=scale_shift,
                                       up=resample == "up", down=resample == "down"), 6)
    ours = tr.ResBlock(32, 128, cout, 0.0, scale_shift, resample)
    _load_theirs_into_ours(theirs, ours)
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.standard_normal((2, 32, 8, 8)).astype(np.float32))
    emb = torch.from_numpy(rng.standard_normal((2, 128)).astype(np.float32))
    with torch.no_grad():
        assert rel_err(ours(x, emb).numpy(), theirs(x, emb).numpy()) <= DEEPINV_TOL


@pytest.mark.parametrize("direction", ["up", "down"])
def test_reference_resample_matches_deepinv(direction):
    dm = _deepinv()
    theirs = dm.Upsample(32, True) if direction == "up" else dm.Downsample(32, True)
    ours = tr.Upsample(32) if direction == "up" else tr.Downsample(32)
    _load_theirs_into_ours(tr.randomize_(theirs, 7), ours)
    x = torch.from_numpy(np.random.default_rng(6).standard_normal((2, 32, 8, 8)).astype(np.float32))
    with torch.no_grad():
        assert rel_err(ours(x).numpy(), theirs(x).numpy()) <= DEEPINV_TOL


def test_flax_unet_matches_deepinv_diffunet_directly():
    """Our converter and Flax UNet against deepinv's DiffUNet (the FFHQ 256 model, random weights) with
    no code of ours on the PyTorch side: its state dict (less its two DDPM-schedule buffers) converted
    as a guided-diffusion checkpoint, the same inputs, the same eps and sigma outputs."""
    dm = _deepinv()
    theirs = tr.randomize_(dm.DiffUNet(large_model=False, pretrained=None).eval(), seed=8)
    extra = {"sqrt_alphas_cumprod", "sqrt_1m_alphas_cumprod"}
    state = {k: v.numpy().copy() for k, v in theirs.state_dict().items() if k not in extra}
    params = to_flax_params(state, CONFIGS["ffhq256"])
    # The same weights at 64 px keep it quick; attention stays at downsampling rate 16 (4 px here).
    config = dataclasses.replace(CONFIGS["ffhq256"], image_size=64, attention_resolutions=(4,))
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    t = np.array([0.0, 612.4], np.float32)
    with torch.no_grad():
        expected = theirs.forward_diffusion(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    got = jax.jit(UNet(config).apply)({"params": params}, nhwc(x), t)
    assert got.shape == (2, 64, 64, 6)
    assert rel_err(nchw(got), expected) <= RTOL
