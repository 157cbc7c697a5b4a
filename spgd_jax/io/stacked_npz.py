"""An .npz of stacked arrays written one row at a time: memory for one row, whatever the row count.

    write_stacked_npz(path, {"y": ((64, 64, 3), np.float32, rows_of_y)}, count=10_000, names=names)

Each stacked array (count, *row_shape) is one .npy entry of the zip (ZIP64, uncompressed), its header
first, then the rows as they come: `np.load(path)` reads it as any .npz. The file is written atomically
(spgd_jax.io.files): complete or not at all.
"""

from __future__ import annotations

import os
import zipfile
from typing import Iterable

import numpy as np

from spgd_jax.io.files import atomic_write

__all__ = ["write_stacked_npz"]


def write_stacked_npz(path: str | os.PathLike, stacked: dict[str, tuple[tuple, np.dtype, Iterable[np.ndarray]]],
                      count: int, **arrays: np.ndarray) -> None:
    """stacked: {name: (row_shape, dtype, rows)}: `count` rows of row_shape, each cast to dtype; arrays:
    small arrays written whole. ValueError (and no file) when a row has another shape or the count differs."""

    def write(stream):
        with zipfile.ZipFile(stream, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, (row_shape, dtype, rows) in stacked.items():
                dtype = np.dtype(dtype)
                with archive.open(f"{name}.npy", "w", force_zip64=True) as entry:
                    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                              "shape": (count, *row_shape)}
                    np.lib.format.write_array_header_2_0(entry, header)
                    written = 0
                    for row in rows:
                        row = np.ascontiguousarray(row, dtype=dtype)
                        if row.shape != tuple(row_shape):
                            raise ValueError(f"{name}: row {written} has shape {row.shape}, expected {row_shape}")
                        entry.write(row.tobytes())
                        written += 1
                    if written != count:
                        raise ValueError(f"{name}: {written} rows, expected {count}")
            for name, value in arrays.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as entry:
                    np.lib.format.write_array(entry, np.asarray(value), allow_pickle=False)

    atomic_write(path, write)
