"""Every registered restoring sampler through the registry alone: the API traced on each core task, the
command line end to end with a tiny UNet, and `nfe` against the denoiser evaluations counted at run time.

The methods' own algorithms are tested in test_spgd, test_dps, test_projection_samplers,
test_svd_samplers and test_optimisation_samplers; this file checks that a registered method needs
nothing beyond its registration to work everywhere.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli_helpers import random_faces, tiny_weights
from sampler_toys import counting, gaussian_denoiser
from spgd_jax import operators, restore
from spgd_jax.samplers import SAMPLERS, forward_for, nfe, presets, sample

CORE_TASKS = ("inpaint", "gauss_deblur", "motion_deblur", "sr4")
RESTORING = [name for name, sampler in SAMPLERS.items() if sampler.conditional]
# The smallest run of each method: fields set to small values where the config has them.
SMALL = {"steps": 3, "warmup": 2, "iterations": 2, "ode_steps": 2, "langevin_steps": 2, "candidates": 3,
         "cg_iterations": 3, "init_iterations": 3}


def small_config(name: str, task: str):
    config = presets.config(name, task, tuned=False)
    fields = {f.name for f in dataclasses.fields(config)}
    return dataclasses.replace(config, **{k: v for k, v in SMALL.items() if k in fields})


def runnable(name: str, task: str) -> bool:
    """Whether the method runs the task (DDRM has no SVD of motion blur; that is the paper's "-")."""
    try:
        forward_for(small_config(name, task), operators.get(task, 16))
    except ValueError:
        assert (name, task) == ("ddrm", "motion_deblur")
        return False
    return True


@pytest.mark.parametrize("name", RESTORING)
def test_every_sampler_traces_on_every_core_task_it_can_run(name):
    """The whole program of each method and task, traced (jax.eval_shape) with a toy denoiser: the operators,
    their linear algebra and SVDs, the registry. The UNet runs in the command-line test below."""
    for task in CORE_TASKS:
        if not runnable(name, task):
            continue
        operator, sampler_config = operators.get(task, 16), small_config(name, task)
        op_params = operator.init_params(jax.random.key(1), 2, 16) or None
        x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
        y = jax.eval_shape(jax.vmap(operator.forward, in_axes=(0, None if op_params is None else 0)), x, op_params)
        run = lambda y: sample(gaussian_denoiser, forward_for(sampler_config, operator), y, jax.random.key(2),
                               sampler_config, op_params, x_shape=(16, 16, 3))
        result = jax.eval_shape(run, y)
        assert result.x.shape == (2, 16, 16, 3) and result.diverged.shape == (2,), (name, task)


@pytest.mark.parametrize("name", RESTORING)
def test_nfe_is_the_number_of_denoiser_evaluations(name):
    operator, config = operators.get("inpaint", 8), small_config(name, "inpaint")
    op_params = operator.init_params(jax.random.key(0), 2, 8)
    y = operator.measure(jax.random.key(1), 0.5 * jax.random.normal(jax.random.key(2), (2, 8, 8, 3)), op_params)
    record = []
    result = sample(counting(gaussian_denoiser, record), forward_for(config, operator), y, jax.random.key(3), config,
                    op_params, x_shape=(8, 8, 3))
    jax.effects_barrier()
    assert len(record) == 2 * nfe(config) and not bool(result.diverged.any())


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_weights(tmp_path_factory)


# SPGD and DPS run from the command line in test_restore.py
COMMAND_LINE = [name for name in RESTORING if name not in ("spgd", "dps")]


@pytest.mark.parametrize("index", range(len(COMMAND_LINE)))
def test_every_sampler_runs_from_the_command_line(index, weights, tmp_path):
    """Each method restores from the command line; one with a step size sweeps two values of it in the same
    run (one compiled call: --set FIELD=A,B)."""
    name = COMMAND_LINE[index]
    task = next(t for t in CORE_TASKS[index % 4:] + CORE_TASKS if runnable(name, t))  # the tasks take turns
    config = small_config(name, task)
    fields = {f.name for f in dataclasses.fields(config)}
    settings = [f"{k}={v}" for k, v in SMALL.items() if k in fields]
    faces = random_faces(tmp_path, names=("a", "b"))
    out = tmp_path / "out"
    arguments = ["--task", task, "--sampler", name, "--input", str(faces), "--weights", weights, "--out", str(out),
                 "--batch-size", "2", "--quiet"]
    step = SAMPLERS[name].step_size
    values = None if step is None else [getattr(config, step), getattr(config, step) / 2]
    if step is not None:
        settings.append(f"{step}={values[0]!r},{values[1]!r}")
    for setting in settings:
        arguments += ["--set", setting]
    assert restore.main(arguments) == 0
    written = json.loads((out / "config.json").read_text())
    assert written["sampler"] == name and written["step_sizes"] == (None if step is None else {step: values})
    assert {k: written["sampler_config"][k] for k in SMALL if k in fields} == {k: SMALL[k] for k in SMALL if k in fields}
    for folder in [out] if step is None else [out / f"{step}-{value:g}" for value in values]:
        records = json.loads((folder / "metrics.json").read_text())["images"]
        assert len(records) == 2 and all(np.isfinite(r["psnr"]) for r in records), folder


def test_a_method_refuses_a_task_it_cannot_run_before_any_work(weights, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="--sampler ddrm cannot restore motion_deblur: .*SVD"):
        restore.main(["--task", "motion_deblur", "--sampler", "ddrm", "--weights", weights, "--out", str(out)])
    with pytest.raises(SystemExit, match="--sampler diffpir needs a linear operator.*hdr is not linear"):
        restore.main(["--task", "hdr", "--sampler", "diffpir", "--weights", weights, "--out", str(out)])
    assert not out.exists()
