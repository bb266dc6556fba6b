"""DeepFloyd IF / diffusers UNet folders <-> our flax UNet.

A diffusers UNet folder holds `config.json` and
`diffusion_pytorch_model[.fp16].safetensors` (or a sharded `.index.json`).
Our module tree mirrors diffusers' names exactly, so the mapping needs no
renames; only kernel layouts change (see `torch_layout`).
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp

from dreambooth_jax.models.unet import UNet, UNetConfig, abstract_unet
from dreambooth_jax.weights import safetensors_io, torch_layout

WEIGHTS_STEM = "diffusion_pytorch_model"


def unet_config_from_folder(folder: str) -> UNetConfig:
  return UNetConfig.from_diffusers(safetensors_io.read_config(folder),
                                   source=os.path.join(folder, "config.json"))


def load_unet(folder: str, dtype=jnp.float32, *, compute_dtype=None, variant: str | None = None,
              remat: bool = False, place=None) -> UNet:
  """Loads a diffusers UNet2DConditionModel folder (IF stage I/II layout) into our UNet.

  Params are stored in `dtype`; math runs in `compute_dtype` (default: `dtype`).
  `place(path, array)` may put each tensor on devices as it is read (sharded
  loading of multi-billion-parameter UNets without a host copy of the whole).
  Raises WeightsError naming any missing, unexpected or mis-shaped tensor.
  """
  cfg = unet_config_from_folder(folder)
  tensors = safetensors_io.open_folder(folder, (WEIGHTS_STEM,), variant)
  model = abstract_unet(cfg, dtype=compute_dtype or dtype, param_dtype=dtype, remat=remat)
  return torch_layout.load_params(model, tensors, dtype=dtype, source=tensors.source, place=place)


def save_unet_diffusers(unet: UNet, folder: str, dtype=None) -> str:
  """Writes `unet` as a diffusers folder that `UNet2DConditionModel.from_pretrained` loads.

  `dtype` (e.g. np.float16) converts on the way out; default keeps the param dtype.
  """
  os.makedirs(folder, exist_ok=True)
  tensors = torch_layout.export_params(unet, dtype=dtype)
  path = os.path.join(folder, WEIGHTS_STEM + ".safetensors")
  safetensors_io.save_file(tensors, path, metadata={"format": "pt"})
  config = unet.cfg.to_diffusers()
  config["_diffusers_version"] = "0.42.1"
  tmp = os.path.join(folder, "config.json.tmp")
  with open(tmp, "w") as f:
    json.dump(config, f, indent=2)
  os.replace(tmp, os.path.join(folder, "config.json"))
  return folder
