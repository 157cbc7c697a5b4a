"""The converter (convert/) and checkpoint save/load (spgd_jax.io.checkpoint)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest
import torch

from spgd_jax.convert import torch_adm as tr
from spgd_jax.convert.__main__ import main
from spgd_jax.convert.guided_diffusion import convert, read_state_dict, state_dict_shapes, to_flax_params
from spgd_jax.io import checkpoint
from spgd_jax.io.prior import load_denoiser
from spgd_jax.models.adm import CONFIGS, UNet, UNetConfig
from test_parity import SMALL_CONFIGS, nchw, nhwc, rel_err, torch_c_noise

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = CONFIGS["tiny16"]


def reference_state_dict(config: UNetConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    return tr.from_config(config, seed).state_dict()


def leftovers(directory: pathlib.Path, keep: set[str]) -> list[str]:
    """Entries of ``directory`` other than ``keep`` (temporary directories included)."""
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


# -- key names ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted({**SMALL_CONFIGS, **CONFIGS}))
def test_expected_keys_and_shapes_are_guided_diffusions(name):
    """The converter's expectation (from the Flax model's tree) equals the torch reference's state dict."""
    config = {**SMALL_CONFIGS, **CONFIGS}[name]
    with torch.device("meta"):  # shapes only: no memory, even for imagenet256
        reference = tr.create_model(**{k: v for k, v in config.to_dict().items() if k != "dtype"})
    assert state_dict_shapes(config) == {k: tuple(v.shape) for k, v in reference.state_dict().items()}


def test_ffhq256_key_and_parameter_count():
    shapes = state_dict_shapes(CONFIGS["ffhq256"])
    assert len(shapes) == 362
    assert sum(int(np.prod(s)) for s in shapes.values()) == 93_563_910


# -- rejection ------------------------------------------------------------------------

MISSING = "input_blocks.1.0.out_layers.3.weight"
EXTRA = "input_blocks.1.0.spare.weight"
MISSHAPED = "middle_block.1.qkv.weight"


def _break(state: dict, how: str) -> dict:
    state = dict(state)
    if how in ("missing", "all"):
        del state[MISSING]
    if how in ("extra", "all"):
        state[EXTRA] = torch.zeros(3)
    if how in ("misshaped", "all"):
        state[MISSHAPED] = state[MISSHAPED][:-1]
    return state


@pytest.mark.parametrize("how", ["missing", "extra", "misshaped", "all"])
def test_mismatched_state_dict_is_rejected_in_one_report_writing_nothing(tmp_path, how):
    torch.save(_break(reference_state_dict(TINY), how), tmp_path / "bad.pt")
    with pytest.raises(ValueError) as info:
        convert(tmp_path / "bad.pt", TINY, tmp_path / "out")
    message = str(info.value)
    expected = {"missing": [f"missing: {MISSING}"], "extra": [f"unexpected: {EXTRA}"],
                "misshaped": [f"mis-shaped: {MISSHAPED}: checkpoint (191, 64, 1), config expects (192, 64, 1)"]}
    expected["all"] = [line for lines in expected.values() for line in lines]
    for line in expected[how]:
        assert line in message
    assert message.count("\n") == len(expected[how])  # header + one line per problem
    assert leftovers(tmp_path, {"bad.pt"}) == []


def test_a_file_of_another_network_is_reported_in_a_screenful(tmp_path):
    from spgd_jax.io.checkpoint import SHOWN_PER_KIND

    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")  # nothing of the UNet at all
    with pytest.raises(ValueError) as info:
        convert(tmp_path / "other.pt", TINY, tmp_path / "out")
    lines = str(info.value).splitlines()
    missing = int(re.search(r"\((\d+) missing", lines[0])[1])
    assert missing > SHOWN_PER_KIND and len([line for line in lines if "  missing: " in line]) == SHOWN_PER_KIND
    assert f"  ... and {missing - SHOWN_PER_KIND} more missing" in lines and "  unexpected: fc.weight" in lines
    assert len(lines) == 1 + SHOWN_PER_KIND + 2 and leftovers(tmp_path, {"other.pt"}) == []


def test_wrong_config_is_named_in_the_report():
    state = {k: v.numpy() for k, v in reference_state_dict(TINY).items()}
    with pytest.raises(ValueError, match="check --config") as info:
        to_flax_params(state, CONFIGS["tiny16_cond"])
    assert "missing: label_emb.weight" in str(info.value)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    state = dict(reference_state_dict(TINY))
    torch.save({"state_dict": state, "trap": _RunsCodeWhenUnpickled(marker)}, tmp_path / "trap.pt")
    with pytest.raises(ValueError, match=r"refusing to load .*refers to Python code \("):
        convert(tmp_path / "trap.pt", TINY, tmp_path / "out")
    assert not marker.exists()
    assert leftovers(tmp_path, {"trap.pt"}) == []


