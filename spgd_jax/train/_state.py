"""One training update: the hyper-parameters, the train state, Adam with warm-up and clipping, the EMA.

`make_train_step` is pure (to be jitted): every random input of update s (flips, t, noise, dropout)
comes from fold_in(PRNGKey(seed), s), so a resumed run repeats an uninterrupted one bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spgd_jax.models.adm import UNet
from spgd_jax.train import _data as data
from spgd_jax.train._diffusion import Diffusion, per_image_loss


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters.  Fields in RESUME_INVARIANT must not change when resuming."""

    batch_size: int = 32
    lr: float = 2e-4
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    num_steps: int = 200_000
    seed: int = 0
    log_every: int = 10             # steps between progress lines (non-tty) / metrics records
    val_every: int = 500            # steps between validation losses
    sample_every: int = 1000        # steps between sample grids
    checkpoint_minutes: float = 10.0
    time_limit_minutes: float | None = None  # stop this session after this much training, then
                                              # validate, sample, save (None: run to num_steps)
    num_samples: int = 16           # images in a sample grid (a square number)
    sample_steps: int = 50          # Euler steps (network evaluations) for the grid

    def __post_init__(self):
        for name in ("batch_size", "num_steps", "log_every", "val_every", "sample_every",
                     "num_samples", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.warmup_steps < 0 or not self.grad_clip > 0:
            raise ValueError(f"need lr > 0, warmup_steps >= 0, grad_clip > 0; got lr={self.lr}, "
                             f"warmup_steps={self.warmup_steps}, grad_clip={self.grad_clip}")
        if self.time_limit_minutes is not None and not self.time_limit_minutes > 0:
            raise ValueError(f"time_limit_minutes must be > 0 (or None), got {self.time_limit_minutes}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if int(np.sqrt(self.num_samples)) ** 2 != self.num_samples:
            raise ValueError(f"num_samples must be a square number (grid), got {self.num_samples}")


RESUME_INVARIANT = ("batch_size", "lr", "warmup_steps", "grad_clip", "ema_decay", "seed")


class TrainState(NamedTuple):
    step: jax.Array          # int32 (): number of optimiser updates done
    params: Any
    ema_params: Any
    opt_state: Any


def learning_rate(tcfg: TrainConfig) -> Callable[[jax.Array], jax.Array]:
    """lr * min(1, (s + 1) / warmup_steps) at update s (constant lr without warm-up)."""
    warmup = max(tcfg.warmup_steps, 1)
    return lambda s: tcfg.lr * jnp.minimum(1.0, (s + 1.0) / warmup)


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(tcfg.grad_clip), optax.adam(learning_rate(tcfg)))


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """EMA decay used at update `step` (0-based): min(decay, (1 + step) / (10 + step))."""
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema, params, decay: jax.Array):
    """ema <- decay * ema + (1 - decay) * params, leaf by leaf."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def init_state(model: UNet, tx: optax.GradientTransformation, key: jax.Array, params: Any = None) -> TrainState:
    """Update 0: `params` (default: a fresh initialisation from `key`) as both the weights and their
    EMA, and a fresh optimiser state."""
    if params is None:
        cfg = model.config
        x = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.in_channels), jnp.float32)
        params = model.init(key, x, jnp.zeros((1,), jnp.float32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params))


def make_train_step(model: UNet, diffusion: Diffusion, tx: optax.GradientTransformation,
                    tcfg: TrainConfig) -> Callable:
    """(state, images uint8 (B, S, S, C)) -> (state, {'loss', 'grad_norm'}); pure, to be jitted.

    All randomness (flips, t, noise, dropout) comes from fold_in(PRNGKey(seed), state.step).
    """
    base_key = jax.random.PRNGKey(tcfg.seed)

    def train_step(state: TrainState, images: jax.Array):
        key = jax.random.fold_in(base_key, state.step)
        k_flip, k_t, k_noise, k_drop = jax.random.split(key, 4)
        x0 = data.random_flip(k_flip, data.to_model_range(images))
        t = jax.random.randint(k_t, (x0.shape[0],), 0, diffusion.num_timesteps)
        noise = jax.random.normal(k_noise, x0.shape)

        def loss_fn(params):
            return jnp.mean(per_image_loss(model, diffusion, params, x0, t, noise, k_drop))

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, ema_decay_at(state.step, tcfg.ema_decay))
        new_state = TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return train_step
