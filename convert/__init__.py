"""PyTorch checkpoint -> spgd_jax checkpoint conversion (``python -m spgd_jax.convert --help``).

Installed as ``spgd_jax.convert`` (the repository's convert/ folder). Importing it needs no PyTorch; reading a
.pt file does (the torch extra: ``pip install 'spgd-jax[torch]'``), and so does ``spgd_jax.convert.torch_adm``,
the independent PyTorch ADM UNet the tests and the speed benchmark compare against.
"""

from .guided_diffusion import check_state_dict, convert, read_state_dict, state_dict_shapes, to_flax_params

__all__ = ["check_state_dict", "convert", "read_state_dict", "state_dict_shapes", "to_flax_params"]
