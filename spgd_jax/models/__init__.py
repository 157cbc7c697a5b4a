"""Network families: the networks inside the denoisers (pure Flax; no files, no sampling).

    from spgd_jax import models
    config = models.adm.CONFIGS["ffhq256"]           # guided-diffusion's ADM UNet
    params = models.family_of(config).init(config, key)
    network = models.family_of(config).network(config)  # network(params, x, noise_labels, class_labels)

A family (`Family`) is registered once, here; adding one is one module plus one `register_family` line.
"""

from spgd_jax.models import adm
from spgd_jax.models._family import FAMILIES, Family, Network, family_of, get_family, register_family
from spgd_jax.models.adm._family import ADM

register_family(ADM)

__all__ = ["FAMILIES", "Family", "Network", "adm", "family_of", "get_family", "register_family"]