@pytest.mark.parametrize("content", [b"", b"not a checkpoint\n" * 10, b"PK\x03\x04" + b"\0" * 60])
def test_unreadable_file_is_reported(tmp_path, content):
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        read_state_dict(tmp_path / "x.pt")


def test_wrapped_and_prefixed_state_dicts_are_accepted(tmp_path):
    state = reference_state_dict(TINY)
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "step": torch.tensor(7)}, tmp_path / "w.pt")
    got = read_state_dict(tmp_path / "w.pt")
    assert set(got) == set(state)
    np.testing.assert_array_equal(got[MISSHAPED], state[MISSHAPED].numpy())
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        read_state_dict(tmp_path / "list.pt")


# -- checkpoint save / load -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_params():
    return to_flax_params({k: v.numpy() for k, v in reference_state_dict(TINY, seed=1).items()}, TINY)


def test_save_load_round_trip(tmp_path, tiny_params):
    path = checkpoint.save(tmp_path / "ckpt", tiny_params, TINY)
    params, meta = checkpoint.load(path)
    assert meta.config == TINY
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, tiny_params)
    assert json.loads((path / "config.json").read_text()) == {"family": "adm", "preconditioning": "vp",
                                                              "config": TINY.to_dict(),
                                                              "params_sha256": checkpoint.params_digest(tiny_params)}
    assert leftovers(tmp_path, {"ckpt"}) == []


def test_save_refuses_to_overwrite_unless_asked(tmp_path, tiny_params):
    path = checkpoint.save(tmp_path / "ckpt", tiny_params, TINY)
    with pytest.raises(FileExistsError, match="overwrite"):
        checkpoint.save(path, tiny_params, TINY)
    doubled = jax.tree_util.tree_map(lambda a: 2 * a, tiny_params)
    checkpoint.save(path, doubled, TINY, overwrite=True)
    params, _ = checkpoint.load(path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, doubled)
    assert leftovers(tmp_path, {"ckpt"}) == []


def test_save_rejects_params_that_do_not_fit_the_config(tmp_path, tiny_params):
    with pytest.raises(ValueError, match="params do not match the config"):
        checkpoint.save(tmp_path / "ckpt", tiny_params, CONFIGS["tiny16_plain"])
    with pytest.raises(TypeError, match=r"variables\['params'\]"):
        checkpoint.save(tmp_path / "ckpt", {"params": tiny_params}, TINY)
    assert leftovers(tmp_path, set()) == []


