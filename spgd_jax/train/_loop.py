"""The training run: start (fresh, from --init weights, or resumed), then update until done, validating,
sampling, logging and checkpointing on the way.

The training set goes to the devices once; each call of the compiled update does tcfg.steps_per_call
updates, gathering its batches there.  The batch is split over the local devices (a 1-D
`spgd_jax.sharding.batch_mesh`), the weights, optimiser state and training set are replicated; the code
is the same on CPU and GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from spgd_jax import sharding
from spgd_jax.io import checkpoint
from spgd_jax.models.adm import UNet, UNetConfig
from spgd_jax.train import _checkpoints as checkpoints
from spgd_jax.train import _data as data
from spgd_jax.train import _report as report
from spgd_jax.train._diffusion import linear_schedule, per_image_loss, sample_images
from spgd_jax.train._state import (RESUME_INVARIANT, TrainConfig, TrainState, init_state, learning_rate,
                                   make_optimizer, make_train_steps)
from spgd_jax.train._validation import Validation, make_validation, validation_loss


def train(data_dir: str | os.PathLike, run: str | os.PathLike, model_config: UNetConfig,
          tcfg: TrainConfig, cache_dir: str | os.PathLike | None = "data_cache",
          split: data.Split = data.Split(), log: Callable[[str], None] | None = None,
          init: str | os.PathLike | None = None) -> TrainState:
    """Train (or resume) in `run` until tcfg.num_steps updates (or tcfg.time_limit_minutes of
    training in this call); returns the final state.

    init: weights folder (spgd_jax.io.checkpoint format, e.g. an export) whose params start a NEW run,
    as both the weights and their EMA, with a fresh optimiser; refused when `run` already holds
    checkpoints (that run resumes instead). Writes checkpoints every tcfg.checkpoint_minutes and at
    the end (or on SIGINT/SIGTERM).
    """
    run = Path(run)
    progress = report.Progress(tcfg.num_steps, tcfg.log_every)
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
    mngr = checkpoints.manager(run)
    try:
        meta = checkpoints.new_meta(model_config, tcfg, data_dir, split, len(train_names), len(val_names),
                                    data.source_counts(names))
        resume_step = mngr.latest_step()
        init_params = None if init is None else _init_params(init, model_config, run, resume_step)
        if init is not None:
            meta["init"] = str(Path(init).resolve())
        if resume_step is not None:
            old = checkpoints.restore_meta(mngr, resume_step)
            checkpoints.check_resumable(old, meta)
            meta.update({k: old[k] for k in checkpoints.CARRIED_OVER if k in old})
        hardware = checkpoints.hardware_description()
        if hardware not in meta["hardware"]:
            meta["hardware"].append(hardware)
        report.write_validation_split(run, val_names)

        size = model_config.image_size
        train_images, _ = data.load_folder(data_dir, train_names, size, cache_dir, log)
        val_images, _ = data.load_folder(data_dir, val_names, size, cache_dir, log)
        fns = _compiled(model_config, _compile_config(tcfg), tuple(devices))
        if resume_step is None:
            state = init_state(UNet(model_config), make_optimizer(tcfg), jax.random.PRNGKey(tcfg.seed), init_params)
            if init is not None:
                log(f"initialised from {init}")
            state = jax.device_put(state, fns.replicated)
        else:
            state = checkpoints.restore_state(mngr, resume_step, model_config, tcfg, fns.replicated)
            log(f"resumed from {run / 'checkpoints'} at step {resume_step}")
        num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
        log(f"model: {num_params:,} parameters ({num_params * 4 / 1e6:.1f} MB float32); "
            f"{len(train_images)} training / {len(val_images)} validation images; {hardware}")
        dataset = jax.device_put(train_images, fns.replicated)  # once: batches are gathered on the device
        return _updates(state, run, mngr, meta, tcfg, fns, dataset, make_validation(val_images, linear_schedule()),
                        progress, log)
    finally:
        mngr.close()


def _init_params(init: str | os.PathLike, model_config: UNetConfig, run: Path, resume_step: int | None):
    """The params of the --init weights, refused for a run that resumes or for another architecture."""
    if resume_step is not None:
        raise ValueError(f"{str(run)!r} already holds checkpoints (step {resume_step}): it resumes from them, "
                         f"so --init cannot apply; drop --init, or use a new --run folder")
    params, saved = checkpoint.load(init)
    config = saved.config
    if config.to_dict() != model_config.to_dict():
        diff = {k: (v, model_config.to_dict().get(k)) for k, v in config.to_dict().items()
                if model_config.to_dict().get(k) != v}
        raise ValueError(f"--init weights {str(init)!r} have another architecture (weights, run): {diff}; "
                         f"pass the matching --model/--set options")
    return params


def _updates(state: TrainState, run: Path, mngr, meta: dict, tcfg: TrainConfig, fns: _Functions,
             dataset: jax.Array, val: Validation, progress: report.Progress,
             log: Callable[[str], None]) -> TrainState:
    """The update loop from `state` to tcfg.num_steps (or the time limit, or SIGINT/SIGTERM), in calls of
    tcfg.steps_per_call updates on the training set `dataset` (uint8, on the devices); checkpoints at the
    end and every tcfg.checkpoint_minutes. Returns the last state.

    The host stays at most one call ahead of the device: after queueing call i it waits for call i-1, so
    the next call's batch indices are computed while the device works, and the time limit and images/s
    measure the device's progress.  Losses are read back only when a metrics record is written."""
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    loop = _UpdateLoop(state, run, mngr, meta, tcfg, fns, dataset, val, progress, log)
    deadline = None if tcfg.time_limit_minutes is None else time.monotonic() + 60 * tcfg.time_limit_minutes
    try:
        while loop.step < tcfg.num_steps and stop["signal"] is None:
            if not loop.update(deadline):
                break
        if mngr.latest_step() != loop.step:
            loop.save()
        if stop["signal"] is not None:
            log(f"stopped by signal {stop['signal']} at step {loop.step}; run the same command to resume")
    finally:
        loop.metrics_log.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    return loop.state


