"""Network families: the networks inside the denoisers (pure Flax; no files, no sampling).

    from spgd_jax import models
    config = models.adm.CONFIGS["ffhq256"]           # guided-diffusion's ADM UNet
    params = models.family_of(config).init(config, key)
    network = models.family_of(config).network(config)  # network(params, x, noise_labels, class_labels)

A family (`Family`) is registered beside its definition; adding one is one module (a sub-package with its
`register_family` line) plus its import here.
"""

from spgd_jax.models._family import FAMILIES, Family, Network, family_of, get_family, register_family
from spgd_jax.models import adm  # registers the ADM family (spgd_jax.models.adm._family)

__all__ = ["FAMILIES", "Family", "Network", "adm", "family_of", "get_family", "register_family"]
