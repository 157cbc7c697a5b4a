"""DDPM training of the ADM UNet prior, and export of its EMA weights.

    python -m spgd_jax.train --data DIR --run runs/NAME [--model default64] [--set key=value ...]
    python -m spgd_jax.train export --run runs/NAME --out weights/NAME [--card weights/MODEL_CARD.md]

Training is standard DDPM epsilon prediction (Ho et al. 2020, guided-diffusion conventions): linear
betas 1e-4 .. 0.02 over T = 1000 steps, t ~ U{0..T-1}, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,
loss = mean (eps - eps_hat)^2 per image; with `learn_sigma` the guided-diffusion hybrid loss adds the
variational bound term (in bits/dim) for the learned variance with the mean's gradient stopped.
Adam with linear learning-rate warm-up, global-norm gradient clipping, an EMA of the weights with
decay min(ema_decay, (1 + s) / (10 + s)) at update s.

The run folder holds resumable orbax checkpoints (`checkpoints/`), `metrics.jsonl`, sample grids
(`samples/step_XXXXXXXX.png`) and `validation_split.txt`; re-running the same command continues
from the latest checkpoint with bit-identical results to an uninterrupted run (data order, noise,
flips and dropout are functions of (seed, step)).  SIGINT / SIGTERM save a checkpoint and exit.
Several local devices are used data-parallel (batch sharded over a 1-D `jax.sharding.Mesh`,
weights replicated); the code is the same on CPU and GPU.  To exercise that path on a CPU:
XLA_FLAGS=--xla_force_host_platform_device_count=2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import re
import shutil
import signal
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spgd_jax import checkpoint, data
from spgd_jax.denoiser import make_denoiser
from spgd_jax.images import save_png
from spgd_jax.unconditional import EulerConfig, euler
from spgd_jax.unet import CONFIGS, UNet, UNetConfig

# The default prior: a small 64x64 ADM UNet sized for CPU training (see weights/MODEL_CARD.md).
DEFAULT64 = UNetConfig(
    image_size=64, num_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2, 2),
    attention_resolutions=(16, 8), num_head_channels=32, use_scale_shift_norm=True,
    resblock_updown=True, learn_sigma=False, dropout=0.0)
MODELS = {"default64": DEFAULT64, **CONFIGS}
CARD_BEGIN, CARD_END = "<!-- export:begin -->", "<!-- export:end -->"
MAX_WEIGHTS_MB = 30.0


# ----------------------------------------------------------------------------------------------
# Diffusion maths (host constants in float64, used on the device in float32)

@dataclass(frozen=True)
class Diffusion:
    """DDPM constants for `num_timesteps` steps; arrays are float64 numpy (T,)."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)


def linear_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Diffusion:
    """guided-diffusion's "linear" schedule: betas linearly from beta_start to beta_end
    (both scaled by 1000 / num_timesteps), alphas_cumprod = cumprod(1 - betas)."""
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    scale = 1000.0 / num_timesteps
    betas = np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)
    return Diffusion(betas=betas, alphas_cumprod=np.cumprod(1.0 - betas))


def q_sample(abar_t: jax.Array, x0: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; abar_t (B,), x0/noise (B, H, W, C)."""
    a = abar_t[:, None, None, None]
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


def _normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) of 8-bit data x in [-1, 1] (bins of width 2/255) under N(mean, exp(log_scale)^2)."""
    inv_std = jnp.exp(-log_scale)
    upper = inv_std * (x - mean + 1.0 / 255.0)
    lower = inv_std * (x - mean - 1.0 / 255.0)
    log_cdf_upper = jax.scipy.special.log_ndtr(upper)
    log_sf_lower = jax.scipy.special.log_ndtr(-lower)
    log_delta = jnp.log(jnp.maximum(jax.scipy.special.ndtr(upper) - jax.scipy.special.ndtr(lower), 1e-12))
    return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_sf_lower, log_delta))


