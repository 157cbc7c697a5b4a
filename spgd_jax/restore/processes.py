"""Many processes, many hosts: JAX's multi-controller runtime for a dataset run.

    python -m spgd_jax.restore ... --coordinator host0:1234 --num-processes 2 --process-id 0   # on host 0
    python -m spgd_jax.restore ... --coordinator host0:1234 --num-processes 2 --process-id 1   # on host 1
    srun python -m spgd_jax.restore ... --distributed                                         # SLURM, Open MPI

`initialize` calls `jax.distributed.initialize` with the flags given, the rest found as JAX finds them
(JAX_COORDINATOR_ADDRESS, SLURM, Open MPI, ...). Each process then restores its own share of the images
on its own devices (no communication while sampling); the processes meet only at `barrier`s, before and
after listing what is finished. If a process dies, JAX's runtime stops the others within its heartbeat
timeout: each loses at most the batch it was restoring, and the same command resumes every share.
"""

from __future__ import annotations

import argparse
from typing import Sequence, TypeVar

from spgd_jax.restore._args import UsageError

__all__ = ["Processes", "add_process_arguments", "initialize", "share"]

T = TypeVar("T")


def add_process_arguments(parser: argparse.ArgumentParser) -> None:
    """--distributed, --coordinator, --num-processes, --process-id: the arguments of `initialize`."""
    group = parser.add_argument_group(
        "many processes and hosts (a dataset run, --input: each process restores its share into the same --out)")
    group.add_argument("--distributed", action="store_true",
                       help="start JAX's multi-process runtime from the environment (SLURM, Open MPI, "
                            "JAX_COORDINATOR_ADDRESS); the flags below override what it finds")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, the same for every process")
    group.add_argument("--num-processes", type=int, help="how many processes the run has")
    group.add_argument("--process-id", type=int, help="this process's number, 0 .. N-1")


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None, auto: bool) -> bool:
    """jax.distributed.initialize when any of the flags is given (or auto: from the environment alone);
    call it before JAX starts a computation. Returns whether it ran. UsageError naming what is missing."""
    if not auto and coordinator is None and num_processes is None and process_id is None:
        return False
    import jax

    if num_processes is not None and num_processes < 1:
        raise UsageError(f"--num-processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise UsageError(f"--process-id must be in 0..{num_processes - 1} (--num-processes {num_processes}), got "
                         f"{process_id}")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    except (RuntimeError, ValueError, TypeError) as error:
        raise UsageError(f"cannot start JAX's multi-process runtime ({error}); give --coordinator HOST:PORT, "
                         "--num-processes N and --process-id I on every process, or run under SLURM or Open MPI "
                         "with --distributed") from None
    return True


def share(items: Sequence[T], index: int, count: int) -> list[T]:
    """Process `index`'s share of `count`: every count-th item from the index-th (round robin, so each
    share takes items from the whole sorted list and the shares differ in size by one at most)."""
    return list(items[index::count])


class Processes:
    """This process among the processes of the run: index, count, main (index 0) and barrier."""

    def __init__(self):
        import jax

        self.index, self.count = jax.process_index(), jax.process_count()
        self.main = self.index == 0

    def barrier(self, name: str) -> None:
        """Waits until every process got here (nothing to wait for in a single process)."""
        if self.count > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)

    def __str__(self) -> str:
        return f"process {self.index} of {self.count}"