class _UpdateLoop:
    """An update loop's state: the train state and its step, the metrics of the calls since the last record
    (device arrays (k,)), the call still in flight, the training clock; update() makes one call and does
    what falls due after it (metrics record, validation, sample grid, checkpoint)."""

    def __init__(self, state: TrainState, run: Path, mngr, meta: dict, tcfg: TrainConfig, fns: _Functions,
                 dataset: jax.Array, val: Validation, progress: report.Progress, log: Callable[[str], None]):
        self.state, self.run, self.mngr, self.meta, self.tcfg, self.fns = state, run, mngr, meta, tcfg, fns
        self.dataset, self.val, self.progress, self.log = dataset, val, progress, log
        self.lr_fn = learning_rate(tcfg)
        self.metrics_log = report.MetricsLog(run)
        self.step = int(state.step)
        self.last_save_time = self.segment_start = time.monotonic()
        self.base_seconds = meta["train_seconds"]
        self.clock = _TrainingClock()  # training time of this session, compilation and events excluded
        self.interval: list[dict] = []  # metrics of the calls since the last record (device arrays (k,))
        self.previous = None  # the call before the latest one, until it has been waited for
        self.compiled = False

    def wall_s(self) -> float:
        """Seconds of the run so far, earlier sessions included."""
        return self.base_seconds + time.monotonic() - self.segment_start

    def save(self) -> None:
        self.meta["train_seconds"] = self.wall_s()
        checkpoints.save(self.mngr, self.step, self.state, self.meta)
        self.log(f"checkpoint saved at step {self.step} ({self.run / 'checkpoints'})")

    def update(self, deadline: float | None) -> bool:
        """One call of tcfg.steps_per_call updates (fewer at the end), then what falls due; False when the
        time limit (deadline, time.monotonic() seconds) ended the run before tcfg.num_steps."""
        tcfg = self.tcfg
        k = min(tcfg.steps_per_call, tcfg.num_steps - self.step)
        indices = jax.device_put(data.batch_indices_block(tcfg.seed, self.step, k, int(self.dataset.shape[0]),
                                                          tcfg.batch_size), self.fns.indices)
        call_start = time.monotonic()
        self.state, metrics = self.fns.steps(self.state, self.dataset, indices)
        before, self.step = self.step, self.step + k
        self.interval.append(metrics)
        if not self.compiled:  # the first call includes compilation: reported once, kept out of images/s
            self.log(f"step {self.step}: loss {float(metrics['loss'][-1]):.4f} (first call of this session: {k} "
                     f"update(s) with compilation, {time.monotonic() - call_start:.1f} s)")
            self.compiled = True
            self.clock.start()
        else:
            self.clock.add_images(k * tcfg.batch_size)
            if self.previous is not None:
                jax.block_until_ready(self.previous)
            self.previous = metrics
        last = self.step >= tcfg.num_steps or (deadline is not None and time.monotonic() > deadline)
        crossed = lambda every: self.step // every > before // every
        record = crossed(tcfg.log_every) or last
        if self.interval and (record or self.progress.tty):
            self.record_metrics(record)
        self.due_events(crossed, last)
        if last and self.step < tcfg.num_steps:
            self.log(f"time limit of {tcfg.time_limit_minutes:g} min reached at step {self.step}; run the same "
                     f"command to continue")
            return False
        return True

    def record_metrics(self, record: bool) -> None:
        """Reads the losses of the calls since the last record (waits for the device) into the progress line
        and, when `record`, into the metrics log and meta; starts a new interval."""
        losses = np.concatenate([np.asarray(m["loss"]) for m in self.interval])  # waits for the device
        self.clock.stop()
        ips = self.clock.interval_rate()  # nan for the first call alone (compilation)
        if self.clock.session_images:
            self.meta["images_per_s"] = round(self.clock.session_rate(), 2)
        loss = float(np.mean(losses))
        self.progress.update(self.step, loss, ips, float(self.lr_fn(self.step - 1)))
        if record:
            self.meta["train_loss"], self.meta["train_loss_updates"] = loss, len(losses)
            rate = {} if np.isnan(ips) else {"images_per_s": round(ips, 2)}
            self.metrics_log.record(self.step, self.wall_s(), loss=loss, **rate,
                                    grad_norm=float(np.asarray(self.interval[-1]["grad_norm"])[-1]))
        self.interval, self.previous = [], None
        self.clock.start(new_interval=True)

    def due_events(self, crossed: Callable[[int], bool], last: bool) -> None:
        """The validation loss, sample grid and checkpoint that fall due (crossed(every): this call crossed a
        multiple of `every` steps; last: the run's last call), with the training clock stopped."""
        tcfg, fns = self.tcfg, self.fns
        if crossed(tcfg.val_every) or last:
            self.clock.stop(self.state.step)
            self.meta["val_loss"] = validation_loss(fns.loss_batch, self.state.ema_params, self.val, tcfg.batch_size,
                                                    lambda x: jax.device_put(x, fns.sharded))
            self.metrics_log.record(self.step, self.wall_s(), val_loss=self.meta["val_loss"])
            self.log(f"step {self.step}: validation loss (EMA weights, {len(self.val.images)} images) "
                     f"{self.meta['val_loss']:.5f}")
            self.clock.start()
        if crossed(tcfg.sample_every) or last:
            self.clock.stop(self.state.step)
            report.write_sample_grid(self.run, self.step, np.asarray(fns.sample(self.state.ema_params,
                                                                                jax.random.PRNGKey(1))))
            self.clock.start()
        if time.monotonic() - self.last_save_time > 60 * tcfg.checkpoint_minutes:
            self.clock.stop(self.state.step)
            self.save()
            self.last_save_time = time.monotonic()
            self.clock.start()


