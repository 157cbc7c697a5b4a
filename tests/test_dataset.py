"""Dataset runs (issue 26): listing and prefetch, the manifest, per-image randomness, and whole runs of 16
faces and a corrupt file on a tiny prior (16 px, 3 steps): one process, two processes through
jax.distributed on the loopback address with one killed midway, Ctrl-C and resume, refusal and --overwrite.

The whole runs start tests/dataset_worker.py processes (spgd_jax.restore.dataset.run_dataset); every
resumed or split run must give the same bytes as the uninterrupted single-process one.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from cli_helpers import popen_as_from_a_terminal, random_faces, temporary_files, tiny_weights
from dataset_worker import tiny_run
from spgd_jax import operators
from spgd_jax.io.stacked_npz import write_stacked_npz
from spgd_jax.restore import image_stream
from spgd_jax.restore._args import UsageError
from spgd_jax.restore.dataset import EXIT_SOME_SKIPPED, image_key, run_dataset
from spgd_jax.restore.image_stream import list_images, read_batches
from spgd_jax.restore.manifest import Manifest, settings_differences
from spgd_jax.restore.processes import share

WORKER = Path(__file__).parent / "dataset_worker.py"
NAMES = [f"face{i:02d}" for i in range(16)]
KILL_WAIT_S = 120  # a worker must reach the point a test waits for within this


# -- listing, reading, keys, manifest -----------------------------------------------------------------

def test_listing_is_sorted_by_relative_path_and_names_repeated_stems_apart(tmp_path):
    random_faces(tmp_path, names=("b", "a", "c"))
    (tmp_path / "c.jpg").write_bytes((tmp_path / "c.png").read_bytes())
    (tmp_path / "notes.txt").write_text("not an image")
    entries = list_images(str(tmp_path))
    assert [e.identity for e in entries] == ["a.png", "b.png", "c.jpg", "c.png"]
    assert [e.name for e in entries] == ["a", "b", "c_jpg", "c_png"]
    sub = tmp_path / "sub"
    sub.mkdir()
    random_faces(sub, names=("d",))
    assert [e.identity for e in list_images(str(tmp_path / "*" / "*.png"))] == ["sub/d.png"]
    assert [(e.identity, e.name) for e in list_images(str(tmp_path / "**" / "d.png"))] == [("sub/d.png", "sub/d")]
    with pytest.raises(FileNotFoundError, match="no image file"):
        list_images(str(tmp_path / "*.gif"))


def test_reading_runs_ahead_by_the_prefetch_bound_and_skips_unreadable_files(tmp_path, monkeypatch):
    random_faces(tmp_path, names=[f"f{i:02d}" for i in range(12)])
    (tmp_path / "f05.png").write_bytes(b"\x89PNG truncated")
    read, original = [], image_stream._read
    monkeypatch.setattr(image_stream, "_read", lambda entries, size: read.append(1) or original(entries, size))
    batches = read_batches(list_images(str(tmp_path)), size=16, batch=2, prefetch=2)
    first = next(batches)
    time.sleep(0.5)
    assert len(read) <= 1 + 2 + 1  # the one handed out, two queued, one waiting to be queued
    rest = list(batches)
    assert len(read) == 6 and first.truth.shape == (2, 16, 16, 3)
    skipped = [entry.identity for batch in [first, *rest] for entry, _ in batch.skipped]
    assert skipped == ["f05.png"]
    assert sum(len(b.entries) for b in [first, *rest]) == 11


def test_an_images_randomness_depends_on_its_identity_and_the_seed_alone():
    data = lambda key: np.asarray(jax.random.key_data(key))
    assert (data(image_key(0, "a.png")) == data(image_key(0, "a.png"))).all()
    assert not (data(image_key(0, "a.png")) == data(image_key(0, "b.png"))).all()
    assert not (data(image_key(0, "a.png")) == data(image_key(1, "a.png"))).all()
    operator = operators.get("motion_deblur", 16)
    keys = jax.random.split(jax.random.key(3), 3)
    params = operator.params_per_image(keys, 16)
    alone = operator.params_per_image(keys[2:], 16)
    assert (np.asarray(params["kernel"][2:]) == np.asarray(alone["kernel"])).all()
    assert (np.asarray(params["kernel"][0]) == np.asarray(operator.init_params(keys[0], 1, 16)["kernel"][0])).all()
    x = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
    y = operator.measure_per_image(keys, x, params)
    assert (np.asarray(y[2:]) == np.asarray(operator.measure_per_image(keys[2:], x[2:], alone))).all()


def test_shares_are_round_robin_and_cover_everything_once():
    items = list(range(11))
    shares = [share(items, i, 3) for i in range(3)]
    assert sorted(sum(shares, [])) == items and [len(s) for s in shares] == [4, 4, 3]


def test_manifest_refuses_other_settings_naming_them_and_overwrite_clears_only_its_own(tmp_path):
    manifest = Manifest(tmp_path / "out")
    settings = {"task": "inpaint", "sampler_config": {"lr": 2.5, "steps": 3}, "seed": 0}
    assert manifest.check(settings, overwrite=False) is False
    manifest.start(settings, continuing=False, total=2)
    manifest.write_row("a", {"name": "a"}, {"y": np.zeros(3)})
    (tmp_path / "out" / "mine.txt").write_text("the user's")
    assert manifest.check(settings, overwrite=False) is True  # the same settings continue
    changed = {**settings, "sampler_config": {"lr": 3.0, "steps": 3}, "seed": 1}
    with pytest.raises(UsageError, match=r"sampler_config.lr: 2.5 -> 3.0; seed: 0 -> 1.*--overwrite"):
        manifest.check(changed, overwrite=False)
    assert manifest.check(changed, overwrite=True) is False
    manifest.start(changed, continuing=False, total=2)
    assert manifest.finished() == set() and (tmp_path / "out" / "mine.txt").read_text() == "the user's"
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["settings"]["seed"] == 1
    assert settings_differences({"a": {"b": 1}}, {"a": {"b": 1}, "c": 2}) == ["c: '(unset)' -> 2"]


def test_a_plain_restore_runs_outputs_are_not_mixed_into(tmp_path):
    (tmp_path / "restored").mkdir()
    with pytest.raises(UsageError, match="earlier run already exist"):
        Manifest(tmp_path).check({"seed": 0}, overwrite=False)


def test_stacked_npz_reads_as_any_npz_and_a_short_count_leaves_no_file(tmp_path):
    rows = [np.full((2, 3), i, np.float32) for i in range(4)]
    write_stacked_npz(tmp_path / "s.npz", {"y": ((2, 3), np.float32, iter(rows))}, 4, names=np.asarray(list("abcd")))
    with np.load(tmp_path / "s.npz") as data:
        assert (data["y"] == np.stack(rows)).all() and list(data["names"]) == list("abcd")
    with pytest.raises(ValueError, match="3 rows, expected 4"):
        write_stacked_npz(tmp_path / "t.npz", {"y": ((2, 3), np.float32, iter(rows[:3]))}, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


# -- whole runs -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_weights(tmp_path_factory)


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    folder = random_faces(tmp_path_factory.mktemp("dataset"), names=NAMES)
    (folder / "face07b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # sorts among the others
    return folder


def start(weights, faces, out, *extra) -> subprocess.Popen:
    return popen_as_from_a_terminal([sys.executable, str(WORKER), weights, str(faces), str(out), *extra],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    output, _ = process.communicate(timeout=KILL_WAIT_S)
    return process.returncode, output


def wait_for(paths: list[Path], processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + KILL_WAIT_S
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes), \
            [finish(p)[1][-2000:] for p in processes if p.poll() is not None]
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed(weights, faces, out) -> list[subprocess.Popen]:
    address = f"127.0.0.1:{free_port()}"
    return [start(weights, faces, out, "--coordinator", address, "--num-processes", "2", "--process-id", str(i))
            for i in range(2)]


def outputs(out: Path) -> dict[str, bytes]:
    """Every file of a run but the logs."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).parts[0] != "logs"}


