"""The quality benchmark's sampling: ground-truth images, measurements, the compiled programs, `generate`.

Part of benchmarks/quality.py (run it as `python -m benchmarks.quality`). Measurements and sampler keys come
from the seed as in the restore command (spgd_jax.samplers.run_keys), and K posterior samples per image are
drawn as it draws them (posterior_keys), so the same seed gives the same noise in both.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.compute import COMPUTE
from benchmarks.quality_jobs import TABLE1_TASKS, Job, plan, table1_methods
from spgd_jax import default_weights_path, make_denoiser, metrics, models, operators
from spgd_jax.io import checkpoint, images
from spgd_jax.restore.manifest import Manifest
from spgd_jax.samplers import (SAMPLERS, forward_for, image_keys, nfe, posterior_keys, posterior_mean, run_keys,
                               sample, sampler_of, sweep)

WIDEN_STEPS = 3  # values a tuning sweep may add past its edge when its pick sits there
WIDEN_MIN_GAIN_DB = 0.01  # ... and beats the value next to it by at least this mean tuning PSNR


def load_split_images(data: Path, split: Path, count: int, size: int) -> tuple[np.ndarray, list[str]]:
    """uint8 (count, size, size, 3): the first `count` images of the split file, preprocessed."""
    needs = (f"--data DIR must be the folder that holds the face folders named in {split} (celeba/, utkface/: "
             "the default prior's training data, which is not part of the repository; weights/MODEL_CARD.md says "
             "where it comes from)")
    if not data.is_dir():
        raise SystemExit(f"error: data folder {data} does not exist; {needs}")
    names = [n for n in split.read_text().split("\n") if n.strip()][:count]
    if len(names) < count:
        raise SystemExit(f"error: {split} lists {len(names)} images, fewer than {count}")
    missing = [n for n in names if not (data / n).is_file()]
    if missing:
        raise SystemExit(f"error: {len(missing)} of the {count} images are not in {data} (e.g. {missing[0]}); {needs}")
    return np.stack([images.to_uint8(images.load_image(data / n, size)) for n in names]), names


def read_images(path: Path, count: int) -> tuple[np.ndarray, list[str]]:
    """Ground truth from an `images` npz: (x in [-1, 1] float32 (count, S, S, 3), names)."""
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist; make it with `python benchmarks/quality.py images`")
    with np.load(path) as f:
        x, names = f["images"], [str(n) for n in f["names"]]
    if len(x) < count:
        raise SystemExit(f"error: {path} holds {len(x)} images; need --test + --tune = {count}")
    return x[:count].astype(np.float32) / 127.5 - 1.0, names[:count]


def degrade(task: str, x: np.ndarray, seed: int):
    """(operator, params, y): per-image operator parameters and noise from `seed` (image k's depend
    only on k and the seed, so a subset of the images gets the same measurements)."""
    operator = operators.get(task, x.shape[1])
    key_params, key_noise, _ = run_keys(seed)
    params = operator.init_params(key_params, len(x), x.shape[1])
    return operator, params, operator.measure(key_noise, jnp.asarray(x), params)


def sampler_keys(seed: int, count: int) -> jax.Array:
    """One sampler key per image, (count,): image k's depends on k and the seed only."""
    return image_keys(run_keys(seed)[2], count)


