"""Bad input never crashes deep inside JAX and never loses work (the restore CLI, tiny 16 px prior).

Every refusal is a SystemExit whose message names the problem and the fix. Runs that sample use the
settings of cli_helpers.FAST, so they share one compiled sampler with test_restore.py.
Refusing pickled code in .pt files is tested where they are read: test_convert.py.
"""

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import FAST, picture, popen_as_from_a_terminal, temporary_files, tiny_weights
from spgd_jax import restore

NOT_QUIET = [a for a in FAST if a != "--quiet"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_weights(tmp_path_factory)


@pytest.fixture(scope="module")
def modes(tmp_path_factory):
    """One 16 px image in each of greyscale, RGBA, palette and 16-bit greyscale, and a wide 20x40 RGB one."""
    folder = tmp_path_factory.mktemp("modes")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)).save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert("P").save(folder / "palette.png")
    Image.fromarray(rng.integers(0, 65536, (16, 16), dtype=np.uint16)).save(folder / "sixteen.png")
    Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)).save(folder / "wide.png")
    return folder


@pytest.fixture(scope="module")
def modes_run(weights, modes, tmp_path_factory):
    """(out folder, stderr) of a run on the four images, with notices shown."""
    out = tmp_path_factory.mktemp("modes-run") / "out"
    stderr = io.StringIO()  # capsys is per test; this fixture is per module
    with contextlib.redirect_stderr(stderr):
        assert restore.main(["--task", "inpaint", "--input", str(modes), "--weights", weights, "--out", str(out),
                             *NOT_QUIET]) == 0
    return out, stderr.getvalue()


def cli(*arguments):
    return restore.main([*arguments])


# ------------------------------------------------------------------ option values