@pytest.fixture(scope="module")
def reference(weights, faces, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    status, output = finish(start(weights, faces, out))
    assert status == EXIT_SOME_SKIPPED, output
    return out, output


def test_one_process_restores_every_readable_image_and_reports_the_corrupt_one(reference):
    out, output = reference
    assert "face07b.png" in output and "skipped" in output
    files = outputs(out)
    for name in NAMES:
        assert {f"restored/{name}.png", f"measurement/{name}.png", f"finished/{name}.npz"} <= set(files)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["finished"] == 16
    assert [s["identity"] for s in manifest["skipped"]] == ["face07b.png"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["name"] for r in metrics["images"]] == NAMES and metrics["skipped"][0]["name"] == "face07b"
    with np.load(out / "measurement.npz") as data:
        assert data["y"].shape == (16, 16, 16, 3) and data["param_mask"].shape[0] == 16
    assert temporary_files(out) == [] and (out / "logs" / "process-0.log").read_text().count("images") >= 4


def test_two_processes_one_killed_midway_then_rerun_equal_one_process(weights, faces, tmp_path, reference):
    out = tmp_path / "out"
    first, second = distributed(weights, faces, out)
    wait_for([out / "finished" / "face01.npz"], [first, second])  # process 1's first batch (odd images)
    second.send_signal(signal.SIGKILL)
    first.send_signal(signal.SIGKILL)  # JAX's runtime stops it within its heartbeat timeout (100 s)
    finish(first), finish(second)
    assert 4 <= len(list((out / "finished").glob("*.npz"))) < 16 and not (out / "metrics.json").exists()
    statuses = [finish(p) for p in distributed(weights, faces, out)]  # a row being written may be left partial
    assert [s for s, _ in statuses] == [EXIT_SOME_SKIPPED] * 2, statuses
    assert "continuing: " in (out / "logs" / "process-1.log").read_text()
    assert outputs(out) == outputs(reference[0]) and temporary_files(out) == []


def test_continuing_removes_the_partial_files_a_killed_process_left(tmp_path):
    from spgd_jax.restore import manifest

    out = tmp_path / "out"
    run = manifest.Manifest(out)
    run.start({"seed": 0}, False, 2)
    (out / "restored").mkdir()
    stale = [out / "finished" / ".killed.npz.0a1b.tmp", out / "restored" / ".killed.png.0a1b.tmp",
             out / ".metrics.json.0a1b.tmp"]
    kept = [out / "finished" / ".peer.npz.0a1b.tmp",  # a peer's row being written
            out / ".users-notes.0a1b.tmp"]  # the user's own file in --out
    for path in stale + kept:
        path.write_bytes(b"half a file")
        if path not in kept[:1]:
            os.utime(path, (manifest._PROCESS_STARTED - 10,) * 2)  # written before this process started
    run.start({"seed": 0}, True, 2)
    assert [p.exists() for p in stale + kept] == [False] * len(stale) + [True] * len(kept)
    assert run.finished() == set()


def test_ctrl_c_keeps_the_finished_images_and_the_same_command_continues(weights, faces, tmp_path, reference):
    out = tmp_path / "out"
    process = start(weights, faces, out)
    wait_for([out / "finished" / "face00.npz"], [process])
    process.send_signal(signal.SIGINT)
    status, output = finish(process)
    assert status == 130, output
    assert temporary_files(out) == [] and 1 <= len(list((out / "finished").glob("*.npz"))) < 16
    status, output = finish(start(weights, faces, out))
    assert status == EXIT_SOME_SKIPPED and "continuing: " in (out / "logs" / "process-0.log").read_text(), output
    assert outputs(out) == outputs(reference[0])


def test_other_settings_are_refused_and_overwrite_starts_afresh(weights, faces, tmp_path, reference):
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    (out / "restored" / "stale.png").write_bytes(b"from an earlier run")
    with pytest.raises(UsageError, match=r"seed: 0 -> 1.*--overwrite"):
        run_dataset(*tiny_run(weights, str(faces), out, seed=1))
    assert outputs(out) == {**outputs(reference[0]), "restored/stale.png": b"from an earlier run"}
    assert run_dataset(*tiny_run(weights, str(faces), out, seed=1, overwrite=True)) == EXIT_SOME_SKIPPED
    assert json.loads((out / "manifest.json").read_text())["settings"]["seed"] == 1
    now, before = outputs(out), outputs(reference[0])
    assert set(now) == set(before)  # the stale picture is gone
    assert now["restored/face00.png"] != before["restored/face00.png"]


def test_process_flags_need_a_dataset_run(tmp_path):
    from spgd_jax import restore

    for extra in ([], ["--input", str(tmp_path), "--video"]):
        with pytest.raises(SystemExit, match="split a dataset run: give --input"):
            restore.main(["--task", "sr4", "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "0",
                          "--out", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists()


def test_quality_benchmark_jobs_resume_from_their_rows(weights, tmp_path):
    """benchmarks/quality.py generate --batch keeps each batch's rows (spgd_jax.restore.manifest): a re-run
    restores only the images without a row, and gives the same job results; other settings are refused."""
    from benchmarks import quality

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", images=truth, names=np.asarray([f"im{i}.png" for i in range(6)]))
    out = tmp_path / "q"
    command = ["generate", "--images", str(tmp_path / "images.npz"), "--weights", weights, "--out", str(out),
               "--test", "4", "--tune", "2", "--tasks", "inpaint", "--jobs", "t1_spgd_inpaint", "--steps", "2",
               "--warmup", "1", "--lr-factors", "0.5,1", "--batch", "4", "--compile-workers", "1"]
    assert quality.main(command) == 0
    with np.load(out / "t1_spgd_inpaint.npz") as data:
        first = {k: data[k] for k in data.files}
    assert first["psnr"].shape == (2, 6) and first["restored"].shape == (4, 16, 16, 3)
    rows = out / "rows" / "t1_spgd_inpaint" / "finished"
    assert sorted(p.name for p in rows.iterdir()) == [f"im{i}.png.npz" for i in range(6)]
    (rows / "im5.png.npz").unlink()  # as if the run had stopped in its second batch
    stamps = {p.name: p.stat().st_mtime_ns for p in rows.iterdir()}
    assert quality.main(command) == 0
    assert {p.name: p.stat().st_mtime_ns for p in rows.iterdir() if p.name in stamps} == stamps  # kept, not redone
    with np.load(out / "t1_spgd_inpaint.npz") as data:
        for key, value in first.items():
            np.testing.assert_array_equal(data[key], value)
    with pytest.raises(SystemExit, match="seed: 0 -> 1"):
        quality.main([*command, "--seed", "1"])