def vb_terms_bpd(diffusion: Diffusion, eps: jax.Array, var_values: jax.Array, x0: jax.Array,
                 x_t: jax.Array, t: jax.Array) -> jax.Array:
    """Per-image variational-bound term L_t in bits/dim for the learned-variance output (B,).

    eps, var_values, x0, x_t: (B, H, W, C); t int (B,).  var_values in [-1, 1] interpolates the log
    variance between the clipped posterior variance and beta_t (guided-diffusion's "learned_range").
    L_0 is the discretised decoder NLL, L_t (t > 0) the KL to the true posterior q(x_{t-1}|x_t, x0).
    """
    betas, abar = diffusion.betas, diffusion.alphas_cumprod
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    coef_x0 = betas * np.sqrt(abar_prev) / (1.0 - abar)
    coef_xt = (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)

    def at(table):
        return jnp.asarray(table, jnp.float32)[t][:, None, None, None]

    true_mean = at(coef_x0) * x0 + at(coef_xt) * x_t
    true_logvar = at(post_logvar)
    x0_hat = at(np.sqrt(1.0 / abar)) * x_t - at(np.sqrt(1.0 / abar - 1.0)) * eps
    model_mean = at(coef_x0) * x0_hat + at(coef_xt) * x_t
    frac = (var_values + 1.0) / 2.0
    model_logvar = frac * at(np.log(betas)) + (1.0 - frac) * true_logvar
    kl = jnp.mean(_normal_kl(true_mean, true_logvar, model_mean, model_logvar), axis=(1, 2, 3))
    nll = -jnp.mean(_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar), axis=(1, 2, 3))
    return jnp.where(t == 0, nll, kl) / np.log(2.0)


def per_image_loss(model: UNet, diffusion: Diffusion, params, x0: jax.Array, t: jax.Array,
                   noise: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
    """DDPM training loss per image (B,): eps MSE (+ VB term with learn_sigma).

    x0, noise (B, H, W, C) in [-1, 1] / N(0, 1); t int (B,) in [0, T); dropout on iff dropout_key.
    """
    abar = jnp.asarray(diffusion.alphas_cumprod, jnp.float32)[t]
    x_t = q_sample(abar, x0, noise)
    train = dropout_key is not None
    out = model.apply({"params": params}, x_t, t.astype(jnp.float32), train=train,
                      rngs={"dropout": dropout_key} if train else None)
    c = x0.shape[-1]
    eps = out[..., :c]
    loss = jnp.mean((noise - eps) ** 2, axis=(1, 2, 3))
    if model.config.learn_sigma:
        loss = loss + vb_terms_bpd(diffusion, jax.lax.stop_gradient(eps), out[..., c:], x0, x_t, t)
    return loss


def sample_images(model: UNet, params, key: jax.Array, num_images: int, num_steps: int) -> jax.Array:
    """Unconditional samples (num_images, S, S, C) for monitoring: the project's EDM Euler sampler
    on the VP-preconditioned denoiser (the path SPGD uses), `num_steps` network evaluations."""
    cfg = model.config
    euler_config = EulerConfig(steps=num_steps)
    x_init = euler_config.sigma_max * jax.random.normal(
        key, (num_images, cfg.image_size, cfg.image_size, cfg.in_channels))
    return euler(make_denoiser(model, params), x_init, euler_config).x


# ----------------------------------------------------------------------------------------------
# Optimiser, EMA, train state

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


def init_state(model: UNet, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
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


def batch_indices(seed: int, step: int, num_images: int, batch_size: int) -> np.ndarray:
    """Indices of the batch for update `step`: consecutive slices of a stream of per-epoch
    permutations (epoch e shuffled by numpy's default_rng([seed, e]))."""
    epoch, offset = np.divmod(np.arange(step * batch_size, (step + 1) * batch_size), num_images)
    return np.array([_permutation(seed, int(e), num_images)[o] for e, o in zip(epoch, offset)])


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


# ----------------------------------------------------------------------------------------------
# Validation: a fixed set of (image, t, noise), no flips, no dropout

class Validation(NamedTuple):
    images: np.ndarray       # uint8 (N, S, S, C)
    t: np.ndarray            # int32 (N,), evenly spread over [0, T)
    noise: np.ndarray        # float32 (N, S, S, C) from PRNGKey(0)


def make_validation(images: np.ndarray, diffusion: Diffusion) -> Validation:
    n = len(images)
    t = np.floor((np.arange(n) + 0.5) * diffusion.num_timesteps / n).astype(np.int32)
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(0), images.shape, jnp.float32))
    return Validation(images=images, t=t, noise=noise)


