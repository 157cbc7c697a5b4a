"""`python -m spgd_jax.restore`: see spgd_jax.restore."""

import os
import sys

from spgd_jax.restore import EXIT_INTERRUPTED, entry

status = entry()
if status == EXIT_INTERRUPTED:
    # A cancelled compiled run (or a compile still going in the worker thread) must not be waited for or
    # torn down by the interpreter's exit: every output is already settled, so leave at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
sys.exit(status)
