"""One process of a dataset run for the tests, on a tiny prior: `python tests/dataset_worker.py WEIGHTS INPUT OUT
[--coordinator HOST:PORT --num-processes N --process-id I] [--seed S] [--overwrite] [--batch B]`.

It runs spgd_jax.restore.dataset.run_dataset with SPGD's inpainting preset at 3 steps and 2 warm-up
iterations (every process the same settings) and exits with its status (130 on Ctrl-C)."""

import argparse
import os
import sys
from pathlib import Path


def tiny_run(weights: str, input: str, out: Path, seed: int = 0, batch: int = 4, overwrite: bool = False):
    """(run_dataset's arguments) for SPGD inpainting at 3 steps on the checkpoint `weights`."""
    from spgd_jax.restore import dataset
    from spgd_jax.restore._inputs import load_prior, make_operator
    from spgd_jax.samplers import presets

    denoiser, unet_config = load_prior(Path(weights))
    operator = make_operator("inpaint", unet_config.image_size, None)
    config = presets.config("spgd", "inpaint", False, steps=3, warmup=2)
    settings = {"task": "inpaint", "sampler": "spgd", "steps": 3, "seed": seed}
    run = dataset.DatasetRun(input, Path(out), settings, config, seed, batch, "inpaint", overwrite=overwrite,
                             quiet=True)
    return run, denoiser, operator, unet_config.image_size


def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("weights", "input", "out"):
        parser.add_argument(name)
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    args = parser.parse_args()

    from spgd_jax.restore.processes import initialize

    initialize(args.coordinator, args.num_processes, args.process_id, auto=False)
    from spgd_jax.xla_setup.compile_cache import enable_compilation_cache
    from spgd_jax.restore import dataset

    enable_compilation_cache()  # the tests' cache folder (conftest)
    try:
        return dataset.run_dataset(*tiny_run(args.weights, args.input, args.out))
    except KeyboardInterrupt:  # as the command line: leave at once, the sampler's thread may still run
        print("interrupted", file=sys.stderr, flush=True)
        os._exit(130)


if __name__ == "__main__":
    sys.exit(main())