def validation_loss(loss_batch: Callable, params, val: Validation, batch_size: int,
                    put: Callable = lambda x: x) -> float:
    """Mean per-image loss over the whole validation set (chunks padded to batch_size)."""
    n = len(val.images)
    total = 0.0
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size) % n
        losses = np.asarray(loss_batch(params, put(val.images[idx]), put(val.t[idx]), put(val.noise[idx])))
        keep = min(batch_size, n - start)
        total += float(np.sum(losses[:keep], dtype=np.float64))
    return total / n


# ----------------------------------------------------------------------------------------------
# Run folder: checkpoints, metrics, samples, progress

def _checkpoint_manager(run: Path, read_only: bool = False) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        (run / "checkpoints").resolve(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=not read_only, read_only=read_only,
                                             enable_async_checkpointing=False))


def hardware_description() -> str:
    devices = jax.local_devices()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()}); host {cpu}, "
            f"{os.cpu_count()} logical CPUs")


class Progress:
    """One status line: rewritten in place on a terminal, printed every `every` steps otherwise."""

    def __init__(self, total: int, every: int, stream=sys.stderr):
        self.total, self.every, self.stream = total, every, stream
        self.tty = stream.isatty()

    def update(self, step: int, loss: float, images_per_s: float, lr: float) -> None:
        width = 30
        done = int(width * step / self.total)
        line = (f"[{'#' * done}{'.' * (width - done)}] step {step}/{self.total}  loss {loss:.4f}  "
                f"{images_per_s:.1f} img/s  lr {lr:.2e}")
        if self.tty:
            self.stream.write("\r" + line)
            self.stream.flush()
        elif step % self.every == 0 or step == self.total:
            print(line, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        print(("\n" if self.tty else "") + text, file=self.stream, flush=True)


def _grid(x: np.ndarray) -> np.ndarray:
    """(n*n, S, S, C) -> (n*S, n*S, C)."""
    n = int(np.sqrt(len(x)))
    s, c = x.shape[1], x.shape[3]
    return x.reshape(n, n, s, s, c).transpose(0, 2, 1, 3, 4).reshape(n * s, n * s, c)


# ----------------------------------------------------------------------------------------------
# Training driver

def train(data_dir: str | os.PathLike, run: str | os.PathLike, model_config: UNetConfig,
          tcfg: TrainConfig, cache_dir: str | os.PathLike | None = "data_cache",
          split: data.Split = data.Split(), log: Callable[[str], None] | None = None,
          init: str | os.PathLike | None = None) -> TrainState:
    """Train (or resume) in `run` until tcfg.num_steps updates (or tcfg.time_limit_minutes of
    training in this call); returns the final state.

    init: weights folder (spgd_jax.checkpoint format, e.g. an export) whose params start a NEW run,
    as both the weights and their EMA, with a fresh optimiser; refused when `run` already holds
    checkpoints (that run resumes instead). Writes checkpoints every tcfg.checkpoint_minutes and at
    the end (or on SIGINT/SIGTERM).
    """
    run = Path(run)
    progress = Progress(tcfg.num_steps, tcfg.log_every)
    log = log or progress.message
    names = data.list_images(data_dir)
    train_names, val_names = data.split_names(names, split)
    if not train_names or not val_names:
        raise ValueError(f"{len(names)} image(s) in {str(data_dir)!r} give {len(train_names)} training and "
                         f"{len(val_names)} validation images (every {split.every}th file from index "
                         f"{split.offset} is held out); add images")
    devices = jax.local_devices()
    if tcfg.batch_size % len(devices):
        raise ValueError(f"batch_size {tcfg.batch_size} must be a multiple of the {len(devices)} local "
                         f"devices (data parallel); change --set batch_size=...")

    run.mkdir(parents=True, exist_ok=True)
    mngr = _checkpoint_manager(run)
    meta = {"model": model_config.to_dict(), "train": dataclasses.asdict(tcfg),
            "data": str(Path(data_dir).resolve()), "split": dataclasses.asdict(split),
            "num_train": len(train_names), "num_val": len(val_names),
            "train_seconds": 0.0, "hardware": [], "train_loss": None, "val_loss": None, "init": None}
    resume_step = mngr.latest_step()
    if init is not None:
        if resume_step is not None:
            mngr.close()
            raise ValueError(f"{str(run)!r} already holds checkpoints (step {resume_step}): it resumes from them, "
                             f"so --init cannot apply; drop --init, or use a new --run folder")
        init_params, init_config = checkpoint.load(init)
        if init_config.to_dict() != model_config.to_dict():
            mngr.close()
            diff = {k: (v, model_config.to_dict().get(k)) for k, v in init_config.to_dict().items()
                    if model_config.to_dict().get(k) != v}
            raise ValueError(f"--init weights {str(init)!r} have another architecture (weights, run): {diff}; "
                             f"pass the matching --model/--set options")
        meta["init"] = str(Path(init).resolve())
    if resume_step is not None:
        old = mngr.restore(resume_step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        try:
            _check_resumable(old, meta)
        except ValueError:
            mngr.close()
            raise
        meta.update({k: old[k] for k in ("train_seconds", "hardware", "train_loss", "val_loss", "init")
                     if k in old})
    hardware = hardware_description()
    if hardware not in meta["hardware"]:
        meta["hardware"].append(hardware)
    (run / "validation_split.txt").write_text("".join(n + "\n" for n in val_names))

    size = model_config.image_size
    train_images, _ = data.load_folder(data_dir, train_names, size, cache_dir, log)
    val_images, _ = data.load_folder(data_dir, val_names, size, cache_dir, log)
    val = make_validation(val_images, linear_schedule())

    fns = _jitted(model_config, dataclasses.replace(TrainConfig(), **{k: getattr(tcfg, k) for k in COMPILE_KEYS}),
                  tuple(devices))
    replicated, sharded = fns.replicated, fns.sharded
    if resume_step is None:
        state = init_state(UNet(model_config), make_optimizer(tcfg), jax.random.PRNGKey(tcfg.seed))
        if init is not None:
            state = state._replace(params=init_params, ema_params=jax.tree.map(jnp.copy, init_params),
                                   opt_state=make_optimizer(tcfg).init(init_params))
            log(f"initialised from {init}")
        state = jax.device_put(state, replicated)
    else:
        state = _restore_state(mngr, resume_step, model_config, tcfg, replicated)
        log(f"resumed from {run / 'checkpoints'} at step {resume_step}")
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    log(f"model: {num_params:,} parameters ({num_params * 4 / 1e6:.1f} MB float32); "
        f"{len(train_images)} training / {len(val_images)} validation images; {hardware}")

    step_fn, loss_batch, sample_fn = fns.step, fns.loss_batch, fns.sample
    lr_fn = learning_rate(tcfg)

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    metrics_file = open(run / "metrics.jsonl", "a")
    step = int(state.step)
    last_save_time = time.monotonic()
    interval_start, interval_losses, segment_start = time.monotonic(), [], time.monotonic()
    first_step = True
    base_seconds = meta["train_seconds"]

    def save():
        meta["train_seconds"] = base_seconds + time.monotonic() - segment_start
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                meta=ocp.args.JsonSave(meta)), force=True)
        mngr.wait_until_finished()
        log(f"checkpoint saved at step {step} ({run / 'checkpoints'})")

    def record(**values):
        metrics_file.write(json.dumps({"step": step, "wall_s": round(base_seconds + time.monotonic()
                                                                      - segment_start, 1), **values}) + "\n")
        metrics_file.flush()

    deadline = None if tcfg.time_limit_minutes is None else time.monotonic() + 60 * tcfg.time_limit_minutes
    try:
        while step < tcfg.num_steps and stop["signal"] is None:
            last = step + 1 == tcfg.num_steps or (deadline is not None and time.monotonic() > deadline)
            images = jax.device_put(train_images[batch_indices(tcfg.seed, step, len(train_images),
                                                               tcfg.batch_size)], sharded)
            state, metrics = step_fn(state, images)
            step += 1
            if first_step:  # includes compilation: reported once, kept out of images/s
                log(f"step {step}: loss {float(metrics['loss']):.4f} (first step of this session, with "
                    f"compilation: {time.monotonic() - interval_start:.1f} s)")
                first_step, interval_start = False, time.monotonic()
            else:
                interval_losses.append(metrics["loss"])
            if interval_losses and (step % tcfg.log_every == 0 or last or progress.tty):
                loss = float(np.mean([float(v) for v in interval_losses]))
                now = time.monotonic()
                ips = len(interval_losses) * tcfg.batch_size / max(now - interval_start, 1e-9)
                progress.update(step, loss, ips, float(lr_fn(step - 1)))
                if step % tcfg.log_every == 0 or last:
                    meta["train_loss"] = loss
                    record(loss=loss, images_per_s=round(ips, 2), grad_norm=float(metrics["grad_norm"]))
                interval_start, interval_losses = time.monotonic(), []
            if step % tcfg.val_every == 0 or last:
                meta["val_loss"] = validation_loss(loss_batch, state.ema_params, val, tcfg.batch_size,
                                                   lambda x: jax.device_put(x, sharded))
                record(val_loss=meta["val_loss"])
                log(f"step {step}: validation loss (EMA weights, {len(val.images)} images) "
                    f"{meta['val_loss']:.5f}")
                interval_start = time.monotonic()
            if step % tcfg.sample_every == 0 or last:
                grid = _grid(np.asarray(sample_fn(state.ema_params, jax.random.PRNGKey(1))))
                (run / "samples").mkdir(exist_ok=True)
                save_png(run / "samples" / f"step_{step:08d}.png", grid)
                interval_start = time.monotonic()
            if time.monotonic() - last_save_time > 60 * tcfg.checkpoint_minutes:
                save()
                last_save_time = interval_start = time.monotonic()
            if last and step < tcfg.num_steps:
                log(f"time limit of {tcfg.time_limit_minutes:g} min reached at step {step}; run the same "
                    f"command to continue")
                break
        if mngr.latest_step() != step:
            save()
        if stop["signal"] is not None:
            log(f"stopped by signal {stop['signal']} at step {step}; run the same command to resume")
    finally:
        metrics_file.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        mngr.close()
    return state