@pytest.mark.parametrize("arguments, message", [
    (["--sampler", "ddim"], "invalid choice: 'ddim'"),
    (["--task", "sr5"], "invalid choice: 'sr5'"),
    (["--set", "warmup"], "'warmup' is not FIELD=VALUE"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_malformed_option_values_are_argparse_errors(arguments, message, weights, capsys):
    with pytest.raises(SystemExit) as info:
        cli("--task", "sr4", "--weights", weights, *arguments)  # a second --task replaces the first
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    (["--adm", "bogus"], "SPGDConfig.adm must be one of"),
    (["--lr", "fast"], "--lr fast: lr takes a value of type float"),
    (["--lr", "1,2,1"], "lists a value twice"),
    (["--steps", "many"], "steps takes a value of type int"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--lr", "1,0"], "lr must be > 0"),
    (["--lr", "nan"], r"lr must be > 0 \(a finite number\)"),
    (["--steps", "1"], "steps"),
    (["--steps", "4,8"], "only the step size takes several values.*--lr"),
    (["--beta", "1.5"], r"beta must be in \[0, 1\)"),
    (["--sigma-y", "-0.1"], "--sigma-y must be >= 0"),
    (["--sampler", "dps", "--diagnostics"], "--diagnostics is not a setting of --sampler dps"),
    (["--sampler", "dps", "--zeta", "0"], "zeta must be > 0"),
    (["--sampler", "dps", "--lr", "1"], "--lr is not a setting of --sampler dps.*--zeta"),
    (["--zeta", "1"], "--zeta is not a setting of --sampler spgd"),
    (["--set", "momentum=0.9"], "SPGDConfig has no field 'momentum'"),
    (["--set", "nosuch=1"], "SPGDConfig has no field 'nosuch'"),
    (["--set", "warmup=two"], "warmup takes a value of type int"),
    (["--set", "diagnostics=maybe"], "diagnostics takes a value of type bool"),
    (["--measurement", "m.png"], "--measurement m.png is not an .npz file"),
])
def test_out_of_range_values_are_clear_errors(arguments, message, weights, tmp_path):
    """Every bad value is a usage error: exit status 2 and a message naming the argument and the fix."""
    with pytest.raises(SystemExit, match=message) as info:
        cli("--task", "sr4", "--weights", weights, "--out", str(tmp_path / "out"), "--quiet", *arguments)
    assert info.value.code == 2
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ images


def test_other_modes_and_sizes_are_converted_with_notices(modes_run):
    out, stderr = modes_run
    notices = [line for line in stderr.splitlines() if line.startswith("notice: ")]
    for name, mode in (("grey", "L"), ("rgba", "RGBA"), ("palette", "P"), ("sixteen", "I;16")):
        assert any(f"{name}.png: {mode}" in line and "RGB" in line for line in notices), (name, stderr)
    assert any("wide.png: 40x20 centre-cropped to 20x20" in line for line in notices)
    assert any("wide.png: resized from 20x20 to 16x16" in line for line in notices)
    assert len(notices) == 6
    for name in ("grey", "rgba", "palette", "sixteen", "wide"):
        assert picture(out / "restored" / f"{name}.png").shape == (16, 16, 3)


def test_corrupt_or_truncated_image_is_named_skipped_and_the_others_restored(weights, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "good.png")
    (folder / "bad.png").write_bytes((folder / "good.png").read_bytes()[:40])
    out = tmp_path / "out"
    assert cli("--task", "inpaint", "--input", str(folder), "--weights", weights, "--out", str(out),
               *FAST) == restore.EXIT_SOME_SKIPPED == 4
    assert re.search(r"bad.png is not a readable image.*re-export it", capsys.readouterr().err)
    assert picture(out / "restored" / "good.png").shape == (16, 16, 3) and not (out / "restored" / "bad.png").exists()
    skipped = json.loads((out / "manifest.json").read_text())["skipped"]
    assert [s["identity"] for s in skipped] == ["bad.png"] and "not a readable image" in skipped[0]["reason"]


# ------------------------------------------------------------------ measurements


def _npy_bytes(array):
    stream = io.BytesIO()
    np.save(stream, array)
    return stream.getvalue()


def _measurement(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("case, task, message", [
    ("other task", "sr4", r"is a measurement of task 'inpaint', not 'sr4'; pass --task inpaint"),
    ("wrong size", "sr4", r"measurement has shape \(8, 8, 3\), but task 'sr4' with a 16 px model makes \(4, 4, 3\)"),
    ("no mask", "inpaint", r"holds operator parameters \[\], but task 'inpaint' at 16 px needs \['mask'\]"),
    ("mask size", "inpaint", r"parameter 'mask' has shape \(2, 8, 8, 1\), task 'inpaint' at 16 px needs \(2, 16, 16"),
    ("not npz", "sr4", "not a measurement .npz written by spgd_jax.restore"),
    ("npy", "sr4", "not a measurement .npz written by spgd_jax.restore .*one unnamed array"),
])
def test_measurement_that_does_not_fit_is_refused(case, task, message, weights, tmp_path):
    y16 = np.zeros((2, 16, 16, 3), np.float32)
    path = {
        "other task": lambda p: _measurement(p, y=y16, task=np.asarray("inpaint")),
        "wrong size": lambda p: _measurement(p, y=np.zeros((2, 8, 8, 3), np.float32)),
        "no mask": lambda p: _measurement(p, y=y16),
        "mask size": lambda p: _measurement(p, y=y16, param_mask=np.ones((2, 8, 8, 1), np.float32)),
        "not npz": lambda p: (p.write_bytes(b"PK\x03\x04 broken"), str(p))[1],
        "npy": lambda p: (p.write_bytes(_npy_bytes(y16)), str(p))[1],
    }[case](tmp_path / "m.npz")
    with pytest.raises(SystemExit, match=message):
        cli("--task", task, "--measurement", path, "--weights", weights, "--out", str(tmp_path / "out"), *FAST)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ weights


def _damaged(weights, tmp_path, how):
    path = tmp_path / "w"
    shutil.copytree(weights, path)
    if how == "other config":
        meta = json.loads((path / "config.json").read_text())
        meta["config"]["num_channels"] *= 2
        (path / "config.json").write_text(json.dumps(meta))
    elif how == "corrupt params":
        for p in (path / "params").rglob("*"):
            if p.is_file() and p.name != "_METADATA":
                p.write_bytes(b"garbage")
    elif how == "partial":
        shutil.rmtree(path / "params")
    elif how in ("unknown family", "unknown preconditioning"):
        meta = json.loads((path / "config.json").read_text())
        meta["family" if how == "unknown family" else "preconditioning"] = "dit" if how == "unknown family" else "ve"
        (path / "config.json").write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize("how, message", [
    ("other config", "params do not match the config"),
    ("corrupt params", "corrupt or partial checkpoint"),
    ("partial", "params/ is missing"),
    ("unknown family", "unknown network family 'dit'"),
    ("unknown preconditioning", "unknown preconditioning 've'"),
])
def test_broken_weights_are_refused_before_any_work(how, message, weights, tmp_path):
    path = _damaged(weights, tmp_path, how)
    with pytest.raises(SystemExit, match=f"cannot load weights from {path}: .*{message}"):
        cli("--task", "sr4", "--weights", str(path), "--out", str(tmp_path / "out"), *FAST)
    assert not (tmp_path / "out").exists()


def test_a_corrupt_weights_file_is_one_error_line_without_tracebacks(weights, tmp_path):
    path = tmp_path / "w"
    shutil.copytree(weights, path)
    data = max((p for p in (path / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])  # the arrays' own bytes, cut short
    done = subprocess.run([sys.executable, "-m", "spgd_jax.restore", "--task", "sr4", "--weights", str(path), "--out",
                           str(tmp_path / "out"), *FAST], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    # tensorstore's reads still in flight used to print a dozen "Event loop is closed" tracebacks after it
    assert done.stderr.startswith(f"error: cannot load weights from {path}: could not read the params"), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_pytorch_file_as_weights_is_refused_unread_with_the_convert_command(tmp_path):
    marker = tmp_path / "code-ran"
    pt = tmp_path / "model.pt"
    pt.write_bytes(pickle.dumps({"trap": _RunsCodeWhenUnpickled(marker)}))
    with pytest.raises(SystemExit, match=r"is a file; it needs a checkpoint directory.*python -m spgd_jax.convert .*model.pt"):
        cli("--task", "sr4", "--weights", str(pt), "--out", str(tmp_path / "out"), *FAST)
    assert not marker.exists() and not (tmp_path / "out").exists()


# ------------------------------------------------------------------ divergence


def test_a_diverging_image_is_flagged_and_the_others_are_written(modes_run, weights, tmp_path, capsys):
    out, _ = modes_run
    with np.load(out / "measurement.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["y"][1] = 3e38  # a residual beyond float32: image 1's gradient overflows at once
    poisoned = _measurement(tmp_path / "poisoned.npz", **arrays)
    assert cli("--task", "inpaint", "--measurement", poisoned, "--weights", weights, "--out", str(tmp_path / "o"),
               *FAST) == 0
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    names = [str(n) for n in arrays["names"]]
    assert [r["diverged"] for r in metrics["images"]] == [False, True, False, False, False]
    assert metrics["images"][1]["diverged_at_step"] == 0
    assert all("diverged_at_step" not in r for i, r in enumerate(metrics["images"]) if i != 1)
    finite = [r["residual_rms"] for i, r in enumerate(metrics["images"]) if i != 1]
    np.testing.assert_allclose(metrics["mean_std_over_finite_images"]["residual_rms"]["mean"], np.mean(finite),
                               rtol=1e-6)
    for name in names:  # every image is written, the diverged one as its last finite state
        assert picture(tmp_path / "o" / "restored" / f"{name}.png").shape == (16, 16, 3)
    err = capsys.readouterr().err
    assert f"warning: {names[1]} diverged" in err and "at outer step 0" in err and "smaller --lr" in err
    assert err.count("warning:") == 1


# ------------------------------------------------------------------ Ctrl-C


def _interrupt_inside(monkeypatch, owner, name):
    """Makes owner.name write a few bytes into its stream, then raise KeyboardInterrupt (as Ctrl-C would)."""

    def interrupted(*args, **kwargs):
        stream = next(a for a in (*args, *kwargs.values()) if hasattr(a, "write"))
        stream.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(owner, name, interrupted)


def test_ctrl_c_while_writing_leaves_the_folder_as_it_was(modes, weights, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _interrupt_inside(monkeypatch, np, "savez")  # measurement.npz, written after the measurement pictures
    with pytest.raises(KeyboardInterrupt):
        cli("--task", "inpaint", "--input", str(modes), "--weights", weights, "--out", str(out), *FAST)
    monkeypatch.undo()
    assert not out.exists()  # the run made it: nothing is left, not even staged pictures

    assert cli("--task", "inpaint", "--input", str(modes), "--weights", weights, "--out", str(out), *FAST) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _interrupt_inside(monkeypatch, Image.Image, "save")  # inside the very first PNG of a second run
    with pytest.raises(KeyboardInterrupt):  # a sweep: a run as a whole, swapped in once complete
        cli("--task", "inpaint", "--input", str(modes), "--weights", weights, "--out", str(out), "--seed", "1",
            "--lr", "1,2", "--overwrite", *FAST)
    assert temporary_files(out) == []
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # the earlier run, untouched
    with pytest.raises(KeyboardInterrupt):  # a dataset run (--input) starts afresh: the earlier run is gone
        cli("--task", "inpaint", "--input", str(modes), "--weights", weights, "--out", str(out), "--seed", "1",
            "--overwrite", *FAST)
    assert temporary_files(out) == [] and not list(out.glob("restored/*"))
    assert json.loads((out / "manifest.json").read_text())["settings"]["seed"] == 1


def test_ctrl_c_just_as_the_temporary_file_is_made_leaves_none(tmp_path, monkeypatch):
    from spgd_jax.io import files

    made = os.open

    def interrupted_on_return(*args, **kwargs):  # Ctrl-C between the file's creation and its handle's use
        made(*args, **kwargs)
        raise KeyboardInterrupt

    (tmp_path / "a.json").write_text("earlier")
    monkeypatch.setattr(os, "open", interrupted_on_return)
    with pytest.raises(KeyboardInterrupt):
        files.write_json(tmp_path / "a.json", {"later": 1})
    monkeypatch.undo()
    assert temporary_files(tmp_path) == [] and (tmp_path / "a.json").read_text() == "earlier"


def test_ctrl_c_while_sampling_leaves_no_output_folder(modes, weights, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    from spgd_jax.restore import dataset

    monkeypatch.setattr(dataset, "sample_sharded", interrupted)  # an --input run: a dataset run
    with pytest.raises(KeyboardInterrupt):
        cli("--task", "inpaint", "--input", str(modes), "--weights", weights, "--out", str(tmp_path / "a" / "b"), *FAST)
    assert not (tmp_path / "a" / "b").exists()


def test_command_line_entry_reports_an_interrupt(monkeypatch, capsys):
    def interrupted(argv=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(restore, "main", interrupted)
    assert restore.entry() == 130
    assert "interrupted" in capsys.readouterr().err


def test_ctrl_c_stops_the_compiled_run_within_seconds(weights, modes, tmp_path):
    """SIGINT to the command line while the compiled sampler runs: it stops within seconds (not after the
    whole run), exits with 130 and writes nothing."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "spgd_jax.restore", "--task", "inpaint", "--input", str(modes), "--weights",
               weights, "--out", str(out), "--steps", "20000", "--warmup", "2", "--batch-size", "2"]
    process = popen_as_from_a_terminal(command, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    lines = []
    for line in process.stderr:  # not a terminal: plain progress lines, no carriage returns
        lines.append(line)
        if "compiled in" in line:  # sampling has started (the run would take minutes)
            break
    assert not any("\r" in line for line in lines), lines
    interrupted = time.perf_counter()
    process.send_signal(signal.SIGINT)
    rest = process.communicate(timeout=60)[1]
    waited = time.perf_counter() - interrupted
    assert process.returncode == 130, "".join(lines) + rest
    assert waited < 10, f"took {waited:.1f} s to stop"
    assert "interrupted: nothing of this run was written" in rest
    assert not out.exists()


def test_a_run_where_no_image_finished_exits_with_its_own_status(modes_run, weights, tmp_path, capsys):
    out, _ = modes_run
    with np.load(out / "measurement.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["y"][:] = 3e38  # every image's gradient overflows at once
    poisoned = _measurement(tmp_path / "poisoned.npz", **arrays)
    assert cli("--task", "inpaint", "--measurement", poisoned, "--weights", weights, "--out", str(tmp_path / "o"),
               *NOT_QUIET) == restore.EXIT_NO_IMAGE_FINISHED == 3
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert all(r["diverged"] and r["diverged_at_step"] == 0 for r in metrics["images"])
    err = capsys.readouterr().err
    assert "error: no image finished" in err and "no image finished" in err.splitlines()[-2]
    assert "exit status" in restore.build_parser().format_help()


# ------------------------------------------------------------------ files


def test_written_files_get_the_umask_mode(modes, weights, tmp_path):
    previous = os.umask(0o027)
    try:
        assert cli("--task", "inpaint", "--input", str(modes), "--weights", weights, "--out", str(tmp_path / "o"),
                   "--video", *FAST) == 0
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "o").rglob("*") if p.is_file()]
    suffixes = {p.suffix for p in files}
    assert {".png", ".json", ".npz", ".gif"} <= suffixes
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o640)}
    folders = [p for p in (tmp_path / "o").rglob("*") if p.is_dir()]
    assert {oct(p.stat().st_mode & 0o777) for p in folders} == {oct(0o750)}


def test_overwrite_replaces_the_earlier_run_as_a_whole_and_keeps_the_users_files(modes, weights, tmp_path):
    out = tmp_path / "o"
    assert cli("--task", "inpaint", "--input", str(modes), "--weights", weights, "--out", str(out), "--lr", "1,2",
               "--diagnostics", *FAST) == 0
    (out / "notes.txt").write_text("mine")
    (out / "lr-notes").mkdir()  # not a sweep folder of this tool
    assert (out / "lr-1" / "restored" / "grey.png").exists()
    with pytest.raises(SystemExit, match="already exist.*--overwrite"):
        cli("--task", "inpaint", "--input", str(modes / "wide.png"), "--weights", weights, "--out", str(out), *FAST)
    assert cli("--task", "inpaint", "--input", str(modes / "wide.png"), "--weights", weights, "--out", str(out),
               "--overwrite", *FAST) == 0
    found = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert found == ["config.json", "finished", "finished/wide.npz", "grid.png", "logs", "logs/process-0.log",
                     "lr-notes", "manifest.json", "measurement", "measurement.npz", "measurement/wide.png",
                     "metrics.json", "notes.txt", "restored", "restored/wide.png", "skipped"]
    assert (out / "notes.txt").read_text() == "mine"
