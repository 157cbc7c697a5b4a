"""A hand-written gradient (jax.custom_vjp) checked against jax.grad of the plain formulation it replaces."""

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np


def assert_matches_plain(ours, plain, args, weight, atol=1e-5):
    """ours(*args) and plain(*args) agree to atol; so do their gradients in every argument (to atol of the largest)
    for the non-linear loss sum(sin(f(*args)) * weight), so that every term of the gradient matters; and ours'
    gradient agrees with finite differences."""
    np.testing.assert_allclose(ours(*args), plain(*args), atol=atol)

    def grads(fn):
        return jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a)) * weight), argnums=tuple(range(len(args))))(*args)

    for got, reference in zip(grads(ours), grads(plain)):
        np.testing.assert_allclose(got, reference, atol=atol * float(jnp.max(jnp.abs(reference))))
    check_grads(ours, args, order=1, modes=("rev",), atol=2e-2, rtol=2e-2)
