"""`python -m spgd_jax.train` (and `python -m spgd_jax.train export ...`): see spgd_jax.train."""

import sys

from spgd_jax.train import main

sys.exit(main())
