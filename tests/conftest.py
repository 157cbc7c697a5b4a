"""The command lines turn on JAX's persistent compilation cache; the tests leave the user's cache alone
(tests/test_compilation.py turns it on, in a temporary folder, where it is the point)."""

import os

os.environ.setdefault("SPGD_JAX_NO_CACHE", "1")