def make_program(unet_config, operator, config, x_shape, dtype: str, samples: int = 1):
    """jit((unet_params, y, op_params, keys, values (L,) or None) -> (x (L, B, H, W, C), diverged (L, B))).

    values: the config's step sizes (a sweep), or None for one run of the config as it is (L = 1).
    unet_config: the network's config (any registered family's; the prior's is an ADM UNetConfig).
    samples > 1: x is the posterior mean of that many samples per image (posterior_keys: the restore
    command's samples), over those that did not diverge; diverged if every one of them diverged. The
    samples run one after another (lax.map), so the memory is that of one sample per image. dtype: a key of
    benchmarks.compute.COMPUTE."""
    forward = forward_for(config, operator)
    network_dtype, precision = COMPUTE[dtype]

    def one_sample(denoiser, y, op_params, keys, values):
        if values is None:
            result = sample(denoiser, forward, y, keys, config, op_params, x_shape=x_shape)
            return result.x[None], result.diverged[None]
        result = sweep(denoiser, forward, y, keys, config, values, op_params, x_shape=x_shape)
        return result.x, result.diverged

    def program(unet_params, y, op_params, keys, values):
        with jax.default_matmul_precision(precision):  # set while tracing, in whichever thread traces
            denoiser = make_denoiser(unet_config, unet_params, dtype=network_dtype)
            if samples == 1:
                return one_sample(denoiser, y, op_params, keys, values)
            by_sample = jnp.moveaxis(posterior_keys(keys, samples).reshape(len(y), samples), 1, 0)  # (K, B)
            x, diverged = jax.lax.map(lambda k: one_sample(denoiser, y, op_params, k, values), by_sample)
            return posterior_mean(jnp.moveaxis(x, 0, -4), jnp.moveaxis(diverged, 0, -1))

    return jax.jit(program)


def weights_path(args) -> Path:
    """--weights, or the default prior (package data)."""
    return Path(args.weights) if args.weights else default_weights_path()


def read_config(path: Path):
    """The network config of a checkpoint directory, or of its config.json (the file alone: generate may
    compile before the weights beside it exist)."""
    return checkpoint.load_config(path.parent if path.name == checkpoint.CONFIG_FILE else path).config


def make_images(args) -> int:
    size = read_config(weights_path(args)).image_size
    x, names = load_split_images(Path(args.data), Path(args.split), args.count, size)
    np.savez(args.out, images=x, names=np.asarray(names))
    print(f"wrote {len(x)} images of {size} px to {args.out}")
    return 0


def _jobs(args, tasks: tuple[str, ...]) -> tuple[list[Job], list[Job]]:
    """(the full plan, the jobs selected by --tables and --jobs); SystemExit for unknown --methods."""
    methods = table1_methods() if args.methods == "all" else tuple(m for m in args.methods.split(",") if m)
    unknown = [m for m in methods if m not in SAMPLERS or m == "spgd"]
    if unknown:
        raise SystemExit(f"error: --methods {','.join(unknown)}: not a registered restoring sampler other than "
                         f"spgd; choose from {','.join(table1_methods())}")
    full_plan = plan(args.steps, args.warmup, tasks, args.lr_factors, args.zeta_factors, methods, args.method_factors)
    tables = args.tables.split(",") if args.tables else None
    jobs = [j for j in full_plan
            if (tables is None or j.table in tables or (j.tune_only and "1" in tables))
            and (not args.jobs or any(j.name.startswith(p) for p in args.jobs.split(",")))]
    if args.tune == 0 and any(j.values and len(j.values) > 1 for j in jobs):
        raise SystemExit("error: sweeping needs tuning images: pass --tune > 0, or one factor per sweep")
    return full_plan, jobs


def _load_weights(weights: Path, unet_config, started: float, budget_s: float):
    """The weights' params once they exist (waiting for a prior still training); SystemExit past the budget
    or for another architecture than the compiled one."""
    while not (weights / checkpoint.CONFIG_FILE).exists():
        if time.monotonic() - started > budget_s:
            raise SystemExit(f"error: no weights at {weights} within the budget")
        time.sleep(2)
    time.sleep(1)
    unet_params, loaded = checkpoint.load(weights)
    if loaded.config != unet_config:
        raise SystemExit(f"error: {weights} holds another architecture than the compiled one")
    return unet_params


# What a run folder's jobs share; a generate call into a folder holding another run is refused.
RUN_KEYS = ("unet_config", "seed", "test", "tune", "names", "steps", "warmup")