class _FailingWriter:
    """Writes part of a checkpoint, then is interrupted (as by Ctrl-C)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def save(self, directory, _params):
        pathlib.Path(directory).mkdir()
        (pathlib.Path(directory) / "half-written").write_bytes(b"\0" * 100)
        raise KeyboardInterrupt


def test_interrupted_save_leaves_nothing_behind(tmp_path, tiny_params, monkeypatch):
    checkpoint.save(tmp_path / "old", tiny_params, TINY)
    monkeypatch.setattr(checkpoint, "_orbax", _FailingWriter)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "new", tiny_params, TINY)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "old", tiny_params, TINY, overwrite=True)
    assert leftovers(tmp_path, {"old"}) == []
    monkeypatch.undo()
    params, _ = checkpoint.load(tmp_path / "old")  # the previous checkpoint survives intact
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, tiny_params)


def _damage(path: pathlib.Path, how: str) -> None:
    if how == "no config":
        (path / "config.json").unlink()
    elif how == "bad json":
        (path / "config.json").write_text("{not json")
    elif how == "unknown field":
        (path / "config.json").write_text(json.dumps({**TINY.to_dict(), "widht": 3}))
    elif how == "no params":
        for p in sorted((path / "params").rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        (path / "params").rmdir()
    elif how == "corrupt params":
        for p in (path / "params").rglob("*"):
            if p.is_file() and "ocdbt" in str(p.relative_to(path)) or p.parent.name == "d":
                p.write_bytes(b"garbage")
    elif how == "other config":
        (path / "config.json").write_text(json.dumps({**TINY.to_dict(), "num_channels": 64}))


@pytest.mark.parametrize("how,error", [
    ("no config", "config.json is missing"),
    ("bad json", "not a valid checkpoint config"),
    ("unknown field", "unknown UNetConfig fields"),
    ("no params", "params/ is missing"),
    ("corrupt params", "could not read the params"),
    ("other config", "params do not match the config"),
])
def test_load_reports_broken_checkpoints(tmp_path, tiny_params, how, error):
    path = checkpoint.save(tmp_path / "ckpt", tiny_params, TINY)
    _damage(path, how)
    with pytest.raises(ValueError, match=error):
        checkpoint.load(path)


def test_load_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m spgd_jax.convert"):
        checkpoint.load(tmp_path / "nowhere")


def test_a_checkpoint_records_its_family_and_preconditioning_and_old_ones_still_load(tmp_path, tiny_params):
    path = checkpoint.save(tmp_path / "ckpt", tiny_params, TINY, preconditioning="edm")
    meta = checkpoint.load_config(path)
    assert (meta.family, meta.preconditioning, meta.config) == ("adm", "edm", TINY)
    (path / "config.json").write_text(json.dumps(TINY.to_dict()))  # as spgd-jax 0.1 wrote it
    meta = checkpoint.load_config(path)
    assert (meta.family, meta.preconditioning, meta.config) == ("adm", "vp", TINY)
    other = checkpoint.save(tmp_path / "other", tiny_params, TINY, preconditioning="karras")  # stored as given,
    with pytest.raises(ValueError, match="unknown preconditioning 'karras'"):  # refused by the denoiser built
        load_denoiser(other)
    with pytest.raises(TypeError, match="not the config of a registered network family"):
        checkpoint.save(tmp_path / "other", tiny_params, TINY.to_dict())


# -- command line -------------------------------------------------------------------------


def test_cli_end_to_end(tmp_path):
    """python -m spgd_jax.convert with a JSON config, in a subprocess; the result loads and matches torch."""
    config = CONFIGS["tiny16_cond"]
    model = tr.from_config(config, seed=2)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "spgd_jax.convert", str(tmp_path / "model.pt"), "--config",
               str(tmp_path / "config.json"), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout

    labels = np.array([7, 993])
    denoiser = load_denoiser(tmp_path / "out", class_labels=labels)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    sigma = np.array([0.5, 0.5], np.float32)
    with torch.no_grad():
        c_noise = torch_c_noise(torch.from_numpy(sigma))
        eps = model(torch.from_numpy(x) / np.sqrt(1.25), c_noise, torch.from_numpy(labels))[:, :3]
        expected = (torch.from_numpy(x) - 0.5 * eps).numpy()
    assert rel_err(nchw(denoiser(nhwc(x), sigma)), expected) <= 1e-5


def test_cli_errors_exit_2_with_a_message(tmp_path, capsys, tiny_params):
    torch.save(reference_state_dict(TINY), tmp_path / "model.pt")
    (tmp_path / "out").mkdir()
    assert main([str(tmp_path / "model.pt"), "--config", "tiny16", "--out", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([str(tmp_path / "model.pt"), "--config", "nonesuch", "--out", str(tmp_path / "o2")]) == 2
    assert "neither a known config" in capsys.readouterr().err
    assert main([str(tmp_path / "model.pt"), "--config", "tiny16", "--out", str(tmp_path / "out"),
                 "--overwrite"]) == 0
    params, meta = checkpoint.load(tmp_path / "out")
    assert meta.config == TINY
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, to_flax_params(
        {k: v.numpy() for k, v in reference_state_dict(TINY).items()}, TINY))


def test_params_changed_on_disk_are_refused_by_their_recorded_digest(tmp_path, tiny_params):
    # Orbax keeps incompressible arrays as raw blocks without a checksum: bytes changed inside one read back
    # without an error. Here the params of another checkpoint (one value apart) stand in for damaged ones.
    path = checkpoint.save(tmp_path / "ckpt", tiny_params, TINY)
    assert json.loads((path / "config.json").read_text())["params_sha256"] == checkpoint.params_digest(tiny_params)
    flat = flax.traverse_util.flatten_dict(tiny_params)
    name = sorted(flat)[0]
    changed = {**flat, name: np.asarray(flat[name]).copy()}
    changed[name].flat[0] += 1e-3
    other = checkpoint.save(tmp_path / "other", flax.traverse_util.unflatten_dict(changed), TINY)
    shutil.rmtree(path / "params")
    shutil.copytree(other / "params", path / "params")
    with pytest.raises(ValueError, match=r"params in .* are damaged: their sha256 is not the one config.json recorded"):
        checkpoint.load(path)
    checkpoint.load(other)  # its own digest matches
