"""The README says what is true: its Python example runs as written, its layout table is the tree, and
CI runs its test command."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_the_quick_start_is_two_commands_and_ci_runs_the_second():
    quick_start = README[README.index("## Quick start"):README.index("## The command line")]
    commands = re.findall(r"```bash\n(.*?)\n```", quick_start, flags=re.S)
    assert len(commands) == 2 and "python -m spgd_jax.restore --task sr4" in commands[0]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_the_python_example_runs_as_written_from_another_folder_and_restores(tmp_path):
    (code,) = _blocks("python")
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