class _TrainingClock:
    """Seconds and images of training, in the current metrics interval and in the whole session; stop()
    and start() bracket the work that is not training (stop waits for the device first, so that no call
    in flight is billed to the pause)."""

    def __init__(self):
        self.running_since = None
        self.interval_seconds = self.session_seconds = 0.0
        self.interval_images = self.session_images = 0

    def start(self, new_interval: bool = False) -> None:
        if new_interval:
            self.interval_seconds, self.interval_images = 0.0, 0
        self.running_since = time.monotonic()

    def stop(self, wait_for=None) -> None:
        """Stops the clock once `wait_for` (the latest call's output) is computed."""
        if self.running_since is not None:
            jax.block_until_ready(wait_for)
            elapsed = time.monotonic() - self.running_since
            self.interval_seconds += elapsed
            self.session_seconds += elapsed
            self.running_since = None

    def add_images(self, n: int) -> None:
        self.interval_images += n
        self.session_images += n

    def interval_rate(self) -> float:
        """Images per second in the current interval; nan when it has none (its calls compiled)."""
        return self.interval_images / max(self.interval_seconds, 1e-9) if self.interval_images else float("nan")

    def session_rate(self) -> float:
        return self.session_images / max(self.session_seconds, 1e-9)


class _Functions(NamedTuple):
    replicated: NamedSharding     # weights, optimiser state, the training set
    sharded: NamedSharding        # batch axis split over the devices
    indices: NamedSharding        # (K, B) batch indices: the batch axis split over the devices
    steps: Callable               # (state, dataset uint8, indices (K, B)) -> (state, metrics (K,)); donates state
    loss_batch: Callable          # (params, images uint8, t, noise) -> per-image loss (B,)
    sample: Callable              # (params, key) -> images (num_samples, S, S, C)


