"""Training updates: the hyper-parameters, the train state, Adam with warm-up, an optional cosine decay
and clipping, the EMA.

`make_train_step` (one update on a given batch) and `make_train_steps` (K updates in one compiled call,
a `lax.scan` that gathers each batch from the training set held on the device) are pure, to be jitted:
every random input of update s (flips, t, noise, dropout) comes from fold_in(PRNGKey(seed), s), and the
batch of update s is a function of (seed, s) (`_data.batch_indices`), so a resumed run repeats an
uninterrupted one, and K updates per call repeat K calls of one update (to float32 round-off).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Sharding
import numpy as np
import optax

from spgd_jax.models.adm import UNet
from spgd_jax.train import _data as data
from spgd_jax.train._diffusion import Diffusion, loss_weights, parse_loss_weighting, per_image_loss

LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters.  The settings of `recipe` (RESUME_INVARIANT and the learning-rate
    schedule) must not change when resuming."""

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
    steps_per_call: int = 1         # updates per compiled call (a lax.scan on the device; 50 on a GPU):
                                    # same result, fewer host round trips; events (logging, validation,
                                    # samples, checkpoints, the time limit) happen between calls
    # The recipe (the defaults are the recipe of weights/default64 before these fields existed):
    lr_schedule: str = "constant"   # after the warm-up: "constant", or "cosine" decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.1       # cosine: the final learning rate as a fraction of lr
    decay_steps: int | None = None  # cosine: the update at which the decay ends (None: num_steps)
    flip: bool = True               # random horizontal flips of the training images
    loss_weighting: str = "eps"     # "eps": plain eps MSE; "min-snr-G" (e.g. "min-snr-5"): the eps MSE at
                                    # t weighted by min(SNR_t, G) / SNR_t (Hang et al. 2023)

    def __post_init__(self):
        for name in ("batch_size", "num_steps", "log_every", "val_every", "sample_every",
                     "num_samples", "sample_steps", "steps_per_call"):
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
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ValueError(f"decay_steps must be >= 1 (or None: num_steps), got {self.decay_steps}")
        if not isinstance(self.flip, bool):
            raise ValueError(f"flip must be true or false, got {self.flip!r}")
        parse_loss_weighting(self.loss_weighting)

    @property
    def decay_horizon(self) -> int | None:
        """The update at which the cosine decay ends (None for a constant learning rate)."""
        if self.lr_schedule == "constant":
            return None
        return self.num_steps if self.decay_steps is None else self.decay_steps


# Settings a resumed run must keep: they define the training it continues.  (The learning-rate schedule
# is compared through `recipe`, which also holds its horizon.)
RESUME_INVARIANT = ("batch_size", "lr", "warmup_steps", "grad_clip", "ema_decay", "seed", "flip", "loss_weighting")


def recipe(train: dict) -> dict:
    """The settings of a run's metadata ("train": the TrainConfig as a dict) that a resumed run must keep:
    RESUME_INVARIANT and the learning-rate schedule with its horizon.  A field missing from metadata
    written before it existed takes its default, which is the behaviour of that time."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    tcfg = TrainConfig(**{**defaults, **{k: v for k, v in train.items() if k in defaults}})
    out = {k: getattr(tcfg, k) for k in RESUME_INVARIANT}
    out["lr_schedule"] = tcfg.lr_schedule
    if tcfg.lr_schedule != "constant":
        out.update(min_lr_ratio=tcfg.min_lr_ratio, decay_horizon=tcfg.decay_horizon)
    return out


class TrainState(NamedTuple):
    step: jax.Array          # int32 (): number of optimiser updates done
    params: Any
    ema_params: Any
    opt_state: Any


def learning_rate(tcfg: TrainConfig) -> Callable[[jax.Array], jax.Array]:
    """The learning rate at update s: lr * min(1, (s + 1) / warmup_steps) (constant lr without warm-up),
    and with lr_schedule "cosine" times r + (1 - r) (1 + cos(pi u)) / 2, u = (s - warmup_steps) /
    (decay_horizon - warmup_steps) clipped to [0, 1], r = min_lr_ratio: lr at the end of the warm-up,
    lr * r from the horizon on."""
    warmup = max(tcfg.warmup_steps, 1)
    horizon = tcfg.decay_horizon
    if horizon is None:
        return lambda s: tcfg.lr * jnp.minimum(1.0, (s + 1.0) / warmup)
    span = max(horizon - tcfg.warmup_steps, 1)
    r = tcfg.min_lr_ratio

    def cosine(s):
        u = jnp.clip((s - tcfg.warmup_steps) / span, 0.0, 1.0)
        return tcfg.lr * jnp.minimum(1.0, (s + 1.0) / warmup) * (r + (1.0 - r) * 0.5 * (1.0 + jnp.cos(jnp.pi * u)))

    return cosine


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

    All randomness (flips, t, noise, dropout) comes from fold_in(PRNGKey(seed), state.step).  'loss' is
    the objective minimised (with loss_weighting "min-snr-G", the weighted one).
    """
    base_key = jax.random.PRNGKey(tcfg.seed)
    weighting = parse_loss_weighting(tcfg.loss_weighting)

    def train_step(state: TrainState, images: jax.Array):
        key = jax.random.fold_in(base_key, state.step)
        k_flip, k_t, k_noise, k_drop = jax.random.split(key, 4)
        x0 = data.to_model_range(images)
        if tcfg.flip:
            x0 = data.random_flip(k_flip, x0)
        t = jax.random.randint(k_t, (x0.shape[0],), 0, diffusion.num_timesteps)
        noise = jax.random.normal(k_noise, x0.shape)
        weights = loss_weights(diffusion, t, weighting)

        def loss_fn(params):
            return jnp.mean(per_image_loss(model, diffusion, params, x0, t, noise, k_drop, weights))

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, ema_decay_at(state.step, tcfg.ema_decay))
        new_state = TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return train_step


def make_train_steps(model: UNet, diffusion: Diffusion, tx: optax.GradientTransformation, tcfg: TrainConfig,
                     batch_sharding: Sharding | None = None) -> Callable:
    """(state, dataset uint8 (N, S, S, C), indices int (K, B)) -> (state after K updates, {'loss',
    'grad_norm'}: (K,) each); pure, to be jitted.

    Update k trains on dataset[indices[k]] exactly as `make_train_step` would (a `lax.scan` of it), so
    the training set stays on the device and one call does K updates with no host round trip between
    them.  batch_sharding: where each gathered batch lives (split over the devices), or None.
    """
    step = make_train_step(model, diffusion, tx, tcfg)

    def train_steps(state: TrainState, dataset: jax.Array, indices: jax.Array):
        def body(state: TrainState, idx: jax.Array):
            images = jnp.take(dataset, idx, axis=0)
            if batch_sharding is not None:
                images = jax.lax.with_sharding_constraint(images, batch_sharding)
            return step(state, images)

        return jax.lax.scan(body, state, indices)

    return train_steps
