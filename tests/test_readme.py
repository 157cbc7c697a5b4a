"""The README and the model card say what is true: their Python blocks run as written, every `spgd_jax.x`
they name exists and so does every repository path, the layout table is the tree, and CI runs the
README's test command."""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
MODEL_CARD = (ROOT / "weights" / "MODEL_CARD.md").read_text()


def _blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _resolves(name: str) -> bool:
    """Whether a dotted name spgd_jax.a.b... is a module or an attribute of one."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            if not hasattr(found, part):
                return False
            found = getattr(found, part)
        return True
    return False


@pytest.mark.parametrize("document", ["README.md", "weights/MODEL_CARD.md"])
def test_every_name_and_path_the_documents_give_exists(document):
    text = (ROOT / document).read_text()
    names = set(re.findall(r"`[^`]*?\b(spgd_jax(?:\.\w+)+)", text))
    assert names and not [n for n in sorted(names) if not _resolves(n)]
    paths = set(re.findall(r"`((?:spgd_jax|weights|benchmarks|tests|convert)/[^`\s<>]*)`", text))
    assert paths and not [p for p in sorted(paths) if not (ROOT / p).exists()]
    assert "spgd_jax.load(" not in text  # gone: spgd_jax.load_denoiser or spgd_jax.io.checkpoint.load


def test_the_model_cards_python_block_runs_as_written_from_the_repository_root():
    (code,) = _blocks("python", MODEL_CARD)
    check = "\nprint(type(meta.config).__name__, meta.preconditioning, callable(denoiser))\n"
    done = subprocess.run([sys.executable, "-c", code + check], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-3:] == ["UNetConfig", "vp", "True"]


def test_the_extension_example_registers_a_method_that_runs(tmp_path):
    """The README's one-module method: registered, listed, and run by sample (tests/test_extension.py runs
    a toy method from every view and the command line)."""
    code = next(block for block in _blocks("python") if "register_sampler" in block)
    check = """
from spgd_jax import operators
op = operators.get("inpaint", 8)
params = op.init_params(jax.random.key(0), 2, 8)
y = op.measure(jax.random.key(1), jnp.zeros((2, 8, 8, 3)), params)
denoiser = lambda x, sigma: x / (1 + sigma[:, None, None, None] ** 2)
result = samplers.sample(denoiser, op.forward, y, jax.random.key(2), DescentConfig(steps=3), params, x_shape=(8, 8, 3))
print(samplers.SAMPLERS["descent"].step_size, result.x.shape, samplers.nfe(DescentConfig()))
"""
    done = subprocess.run([sys.executable, "-c", code + check], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[-2] == "rate (2, 8, 8, 3) 20"


def test_the_readmes_numbers_match_the_presets():
    """DPS: 1000 NFE as published (the table), 500 steps in the default prior's preset (the text)."""
    from spgd_jax import samplers

    assert samplers.nfe(samplers.presets.config("dps", "sr4", tuned=False)) == 1000
    assert samplers.nfe(samplers.presets.dps_config("sr4")) == 500
    assert "`--sampler dps` runs DPS's tuned preset, 500 EDM steps" in " ".join(README.split())


def test_the_quick_start_is_two_commands_and_ci_runs_the_second():
    quick_start = README[README.index("## Quick start"):README.index("## The command line")]
    commands = re.findall(r"```bash\n(.*?)\n```", quick_start, flags=re.S)
    assert len(commands) == 2 and "python -m spgd_jax.restore --task sr4" in commands[0]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_the_python_example_runs_as_written_from_another_folder_and_restores(tmp_path):
    code = _blocks("python")[0]
    check = "\nprint('PSNR', float(spgd_jax.metrics.psnr(result.x, x)[0]), bool(result.diverged[0]))\n"
    done = subprocess.run([sys.executable, "-c", code + check], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    psnr, diverged = re.search(r"PSNR ([0-9.]+) (\w+)", done.stdout).groups()
    # Gaussian deblurring of the demo face with the preset: the blurred measurement has 20.5 dB, one
    # sample 24.4 (Wiener 25.0; on 50 test faces one sample is +0.4 dB over Wiener on average).
    assert diverged == "False" and float(psnr) > 22.5


def test_the_layout_table_is_the_tree():
    layout = README[README.index("## Layout"):README.index("## Licence")]
    rows = re.findall(r"^\| (`[^|]+`) \|", layout, flags=re.M)
    listed = {path.strip("`") for row in rows for path in re.findall(r"`([^`]+)`", row)}
    for path in listed:
        base = "spgd_jax/" if not ("/" in path or path in {"convert", "weights"}) else ""
        assert (ROOT / (base + path)).exists(), f"the README's layout lists {path}, which does not exist"
    packages = {f"spgd_jax/{p.name}/" for p in (ROOT / "spgd_jax").iterdir() if (p / "__init__.py").exists()}
    modules = {p.name for p in (ROOT / "spgd_jax").glob("*.py") if p.name != "__init__.py"}
    assert packages <= listed, f"sub-packages missing from the layout table: {sorted(packages - listed)}"
    assert modules <= {Path(p).name for p in listed}, f"modules missing: {sorted(modules - {Path(p).name for p in listed})}"
    assert {"convert/", "weights/", "benchmarks/", "tests/"} <= listed
