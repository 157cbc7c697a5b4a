"""The XLA:CPU settings of the command lines (spgd_jax.io.cpu_flags)."""

import os
import subprocess
import sys

import jaxlib
import pytest

from spgd_jax.io import cpu_flags

# In a fresh process: optionally set the flags, then compile a convolution's gradient and say whether XLA:CPU
# handed any of it to an XNNPACK/YNNPACK library fusion.
PROBE = """
import sys
from spgd_jax.io.cpu_flags import use_fast_cpu_flags
added = use_fast_cpu_flags() if sys.argv[1] == "on" else []
import jax, jax.numpy as jnp
loss = lambda x, k: jnp.sum(jax.nn.silu(jax.lax.conv_general_dilated(
    x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))) ** 2)
text = jax.jit(jax.grad(loss)).lower(jnp.ones((2, 16, 16, 32)), jnp.ones((3, 3, 32, 32))).compile().as_text()
print(len(added), "ynn_fusion" in text or "xnn_fusion" in text)
"""


def probe(mode: str, env: dict | None = None) -> tuple[int, bool]:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    added, library = done.stdout.split()
    return int(added), library == "True"


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
def test_this_xla_knows_the_flags_and_they_turn_the_library_fusions_off():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", cpu_flags.ENV_OFF)}
    assert probe("off", env) == (0, True)  # XLA:CPU's default uses them for this program
    assert probe("on", env) == (len(cpu_flags.CPU_FLAGS), False)