class _Functions(NamedTuple):
    replicated: NamedSharding     # weights, optimiser state
    sharded: NamedSharding        # batch axis split over the devices
    step: Callable                # (state, images uint8) -> (state, metrics); donates state
    loss_batch: Callable          # (params, images uint8, t, noise) -> per-image loss (B,)
    sample: Callable              # (params, key) -> images (num_samples, S, S, C)


COMPILE_KEYS = RESUME_INVARIANT + ("num_samples", "sample_steps")


@functools.lru_cache(maxsize=2)
def _jitted(model_config: UNetConfig, tcfg: TrainConfig, devices: tuple) -> _Functions:
    """The jitted functions of a run on a 1-D data-parallel mesh over `devices`; cached, so that
    a run resumed in the same process reuses the compilations (tcfg: only COMPILE_KEYS matter)."""
    mesh = Mesh(np.array(devices), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    model, diffusion = UNet(model_config), linear_schedule()
    step = jax.jit(make_train_step(model, diffusion, make_optimizer(tcfg), tcfg), donate_argnums=0,
                   in_shardings=(replicated, sharded), out_shardings=(replicated, replicated))
    loss_batch = jax.jit(lambda p, x, t, n: per_image_loss(model, diffusion, p, data.to_model_range(x), t, n, None),
                         in_shardings=(replicated, sharded, sharded, sharded), out_shardings=replicated)
    sample = jax.jit(functools.partial(sample_images, model, num_images=tcfg.num_samples,
                                       num_steps=tcfg.sample_steps), out_shardings=replicated)
    return _Functions(replicated, sharded, step, loss_batch, sample)


def _restore_state(mngr: ocp.CheckpointManager, step: int, model_config: UNetConfig, tcfg: TrainConfig,
                   sharding: NamedSharding) -> TrainState:
    """The TrainState of checkpoint `step`, placed with `sharding` (any device count may have saved it)."""
    abstract = jax.eval_shape(lambda: init_state(UNet(model_config), make_optimizer(tcfg), jax.random.PRNGKey(0)))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    return TrainState(*restored)


def _check_resumable(old: dict, new: dict) -> None:
    problems = []
    if old["model"] != new["model"]:
        diff = {k: (old["model"].get(k), v) for k, v in new["model"].items() if old["model"].get(k) != v}
        problems.append(f"model config differs (checkpoint, now): {diff}")
    for k in RESUME_INVARIANT:
        if old["train"][k] != new["train"][k]:
            problems.append(f"train.{k} differs: checkpoint {old['train'][k]!r}, now {new['train'][k]!r}")
    for k in ("split", "num_train", "num_val"):
        if old[k] != new[k]:
            problems.append(f"{k} differs: checkpoint {old[k]!r}, now {new[k]!r}")
    if problems:
        raise ValueError("cannot resume this run with these settings: " + "; ".join(problems)
                         + ". Use the original command, or a new --run folder.")


# ----------------------------------------------------------------------------------------------
# Export of the EMA weights and the model card numbers

def export(run: str | os.PathLike, out: str | os.PathLike, card: str | os.PathLike | None = None,
           step: int | None = None, overwrite: bool = False) -> dict:
    """Write the EMA params + config of checkpoint `step` (default: latest) of `run` to `out` with
    spgd_jax.checkpoint.save; copy validation_split.txt beside `out`; rewrite the block between
    CARD_BEGIN and CARD_END in `card`.  Returns the checkpoint's metadata."""
    run, out = Path(run), Path(out)
    if not (run / "checkpoints").is_dir():
        raise ValueError(f"{str(run)!r} has no checkpoints/ folder; pass the --run folder of a training run")
    mngr = _checkpoint_manager(run, read_only=True)
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
        raise ValueError(f"no checkpoint {'at step ' + str(step) if step is not None else ''} in "
                         f"{str(run / 'checkpoints')!r}; available steps: {list(mngr.all_steps())}")
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    model_config = UNetConfig.from_dict(meta["model"])
    replicated = NamedSharding(Mesh(np.array(jax.local_devices()), ("data",)), PartitionSpec())
    state = _restore_state(mngr, step, model_config, TrainConfig(**meta["train"]), replicated)
    mngr.close()
    checkpoint.save(out, state.ema_params, model_config, overwrite=overwrite)
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    if size_mb > MAX_WEIGHTS_MB:
        raise ValueError(f"exported weights {str(out)!r} take {size_mb:.1f} MB > {MAX_WEIGHTS_MB} MB; "
                         f"train a smaller model")
    shutil.copyfile(run / "validation_split.txt", out.parent / "validation_split.txt")
    meta = {**meta, "step": step, "weights_mb": size_mb,
            "num_params": sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.ema_params))}
    if card is not None:
        _update_card(Path(card), meta, out)
    return meta