def _earlier_jobs(out: Path, manifest: dict) -> dict:
    """The jobs of earlier generate calls into `out` (kept: a run's jobs may be run a few per call), after
    checking that they belong to the same run as `manifest`; SystemExit naming what differs otherwise."""
    path = out / "manifest.json"
    if not path.exists():
        return {}
    earlier, now = json.loads(path.read_text()), json.loads(json.dumps(manifest))
    changed = [key if isinstance(now[key], (dict, list)) else f"{key}: {earlier.get(key)!r} -> {now[key]!r}"
               for key in RUN_KEYS if earlier.get(key) != now[key]]
    if changed:
        raise SystemExit(f"error: {out} holds a run with other settings ({'; '.join(changed)}); give the same "
                         "settings to add jobs to it, or another --out (runs of other jobs are joined with `merge`)")
    return earlier.get("jobs", {})


class Generation:
    """One generate run: the images, measurements and keys, the programs compiled on a thread pool, and the
    manifest the jobs' results go into."""

    def __init__(self, args):
        self.args, self.out, self.started = args, Path(args.out), time.monotonic()
        self.out.mkdir(parents=True, exist_ok=True)
        self.n_test, self.n_all = args.test, args.test + args.tune
        self.x, self.names = read_images(Path(args.images), self.n_all)
        self.weights = weights_path(args)
        self.unet_config = read_config(Path(args.config) if args.config else self.weights)
        size = self.unet_config.image_size
        if self.x.shape[1] != size:
            raise SystemExit(f"error: the images are {self.x.shape[1]} px, the model {size} px")
        self.x_shape = (size, size, 3)
        tasks = tuple(args.tasks.split(",")) if args.tasks else TABLE1_TASKS
        self.full_plan, self.jobs = _jobs(args, tasks)
        self.measurements = {task: degrade(task, self.x, args.seed) for task in tasks}
        self.keys = sampler_keys(args.seed, self.n_all)
        self.manifest = {"weights": str(self.weights), "unet_config": self.unet_config.to_dict(), "seed": args.seed,
                         "test": self.n_test, "tune": args.tune, "names": self.names, "device": str(jax.devices()[0]),
                         "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""), "steps": args.steps,
                         "warmup": args.warmup, "jobs": {}}
        self.manifest["jobs"] = _earlier_jobs(self.out, self.manifest)

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f} s] {text}", flush=True)

    def compile(self, job: Job):
        operator = self.measurements[job.task][0]
        abstract = jax.eval_shape(lambda: models.family_of(self.unet_config).init(self.unet_config, jax.random.key(0)))
        swept = sampler_of(job.config).step_size is not None
        values = jax.ShapeDtypeStruct((len(job.values or (None,)),), jnp.float32) if swept else None
        program = make_program(self.unet_config, operator, job.config, self.x_shape, job.dtype, job.samples)
        rows = job.rows(self.n_test, self.n_all)
        one_batch = lambda a: a[: self.args.batch or rows.stop - rows.start]  # --batch: that many images a call
        _, op_params, y = self.measurements[job.task]
        return program.lower(abstract, one_batch(y), jax.tree.map(one_batch, op_params), one_batch(self.keys),
                             values).compile()

    def batch_runner(self, program, unet_params, task: str, rows: slice, step_sizes):
        """run_batch(index (batch,)) -> (x (L, batch, H, W, C), psnr (L, batch), diverged (L, batch)) over the given
        rows of the task's measurements, as restore_rows calls it; step_sizes (L,) float32, or None."""
        _, op_params, y = self.measurements[task]
        y, op_params, keys, truth = y[rows], jax.tree.map(lambda a: a[rows], op_params), self.keys[rows], self.x[rows]

        def run_batch(index: np.ndarray):
            take = lambda a: a[index]
            restored, diverged = program(unet_params, take(y), jax.tree.map(take, op_params), take(keys), step_sizes)
            return np.asarray(restored), np.asarray(metrics.psnr(restored, truth[index])), np.asarray(diverged)

        return run_batch

    def settings(self, config: dict, values, dtype: str, samples: int, rows: slice) -> dict:
        """What a job's per-image rows were restored with (a resumed run must match it)."""
        return {"config": config, "values": [None if v is None else float(v) for v in values], "dtype": dtype,
                "samples": samples, "seed": self.args.seed, "weights": str(self.weights),
                "images": self.names[rows], "batch": self.args.batch}

    def run_job(self, job: Job, program, unet_params, values) -> None:
        """Runs one compiled job over its images and records its restorations, PSNR and pick."""
        rows = job.rows(self.n_test, self.n_all)
        step_sizes = None if values == (None,) else jnp.asarray(values, jnp.float32)
        run_batch = self.batch_runner(program, unet_params, job.task, rows, step_sizes)
        tested = 0 if job.tune_only else self.n_test  # the leading test images among the rows
        config = {"type": type(job.config).__name__, **dataclasses.asdict(job.config)}
        settings = self.settings(config, values, job.dtype, job.samples, rows)
        count = rows.stop - rows.start
        scores, diverged, restored, seconds = restore_rows(self.out / "rows" / job.name, settings, self.names[rows],
                                                           run_batch, self.args.batch or count, tested, self.log)
        tuning = scores if job.tune_only else scores[:, self.n_test:]
        best = int(np.argmax(np.mean(tuning, axis=1))) if len(values) > 1 else 0
        restored = restored[best] if tested else np.zeros((0, *self.x_shape), np.uint8)
        np.savez_compressed(self.out / f"{job.name}.npz", restored=restored,
                            restored_float_psnr=scores[best, :tested], psnr=scores, diverged=diverged,
                            values=np.asarray([v for v in values if v is not None], np.float64))
        self.manifest["jobs"][job.name] = {
            "table": job.table, "row": job.row, "task": job.task, "dtype": job.dtype, "config": config,
            "values": list(values), "picked": values[best], "tuned_by": job.tuned_by, "seconds": seconds,
            "nfe_per_image": job.samples * nfe(job.config), "images": count * len(values), "samples": job.samples,
            "tune_only": job.tune_only, "device": self.manifest["device"], "jax": self.manifest["jax"],
            "tune": self.args.tune}
        (self.out / "manifest.json").write_text(json.dumps(self.manifest, indent=1) + "\n")
        tune_note = (f", tuning PSNR by value {np.round(np.mean(tuning, 1), 2).tolist()}"
                     if job.values and self.args.tune else "")
        tested_note = f"test PSNR {np.mean(scores[best, :tested]):.2f} dB" if tested else "tuning images only"
        shown = "-" if values[best] is None else f"{values[best]:g}"
        self.log(f"{job.name}: value {shown}, {tested_note}, "
                 f"{int(diverged[best].sum())} diverged ({'-' if seconds is None else f'{seconds:.1f}'} s{tune_note})")

    def widen(self, name: str, program, unet_params) -> float:
        """Extends tuning sweep `name` while its best value sits on the grid's edge, ahead of its neighbour by
        WIDEN_MIN_GAIN_DB or more (a flat edge is left as it is): one value further at a time,
        by the ratio of the grid's two outermost values on that side, at most WIDEN_STEPS times, each run on the
        tuning images with `program` (a one-value program of the sweep's task, compiled for --batch images or
        the test images). Rewrites the sweep's npz and manifest entry with the added values; returns its pick."""
        record, rows = self.manifest["jobs"][name], slice(self.n_test, self.n_all)
        with np.load(self.out / f"{name}.npz") as f:
            psnr, diverged = f["psnr"], f["diverged"]
        values, spent = list(record["values"]), 0.0
        for _ in range(WIDEN_STEPS):
            mean = psnr.mean(1)
            best = int(np.argmax(mean))
            if len(values) < 2 or 0 < best < len(values) - 1:
                break
            inner, edge = (values[1], values[0]) if best == 0 else (values[-2], values[-1])
            if mean[best] - mean[1 if best == 0 else -2] < WIDEN_MIN_GAIN_DB:  # flat there: going on finds nothing
                break
            value, at = edge * edge / inner, 0 if best == 0 else len(values)
            run_batch = self.batch_runner(program, unet_params, record["task"], rows, jnp.asarray([value], jnp.float32))
            settings = self.settings(record["config"], (value,), record["dtype"], record["samples"], rows)
            scores, off, _, seconds = restore_rows(self.out / "rows" / f"{name}_at_{value:g}", settings,
                                                   self.names[rows], run_batch, self.args.batch or self.n_test, 0,
                                                   self.log)
            spent = None if None in (spent, seconds) else spent + seconds
            values.insert(at, value)
            psnr, diverged = np.insert(psnr, at, scores[0], axis=0), np.insert(diverged, at, off[0], axis=0)
        best = int(np.argmax(psnr.mean(1)))
        added = len(values) - len(record["values"])
        if added:
            np.savez_compressed(self.out / f"{name}.npz", restored=np.zeros((0, *self.x_shape), np.uint8),
                                restored_float_psnr=psnr[best, :0], psnr=psnr, diverged=diverged,
                                values=np.asarray(values, np.float64))
            record.update(values=values, picked=values[best], widened=added,
                          seconds=None if None in (record["seconds"], spent) else record["seconds"] + spent,
                          images=record["images"] + added * (rows.stop - rows.start))
            (self.out / "manifest.json").write_text(json.dumps(self.manifest, indent=1) + "\n")
            self.log(f"{name}: widened by {added} value(s) past its edge, picks {values[best]:g} "
                     f"(tuning PSNR by value {np.round(psnr.mean(1), 2).tolist()})")
        return values[best]


