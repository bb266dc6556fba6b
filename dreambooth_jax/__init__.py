"""DreamBooth for Imagen-style cascaded diffusion models in JAX/Flax.

Submodules are imported lazily by their users: `dreambooth_jax.models`,
`dreambooth_jax.weights`, `dreambooth_jax.tokenizer`, `dreambooth_jax.sharding`.
"""

__version__ = "0.1.0"