def _update_card(card: Path, meta: dict, out: Path) -> None:
    if not card.exists():
        raise ValueError(f"model card {str(card)!r} does not exist; create it with the lines "
                         f"{CARD_BEGIN} and {CARD_END} where the numbers go")
    text = card.read_text()
    if CARD_BEGIN not in text or CARD_END not in text:
        raise ValueError(f"model card {str(card)!r} lacks the marker lines {CARD_BEGIN} / {CARD_END}")
    t = meta["train"]
    hours = meta["train_seconds"] / 3600
    block = "\n".join([
        CARD_BEGIN,
        f"| quantity | value |",
        f"|---|---|",
        f"| weights | `{out.name}` (EMA, decay {t['ema_decay']}), {meta['num_params']:,} parameters, "
        f"{meta['weights_mb']:.1f} MB |",
        *([f"| initialised from | `{meta['init']}` (its weights as weights and EMA, fresh optimiser) |"]
          if meta.get("init") else []),
        f"| training updates | {meta['step']:,} at batch {t['batch_size']} "
        f"({meta['step'] * t['batch_size'] / meta['num_train']:.1f} epochs of {meta['num_train']:,} images) |",
        f"| optimiser | Adam, lr {t['lr']:g} (linear warm-up {t['warmup_steps']} steps), "
        f"grad clip {t['grad_clip']}, seed {t['seed']} |",
        f"| hardware | {'; '.join(meta['hardware'])} |",
        f"| wall time | {hours:.1f} h of training |" if hours >= 1 else
        f"| wall time | {60 * hours:.1f} min of training |",
        f"| final training loss | {meta['train_loss']:.4f} (mean of the last {t['log_every']} updates) |"
        if meta["train_loss"] is not None else "| final training loss | not measured |",
        f"| final validation loss | {meta['val_loss']:.4f} (EMA weights, {meta['num_val']} held-out images, "
        f"fixed t and noise) |" if meta["val_loss"] is not None else "| final validation loss | not measured |",
        CARD_END])
    text = re.sub(re.escape(CARD_BEGIN) + ".*?" + re.escape(CARD_END), lambda m: block, text, flags=re.S)
    card.write_text(text)