def generate(args) -> int:
    """Compiles every job's program on a thread pool (while the weights may still be training), then runs
    the jobs in plan order within --budget-s; a sweep's pick feeds the jobs tuned by it."""
    run = Generation(args)
    run.log(f"compiling {len(run.jobs)} programs with {args.compile_workers} threads")
    pool = concurrent.futures.ThreadPoolExecutor(args.compile_workers)
    futures = {job.name: pool.submit(run.compile, job) for job in run.jobs}
    unet_params = _load_weights(run.weights, run.unet_config, run.started, args.budget_s)
    run.log(f"loaded {run.weights}")
    # A one-value sweep picks its value without running, so later rows may run without it.
    picked = {j.name: j.values[0] for j in run.full_plan if j.values and len(j.values) == 1}
    rate = None  # seconds per (image x value x NFE), from the jobs run so far
    for job in run.jobs:
        if job.values is None and job.tuned_by is not None and job.tuned_by not in picked:
            run.log(f"{job.name}: skipped ({job.tuned_by} did not run)")
            continue
        values = job.values or ((picked[job.tuned_by],) if job.tuned_by else (None,))  # (None,): no step size
        rows = job.rows(run.n_test, run.n_all)
        work = (rows.stop - rows.start) * len(values) * job.samples * nfe(job.config)
        left = args.budget_s - (time.monotonic() - run.started)
        if rate is not None and rate * work > left:
            run.log(f"{job.name}: skipped (needs ~{rate * work:.0f} s, {left:.0f} s left)")
            continue
        try:
            program = futures[job.name].result(timeout=max(left, 0.0))
        except concurrent.futures.TimeoutError:
            run.log(f"{job.name}: skipped (not compiled within the budget)")
            continue
        except Exception as error:  # report and go on: one broken job must not lose the others
            run.log(f"{job.name}: compile FAILED: {type(error).__name__}: {error}")
            continue
        run.log(f"{job.name}: compiled")
        if run.manifest["jobs"].get(job.tuned_by, {}).get("tune_only"):  # its sweep ran: widen it past an edge pick
            picked[job.tuned_by] = run.widen(job.tuned_by, program, unet_params)
            values = (picked[job.tuned_by],)
        run.run_job(job, program, unet_params, values)
        seconds = run.manifest["jobs"][job.name]["seconds"]
        if seconds:  # None: resumed from rows kept before they were timed
            rate = seconds / work if rate is None else min(rate, seconds / work)
        if job.values:
            picked[job.name] = run.manifest["jobs"][job.name]["picked"]
    pool.shutdown(wait=False, cancel_futures=True)
    if not all(f.done() for f in futures.values()):
        run.log("leaving compilations still in flight")
        sys.stdout.flush()
        os._exit(0)  # a running XLA compilation cannot be cancelled; do not wait for it
    return 0


