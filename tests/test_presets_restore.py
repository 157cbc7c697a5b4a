"""No preset returns garbage (issue 25.5): every registered method, at its preset for the default prior, on every
task it accepts, restores the demo face better than the measurement's naive inverse, without fitting the noise
(a residual far below sigma_y) and without speckle.

Short runs where the method allows (SHORT: fewer steps of the same schedule). The sampler programs would each
compile the UNet again (10-30 s apiece, 50 programs); here the network is compiled once and the samplers call it
through a host callback (CompiledNetwork), so each program compiles only the method's own arithmetic.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spgd_jax import metrics, operators
from spgd_jax.classical import naive_inverse
from spgd_jax.denoisers import Denoiser
from spgd_jax.io.images import load_demo
from spgd_jax.io.prior import default_weights_path, load_denoiser
from spgd_jax.samplers import SAMPLERS, forward_for, presets, sample

# Fewer steps where a short run behaves as the preset does; SPGD, DPS, DPPS, Score-SDE and DAPS run their full
# presets (their short runs are other methods: DPS's zeta is per step, so 100 of its 500 steps leave the samples
# unguided, 6.6-8.4 dB with residuals of 15-42 sigma_y, and DPPS (DPS's step) at 50 of its 1000 steps gives
# 7.9-14.8 dB with residuals of 12-31 sigma_y; SPGD at T = 50 lands on SR x4's naive inverse, 16.75 vs 16.88 dB;
# Score-SDE at 50 steps speckles random inpainting, Laplacian 1.28x; DAPS at 20 annealing steps gives HDR 8.6 dB;
# RED-Diff's tuned lr moves its mean too little in 50 steps: speckle on random inpainting, Laplacian 1.48x).
SHORT = {"mcg": {"steps": 50}}
NOISE_FIT = 0.1  # a residual RMS below this fraction of sigma_y fits the noise (projections: 0.16 for SR x4)
SPECKLE = 1.25  # a Laplacian RMS above this multiple of the true face's is speckle (good restorations: 0.5-0.9)


class CompiledNetwork:
    """The network of a Denoiser, compiled once (forward and vector-Jacobian product) and called from inside
    traced code by a host callback; hashable (a Denoiser's static network)."""

    def __init__(self, denoiser: Denoiser):
        network, params = denoiser.network, denoiser.params
        apply = lambda x, t: network(params, x, t, None)
        self.apply = jax.jit(apply)
        self.vjp = jax.jit(lambda x, t, cotangent: jax.vjp(lambda v: apply(v, t), x)[1](cotangent)[0])
        config = network.config
        image = jnp.zeros((1, config.image_size, config.image_size, config.in_channels))
        self.channels = jax.eval_shape(apply, image, jnp.zeros(1)).shape[-1]

    def __call__(self, params, x, t, class_labels=None):
        return _network_call(self, x, t)


def _host(function, out_channels, x, t, *extra):
    """Calls the compiled `function` on (x, t, *extra) with any leading batch axes (a vmapped callback)."""

    def call(x, t, *extra):
        lead = x.shape[:-3]
        flat = lambda a: np.asarray(a).reshape((-1,) + a.shape[len(lead):])
        out = function(flat(x), np.broadcast_to(t, lead).reshape(-1), *map(flat, extra))
        return np.asarray(out).reshape(lead + out.shape[1:])

    shape = jax.ShapeDtypeStruct(x.shape[:-1] + (out_channels,), jnp.float32)
    return jax.pure_callback(call, shape, x, t, *extra, vmap_method="expand_dims")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _network_call(network, x, t):
    return _host(network.apply, network.channels, x, t)


def _network_forward(network, x, t):
    return _host(network.apply, network.channels, x, t), (x, t)


def _network_backward(network, residuals, cotangent):
    x, t = residuals
    return _host(network.vjp, x.shape[-1], x, t, cotangent), jnp.zeros_like(t)


_network_call.defvjp(_network_forward, _network_backward)


@pytest.fixture(scope="module")
def demo():
    """(denoiser calling the once-compiled UNet, demo face (1, 64, 64, 3))."""
    denoiser = load_denoiser(default_weights_path())
    fast = Denoiser(CompiledNetwork(denoiser), jnp.zeros(()), denoiser.preconditioning)
    return fast, jnp.asarray(load_demo(64))[None]


def laplacian_rms(x):
    lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    return float(jnp.sqrt(jnp.mean(lap**2)))


def accepted_tasks(name):
    """The tasks the command line runs `name` on with the default prior without a warning (it refuses a non-linear
    task to a linear-only method, a task without a preset step size (asks for one), and warns where
    presets.default_prior_warning says the prior cannot)."""
    sampler = SAMPLERS[name]
    tasks = [t for t in operators.TASKS if presets.default_prior_warning(name, t) is None
             and (operators.get(t, 64).linear or not sampler.linear_only) and _has_preset(name, t)]
    if sampler.forward is not None:  # DDRM: the tasks with an SVD
        tasks = [t for t in tasks if _derivable(sampler, t)]
    return tasks


def _has_preset(name, task):
    """False where the preset has no step size for the task: then it asks for one by name (e.g. DPPS on HDR,
    which its release does not run)."""
    try:
        presets.config(name, task)
        return True
    except ValueError as error:
        step_size = SAMPLERS[name].step_size
        assert f"no preset {step_size} for task {task!r}" in str(error) and f"--set {step_size}=" in str(error)
        return False


def _derivable(sampler, task):
    try:
        sampler.forward(operators.get(task, 64))
        return True
    except ValueError:
        return False


# Methods whose run costs minutes here (gradients through the UNet, or the full 1000-NFE preset): they run
# when SPGD_JAX_ALL_PRESETS=1 is set (about two hours on 2 CPU cores); DDRM, DiffPIR and PnP-ADMM run in every
# suite.
HEAVY = ("spgd", "dps", "mcg", "score_sde", "dpps", "daps", "red_diff")
ALL_PRESETS = os.environ.get("SPGD_JAX_ALL_PRESETS") == "1"


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.skipif(n in HEAVY and not ALL_PRESETS, reason="set SPGD_JAX_ALL_PRESETS=1"))
    for n in SAMPLERS if SAMPLERS[n].conditional])
