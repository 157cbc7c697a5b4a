"""One process of a dataset run for the tests, on a tiny prior: `python tests/dataset_worker.py WEIGHTS INPUT OUT
[--coordinator HOST:PORT --num-processes N --process-id I] [--seed S] [--overwrite] [--batch B]`.

It runs spgd_jax.restore.dataset.run_dataset with SPGD's inpainting preset at 3 steps and 2 warm-up
iterations (every process the same settings) and exits with its status (130 on Ctrl-C)."""

import argparse
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("weights")
    parser.add_argument("input")
    parser.add_argument("out")
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()

    from spgd_jax.restore.processes import initialize

    initialize(args.coordinator, args.num_processes, args.process_id, auto=False)
    from spgd_jax.io.compile_cache import enable_compilation_cache
    from spgd_jax.restore import dataset
    from spgd_jax.restore._args import UsageError
    from spgd_jax.restore._inputs import load_prior, make_operator
    from spgd_jax.samplers import presets

    enable_compilation_cache()  # the tests' cache folder (conftest)
    denoiser, unet_config = load_prior(Path(args.weights))
    operator = make_operator("inpaint", unet_config.image_size, None)
    config = presets.config("spgd", "inpaint", False, steps=args.steps, warmup=2)
    settings = {"task": "inpaint", "sampler": "spgd", "steps": args.steps, "seed": args.seed}
    run = dataset.DatasetRun(args.input, Path(args.out), settings, config, args.seed, args.batch, "inpaint",
                             overwrite=args.overwrite)
    try:
        return dataset.run_dataset(run, denoiser, operator, unet_config.image_size)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
