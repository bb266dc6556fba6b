"""Weight import/export: Hugging Face / diffusers safetensors folders <-> our flax models.

Public API:
  load_unet(dir, dtype, role=None)  diffusers UNet2DConditionModel folder (DeepFloyd IF I/II)
  save_unet_diffusers(unet, dir)    our UNet -> diffusers folder
  load_t5_encoder(dir, dtype)       Hugging Face T5 (v1.1) folder -> our T5 encoder
  check_pretrained(unets, t5, tokenizer)   preflight: configs and headers only, no tensor data
  check_unet_folder / check_t5_folder / check_tokenizer_folder / check_text_width
  load_sd_upscaler(dir)             stabilityai/stable-diffusion-x4-upscaler (IF's stage III): UNet,
                                    VAE, CLIP text encoder, tokenizer, schedulers (weights.sd_upscaler)
  check_sd_upscaler(dir)            its preflight: configs and headers only
Folders may be whole pipeline downloads (model_index.json): unet/, text_encoder/ and
tokenizer/ are resolved. No torch import, no pickle: safetensors only.
"""

import jax.numpy as jnp

from dreambooth_jax.weights import t5 as _t5
from dreambooth_jax.weights.preflight import (Preflight, check_pretrained, check_t5_folder,
                                              check_text_width, check_tokenizer_fits,
                                              check_tokenizer_folder, check_unet_folder)
from dreambooth_jax.weights.safetensors_io import WeightsError
from dreambooth_jax.weights.sd_upscaler import check_sd_upscaler, load_sd_upscaler
from dreambooth_jax.weights.unet import load_unet, save_unet_diffusers, unet_config_from_folder


def load_t5_encoder(folder, dtype=None, **kw):
  """See `dreambooth_jax.weights.t5.load_t5_encoder` (dtype None: float32)."""
  return _t5.load_t5_encoder(folder, jnp.float32 if dtype is None else dtype, **kw)


__all__ = ["WeightsError", "load_unet", "save_unet_diffusers", "unet_config_from_folder",
           "load_t5_encoder", "Preflight", "check_pretrained", "check_unet_folder", "check_t5_folder",
           "check_tokenizer_folder", "check_text_width", "check_tokenizer_fits", "load_sd_upscaler",
           "check_sd_upscaler"]
