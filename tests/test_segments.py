"""A run in segments (spgd_jax.samplers.run_in_segments): the same result as one call, progress between the calls."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sampler_toys import gaussian_denoiser
from spgd_jax import operators, samplers
from spgd_jax.samplers import SAMPLERS, SPGDConfig, Segment, forward_for, presets, sample, sample_sharded
from spgd_jax.samplers.driver import segment_length

RESTORING = [name for name, sampler in SAMPLERS.items() if sampler.conditional]
SMALL = {"steps": 4, "warmup": 2, "iterations": 2, "ode_steps": 2, "langevin_steps": 2, "candidates": 3,
         "cg_iterations": 3, "init_iterations": 3}


def small_config(name: str):
    config = presets.config(name, "inpaint", tuned=False)
    fields = {f.name for f in dataclasses.fields(config)}
    return dataclasses.replace(config, **{k: v for k, v in SMALL.items() if k in fields})


@pytest.fixture(scope="module")
def problem():
    operator = operators.get("inpaint", 8)
    op_params = operator.init_params(jax.random.key(0), 3, 8)
    x = 0.5 * jax.random.normal(jax.random.key(2), (3, 8, 8, 3))
    return operator, np.asarray(operator.measure(jax.random.key(1), x, op_params)), op_params


def assert_same(a, b, context):
    """The same pytree of arrays, to float32 round-off of the values' scale."""
    a, b = a._asdict(), b._asdict()
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b), context
    for path, left in jax.tree_util.tree_leaves_with_path(a):
        right = np.asarray(dict(jax.tree_util.tree_leaves_with_path(b))[path])
        left = np.asarray(left)
        assert left.shape == right.shape and left.dtype == right.dtype, (context, path)
        if left.dtype == bool or np.issubdtype(left.dtype, np.integer):
            np.testing.assert_array_equal(left, right, err_msg=f"{context} {jax.tree_util.keystr(path)}")
        else:
            finite = np.abs(right[np.isfinite(right)])  # a diverged run's losses may hold inf or NaN
            scale = max(1.0, float(finite.max())) if finite.size else 1.0
            np.testing.assert_allclose(left, right, rtol=0, atol=1e-5 * scale,
                                       err_msg=f"{context} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize(("steps", "length"), [(100, 10), (1000, 25), (20000, 25), (20, 2), (25, 1), (36, 3), (7, 1), (1, 1), (480, 24)])
def test_segment_length_divides_the_schedule_into_ten_or_more_equal_parts_of_at_most_25(steps, length):
    assert segment_length(steps) == length
    assert steps % length == 0


def test_segment_length_refuses_an_empty_schedule():
    with pytest.raises(ValueError, match="at least one outer step"):
        segment_length(0)


@pytest.mark.parametrize("name", RESTORING)
def test_every_sampler_run_in_segments_equals_one_call_and_reports_every_step(name, problem):
    operator, y, op_params = problem
    config = small_config(name)
    forward = forward_for(config, operator)
    run = lambda progress: sample_sharded(gaussian_denoiser, forward, y, jax.random.key(3), config,
                                                   op_params, x_shape=(8, 8, 3), progress=progress)
    calls = []
    assert_same(run(calls.append), run(None), name)
    assert calls == list(range(len(calls))) and len(calls) >= 2, calls  # every outer step once, in order


def test_segments_keep_the_trajectory_diagnostics_divergence_and_a_sweep(problem):
    """Everything a run records survives the carry between calls, also with a leading axis of step sizes
    (one of which diverges)."""
    operator, y, op_params = problem
    config = SPGDConfig(lr=2.0, steps=20, warmup=2, trajectory_every=3, diagnostics=True)
    run = lambda progress: sample_sharded(gaussian_denoiser, operator.forward, y, jax.random.key(3), config,
                                                   op_params, x_shape=(8, 8, 3), progress=progress,
                                                   step_sizes=[0.5, 2.0, 1e30])
    calls = []
    segmented, whole = run(calls.append), run(None)
    assert_same(segmented, whole, "spgd sweep")
    assert calls == list(range(20))
    assert segmented.trajectory.shape == (3, 3, 7, 8, 8, 3) and segmented.diagnostics
    assert bool(segmented.diverged[2].all()) and not bool(segmented.diverged[0].any())


def test_an_exception_from_progress_stops_the_run_after_its_segment(problem):
    operator, y, op_params = problem
    config = SPGDConfig(lr=1.0, steps=20, warmup=2)
    seen = []

    def progress(i):
        seen.append(i)
        if i == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample_sharded(gaussian_denoiser, operator.forward, y, jax.random.key(3), config, op_params,
                                x_shape=(8, 8, 3), progress=progress)
    assert seen == [0, 1, 2, 3, 4]


def test_segments_run_under_a_plain_jit_too(problem):
    """sample with progress runs in segments of one jitted program: no devices or sharding."""
    operator, y, op_params = problem
    config = SPGDConfig(lr=1.0, steps=6, warmup=2)
    run = lambda progress: sample(gaussian_denoiser, operator.forward, y, jax.random.key(3), config, op_params,
                                  x_shape=(8, 8, 3), progress=progress)
    calls = []
    assert_same(run(calls.append), run(None), "jit")
    assert calls == list(range(6))
    x_init = jnp.zeros((3, 8, 8, 3))
    with pytest.raises(ValueError, match="does not fit"):
        samplers.run(gaussian_denoiser, operator.forward, y, x_init, config, op_params, segment=Segment(0, 7))


def test_a_run_in_segments_traces_the_step_no_more_often_than_one_call(problem):
    """The first carry (a segment of no steps) and the last program trace no step: the network is traced as
    often as for one whole call (a cold start's tracing and compiling, ~2 s per trace for the default prior)."""
    operator, y, op_params = problem
    config = SPGDConfig(lr=1.0, steps=6, warmup=2)

    def traces(progress):
        count = [0]

        def denoiser(x, sigma):  # a new function each time: a new program, traced afresh
            count[0] += 1
            return gaussian_denoiser(x, sigma)

        sample(denoiser, operator.forward, y, jax.random.key(3), config, op_params, x_shape=(8, 8, 3),
               progress=progress)
        return count[0]

    whole = traces(None)
    assert whole >= 1
    assert traces(lambda i: None) == whole
