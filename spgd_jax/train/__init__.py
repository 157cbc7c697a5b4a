"""DDPM training of the ADM UNet prior, and export of its EMA weights.

    python -m spgd_jax.train --data DIR --run runs/NAME [--model default64] [--set key=value ...]
    python -m spgd_jax.train export --run runs/NAME --out weights/NAME [--card weights/MODEL_CARD.md]

    from spgd_jax import train
    state = train.train("faces/", "runs/mine", train.MODELS["default64"], train.TrainConfig(batch_size=64))
    train.export("runs/mine", "weights/mine")
    train_names, val_names = train.split_names(train.list_images("faces/"), train.Split())  # the fixed split

Training is standard DDPM epsilon prediction (Ho et al. 2020, guided-diffusion conventions): linear
betas 1e-4 .. 0.02 over T = 1000 steps, t ~ U{0..T-1}, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,
loss = mean (eps - eps_hat)^2 per image (loss_weighting "min-snr-G": times min(SNR_t, G) / SNR_t); with
`learn_sigma` the guided-diffusion hybrid loss adds the variational bound term (in bits/dim) for the
learned variance with the mean's gradient stopped.  Random horizontal flips (flip).  Adam with linear
learning-rate warm-up, then a constant rate or a cosine decay to a floor (lr_schedule, min_lr_ratio,
decay_steps), global-norm gradient clipping, an EMA of the weights with decay min(ema_decay, (1 + s) /
(10 + s)) at update s.  The defaults are the recipe of weights/default64.

The training set is put on the devices once; each compiled call does steps_per_call updates (a lax.scan
that gathers its batches there from indices sent once per call), so a GPU is not held up by the host.

The run folder holds resumable orbax checkpoints (`checkpoints/`), `metrics.jsonl`, sample grids
(`samples/step_XXXXXXXX.png`) and `validation_split.txt`; re-running the same command continues
from the latest checkpoint with bit-identical results to an uninterrupted run (data order, noise,
flips and dropout are functions of (seed, step)), also on another machine given the latest checkpoint,
metrics.jsonl and validation_split.txt (weights/train_gpu.sh hands a run from one GPU lease to the next
so).  A resumed run keeps its recipe (`_state.recipe`; a change is refused).  SIGINT / SIGTERM save a
checkpoint and exit.  Several local devices are used data-parallel (batch sharded over
`spgd_jax.sharding.batch_mesh`, weights and the training set replicated); the code is the same on CPU
and GPU.  To exercise that path on a CPU: XLA_FLAGS=--xla_force_host_platform_device_count=2.

Modules: _args (the command line's arguments, --model presets, --set), _data (image folder: list,
split, decode, cache, batch order, flips), _diffusion (schedule, forward process, loss, monitoring
samples), _state (TrainConfig, the recipe, TrainState, optimiser, EMA, the train steps), _validation
(the fixed validation loss), _checkpoints (the run's orbax checkpoints and metadata), _report (progress
line, metrics.jsonl, sample grids), _loop (the run: start or resume, the update loop), _export (weights,
model card and its loss plot).
"""

from __future__ import annotations

import sys

from spgd_jax.train._args import DEFAULT64, MODELS, card_path, configs, export_parser, train_parser
from spgd_jax.train._data import Split, list_images, split_names
from spgd_jax.xla_setup.compile_cache import enable_compilation_cache
from spgd_jax.xla_setup.cpu_flags import use_fast_cpu_flags
from spgd_jax.train._export import CARD_BEGIN, CARD_END, export
from spgd_jax.train._loop import train
from spgd_jax.train._state import TrainConfig, TrainState

__all__ = ["CARD_BEGIN", "CARD_END", "DEFAULT64", "MODELS", "Split", "TrainConfig", "TrainState", "export",
           "list_images", "main", "split_names", "train"]


def main(argv: list[str] | None = None) -> int:
    """Runs the command line (`export` as the first argument: the export command); returns the exit
    status. A bad argument or input ends it with SystemExit(2) and a usage message."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "export":
        p = export_parser()
        a = p.parse_args(argv[1:])
        card = card_path(a)
        try:
            meta = export(a.run, a.out, card, a.step, a.overwrite)
        except (ValueError, FileExistsError) as e:
            p.error(str(e))
        print(f"exported step {meta['step']} EMA weights ({meta['weights_mb']:.1f} MB) to {a.out}"
              + (f"; updated {card}" if card else ""))
        return 0
    p = train_parser()
    a = p.parse_args(argv)
    use_fast_cpu_flags()  # before JAX starts its backends
    if not a.no_cache:
        enable_compilation_cache()
    try:
        model_config, tcfg = configs(a)
        train(a.data, a.run, model_config, tcfg, cache_dir=a.cache_dir, init=a.init)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    return 0
