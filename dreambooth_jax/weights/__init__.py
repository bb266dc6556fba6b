"""Weight import/export: Hugging Face / diffusers safetensors folders <-> our flax models.

Public API:
  load_unet(dir, dtype)             diffusers UNet2DConditionModel folder (DeepFloyd IF I/II)
  save_unet_diffusers(unet, dir)    our UNet -> diffusers folder
  load_t5_encoder(dir, dtype)       Hugging Face T5 (v1.1) folder -> our T5 encoder
No torch import, no pickle: safetensors only.
"""

from dreambooth_jax.weights.safetensors_io import WeightsError
from dreambooth_jax.weights.unet import load_unet, save_unet_diffusers, unet_config_from_folder


def load_t5_encoder(folder, dtype=None, **kw):
  """See `dreambooth_jax.weights.t5.load_t5_encoder`."""
  from dreambooth_jax.weights import t5  # imported lazily: written alongside the UNet importer
  import jax.numpy as jnp
  return t5.load_t5_encoder(folder, dtype if dtype is not None else jnp.float32, **kw)


__all__ = ["WeightsError", "load_unet", "save_unet_diffusers", "unet_config_from_folder",
           "load_t5_encoder"]
