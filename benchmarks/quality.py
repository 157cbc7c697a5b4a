"""Restoration quality of the default prior on held-out faces: the paper's Tables 1-3.

Three stages, so that the sampling can run on a lent GPU (JAX only) and the scoring here:

    python benchmarks/quality.py images   --out val64.npz              # ground truth: split images, uint8
    python benchmarks/quality.py generate --images val64.npz --out Q   # sample (JAX only; GPU or CPU)
    python benchmarks/quality.py score    --images val64.npz --run Q   # metrics -> benchmarks/results/

Jobs may be split over machines or sessions (--jobs) and their runs joined before scoring:

    python benchmarks/quality.py merge --runs Q1 Q2 --out Q           # same images, seed, T and N

It imports spgd_jax's public API alone and runs with the package installed (pip install -e .), from any
working directory.

Images: the first TEST + TUNE names of the fixed validation split (weights/validation_split.txt;
never trained on), centre-cropped and resized to the model's size, stored as uint8. Images
0..TEST-1 are the test set of every table; images TEST.. tune the step sizes: Table 1 runs SPGD
over learning rates and DPS over zetas on all images, picks per task the value with the best mean
PSNR on the tuning images alone, and reports the test images at that value. Tables 2 and 3 and the
bfloat16 check then use the picked learning rate. Every image gets its own operator parameters,
noise and sampler key from --seed, the same for every method and value.

generate writes Q/manifest.json and one Q/<job>.npz per job: the test images' restorations at
the picked value (uint8) and the PSNR of every image at every value. It compiles every program
ahead of time (params are arguments; threads), then waits for --weights to appear if it does not
exist yet (so it can compile while the prior is still training), and runs the jobs in order of
importance within --budget-s. score computes PSNR, SSIM (dm-pix) and LPIPS (AlexNet v0.1) with
mean and std over the test images, the classical baselines, and writes quality_*_{tag}.json/.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spgd_jax.io.compile_cache import enable_compilation_cache
from spgd_jax.io.cpu_flags import use_fast_cpu_flags
from spgd_jax import default_weights_path, make_denoiser, metrics, models, operators
from spgd_jax.io import checkpoint, images
from spgd_jax.restore.manifest import Manifest
from spgd_jax.samplers import SAMPLERS, forward_for, nfe, posterior_mean, presets, sample, sampler_of, sweep

REPO = Path(__file__).resolve().parents[1]

TABLE1_TASKS = ("inpaint", "gauss_deblur", "motion_deblur", "sr4")
TABLE2_TASKS = ("inpaint", "sr4")
TABLE3_TASKS = ("inpaint",)
# Sweep grids, as multiples of the task's preset (spgd_jax.samplers.presets: lr, zeta).
LR_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
ZETA_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
MEAN_SAMPLES = 4  # Table 1's posterior-mean row: SPGD samples averaged per image
METHOD_FACTORS = (0.5, 1.0, 2.0)  # the other methods' step-size sweeps, x the task's preset
# How the tables name the registered samplers (the paper's names); others by their registry name.
METHOD_NAMES = {"spgd": "SPGD", "dps": "DPS", "ddrm": "DDRM", "diffpir": "DiffPIR", "pnp_admm": "PnP-ADMM",
                "red_diff": "RED-Diff", "mcg": "MCG", "score_sde": "Score-SDE", "dpps": "DPPS", "daps": "DAPS"}


def table1_methods() -> tuple[str, ...]:
    """The registered restoring samplers other than SPGD (DPS: its published form, beside the equal-NFE row)."""
    return tuple(n for n, s in SAMPLERS.items() if s.conditional and n != "spgd")


@dataclasses.dataclass(frozen=True)
class Job:
    """One sampler run over the images. values: absolute sweep values of the sampler's step size (lr,
    zeta, ...), or None to use the value picked by job `tuned_by`, or None with tuned_by None for a sampler
    without a step size (its config as it is); runs on all images when it sweeps, else on the test set.
    samples > 1: the restoration is the mean of that many samples per image (that many times the NFE)."""

    name: str
    table: str
    row: str
    task: str
    config: object  # a registered sampler's config
    values: tuple[float, ...] | None = None
    tuned_by: str | None = None
    dtype: str = "float32"
    samples: int = 1
    tune_only: bool = False  # a sweep over the tuning images alone (its pick feeds later jobs; no table row)

    def rows(self, n_test: int, n_all: int) -> slice:
        """The images the job restores: the tuning images, all (a sweep), or the test images."""
        return slice(n_test, n_all) if self.tune_only else slice(0, n_all if self.values else n_test)


def plan(steps: int, warmup: int, tasks: tuple[str, ...] = TABLE1_TASKS, lr_factors=LR_FACTORS,
         zeta_factors=ZETA_FACTORS, methods: tuple[str, ...] = (), method_factors=METHOD_FACTORS) -> list[Job]:
    """Every job of Tables 1-3 and the bfloat16 check, most important first; `methods`: registered samplers
    whose Table 1 rows (their presets, with the NFE of their papers) come after SPGD's and DPS's."""
    jobs = []
    for task in tasks:
        config = presets.spgd_config(task, steps=steps, warmup=warmup)
        jobs.append(Job(f"t1_spgd_{task}", "1", "SPGD", task, config,
                        values=tuple(config.lr * f for f in lr_factors)))
    for task in tasks:
        config = presets.dps_config(task, steps=steps * warmup)
        jobs.append(Job(f"t1_dps_{task}", "1", f"DPS ({steps * warmup} steps, equal NFE)", task, config,
                        values=tuple(config.zeta * f for f in zeta_factors)))
    for name in methods:
        for task in tasks:
            # DPS's tuned preset is the equal-NFE row above; its Table 1 row is DPS as published
            config = presets.config(name, task, tuned=name != "dps")
            try:
                forward_for(config, operators.get(task, 64))
            except ValueError:  # e.g. DDRM has no SVD of motion blur: the paper's "-"
                continue
            step = sampler_of(config).step_size
            values = None if step is None else tuple(getattr(config, step) * f for f in method_factors)
            label = f"{METHOD_NAMES.get(name, name)} ({nfe(config)} NFE" + (", as published)" if name == "dps" else ")")
            job = f"{name}{'1000' if name == 'dps' else ''}_{task}"
            if values is not None:  # tuned on the tuning images alone, then run once on the test images
                jobs.append(Job(f"tune_{job}", "tune", label, task, config, values=values, tune_only=True))
            jobs.append(Job(f"t1_{job}", "1", label, task, config, tuned_by=None if values is None else f"tune_{job}"))
    for task in tasks:
        jobs.append(Job(f"t1_spgd_mean{MEAN_SAMPLES}_{task}", "1", f"SPGD, mean of {MEAN_SAMPLES} samples "
                        f"({MEAN_SAMPLES}x NFE)", task, presets.spgd_config(task, steps=steps, warmup=warmup),
                        tuned_by=f"t1_spgd_{task}", samples=MEAN_SAMPLES))
    for task in tasks:
        jobs.append(Job(f"bf16_spgd_{task}", "bf16", "SPGD bfloat16", task,
                        presets.spgd_config(task, steps=steps, warmup=warmup), tuned_by=f"t1_spgd_{task}",
                        dtype="bfloat16"))
    for task in (t for t in TABLE2_TASKS if t in tasks):
        for label, n, adm in (("no warm-up, no ADM", 1, "off"), ("ADM only", 1, "paper"),
                              ("warm-up only", warmup, "off")):
            jobs.append(Job(f"t2_{task}_n{n}_{adm}", "2", label, task,
                            presets.spgd_config(task, steps=steps, warmup=n, adm=adm), tuned_by=f"t1_spgd_{task}"))
    for task in (t for t in TABLE3_TASKS if t in tasks):
        for n in (2, 10):
            jobs.append(Job(f"t3_{task}_n{n}", "3", f"N = {n}", task,
                            presets.spgd_config(task, steps=steps, warmup=n), tuned_by=f"t1_spgd_{task}"))
    return jobs


# -- ground truth and measurements ----------------------------------------------------------------

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
    key_params, key_noise = jax.random.split(jax.random.fold_in(jax.random.key(seed), 1))
    params = operator.init_params(key_params, len(x), x.shape[1])
    return operator, params, operator.measure(key_noise, jnp.asarray(x), params)


def image_keys(seed: int, count: int) -> jax.Array:
    """One sampler key per image."""
    return jax.random.split(jax.random.fold_in(jax.random.key(seed), 2), count)


# -- generate -------------------------------------------------------------------------------------

def make_program(unet_config, operator, config, x_shape, dtype: str, samples: int = 1):
    """jit((unet_params, y, op_params, keys, values (L,)) -> (x (L, B, H, W, C), diverged (L, B))).

    values: the config's step sizes; for a sampler without one, a placeholder of shape (1,).
    unet_config: the network's config (any registered family's; the prior's is an ADM UNetConfig).
    samples > 1: x is the posterior mean of that many samples per image (sample 0 from the image's key,
    the same as with samples = 1; sample j from fold_in(key, j)) over those that did not diverge
    (spgd_jax.samplers.posterior_mean); diverged if every one of them diverged."""

    forward = forward_for(config, operator)

    def program(unet_params, y, op_params, keys, values):
        denoiser = make_denoiser(unet_config, unet_params, dtype=dtype)

        def one_sample(sample_keys):
            if sampler_of(config).step_size is None:  # one run of the config; values (1,) is a placeholder
                result = sample(denoiser, forward, y, sample_keys, config, op_params, x_shape=x_shape)
                return result.x[None], result.diverged[None]
            result = sweep(denoiser, forward, y, sample_keys, config, values, op_params, x_shape=x_shape)
            return result.x, result.diverged

        if samples == 1:
            return one_sample(keys)
        fold = lambda j: jax.vmap(lambda k: jax.random.fold_in(k, j))(keys)
        x, diverged = jax.lax.map(one_sample, jnp.stack([keys] + [fold(j) for j in range(1, samples)]))
        return posterior_mean(jnp.moveaxis(x, 0, -4), jnp.moveaxis(diverged, 0, -1))

    return jax.jit(program)


def weights_path(args) -> Path:
    """--weights, or the default prior (package data)."""
    return Path(args.weights) if args.weights else default_weights_path()


def read_config(path: Path):
    """The network config of a checkpoint directory, or of its config.json (the file alone: generate may
    compile before the weights beside it exist)."""
    return checkpoint.load_config(path.parent if path.name == checkpoint.CONFIG_FILE else path).config


def generate(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log = lambda text: print(f"[{time.monotonic() - started:6.1f} s] {text}", flush=True)
    n_test, n_all = args.test, args.test + args.tune
    x, names = read_images(Path(args.images), n_all)
    weights = weights_path(args)
    unet_config = read_config(Path(args.config) if args.config else weights)
    size = unet_config.image_size
    if x.shape[1] != size:
        raise SystemExit(f"error: the images are {x.shape[1]} px, the model {size} px")
    x_shape = (size, size, 3)
    tasks = tuple(args.tasks.split(",")) if args.tasks else TABLE1_TASKS
    methods = table1_methods() if args.methods == "all" else tuple(m for m in args.methods.split(",") if m)
    unknown = [m for m in methods if m not in SAMPLERS or m == "spgd"]
    if unknown:
        raise SystemExit(f"error: --methods {','.join(unknown)}: not a registered restoring sampler other than "
                         f"spgd; choose from {','.join(table1_methods())}")
    full_plan = plan(args.steps, args.warmup, tasks, args.lr_factors, args.zeta_factors, methods, args.method_factors)
    jobs = [j for j in full_plan
            if (not args.tables or j.table in args.tables.split(",") or (j.tune_only and "1" in args.tables.split(",")))
            and (not args.jobs or any(j.name.startswith(p) for p in args.jobs.split(",")))]
    if args.tune == 0 and any(j.values and len(j.values) > 1 for j in jobs):
        raise SystemExit("error: sweeping needs tuning images: pass --tune > 0, or one factor per sweep")
    measurements = {task: degrade(task, x, args.seed) for task in tasks}
    keys = image_keys(args.seed, n_all)
    abstract = jax.eval_shape(lambda: models.family_of(unet_config).init(unet_config, jax.random.key(0)))

    def compile_job(job: Job):
        operator, op_params, y = measurements[job.task]
        rows = job.rows(n_test, n_all)
        sub = lambda a: a[rows][: args.batch or None]  # one batch's shapes
        lowered = make_program(unet_config, operator, job.config, x_shape, job.dtype, job.samples).lower(
            abstract, sub(y), jax.tree.map(sub, op_params), sub(keys),
            jax.ShapeDtypeStruct((len(job.values) if job.values else 1,), jnp.float32))
        return lowered.compile()

    # Compile every program in job order on a thread pool while waiting for the weights; each job
    # runs as soon as its program is ready, so the first results do not wait for the last compile.
    log(f"compiling {len(jobs)} programs with {args.compile_workers} threads")
    pool = concurrent.futures.ThreadPoolExecutor(args.compile_workers)
    futures = {job.name: pool.submit(compile_job, job) for job in jobs}
    while not (weights / checkpoint.CONFIG_FILE).exists():
        if time.monotonic() - started > args.budget_s:
            raise SystemExit(f"error: no weights at {weights} within the budget")
        time.sleep(2)
    time.sleep(1)
    unet_params, loaded = checkpoint.load(weights)
    if loaded.config != unet_config:
        raise SystemExit(f"error: {weights} holds another architecture than the compiled one")
    log(f"loaded {weights}")

    manifest = {"weights": str(weights), "unet_config": unet_config.to_dict(), "seed": args.seed,
                "test": n_test, "tune": args.tune, "names": names, "device": str(jax.devices()[0]),
                "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""), "steps": args.steps, "warmup": args.warmup, "jobs": {}}
    # A one-value sweep picks its value without running, so later rows may run without it.
    picked = {j.name: j.values[0] for j in full_plan if j.values and len(j.values) == 1}
    rate = None  # seconds per (image x value x NFE), from the jobs run so far
    for job in jobs:
        if job.values is None and job.tuned_by is not None and job.tuned_by not in picked:
            log(f"{job.name}: skipped ({job.tuned_by} did not run)")
            continue
        values = job.values or ((picked[job.tuned_by],) if job.tuned_by else (0.0,))  # (0.0,): no step size
        rows = job.rows(n_test, n_all)
        count = rows.stop - rows.start
        evaluations = job.samples * nfe(job.config)
        work = count * len(values) * evaluations
        left = args.budget_s - (time.monotonic() - started)
        if rate is not None and rate * work > left:
            log(f"{job.name}: skipped (needs ~{rate * work:.0f} s, {left:.0f} s left)")
            continue
        try:
            program = futures[job.name].result(timeout=max(left, 0.0))
        except concurrent.futures.TimeoutError:
            log(f"{job.name}: skipped (not compiled within the budget)")
            continue
        except Exception as error:  # report and go on: one broken job must not lose the others
            log(f"{job.name}: compile FAILED: {type(error).__name__}: {error}")
            continue
        log(f"{job.name}: compiled")
        operator, op_params, y = measurements[job.task]
        tested = 0 if job.tune_only else n_test  # the leading test images among the rows

        def run_batch(index: np.ndarray):
            take = lambda a: a[rows][index]
            restored, diverged = program(unet_params, take(y), jax.tree.map(take, op_params), take(keys),
                                         jnp.asarray(values, jnp.float32))
            return np.asarray(restored), np.asarray(metrics.psnr(restored, take(x))), np.asarray(diverged)

        t0 = time.perf_counter()
        config = {"type": type(job.config).__name__, **dataclasses.asdict(job.config)}
        settings = {"config": config, "values": [float(v) for v in values], "dtype": job.dtype, "samples": job.samples,
                    "seed": args.seed, "weights": str(weights), "images": names[rows], "batch": args.batch}
        scores, diverged, restored = restore_rows(out / "rows" / job.name, settings, names[rows], run_batch,
                                                  args.batch or count, tested, log)
        seconds = time.perf_counter() - t0
        rate = seconds / work if rate is None else min(rate, seconds / work)
        tuning = scores if job.tune_only else scores[:, n_test:]
        best = int(np.argmax(np.mean(tuning, axis=1))) if len(values) > 1 else 0
        if job.values:
            picked[job.name] = float(values[best])
        restored = restored[best] if tested else np.zeros((0, *x_shape), np.uint8)
        np.savez_compressed(out / f"{job.name}.npz", restored=restored,
                            restored_float_psnr=scores[best, :tested], psnr=scores, diverged=diverged,
                            values=np.asarray(values))
        manifest["jobs"][job.name] = {"table": job.table, "row": job.row, "task": job.task, "dtype": job.dtype,
                                      "config": config, "values": list(values), "picked": float(values[best]),
                                      "tuned_by": job.tuned_by, "seconds": seconds, "nfe_per_image": evaluations,
                                      "images": count * len(values), "samples": job.samples,
                                      "tune_only": job.tune_only,
                                      "device": manifest["device"], "jax": manifest["jax"], "tune": args.tune}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        tune_note = f", tuning PSNR by value {np.round(np.mean(tuning, 1), 2).tolist()}" if job.values and args.tune else ""
        tested_note = f"test PSNR {np.mean(scores[best, :tested]):.2f} dB" if tested else "tuning images only"
        log(f"{job.name}: value {values[best]:g}, {tested_note}, "
            f"{int(diverged[best].sum())} diverged ({seconds:.1f} s{tune_note})")
    pool.shutdown(wait=False, cancel_futures=True)
    if not all(f.done() for f in futures.values()):
        log("leaving compilations still in flight")
        sys.stdout.flush()
        os._exit(0)  # a running XLA compilation cannot be cancelled; do not wait for it
    return 0


def restore_rows(folder: Path, settings: dict, names: list[str], run_batch, batch: int, keep: int, log):
    """A job's images in batches of `batch`, resumable: as each batch ends, each of its images' row (PSNR
    and divergence at every value; the uint8 restorations of the first `keep` images) is written to folder
    (spgd_jax.restore.manifest, as the restore command's dataset runs), and a re-run of the same settings
    restores only the images without a row. run_batch(index (batch,)) -> (x (L, batch, H, W, C), psnr (L,
    batch), diverged (L, batch)); a short last batch is padded with its last image (one compiled shape).
    Returns psnr (L, N), diverged (L, N) and the restorations (L, keep, H, W, C) uint8 (None when keep is 0)."""
    manifest = Manifest(folder)
    try:
        continuing = manifest.check(settings, overwrite=False)
    except Exception as error:  # other settings: the message names them
        raise SystemExit(f"error: {error}") from None
    manifest.start(settings, continuing, len(names))
    done = manifest.finished()
    for start in range(0, len(names), batch):
        stop = min(start + batch, len(names))
        if all(names[i] in done for i in range(start, stop)):
            continue
        index = np.minimum(np.arange(start, start + batch), stop - 1)
        restored, psnr, diverged = run_batch(index)
        for b, i in ((b, i) for b, i in enumerate(range(start, stop)) if names[i] not in done):
            picture = {"restored": images.to_uint8(restored[:, b])} if i < keep else {}
            arrays = {"psnr": psnr[:, b], "diverged": diverged[:, b], **picture}
            manifest.write_row(names[i], {"name": names[i]}, arrays)
        log(f"{folder.name}: {stop}/{len(names)} images")
    rows = [arrays for _, _, arrays in manifest.rows(names)]
    stack = lambda key, part: np.stack([r[key] for r in part], axis=1)
    return stack("psnr", rows), stack("diverged", rows), stack("restored", rows[:keep]) if keep else None


# -- images ---------------------------------------------------------------------------------------

def make_images(args) -> int:
    size = read_config(weights_path(args)).image_size
    x, names = load_split_images(Path(args.data), Path(args.split), args.count, size)
    np.savez(args.out, images=x, names=np.asarray(names))
    print(f"wrote {len(x)} images of {size} px to {args.out}")
    return 0


# -- merge ----------------------------------------------------------------------------------------

MERGE_KEYS = ("unet_config", "seed", "test", "steps", "warmup")  # what makes two runs' rows comparable


def _read_manifest(run: Path) -> dict:
    path = run / "manifest.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist; pass folders written by `quality.py generate`")
    return json.loads(path.read_text())


def _job_info(manifest: dict, job: dict) -> dict:
    """The job with its device, jax version and tuning-image count (older manifests keep them per run)."""
    return {**job, **{k: job.get(k, manifest[k]) for k in ("device", "jax", "tune")}}


def merge(args) -> int:
    """One run from several generate runs that sampled other jobs on the same test images."""
    runs, out = [Path(r) for r in args.runs], Path(args.out)
    if out.exists():
        raise SystemExit(f"error: {out} exists; pass a new folder as --out (merge never overwrites)")
    manifests = [_read_manifest(r) for r in runs]
    base = manifests[0]
    jobs, source = {}, {}
    for run, manifest in zip(runs, manifests):
        for key in MERGE_KEYS:
            if manifest[key] != base[key]:
                raise SystemExit(f"error: {run} has {key} = {manifest[key]!r} but {runs[0]} has {base[key]!r}; "
                                 "only runs over the same test images and settings can be merged")
        if manifest["names"][:base["test"]] != base["names"][:base["test"]]:
            raise SystemExit(f"error: {run} restored other test images than {runs[0]}")
        for name, job in manifest["jobs"].items():
            if name in jobs:
                raise SystemExit(f"error: job {name} is in both {source[name]} and {run}; "
                                 "pass --jobs to generate so that each job runs once")
            jobs[name], source[name] = _job_info(manifest, job), run
    out.mkdir(parents=True)
    for name, run in source.items():
        shutil.copy(run / f"{name}.npz", out / f"{name}.npz")
    longest = max(manifests, key=lambda m: len(m["names"]))  # tuning images follow the test images
    merged = {**base, "names": longest["names"], "tune": max(j["tune"] for j in jobs.values()),
              "jobs": jobs, "merged_from": [str(r) for r in runs]}
    (out / "manifest.json").write_text(json.dumps(merged, indent=1) + "\n")
    print(f"merged {len(jobs)} jobs from {len(runs)} runs into {out}")
    return 0


def sampled_on(jobs: dict) -> str:
    """Where the jobs were sampled: one device, or the jobs of each device."""
    groups: dict[str, list[str]] = {}
    for name, job in jobs.items():
        groups.setdefault(f"{job['device']} (jax {job['jax']})", []).append(name)
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{where} for {', '.join(names)}" for where, names in groups.items())


# -- score ----------------------------------------------------------------------------------------

def _summary(values: dict) -> dict:
    """Mean and std over the images of each metric, and the per-image values (for paired comparisons)."""
    return {**{k: {"mean": float(np.mean(v)), "std": float(np.std(v))} for k, v in values.items()},
            "per_image": {k: np.asarray(v, np.float64).round(5).tolist() for k, v in values.items()}}


def score(args) -> int:
    from spgd_jax.classical import restorer

    run = Path(args.run)
    manifest = _read_manifest(run)
    manifest["jobs"] = {name: _job_info(manifest, job) for name, job in manifest["jobs"].items()}
    n_test = manifest["test"]
    x, names = read_images(Path(args.images), n_test)
    if names != manifest["names"][:n_test]:
        raise SystemExit("error: --images holds other images than the run used")
    reference = jnp.asarray(x)
    rows = []
    for name, job in manifest["jobs"].items():
        if job.get("tune_only"):  # no test image: its sweep is in the tuning table
            continue
        with np.load(run / f"{name}.npz") as f:
            restored = f["restored"].astype(np.float32) / 127.5 - 1.0
            float_psnr, diverged = f["restored_float_psnr"], f["diverged"]
        picked = job["values"].index(job["picked"])
        rows.append({"job": name, **{k: job[k] for k in ("table", "row", "task", "dtype", "picked", "config",
                                                           "seconds", "nfe_per_image")},
                     "diverged": int(diverged[picked, :n_test].sum()),
                     "psnr_float": float(np.mean(float_psnr)),
                     "images": job.get("images"),
                     **_summary(metrics.all_metrics(jnp.asarray(restored), reference, vgg=True))})
    for task in sorted({r["task"] for r in rows if r["table"] == "1"}, key=TABLE1_TASKS.index):
        operator, params, y = degrade(task, x, manifest["seed"])
        restored = jax.jit(jax.vmap(restorer(operator, x.shape[1])))(y, params)
        rows.append({"job": f"t1_classical_{task}", "table": "1", "row": "classical", "task": task,
                     **_summary(metrics.all_metrics(jnp.clip(restored, -1, 1), reference, vgg=True))})
    meta = {k: manifest[k] for k in ("weights", "seed", "test", "steps", "warmup")}
    rows += compared_rows(args.compare or [], {r["job"] for r in rows}, meta)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta["sampled_on"] = sampled_on(manifest["jobs"])
    meta["tune"] = sorted({j["tune"] for j in manifest["jobs"].values() if len(j["values"]) > 1})
    meta["weights"] = args.weights_name or meta["weights"]
    meta["lpips"] = metrics.LPIPS_NAME
    meta["lpips_vgg"] = metrics.LPIPS_VGG_NAME
    stem = out / f"quality_{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "tuning": _tuning(run, manifest),
                                                    "bars": quality_bars(rows), "gains": paired_gains(rows)},
                                                    indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(rows, meta, _tuning(run, manifest)) + bars_markdown(rows)
                                       + gains_markdown(rows))
    print(stem.with_suffix(".md").read_text())
    return 0


def missing_rows(rows: list[dict]) -> list[str]:
    """Lines naming the registered methods with no Table 1 row for a task, and why where it is known."""
    have = {(r["job"][3:-len(r["task"]) - 1], r["task"]) for r in rows if r["table"] == "1"}  # t1_<method>_<task>
    lines = []
    for name in ("spgd",) + table1_methods():
        job = f"{name}1000" if name == "dps" else name
        tasks = [t for t in TABLE1_TASKS if (job, t) not in have]
        if not tasks:
            continue
        cannot = []
        for task in tasks:
            try:
                forward_for(presets.config(name, task), operators.get(task, 64))
            except ValueError:
                cannot.append(task)
        reasons = ([f"cannot run {', '.join(cannot)} (the paper's \"-\")"] if cannot else []) + \
                  ([f"not run on {', '.join(t for t in tasks if t not in cannot)}"] if len(cannot) < len(tasks) else [])
        label = "DPS as published (1000 NFE)" if name == "dps" else METHOD_NAMES.get(name, name)
        lines.append(f"- {label}: {'; '.join(reasons)}.")
    return ["Methods without a row:", ""] + lines + [""] if lines else []


def compared_rows(paths: list[str], jobs: set[str], meta: dict) -> list[dict]:
    """The rows of earlier score results (quality_*.json) that this run lacks, for the tables and the paired
    gains: only from results over the same test images and seed (SystemExit otherwise); each row names its
    source in 'from'."""
    out = []
    for path in paths:
        earlier = json.loads(Path(path).read_text())
        for key in ("test", "seed"):
            if earlier["meta"][key] != meta[key]:
                raise SystemExit(f"error: --compare {path} has {key} = {earlier['meta'][key]} but this run has "
                                 f"{meta[key]}; only results over the same test images and seed compare")
        for row in earlier["rows"]:
            if row["job"] not in jobs:
                jobs.add(row["job"])
                out.append({**row, "from": Path(path).name})
    return out


def _tuning(run: Path, manifest: dict) -> list[dict]:
    """Per swept job: mean PSNR on the tuning images and the test images at every value."""
    n_test, out = manifest["test"], []
    for name, job in manifest["jobs"].items():
        if job["tuned_by"] is None and _has_step_size(job["config"]):
            with np.load(run / f"{name}.npz") as f:
                scores, diverged = f["psnr"], f["diverged"]
            tested = 0 if job.get("tune_only") else n_test
            out.append({"job": name, "task": job["task"], "row": job["row"], "values": job["values"],
                        "picked": job["picked"],
                        "tune_psnr": np.mean(scores[:, tested:], 1).round(3).tolist() if job["tune"] else None,
                        "test_psnr": np.mean(scores[:, :tested], 1).round(3).tolist() if tested else None,
                        "diverged": diverged.sum(1).tolist()})
    return out


def _has_step_size(config: dict) -> bool:
    """Whether a manifest's config (with its 'type') belongs to a sampler with a step size."""
    return any(s.config_type.__name__ == config.get("type") and s.step_size for s in SAMPLERS.values())


def _step_size(r: dict) -> str:
    """The picked lr, zeta, ...; SPGD's lr schedule when it is not the paper's decay to 1 %."""
    if "picked" not in r or not _has_step_size(r["config"]):
        return "-"
    ratio = r["config"].get("lr_min_ratio", 0.01)
    return f"{r['picked']:g}" + ("" if ratio == 0.01 else " constant" if ratio == 1 else f" to x{ratio:g}")


def _cell(r: dict, metric: str, spec: str) -> str:
    return f"{r[metric]['mean']:{spec}} ± {r[metric]['std']:{spec}}"


def _step_size_source(meta: dict) -> str:
    """How the step sizes were chosen: meta['tune'] lists the tuning-image counts of the swept jobs."""
    if not meta["tune"]:
        return "step sizes: the presets (spgd_jax.samplers.presets), no sweep. "
    first, last = meta["test"], meta["test"] + max(meta["tune"]) - 1
    return (f"step sizes picked by mean PSNR on images {first}-{last} where the sweep table lists tuning images, "
            "else the presets (spgd_jax.samplers.presets). ")


def markdown(rows: list[dict], meta: dict, tuning: list[dict]) -> str:
    lines = [f"# Restoration quality of `{meta['weights']}` on {meta['test']} held-out faces", "",
             f"Test images: validation split 0-{meta['test'] - 1}; "
             + _step_size_source(meta)
             + f"PSNR (dB) / SSIM / {meta['lpips']}: mean ± std over "
             f"the test images (restorations saved as 8-bit). Seed {meta['seed']}; sampled on {meta['sampled_on']}; SPGD T = {meta['steps']}, N = {meta['warmup']}, its lr decaying linearly to "
             f"1 % over the run unless marked constant.", ""]
    titles = {"1": "Table 1: SPGD, the other methods, classical baselines",
              "2": f"Table 2: warm-up x ADM (T = {meta['steps']})",
              "3": f"Table 3: warm-up iterations N (T = {meta['steps']})",
              "bf16": "bfloat16 compute (float32 params) against float32, SPGD"}
    for table in ("1", "2", "3", "bf16"):
        chosen = [r for r in rows if r["table"] == table]
        if not chosen:  # the tables below borrow Table 1's rows; they need their own first
            continue
        if table == "2":
            chosen += [{**r, "row": "warm-up + ADM"} for r in rows if r["table"] == "1" and r["row"] == "SPGD"
                       and r["task"] in TABLE2_TASKS]
        if table == "3":
            chosen += [{**r, "row": "N = 1"} for r in rows if r["table"] == "2" and r["row"] == "ADM only"
                       and r["task"] in TABLE3_TASKS]
            chosen += [{**r, "row": f"N = {meta['warmup']}"} for r in rows if r["table"] == "1"
                       and r["row"] == "SPGD" and r["task"] in TABLE3_TASKS]
        if table == "bf16":
            chosen += [{**r, "row": "SPGD float32"} for r in rows if r["table"] == "1" and r["row"] == "SPGD"]
        lines += [f"## {titles[table]}", "",
                  "| task | method | step size | PSNR | SSIM | LPIPS | LPIPS-VGG | PSNR (float) | diverged | NFE | s/image |",
                  "|---|---|---:|---|---|---|---|---:|---:|---:|---:|"]
        for r in sorted(chosen, key=lambda r: (TABLE1_TASKS.index(r["task"]), r["row"])):
            step = _step_size(r)
            per_image = f"{r['seconds'] / r['images']:.2f}" if r.get("images") else "-"
            extra = (f"{r['psnr_float']:.3f} | {r['diverged']} | {r['nfe_per_image']} | {per_image}" if "picked" in r
                     else "- | - | - | -")
            lpips, vgg = (_cell(r, m, ".3f") if m in r else "-" for m in ("lpips", "lpips_vgg"))  # none below 32 px
            row = r["row"] + (f" (from {r['from']})" if "from" in r else "")
            lines.append(f"| {r['task']} | {row} | {step} | {_cell(r, 'psnr', '.2f')} | {_cell(r, 'ssim', '.3f')} | "
                         f"{lpips} | {vgg} | {extra} |")
        lines.append("")
    lines += missing_rows(rows)
    lines += ["## Step-size sweeps (mean PSNR, dB)", "", "| job | values | tuning images | test images | picked |",
              "|---|---|---|---|---:|"]
    for t in tuning:
        tune = ", ".join(f"{v:.2f}" for v in t["tune_psnr"]) if t["tune_psnr"] else "-"
        test = ", ".join(f"{v:.2f}" for v in t["test_psnr"]) if t["test_psnr"] else "-"
        lines.append(f"| {t['job']} | {', '.join(f'{v:g}' for v in t['values'])} | {tune} | {test} | {t['picked']:g} |")
    return "\n".join(lines) + "\n"


# -- quality bars ---------------------------------------------------------------------------------

CLASSICAL_MARGIN_DB = 1.5  # SPGD must beat the classical baseline by this much PSNR, with lower LPIPS
DPS_TASKS_NEEDED = 3  # SPGD must match or beat DPS at equal NFE on this many Table-1 tasks


def quality_bars(rows: list[dict]) -> list[dict]:
    """Each Table-1 SPGD row (one sample; mean of samples) against the classical baseline, and the
    one-sample row against DPS at equal NFE, on the same test images.

    gain: mean over the images of the paired PSNR difference SPGD - other (dB); stderr: its standard
    error; ahead: images where SPGD's PSNR is higher; met: gain >= CLASSICAL_MARGIN_DB with lower
    mean LPIPS (classical), gain >= 0 (DPS)."""
    by_job = {r["job"]: r for r in rows}
    comparisons = []
    for task in TABLE1_TASKS:
        one_sample = f"t1_spgd_{task}"
        pairs = [(job, f"t1_classical_{task}") for job in (one_sample, f"t1_spgd_mean{MEAN_SAMPLES}_{task}")]
        for spgd_job, other_job in pairs + [(one_sample, f"t1_dps_{task}")]:
            if spgd_job not in by_job or other_job not in by_job:
                continue
            ours, other = by_job[spgd_job], by_job[other_job]
            diff = np.asarray(ours["per_image"]["psnr"]) - np.asarray(other["per_image"]["psnr"])
            gain = float(diff.mean())
            stderr = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else float("nan")
            against = "classical" if other["row"] == "classical" else "DPS"
            lpips = (ours["lpips"]["mean"], other["lpips"]["mean"]) if "lpips" in ours else None
            met = gain >= 0 if against == "DPS" else \
                gain >= CLASSICAL_MARGIN_DB and (lpips is None or lpips[0] < lpips[1])
            comparisons.append({"task": task, "spgd": ours["row"], "against": against, "gain": gain,
                                "stderr": stderr, "ahead": int((diff > 0).sum()), "images": int(diff.size),
                                "lpips": lpips, "met": bool(met)})
    return comparisons


def bars_markdown(rows: list[dict]) -> str:
    """The quality-bar section of the report: one line per comparison and a verdict per bar."""
    comparisons = quality_bars(rows)
    if not comparisons:
        return ""
    lines = ["", "## Quality bars", "",
             f"SPGD minus the other method on the same test images: PSNR gain in dB (mean of the paired "
             f"per-image differences ± its standard error); ahead: images where SPGD's PSNR is higher. "
             f"Bars: at least +{CLASSICAL_MARGIN_DB:g} dB over the classical baseline with lower LPIPS; "
             f"at least +0 dB against DPS at equal NFE on {DPS_TASKS_NEEDED} of {len(TABLE1_TASKS)} tasks.", "",
             "| task | SPGD row | against | PSNR gain | ahead | LPIPS SPGD / other | met |", "|---|---|---|---:|---:|---|---|"]
    for c in comparisons:
        lpips = f"{c['lpips'][0]:.3f} / {c['lpips'][1]:.3f}" if c["lpips"] else "-"
        lines.append(f"| {c['task']} | {c['spgd']} | {c['against']} | {c['gain']:+.2f} ± {c['stderr']:.2f} | "
                     f"{c['ahead']}/{c['images']} | {lpips} | {'yes' if c['met'] else 'no'} |")
    lines.append("")
    against_dps = [c for c in comparisons if c["against"] == "DPS"]
    if against_dps:
        wins = sum(c["met"] for c in against_dps)
        verdict = ("met" if wins >= DPS_TASKS_NEEDED else "not met" if len(against_dps) == len(TABLE1_TASKS)
                   else f"open ({len(against_dps)} of {len(TABLE1_TASKS)} tasks have a DPS row)")
        lines.append(f"- DPS at equal NFE: SPGD matches or beats it on {wins} of {len(against_dps)} tasks "
                     f"({', '.join(c['task'] for c in against_dps if c['met']) or 'none'}); "
                     f"bar {DPS_TASKS_NEEDED} of {len(TABLE1_TASKS)}: {verdict}.")
    for spgd_row in dict.fromkeys(c["spgd"] for c in comparisons if c["against"] == "classical"):
        chosen = [c for c in comparisons if c["against"] == "classical" and c["spgd"] == spgd_row]
        met = [c["task"] for c in chosen if c["met"]]
        lines.append(f"- Classical baselines, {spgd_row}: bar met on {len(met)} of {len(chosen)} tasks "
                     f"({', '.join(met) or 'none'}).")
    return "\n".join(lines) + "\n"


def paired_gains(rows: list[dict]) -> list[dict]:
    """SPGD (one sample) minus every other Table 1 row of its task, on the same test images: for each metric,
    the mean of the paired per-image differences and its standard error."""
    out = []
    for task in TABLE1_TASKS:
        table1 = [r for r in rows if r["table"] == "1" and r["task"] == task]
        ours = next((r for r in table1 if r["job"] == f"t1_spgd_{task}"), None)
        if ours is None:
            continue
        for other in table1:
            if other is ours:
                continue
            gains = {}
            for metric in ours["per_image"]:
                if metric in other["per_image"]:
                    diff = np.asarray(ours["per_image"][metric]) - np.asarray(other["per_image"][metric])
                    stderr = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else float("nan")
                    gains[metric] = {"gain": float(diff.mean()), "stderr": stderr}
            out.append({"task": task, "against": other["row"], "images": len(ours["per_image"]["psnr"]), **gains})
    return out


def gains_markdown(rows: list[dict]) -> str:
    """The paired SPGD-minus-method section of the report (empty without an SPGD Table 1 row)."""
    gains = paired_gains(rows)
    if not gains:
        return ""
    metrics_shown = [m for m in ("psnr", "ssim", "lpips", "lpips_vgg") if any(m in g for g in gains)]
    labels = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS", "lpips_vgg": "LPIPS-VGG"}
    lines = ["", "## SPGD minus each method (paired, same test images)", "",
             "Mean of the per-image differences SPGD - method ± its standard error (positive PSNR/SSIM and negative "
             "LPIPS favour SPGD).", "", "| task | method | " + " | ".join(labels[m] for m in metrics_shown) + " |",
             "|---|---|" + "---:|" * len(metrics_shown)]
    spec = {"psnr": "+.2f", "ssim": "+.3f", "lpips": "+.3f", "lpips_vgg": "+.3f"}
    for g in gains:
        cells = [f"{g[m]['gain']:{spec[m]}} ± {g[m]['stderr']:.{spec[m][-2]}f}" if m in g else "-" for m in metrics_shown]
        lines.append(f"| {g['task']} | {g['against']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("images", help="write the ground-truth images (uint8 npz)")
    p.add_argument("--weights", help="for the image size (default: spgd_jax.default_weights_path())")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "faces"),
                   help="folder of the face folders (celeba/, utkface/) named in --split; not in the repository "
                        "(default: ../shared/data/faces beside the clone)")
    p.add_argument("--split", default=str(REPO / "weights" / "validation_split.txt"))
    p.add_argument("--count", type=int, default=82)
    p.add_argument("--out", required=True)
    p = sub.add_parser("generate", help="run the samplers (JAX only)")
    p.add_argument("--images", required=True)
    p.add_argument("--weights", help="weights folder; may appear later (then --config gives the architecture); "
                   "default: spgd_jax.default_weights_path()")
    p.add_argument("--config", help="a checkpoint's config.json (or folder) of the architecture, when --weights "
                   "does not exist yet")
    p.add_argument("--out", required=True)
    p.add_argument("--test", type=int, default=50)
    p.add_argument("--tune", type=int, default=32, help="tuning images (0: no sweeps, one factor each)")
    p.add_argument("--tasks", help="comma-separated (default: inpaint,gauss_deblur,motion_deblur,sr4)")
    p.add_argument("--tables", help="comma-separated subset of 1,2,3,bf16 (default: all)")
    p.add_argument("--jobs", help="comma-separated job name prefixes, e.g. t1_spgd (default: all)")
    factors = lambda text: tuple(float(v) for v in text.split(","))
    p.add_argument("--lr-factors", type=factors, default=LR_FACTORS, help="SPGD sweep, x the preset lr")
    p.add_argument("--zeta-factors", type=factors, default=ZETA_FACTORS, help="DPS sweep, x the preset zeta")
    p.add_argument("--methods", default="all",
                   help="Table 1's other methods: comma-separated registered sampler names, 'all' (default: every "
                        "restoring sampler of spgd_jax.samplers.SAMPLERS) or '' (SPGD and equal-NFE DPS only)")
    p.add_argument("--method-factors", type=factors, default=METHOD_FACTORS,
                   help="the other methods' step-size sweeps, x their presets")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=1e9, help="skip jobs that would end later than this")
    p.add_argument("--compile-workers", type=int, default=4)
    p.add_argument("--batch", type=int, default=0, help="images per compiled call (default 0: all of a job's); each "
                   "batch's rows are kept in OUT/rows/JOB/, so a re-run resumes where it stopped")
    p = sub.add_parser("merge", help="join generate runs of other jobs on the same test images")
    p.add_argument("--runs", nargs="+", required=True, help="generate output folders")
    p.add_argument("--out", required=True, help="a new folder")
    p = sub.add_parser("score", help="metrics and tables from a generate (or merge) run")
    p.add_argument("--images", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--tag", required=True, help="file name tag, e.g. h200-50img")
    p.add_argument("--weights-name", help="how the tables name the weights (default: the path generate used)")
    p.add_argument("--compare", nargs="+", help="earlier results (quality_*.json, same test images and seed) whose "
                   "rows join the tables and the paired gains, e.g. SPGD's rows of another run")
    args = parser.parse_args(argv)
    use_fast_cpu_flags()  # before JAX starts its backends; SPGD_JAX_CPU_FLAGS=0 turns it off
    enable_compilation_cache()  # SPGD_JAX_NO_CACHE=1 turns it off
    return {"images": make_images, "generate": generate, "merge": merge, "score": score}[args.stage](args)


if __name__ == "__main__":
    sys.exit(main())