def _only_values_differ(folder: Path, settings: dict) -> bool:
    """Whether the rows in folder were restored with these settings but other step-size values."""
    try:
        earlier = json.loads((folder / "manifest.json").read_text())["settings"]
    except (OSError, ValueError, KeyError):
        return False
    other = lambda d: {k: v for k, v in json.loads(json.dumps(d)).items() if k != "values"}
    return other(earlier) == other(settings)


def restore_rows(folder: Path, settings: dict, names: list[str], run_batch, batch: int, keep: int, log):
    """A job's images in batches of `batch`, resumable: as each batch ends, each of its images' row (PSNR
    and divergence at every value; the uint8 restorations of the first `keep` images) is written to folder
    (spgd_jax.restore.manifest, as the restore command's dataset runs), and a re-run of the same settings
    restores only the images without a row; rows of other step-size values (a pick that a widened sweep moved)
    are renamed FOLDER.superseded-K, not overwritten, and the job restores afresh; other settings: SystemExit. run_batch(index (batch,)) -> (x
    (L, batch, H, W, C), psnr (L, batch), diverged (L, batch)); a short last batch is padded with its last image
    (one compiled shape).
    Returns psnr (L, N), diverged (L, N), the restorations (L, keep, H, W, C) uint8 (None when keep is 0) and
    the seconds the rows took to restore, resumed runs included (None if a row has no time)."""
    manifest = Manifest(folder)
    try:
        continuing = manifest.check(settings, overwrite=False)
    except Exception as error:  # other settings: refused, unless only the pick moved (a widened sweep)
        if not _only_values_differ(folder, settings):
            raise SystemExit(f"error: {error}") from None
        aside = next(folder.with_name(f"{folder.name}.superseded-{k}") for k in range(1, 1000)
                     if not folder.with_name(f"{folder.name}.superseded-{k}").exists())
        folder.rename(aside)
        log(f"{folder.name}: {error}; its rows are kept in {aside.name}, restoring afresh")
        manifest, continuing = Manifest(folder), False
    manifest.start(settings, continuing, len(names))
    done = manifest.finished()
    for start in range(0, len(names), batch):
        stop = min(start + batch, len(names))
        if all(names[i] in done for i in range(start, stop)):
            continue
        index = np.minimum(np.arange(start, start + batch), stop - 1)
        t0 = time.perf_counter()
        restored, psnr, diverged = run_batch(index)
        seconds = (time.perf_counter() - t0) / (stop - start)  # the batch's wall time, per image restored
        for b, i in ((b, i) for b, i in enumerate(range(start, stop)) if names[i] not in done):
            picture = {"restored": images.to_uint8(restored[:, b])} if i < keep else {}
            arrays = {"psnr": psnr[:, b], "diverged": diverged[:, b], **picture}
            manifest.write_row(names[i], {"name": names[i], "seconds": seconds}, arrays)
        log(f"{folder.name}: {stop}/{len(names)} images")
    records = list(manifest.rows(names))
    rows, times = [arrays for _, _, arrays in records], [row.get("seconds") for _, row, _ in records]
    stack = lambda key, part: np.stack([r[key] for r in part], axis=1)
    seconds = None if None in times else float(sum(times))  # rows kept before they were timed: unknown
    return stack("psnr", rows), stack("diverged", rows), stack("restored", rows[:keep]) if keep else None, seconds