# The training settings the compiled functions depend on (the rest only steers the loop).
COMPILE_KEYS = RESUME_INVARIANT + ("lr_schedule", "min_lr_ratio", "num_samples", "sample_steps")


def _compile_config(tcfg: TrainConfig) -> TrainConfig:
    """tcfg reduced to COMPILE_KEYS and the cosine horizon (other fields at their defaults), so that runs
    differing only in the loop's settings (num_steps with a horizon that stays, steps_per_call, ...) share
    their compilations."""
    return dataclasses.replace(TrainConfig(), **{k: getattr(tcfg, k) for k in COMPILE_KEYS},
                               decay_steps=tcfg.decay_horizon)


@functools.lru_cache(maxsize=2)
def _compiled(model_config: UNetConfig, tcfg: TrainConfig, devices: tuple) -> _Functions:
    """The jitted functions of a run on a 1-D data-parallel mesh over `devices`; cached, so that
    a run resumed in the same process reuses the compilations (tcfg: from _compile_config)."""
    mesh = sharding.batch_mesh(devices)
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXIS))
    indices = NamedSharding(mesh, PartitionSpec(None, sharding.BATCH_AXIS))
    model, diffusion = UNet(model_config), linear_schedule()
    steps = jax.jit(make_train_steps(model, diffusion, make_optimizer(tcfg), tcfg, sharded), donate_argnums=0,
                    in_shardings=(replicated, replicated, indices), out_shardings=(replicated, replicated))
    loss_batch = jax.jit(lambda p, x, t, n: per_image_loss(model, diffusion, p, data.to_model_range(x), t, n, None),
                         in_shardings=(replicated, sharded, sharded, sharded), out_shardings=replicated)
    sample = jax.jit(functools.partial(sample_images, model, num_images=tcfg.num_samples,
                                       num_steps=tcfg.sample_steps), out_shardings=replicated)
    return _Functions(replicated, sharded, indices, steps, loss_batch, sample)
