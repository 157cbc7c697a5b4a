"""The project's default prior as package data (installed as `spgd_jax.weights`): default64/ and its
MODEL_CARD.md. Found with `spgd_jax.io.prior.default_weights_path()`; nothing to import here."""
