"""The manifest of a dataset run in --out: its settings, the images finished, the files skipped.

    out/manifest.json          {"settings": {...}, "complete": false, ...}: written when the run starts
    out/finished/NAME.npz      one per finished image: its metrics row ('row', JSON) and measurement
                               ('y', 'param_*'); written after the image's pictures, so it marks them complete
    out/skipped/NAME.json      one per unreadable input file: {"identity": ..., "reason": ...}

Every file is written atomically (spgd_jax.io.files) and by one process, so any number of processes can
fill one --out on a shared filesystem without locks. A run of the same settings into the same --out
continues it; other settings are refused (naming what differs) unless --overwrite, which moves the
earlier run's outputs aside and deletes them before anything new is written. Files of the user's own in
--out are never touched.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from spgd_jax.io.files import write_json, write_npz
from spgd_jax.restore._args import UsageError
from spgd_jax.restore._folder import OWNED_NAMES, owned_entries

_PROCESS_STARTED = time.time()  # before this process writes a row: older partial rows are a killed run's

__all__ = ["Manifest", "settings_differences"]

MANIFEST = "manifest.json"
FINISHED, SKIPPED, LOGS = "finished", "skipped", "logs"  # all four among _folder.OWNED_NAMES
_TEMPORARY = re.compile(r"\.(.+)\.[0-9a-f]+\.tmp")  # spgd_jax.io.files.atomic_write's name for NAME's


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def settings_differences(before: dict, now: dict) -> list[str]:
    """'field: before -> now' for each (dotted) setting that differs, sorted."""
    before, now = _flat(json.loads(json.dumps(before))), _flat(json.loads(json.dumps(now)))
    return [f"{k}: {before.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r}"
            for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]


class Manifest:
    """The manifest of the run in `out` (a folder; created by `start`)."""

    def __init__(self, out: Path):
        self.out = Path(out)

    def earlier_outputs(self) -> list[Path]:
        """What an earlier run (a dataset run or a plain restore) left in out."""
        return owned_entries(self.out)

    def check(self, settings: dict, overwrite: bool) -> bool:
        """Whether the run continues an earlier one in out. UsageError when out holds a run of other
        settings, or the outputs of a plain restore run, and overwrite is off."""
        path = self.out / MANIFEST
        if path.is_file():
            try:
                earlier = json.loads(path.read_text())["settings"]
            except (ValueError, KeyError) as error:
                raise UsageError(f"{path} is not a manifest of spgd_jax.restore ({error}); pass --overwrite to start "
                                 "afresh or choose another --out") from None
            changed = settings_differences(earlier, settings)
            if not changed:
                return not overwrite
            if not overwrite:
                raise UsageError(f"--out {self.out} holds a run with other settings ({'; '.join(changed)}); run the "
                                 "same command to continue it, pass --overwrite to start afresh, or choose another "
                                 "--out")
            return False
        existing = self.earlier_outputs()
        if existing and not overwrite:
            shown = ", ".join(str(p) for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
            raise UsageError(f"{len(existing)} output(s) of an earlier run already exist ({shown}); pass --overwrite "
                             "to replace them or choose another --out")
        return False

    def start(self, settings: dict, continuing: bool, total: int) -> None:
        """Creates out (or, unless continuing, clears the earlier run's outputs) and writes the manifest.
        Continuing, the skipped records go: their files are tried again (and recorded again if still bad); so do
        the partial files a killed process left (temporary files older than this process)."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            if not continuing:
                self._remove_earlier()
            shutil.rmtree(self.out / SKIPPED, ignore_errors=True)
            for folder in (FINISHED, SKIPPED, LOGS):
                (self.out / folder).mkdir(exist_ok=True)
        except OSError as error:
            raise UsageError(f"cannot write to output folder {self.out} ({error.strerror}); choose a writable --out") \
                from None
        if continuing:  # files a killed process was writing (every process of this run imports this first)
            for partial in self._partial_files():
                if partial.stat().st_mtime < _PROCESS_STARTED:
                    partial.unlink(missing_ok=True)
        else:
            write_json(self.out / MANIFEST, {"settings": settings, "images": total, "complete": False})

    def _partial_files(self) -> list[Path]:
        """The temporary files (spgd_jax.io.files) of this run's own outputs: inside its folders, or beside its
        files in out (.metrics.json.<hex>.tmp)."""
        inside = [p for entry in self.earlier_outputs() if entry.is_dir() for p in entry.rglob(".*.tmp")]
        beside = [p for p in self.out.glob(".*.tmp") if (m := _TEMPORARY.fullmatch(p.name)) and m[1] in OWNED_NAMES]
        return inside + beside

    def _remove_earlier(self) -> None:
        entries = self.earlier_outputs()
        if not entries:
            return
        aside = Path(tempfile.mkdtemp(dir=self.out, prefix=".spgd-earlier-"))
        for entry in entries:
            entry.rename(aside / entry.name)
        shutil.rmtree(aside, ignore_errors=True)

    def finished(self) -> set[str]:
        """The names of the finished images."""
        folder = self.out / FINISHED
        return {p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.npz")
                if not p.name.startswith(".")}

    def skipped(self) -> dict[str, dict]:
        """{name: {"identity", "reason"}} of the files found unreadable (and not finished since)."""
        folder, done = self.out / SKIPPED, self.finished()
        found = {p.relative_to(folder).with_suffix("").as_posix(): p for p in folder.rglob("*.json")
                 if not p.name.startswith(".")}
        return {name: json.loads(path.read_text()) for name, path in sorted(found.items()) if name not in done}

    def write_row(self, name: str, row: dict, arrays: dict[str, np.ndarray]) -> None:
        """Marks image `name` finished: its metrics row and arrays (measurement, parameters)."""
        path = self.out / FINISHED / f"{name}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_npz(path, row=np.asarray(json.dumps(row)), **arrays)

    def read_row(self, name: str) -> tuple[dict, dict[str, np.ndarray]]:
        """(row, arrays) of a finished image."""
        with np.load(self.out / FINISHED / f"{name}.npz", allow_pickle=False) as data:
            return json.loads(str(data["row"])), {k: data[k] for k in data.files if k != "row"}

    def write_skipped(self, name: str, identity: str, reason: str) -> None:
        path = self.out / SKIPPED / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"identity": identity, "reason": reason})

    def rows(self, names: list[str]) -> Iterator[tuple[str, dict, dict[str, np.ndarray]]]:
        """(name, row, arrays) of each finished name, in the given order, one at a time."""
        for name in names:
            yield (name, *self.read_row(name))

    def complete(self, summary: dict) -> None:
        """Marks the run complete in the manifest, with what it found (counts, skipped files)."""
        manifest = json.loads((self.out / MANIFEST).read_text())
        write_json(self.out / MANIFEST, {**manifest, **summary, "complete": True})
