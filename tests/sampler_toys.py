"""Toy denoisers and operators for the sampler tests (no UNet, no real operators; fast on CPU)."""

import jax
import jax.numpy as jnp
import numpy as np

from spgd_jax.operators import SVDForward

PRIOR_VAR = 0.25  # data ~ N(0, v I)
SHAPE = (4, 4, 2)  # one image (H, W, C)
N_PIXELS = int(np.prod(SHAPE))


def gaussian_shrink(sigma):
    """D(x; s) = x * v / (v + s^2), the exact Tweedie estimate for data ~ N(0, v I)."""
    return PRIOR_VAR / (PRIOR_VAR + sigma**2)


def gaussian_denoiser(x, sigma):
    """(B,H,W,C), (B,) -> (B,H,W,C)."""
    return x * gaussian_shrink(sigma)[:, None, None, None]


def conv_denoiser(seed=0, channels=SHAPE[-1], width=8):
    """A tiny random nonlinear conv net with the Denoiser contract (batch-independent)."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    w1 = 0.5 * jax.random.normal(k1, (3, 3, channels, width))
    w2 = 0.5 * jax.random.normal(k2, (3, 3, width, channels))

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def denoiser(x, sigma):
        s = sigma[:, None, None, None]
        hidden = jnp.tanh(conv(x / jnp.sqrt(1.0 + s**2), w1) + 0.1 * jnp.log(s))
        return gaussian_denoiser(x, sigma) + 0.1 * conv(hidden, w2)

    return denoiser


def matrix_forward(x, matrix):
    """A(x) = M vec(x) for one image x (H,W,C) and its matrix M (m, H*W*C)."""
    return matrix @ x.reshape(-1)


def random_problem(batch, m=12, seed=0):
    """Per-image matrices (B, m, n), clean images (B,H,W,C), measurements (B, m), initial noise (B,H,W,C)."""
    rng = np.random.default_rng(seed)
    matrices = rng.standard_normal((batch, m, N_PIXELS)) / np.sqrt(N_PIXELS)
    x0 = np.sqrt(PRIOR_VAR) * rng.standard_normal((batch,) + SHAPE)
    y = np.einsum("bmn,bn->bm", matrices, x0.reshape(batch, -1)) + 0.01 * rng.standard_normal((batch, m))
    x_init = 100.0 * rng.standard_normal((batch,) + SHAPE)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return f32(matrices), f32(x0), f32(y), f32(x_init)


def counting(denoiser, record):
    """Wraps a denoiser so that each image's evaluation, when EXECUTED, appends its sigma to record.

    The callback takes x, so under the samplers' per-image vmap it runs once per image and evaluation."""

    def wrapped(x, sigma):
        jax.debug.callback(lambda x_, s: record.extend(np.broadcast_to(s, x_.shape[:1]).tolist()), x, sigma)
        return denoiser(x, sigma)

    return wrapped


def gaussian_posterior(matrix, y, prior_mean, prior_var, noise_var):
    """Mean (n,) and covariance (n, n), float64, of x ~ N(prior_mean, prior_var I) given y = M x + N(0, noise_var I)."""
    matrix, y, prior_mean = (np.asarray(a, np.float64) for a in (matrix, y, prior_mean))
    precision = np.eye(matrix.shape[1]) / prior_var + matrix.T @ matrix / noise_var
    covariance = np.linalg.inv(precision)
    return covariance @ (prior_mean.reshape(-1) / prior_var + matrix.T @ y / noise_var), covariance



class MatrixSVD(SVDForward):
    """matrix_forward carrying its SVD, for DDRM: params = svd_params(matrices), per image {"matrix" (m, n),
    "u" (m, m), "s" (m,), "vt" (n, n)} (NumPy float64 SVD, m <= n = H*W*C); spectral grid = SHAPE."""

    def __call__(self, x, params):
        return matrix_forward(x, params["matrix"])

    def vt(self, x, params):
        return (params["vt"] @ x.reshape(-1)).reshape(x.shape)

    def v(self, c, params):
        return (params["vt"].T @ c.reshape(-1)).reshape(c.shape)

    def ut(self, y, params, x_shape):
        coefficients = params["u"].T @ y
        return jnp.zeros(int(np.prod(x_shape)), y.dtype).at[: y.shape[0]].set(coefficients).reshape(x_shape)

    def u(self, c, params):
        return params["u"] @ c.reshape(-1)[: params["u"].shape[0]]

    def singulars(self, params, x_shape):
        s = params["s"]
        return jnp.zeros(int(np.prod(x_shape)), s.dtype).at[: s.shape[0]].set(s).reshape(x_shape)


def svd_params(matrices):
    """MatrixSVD's per-image params of matrices (B, m, n): float32 arrays with the leading axis B."""
    u, s, vt = np.linalg.svd(np.asarray(matrices, np.float64), full_matrices=True)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return {"matrix": f32(matrices), "u": f32(u), "s": f32(s), "vt": f32(vt)}
