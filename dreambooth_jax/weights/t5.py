"""Hugging Face T5 checkpoints -> `models.t5.T5EncoderModel`, without torch.

Accepted folders hold `config.json` and `model.safetensors` (or a sharded
`model.safetensors.index.json`, or the `.fp16` variant), as written by
`T5EncoderModel.save_pretrained` (DeepFloyd IF's `text_encoder/`) or by
`T5ForConditionalGeneration` (`google/t5-v1_1-xxl`): the decoder and LM head
of a full checkpoint are skipped, never read.

The model is built abstractly (`nnx.eval_shape`, no memory, no init compute)
and every parameter is then filled from the file, in the requested dtype, so
peak host memory is one tensor plus the model.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreambooth_jax.models.t5 import T5Config, T5EncoderModel, count_params
from dreambooth_jax.weights.safetensors_io import WeightsError, open_folder, read_config
from dreambooth_jax.weights.torch_layout import load_params

__all__ = ["t5_config_from_dict", "abstract_t5_encoder", "load_t5_encoder", "count_params",
           "T5_EMBED_ALIASES"]

# transformers ties `encoder.embed_tokens.weight` to `shared.weight` and normally saves
# only one of the two; which one survives de-duplication has changed across versions.
T5_EMBED_ALIASES = ("shared.weight", "encoder.embed_tokens.weight")


def t5_config_from_dict(d: Mapping[str, Any]) -> T5Config:
  """T5Config from a config.json dict; refuses configs that are not T5 encoders."""
  model_type = d.get("model_type", "t5")
  if model_type not in ("t5", "umt5", "mt5"):
    raise WeightsError(f"config.json has model_type {model_type!r}; expected a T5 model ('t5').")
  if model_type == "umt5":
    # UMT5 gives every block its own relative bias; our encoder shares block 0's.
    raise WeightsError("UMT5 checkpoints are not supported (per-layer relative position bias).")
  try:
    return T5Config.from_dict(d)
  except (TypeError, ValueError) as e:
    raise WeightsError(f"config.json is not a usable T5 config: {e}") from e


def _config_from(source: str | Mapping[str, Any] | T5Config) -> T5Config:
  if isinstance(source, T5Config):
    return source
  if isinstance(source, Mapping):
    return t5_config_from_dict(source)
  if os.path.isdir(source):
    return t5_config_from_dict(read_config(source))
  try:
    with open(source) as f:
      return t5_config_from_dict(json.load(f))
  except (OSError, json.JSONDecodeError) as e:
    raise WeightsError(f"cannot read T5 config {source!r}: {e}") from e


def abstract_t5_encoder(config: str | Mapping[str, Any] | T5Config, dtype=jnp.float32,
                        param_dtype=None, remat: bool = False) -> T5EncoderModel:
  """The encoder with ShapeDtypeStruct parameters: for shape checks, sharding plans and loading.

  `config` is a T5Config, a config dict, a config.json path or a model folder,
  e.g. `reference_configs/t5_v1_1_xxl.json` for the full-size IF text encoder.
  """
  cfg = _config_from(config)
  param_dtype = dtype if param_dtype is None else param_dtype
  return nnx.eval_shape(lambda: T5EncoderModel(cfg, dtype=dtype, param_dtype=param_dtype,
                                               rngs=nnx.Rngs(0), remat=remat))


def _is_not_encoder(key: str) -> bool:
  return key.startswith(("decoder.", "lm_head.")) or key in T5_EMBED_ALIASES[1:]


def load_t5_encoder(directory: str, dtype=jnp.float32, *, param_dtype=None, remat: bool = False,
                    variant: str | None = None,
                    place: Callable[[tuple, np.ndarray], jax.Array] | None = None) -> T5EncoderModel:
  """Loads the T5 encoder of a Hugging Face folder, computing in `dtype`.

  Parameters are stored in `param_dtype` (default: `dtype`), e.g. bfloat16 for
  frozen inference on TPU. `place(path, array)` can put each tensor straight
  onto a mesh (see `torch_layout.load_params`). Raises WeightsError naming every
  missing, unexpected or mis-shaped tensor when folder and config disagree.
  """
  config = t5_config_from_dict(read_config(directory))
  tensors = open_folder(directory, ("model",), variant=variant)
  param_dtype = dtype if param_dtype is None else param_dtype
  model = abstract_t5_encoder(config, dtype=dtype, param_dtype=param_dtype, remat=remat)
  renames = ()
  if T5_EMBED_ALIASES[0] not in tensors and T5_EMBED_ALIASES[1] in tensors:
    renames = ((r"^shared\.weight$", T5_EMBED_ALIASES[1]),)
  # Cast on the host in place of `place`'s default so that bf16 storage never
  # materialises a float32 copy of the 0.5 GB XXL embedding on device.
  if place is None:
    place = lambda path, array: jnp.asarray(np.asarray(array).astype(param_dtype))
  return load_params(model, tensors, renames=renames, source=tensors.source,
                     ignore=_is_not_encoder, place=place)
