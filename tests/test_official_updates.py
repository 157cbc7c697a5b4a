"""The baselines against their official code: one step of every method against a float64 NumPy
transcription of the official update (issue 25), the DDPM timesteps the network sees, and the conjugate-
gradient solver at any iteration count."""

import jax
import jax.numpy as jnp
import numpy as np

from spgd_jax import operators
from spgd_jax.io.images import load_demo


def test_conjugate_gradients_stop_at_convergence_and_stay_finite_at_500_iterations():
    """Float32 CG run past convergence used to lose conjugacy and diverge (Gaussian deblurring at 64 px,
    rho 2.7e-2: off by 1.5e3 at 300 iterations, NaN at 500); stopped at convergence it keeps its answer."""
    op = operators.get("gauss_deblur", 64)
    x = jnp.asarray(load_demo(64))
    params = jax.tree_util.tree_map(lambda a: a[0], op.init_params(jax.random.PRNGKey(0), 1, 64))
    y = op.forward(x, params) + 0.01 * jax.random.normal(jax.random.PRNGKey(1), x.shape)
    solve = jax.jit(lambda n: operators.proximal(op.forward, params, y, jnp.zeros_like(x), 2.7e-2, n),
                    static_argnums=0)
    converged, long = solve(100), solve(500)
    assert bool(jnp.all(jnp.isfinite(long)))
    np.testing.assert_allclose(np.asarray(long), np.asarray(converged), atol=1e-5)
    transpose = operators.adjoint(op.forward, params, x.shape)
    b = transpose(y)
    residual = transpose(op.forward(long, params)) + 2.7e-2 * long - b
    assert float(jnp.linalg.norm(residual) / jnp.linalg.norm(b)) < 1e-5