def test_every_preset_restores_the_demo_face_better_than_the_naive_inverse(name, demo):
    denoiser, x = demo
    failures = []
    for task in accepted_tasks(name):
        operator = operators.get(task, 64)
        params = operator.init_params(jax.random.key(1), 1, 64)
        y = operator.measure(jax.random.key(2), x, params)
        config = presets.config(name, task, **SHORT.get(name, {}))
        result = sample(denoiser, forward_for(config, operator), y, jax.random.key(3), config, params,
                        x_shape=(64, 64, 3))
        restored = jnp.clip(result.x, -1, 1)
        psnr = float(metrics.psnr(restored, x)[0])
        naive = float(metrics.psnr(naive_inverse(task, y, 64), x)[0])
        residual = float(jnp.sqrt(jnp.mean((jax.vmap(operator.forward)(restored, params) - y) ** 2)))
        speckle = laplacian_rms(restored) / laplacian_rms(x)
        line = (f"{name} {task}: {psnr:.2f} dB (naive inverse {naive:.2f}), residual {residual / operator.sigma_y:.2f} "
                f"sigma_y, Laplacian {speckle:.2f}x the face's")
        print(line)
        if bool(result.diverged[0]) or psnr <= naive or residual < NOISE_FIT * operator.sigma_y or speckle > SPECKLE:
            failures.append(line)
    assert not failures, "\n".join(failures)


def test_the_warned_pairs_name_registered_methods_and_tasks():
    for name, task in presets.UNSUPPORTED_PAIRS_BY_DEFAULT_PRIOR:
        assert name in SAMPLERS and task in operators.TASKS
        assert presets.default_prior_warning(name, task) and presets.default_prior_warning("spgd", task) is None
