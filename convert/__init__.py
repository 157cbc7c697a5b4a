"""PyTorch checkpoint -> spgd_jax checkpoint conversion (``python -m spgd_jax.convert --help``)."""

from .guided_diffusion import check_state_dict, convert, read_state_dict, state_dict_shapes, to_flax_params

__all__ = ["check_state_dict", "convert", "read_state_dict", "state_dict_shapes", "to_flax_params"]
