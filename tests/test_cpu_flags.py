"""The XLA:CPU settings applied on `import spgd_jax` and by the command lines (spgd_jax.xla_setup.cpu_flags)."""

import os
import subprocess
import sys

import jaxlib
import pytest

from spgd_jax.xla_setup import cpu_flags

# In a fresh process: import spgd_jax as a library user does (or as the command lines do: then also their own
# call of use_fast_cpu_flags), compile SPGD on a tiny UNet, and print what the command line's call added after
# the import, the root ops of the compiled program's XNNPACK/YNNPACK library fusions ("none" if it has none),
# and $XLA_FLAGS.
PROBE = """
import os, re, sys
import spgd_jax
added = spgd_jax.xla_setup.use_fast_cpu_flags() if sys.argv[1] == "cli" else []
import jax, jax.numpy as jnp
config = spgd_jax.UNetConfig(image_size=8, num_channels=32, num_res_blocks=1, channel_mult=(1,),
                             attention_resolutions=(8,), num_head_channels=32, use_scale_shift_norm=True)
x = jnp.zeros((2, 8, 8, 3))
params = spgd_jax.UNet(config).init(jax.random.key(0), x, jnp.zeros((2,)))["params"]
run = lambda p, y: spgd_jax.sample(spgd_jax.make_denoiser(config, p), lambda x, _: x, y, jax.random.key(1),
                                   spgd_jax.SPGDConfig(lr=1.0, steps=2, warmup=1), x_shape=(8, 8, 3)).x
text = jax.jit(run).lower(params, x).compile().as_text()
computations = {block.split()[0].lstrip("%"): block for block in text.split("\\n\\n") if block.strip()}
roots = set()
for callee in re.findall(r"kind=kCustom, calls=%?([\\w.\\-]+)", text):
    roots.update(re.findall(r"ROOT \\S+ = \\S+ ([\\w\\-]+)\\(", computations.get(callee, "")) or ["?"])
print(len(added), ",".join(sorted(roots)) or "none", os.environ.get("XLA_FLAGS", ""))
"""


def probe(mode: str, env: dict) -> tuple[int, str, str]:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    added, library_roots, *flags = done.stdout.split()
    return int(added), library_roots, " ".join(flags)


@pytest.fixture
def fresh(monkeypatch):
    """As before JAX's backends start, with no XLA_FLAGS of the user's."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv(cpu_flags.ENV_OFF, raising=False)
    monkeypatch.setattr(cpu_flags, "_backends_started", lambda: False)
    monkeypatch.setattr(jaxlib, "__version__", cpu_flags.MEASURED_JAXLIB[0] + "9")


def test_flags_are_added_once_and_a_users_own_setting_wins(fresh, monkeypatch):
    assert cpu_flags.use_fast_cpu_flags() == list(cpu_flags.CPU_FLAGS)
    assert cpu_flags.use_fast_cpu_flags() == []  # already there
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type=dot")
    assert cpu_flags.use_fast_cpu_flags() == ["--xla_cpu_experimental_xnn_fusion_type="]
    flags = os.environ["XLA_FLAGS"].split()
    assert flags == ["--xla_force_host_platform_device_count=2", "--xla_cpu_experimental_ynn_fusion_type=dot",
                     "--xla_cpu_experimental_xnn_fusion_type="]


@pytest.mark.parametrize("case", ["switched off", "unmeasured jaxlib", "backends started"])
def test_nothing_is_set_when_off_on_another_jaxlib_or_too_late(fresh, monkeypatch, case):
    if case == "switched off":
        monkeypatch.setenv(cpu_flags.ENV_OFF, "0")
    elif case == "unmeasured jaxlib":
        monkeypatch.setattr(jaxlib, "__version__", "99.1.0")
    else:
        monkeypatch.setattr(cpu_flags, "_backends_started", lambda: True)
    assert cpu_flags.use_fast_cpu_flags() == []
    assert "XLA_FLAGS" not in os.environ


@pytest.mark.skipif(not jaxlib.__version__.startswith(cpu_flags.MEASURED_JAXLIB), reason="flags measured on jaxlib 0.10")
def test_a_plain_import_compiles_the_sampler_with_the_command_lines_settings():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", cpu_flags.ENV_OFF)}
    library = probe("library", env)
    assert library == probe("cli", env)  # the command line's own call adds nothing: the same XLA settings
    # Only dots go to the library fusions (YNNPACK); convolutions, reductions and element-wise ops stay XLA's.
    assert library == (0, "dot", " ".join(cpu_flags.CPU_FLAGS))
    # Turned off, XLA:CPU's defaults hand the same program's convolutions to its library fusions too.
    added, roots, flags = probe("library", {**env, cpu_flags.ENV_OFF: "0"})
    assert (added, flags) == (0, "") and {"dot", "convolution"} <= set(roots.split(","))


LATE_IMPORT = """
import warnings
import jax
jax.numpy.ones(2).block_until_ready()  # starts JAX's backends before spgd_jax is imported
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import spgd_jax
print(sum(issubclass(w.category, spgd_jax.xla_setup.LateFlagsWarning) for w in caught))
"""


@pytest.mark.skipif(not jaxlib.__version__.startswith(cpu_flags.MEASURED_JAXLIB), reason="flags measured on jaxlib 0.10")
@pytest.mark.parametrize("off, warnings", [(False, 1), (True, 0)])
def test_importing_spgd_jax_too_late_warns_unless_turned_off(off, warnings):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", cpu_flags.ENV_OFF)}
    if off:
        env[cpu_flags.ENV_OFF] = "0"
    done = subprocess.run([sys.executable, "-c", LATE_IMPORT], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) == warnings
