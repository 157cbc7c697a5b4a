"""The restore command's arguments: flags from the registered methods' config fields, read before JAX.

The parser reads spgd_jax.catalog, a plain-data copy of the registries, so that --help and a bad argument
answer without importing JAX; here it is checked against the live registries. For every registered method:
its step size takes several values (a sweep), its divergence hint names a flag it accepts, and a flag of
another method is refused with a usage error (exit status 2).
"""

import re
import subprocess
import sys
import textwrap

import pytest

from spgd_jax import catalog, operators, samplers
from spgd_jax.restore import EXIT_USAGE, build_parser, main
from spgd_jax.restore._args import NOT_FLAGS, Request, UsageError, check_arguments, flag, hint

RESTORING = [name for name, sampler in samplers.SAMPLERS.items() if sampler.conditional]
BUILT_IN = list(catalog.SAMPLERS)


def _check(*arguments):
    return check_arguments(build_parser().parse_args(["--task", "sr4", *arguments]))


def test_the_catalog_is_the_registries():
    """catalog.SAMPLERS and TASKS describe the built-in methods and tasks exactly; on a change, rewrite them
    as the message shows."""
    live = {name: d for name, d in samplers.describe().items() if name in BUILT_IN}
    assert list(samplers.SAMPLERS)[:len(BUILT_IN)] == BUILT_IN, "a built-in method is missing from the catalog"
    assert catalog.SAMPLERS == live, f"spgd_jax/catalog.py SAMPLERS must be {live!r}"
    tasks = {name: {"linear": operators.get(name, 64).linear} for name in operators.TASKS}
    assert catalog.TASKS == tasks, f"spgd_jax/catalog.py TASKS must be {tasks!r}"
    assert catalog.samplers() == samplers.describe()  # JAX imported here: the live registry answers


@pytest.mark.parametrize("name", RESTORING)
def test_every_config_field_is_a_flag_of_its_method(name):
    parser = build_parser()
    options = {option for action in parser._actions for option in action.option_strings}
    fields = samplers.describe()[name]["fields"]
    assert {flag(f) for f in fields if f not in NOT_FLAGS} <= options
    assert all(f in fields for f in NOT_FLAGS if f in fields)  # settable with --set


@pytest.mark.parametrize("name", RESTORING)
def test_every_step_size_sweeps_and_only_the_step_size(name):
    step = samplers.SAMPLERS[name].step_size
    fields = samplers.describe()[name]["fields"]
    count = next(f for f, kind in fields.items() if kind == "int" and f not in NOT_FLAGS)  # steps, iterations
    if step is None:
        with pytest.raises(UsageError, match="only the step size takes several values.*that is none"):
            _check("--sampler", name, flag(count), "4,8")
        return
    for arguments in ([flag(step), "0.5,2"], ["--set", f"{step}=0.5,2"]):
        request = _check("--sampler", name, *arguments)
        assert request == Request(name, {step: 0.5}, (0.5, 2.0)), arguments
    with pytest.raises(UsageError, match=f"only the step size.*{flag(step)}"):
        _check("--sampler", name, flag(count), "4,8")


@pytest.mark.parametrize("name", RESTORING)
def test_every_hint_names_a_flag_that_method_accepts(name):
    advice = hint(samplers.describe()[name])
    flags = re.findall(r"--[a-z][a-z-]*", advice)
    assert flags, advice
    for option in flags:
        _check("--sampler", name, option, "4")  # a usage error if --sampler name did not take it


@pytest.mark.parametrize("name", RESTORING)
def test_a_flag_of_another_method_is_a_usage_error(name):
    own = samplers.describe()[name]["fields"]
    other = next(f for d in samplers.describe().values() for f in d["fields"] if f not in own and f not in NOT_FLAGS)
    with pytest.raises(SystemExit, match=f"{flag(other)} is not a setting of --sampler {name}") as info:
        main(["--task", "sr4", "--sampler", name, flag(other), "1"])
    assert info.value.code == EXIT_USAGE


def test_arguments_are_checked_before_jax_is_imported():
    """--help and a usage error leave JAX unimported (a fresh interpreter; no timing)."""
    code = textwrap.dedent("""
        import sys
        from spgd_jax.restore import entry
        sys.argv = ["restore", *sys.argv[1:]]
        try:
            status = entry()
        except SystemExit as error:
            status = error.code
        print("jax" in sys.modules, status)
    """)
    for arguments, status in ((["--help"], 0), (["--task", "sr4", "--set", "nosuch=1"], 2),
                              (["--task", "sr4", "--lr", "-1"], 2), (["--task", "sr5"], 2),
                              (["--task", "sr4", "--measurement", "m.txt"], 2)):
        done = subprocess.run([sys.executable, "-c", code, *arguments], capture_output=True, text=True, timeout=60)
        assert done.stdout.split()[-2:] == ["False", str(status)], (arguments, done.stdout, done.stderr[-2000:])