# ----------------------------------------------------------------------------------------------
# Command line

def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _configs(args) -> tuple[UNetConfig, TrainConfig]:
    overrides = _parse_set(args.set)
    model_fields = set(UNetConfig.__dataclass_fields__)
    train_fields = set(TrainConfig.__dataclass_fields__)
    unknown = set(overrides) - model_fields - train_fields
    if unknown:
        raise ValueError(f"unknown --set key(s) {sorted(unknown)}; model keys: {sorted(model_fields)}; "
                         f"training keys: {sorted(train_fields)}")
    m = {k: v for k, v in overrides.items() if k in model_fields}
    m = {k: tuple(v) if isinstance(v, list) else v for k, v in m.items()}
    if args.image_size is not None:
        m["image_size"] = args.image_size
    model = dataclasses.replace(MODELS[args.model], **m)
    tr = {k: v for k, v in overrides.items() if k in train_fields}
    return model, TrainConfig(**tr)


def _epilog() -> str:
    """The --set keys with their defaults (model keys: the default64 preset's values), and the export command."""
    def listing(values: dict) -> str:
        return textwrap.fill(", ".join(f"{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}"
                                       for k, v in values.items()), 100, initial_indent="  ", subsequent_indent="  ")

    training = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    model = dataclasses.asdict(MODELS["default64"])
    return (f"--set keys, training (TrainConfig; default):\n{listing(training)}\n"
            f"--set keys, model (UNetConfig; the default64 preset's value, other presets differ):\n{listing(model)}\n\n"
            "Export: python -m spgd_jax.train export --run RUN --out weights/NAME")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "export":
        p = argparse.ArgumentParser(prog="python -m spgd_jax.train export",
                                    description="Export a run's EMA weights + config and update the model card.")
        p.add_argument("--run", required=True, help="training run folder (holds checkpoints/)")
        p.add_argument("--out", required=True, help="output weights folder, e.g. weights/default64")
        p.add_argument("--card", default=None, help="model card whose export block is rewritten "
                                                    "(default: MODEL_CARD.md beside --out, if present)")
        p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        a = p.parse_args(argv[1:])
        card = a.card
        if card is None and (Path(a.out).parent / "MODEL_CARD.md").exists():
            card = Path(a.out).parent / "MODEL_CARD.md"
        try:
            meta = export(a.run, a.out, card, a.step, a.overwrite)
        except (ValueError, FileExistsError) as e:
            p.error(str(e))
        print(f"exported step {meta['step']} EMA weights ({meta['weights_mb']:.1f} MB) to {a.out}"
              + (f"; updated {card}" if card else ""))
        return 0
    p = argparse.ArgumentParser(prog="python -m spgd_jax.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_epilog())
    p.add_argument("--data", required=True, help="folder of training images (jpg/png, searched recursively)")
    p.add_argument("--run", default="runs/train", help="run folder: checkpoints, metrics, samples "
                                                       "(resumes if it holds checkpoints)")
    p.add_argument("--model", default="default64", choices=sorted(MODELS), help="architecture preset")
    p.add_argument("--image-size", type=int, default=None, help="override the preset's image size")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model (UNetConfig) or training (TrainConfig) field; JSON values, "
                        "e.g. --set num_channels=32 --set channel_mult=[1,2,2] --set batch_size=64")
    p.add_argument("--cache-dir", default="data_cache", help="where decoded images are cached (.npy)")
    p.add_argument("--init", default=None, metavar="WEIGHTS",
                   help="start a new run from these weights (e.g. weights/default64): params and EMA, "
                        "fresh optimiser")
    a = p.parse_args(argv)
    try:
        model_config, tcfg = _configs(a)
        train(a.data, a.run, model_config, tcfg, cache_dir=a.cache_dir, init=a.init)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
