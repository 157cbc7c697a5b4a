"""The output folder of a run, replaced as a whole.

A run writes everything into a hidden staging folder inside --out and, once every file is complete, swaps
its outputs in: the earlier run's outputs (the entries this tool writes: restored/, measurement/, grid.png,
metrics.json, lr-VALUE/ of a sweep, ...) are moved aside and deleted, so no stale file of an earlier run survives
--overwrite. Files of the user's own in --out are never touched. An error or Ctrl-C before the swap leaves
--out as it was (and removes a folder this run created).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from spgd_jax import catalog
from spgd_jax.restore._args import UsageError

__all__ = ["OWNED_NAMES", "OutputFolder", "owned_entries"]

OWNED_NAMES = ("restored", "measurement", "std", "video", "grid.png", "config.json", "metrics.json",
               "measurement.npz", "samples.npz", "diagnostics.png", "diagnostics.npz", "sweep.md", "sweep.png",
               "manifest.json", "finished", "skipped", "logs")  # the last four: a dataset run's (manifest.py)


def _sweep_folder() -> re.Pattern:
    """FIELD-VALUE/, one folder per step size of a sweep (lr-2.5, zeta-3, ...), for any registered step size."""
    fields = sorted({d["step_size"] for d in catalog.samplers().values() if d["step_size"]})
    return re.compile("(" + "|".join(map(re.escape, fields)) + r")-[0-9.eE+-]+")


def owned_entries(out: Path) -> list[Path]:
    """The entries of `out` that a restore run writes (sorted); nothing else in `out` is ever touched."""
    if not out.is_dir():
        return []
    sweep_folder = _sweep_folder()
    return sorted(p for p in out.iterdir() if p.name in OWNED_NAMES or (p.is_dir() and sweep_folder.fullmatch(p.name)))


class OutputFolder:
    """Stages a run's outputs inside `out` and swaps them in with `commit`.

    Use as a context manager: `with OutputFolder(out, overwrite) as staging: ...write into staging...;
    folder.commit()`. Leaving the block without commit (an error, Ctrl-C) removes the staging folder and
    a folder `out` created here.
    """

    def __init__(self, out: Path, overwrite: bool):
        existing = owned_entries(out)
        if existing and not overwrite:
            shown = ", ".join(str(p) for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
            raise UsageError(f"{len(existing)} output(s) of an earlier run already exist ({shown}); pass --overwrite "
                             "to replace them or choose another --out")
        self.out, self.created, self.staging = out, not out.exists(), None

    def __enter__(self) -> Path:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(dir=self.out, prefix=".spgd-restore-"))
        except OSError as error:
            self._remove_created()
            raise UsageError(f"cannot write to output folder {self.out} ({error.strerror}); choose a writable --out") \
                from None
        return self.staging

    def commit(self) -> None:
        """Moves the earlier run's outputs aside, the staged ones into place, then deletes the earlier ones."""
        aside = Path(tempfile.mkdtemp(dir=self.out, prefix=".spgd-earlier-"))
        moved = []
        try:
            for entry in owned_entries(self.out):
                entry.rename(aside / entry.name)
                moved.append(entry.name)
            for entry in sorted(self.staging.iterdir()):
                entry.rename(self.out / entry.name)
        except BaseException:  # put the earlier run back where it was
            for name in moved:
                if not (self.out / name).exists():
                    (aside / name).rename(self.out / name)
            raise
        finally:
            shutil.rmtree(aside, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        if exc[0] is not None:
            self._remove_created()

    def _remove_created(self) -> None:
        if self.created and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()  # leave no empty folder behind an error or Ctrl-C
