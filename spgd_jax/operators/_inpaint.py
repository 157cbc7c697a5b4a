"""Inpainting masks and the masking operator.

Masks are float32 (H, W, 1): 1 keeps a pixel, 0 removes it, the same for every channel.
The operator multiplies, so removed pixels read 0 (mid-grey in [-1, 1]) and y has x's shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def inpaint(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked image x * mask for one image x (H, W, C) and mask (H, W, 1) or (H, W, C)."""
    if x.ndim != 3 or mask.ndim != 3 or mask.shape[:2] != x.shape[:2]:
        raise ValueError(f"inpaint expects x (H, W, C) and mask (H, W, 1) of the same H, W, got {x.shape} and {mask.shape}")
    return x * mask.astype(x.dtype)


def random_mask(key: jax.Array, height: int, width: int, keep_fraction: float = 0.2) -> jax.Array:
    """(H, W, 1) mask keeping a uniformly random subset of pixels.

    Exactly H*W - int(H*W * (1 - keep_fraction)) pixels are kept, as the reference removes
    int(H*W * 0.8) pixels for its "keep 20%" setting. jit-friendly (sizes are static).
    """
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    total = height * width
    kept = total - int(total * (1 - keep_fraction))
    chosen = jax.random.permutation(key, total)[:kept]
    return jnp.zeros(total, jnp.float32).at[chosen].set(1.0).reshape(height, width, 1)


def box_mask(key: jax.Array, height: int, width: int, box: int, margin: int) -> jax.Array:
    """(H, W, 1) mask removing one box x box square at a random position.

    Its top-left corner is uniform over [margin, H - margin - box) x [margin, W - margin - box),
    the reference's ``np.random.randint(margin, size - margin - box)`` (DAPS: box 128, margin 32
    at 256 px). jit-friendly.
    """
    for side in (height, width):
        if side - margin - box <= margin:
            raise ValueError(
                f"a {box}x{box} box with margin {margin} does not fit in a {height}x{width} image: "
                f"need size - margin - box > margin; use a smaller box_size or margin"
            )
    key_top, key_left = jax.random.split(key)
    top = jax.random.randint(key_top, (), margin, height - margin - box)
    left = jax.random.randint(key_left, (), margin, width - margin - box)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside = (rows >= top) & (rows < top + box) & (cols >= left) & (cols < left + box)
    return jnp.where(inside, 0.0, 1.0).astype(jnp.float32)[:, :, None]
