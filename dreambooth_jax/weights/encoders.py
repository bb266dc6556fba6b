"""Hugging Face folders of the evaluation encoders -> our flax models.

- DINO ViT-S/16 (`facebook/dino-vits16`, a transformers `ViTModel` folder) ->
  `models.vit.ViT`; the pooler that `ViTModel` adds by default is not part of
  DINO and not used by the protocol, so `pooler.*` tensors are ignored.
- CLIP ViT-B/32 (`openai/clip-vit-base-patch32`, a `CLIPModel` folder) ->
  `models.clip.CLIP`.

Each folder holds `config.json` and `model.safetensors` (or a sharded
`model.safetensors.index.json`). Our module names equal the state-dict keys,
so no renames are needed; only kernel layouts change (see `torch_layout`).
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreambooth_jax.models.clip import CLIP, CLIPConfig, abstract_clip_model
from dreambooth_jax.models.vit import ViT, ViTConfig, abstract_vit
from dreambooth_jax.weights import safetensors_io, torch_layout

WEIGHTS_STEM = "model"


class _StripPrefix(Mapping[str, np.ndarray]):
  """Views a tensor mapping without a common key prefix, e.g. `vit.` of ViT*For* checkpoints."""

  def __init__(self, tensors, prefix: str):
    self._t, self._p = tensors, prefix
    self.source = getattr(tensors, "source", "checkpoint")

  def __getitem__(self, name):
    return self._t[self._p + name]

  def shape(self, name):
    return tuple(getattr(self._t, "shape", lambda k: self._t[k].shape)(self._p + name))

  def __iter__(self) -> Iterator[str]:
    return (k[len(self._p):] for k in self._t if k.startswith(self._p))

  def __len__(self):
    return sum(1 for _ in self)


def param_count(model: nnx.Module) -> int:
  """Number of parameter scalars (works on abstract models too)."""
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  return int(sum(math.prod(x.shape) for x in leaves))


# --- DINO (ViTModel) -------------------------------------------------------------------------

def dino_config(config: dict[str, Any], source: str = "config") -> ViTConfig:
  return ViTConfig.from_hf(config, source=source)


def abstract_dino(config: dict[str, Any] | ViTConfig, *, dtype=None,
                  param_dtype=jnp.float32) -> ViT:
  """A shape-only ViT from a HF ViT config.json dict (no weights, no memory)."""
  cfg = config if isinstance(config, ViTConfig) else dino_config(config)
  return abstract_vit(cfg, dtype=dtype, param_dtype=param_dtype)


def load_dino(folder: str, dtype=jnp.float32, *, compute_dtype=None, place=None) -> ViT:
  """Loads a transformers ViTModel folder (DINO ViT-S/16) into our ViT.

  Params are stored in `dtype`; math runs in `compute_dtype` (default: `dtype`).
  Raises WeightsError naming the folder when config or weights are missing,
  and listing every missing, unexpected or mis-shaped tensor.
  """
  cfg = dino_config(safetensors_io.read_config(folder), source=os.path.join(folder, "config.json"))
  tensors = safetensors_io.open_folder(folder, (WEIGHTS_STEM,))
  # A ViTModel saved as part of ViTFor* carries the base-model prefix `vit.`.
  if "embeddings.cls_token" not in tensors and "vit.embeddings.cls_token" in tensors:
    tensors = _StripPrefix(tensors, "vit.")
  model = abstract_dino(cfg, dtype=compute_dtype or dtype, param_dtype=dtype)
  return torch_layout.load_params(
      model, tensors, dtype=dtype, source=tensors.source, place=place,
      # The pooler (dense + tanh) is not part of DINO, and the protocol uses
      # last_hidden_state[:, 0]; mask_token only exists for masked-image modelling.
      ignore=lambda k: k.startswith("pooler.") or k == "embeddings.mask_token")


# --- CLIP (CLIPModel) ------------------------------------------------------------------------

def clip_config(config: dict[str, Any], source: str = "config") -> CLIPConfig:
  return CLIPConfig.from_hf(config, source=source)


def abstract_clip(config: dict[str, Any] | CLIPConfig, *, dtype=None,
                  param_dtype=jnp.float32) -> CLIP:
  """A shape-only CLIP from a HF CLIPModel config.json dict (no weights, no memory)."""
  cfg = config if isinstance(config, CLIPConfig) else clip_config(config)
  return abstract_clip_model(cfg, dtype=dtype, param_dtype=param_dtype)


def load_clip(folder: str, dtype=jnp.float32, *, compute_dtype=None, place=None) -> CLIP:
  """Loads a transformers CLIPModel folder (CLIP ViT-B/32) into our CLIP.

  Params are stored in `dtype`; math runs in `compute_dtype` (default: `dtype`).
  Raises WeightsError as `load_dino` does.
  """
  cfg = clip_config(safetensors_io.read_config(folder), source=os.path.join(folder, "config.json"))
  tensors = safetensors_io.open_folder(folder, (WEIGHTS_STEM,))
  model = abstract_clip(cfg, dtype=compute_dtype or dtype, param_dtype=dtype)
  return torch_layout.load_params(
      model, tensors, dtype=dtype, source=tensors.source, place=place,
      # Checkpoints written by older transformers saved the constant
      # `position_ids` buffers; we compute positions instead.
      ignore=lambda k: k.endswith("embeddings.position_ids"))
