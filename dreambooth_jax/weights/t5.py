"""Hugging Face T5 checkpoints -> `models.t5.T5EncoderModel`, without torch.

Accepted folders hold `config.json` and `model*.safetensors` in any layout
`safetensors_io.open_folder` reads (single, sharded, `fp16` variant), as written
by `T5EncoderModel.save_pretrained` (DeepFloyd IF's `text_encoder/`) or by
`T5ForConditionalGeneration` (`google/t5-v1_1-xxl`): the decoder and LM head
of a full checkpoint are skipped, never read. A pipeline folder is resolved to
its `text_encoder/`. Text models IF was not trained with (mT5, UMT5, CLIP,
decoder-only LMs) are refused by name (`describe_text_config`).

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
from etils import epath
from flax import nnx

from dreambooth_jax.models.t5 import T5Config, T5EncoderModel, count_params
from dreambooth_jax.weights import safetensors_io
from dreambooth_jax.weights.safetensors_io import WeightsError, open_folder, read_config, save_file
from dreambooth_jax.weights.torch_layout import export_params, load_params

__all__ = ["save_t5_encoder", "t5_config_from_dict", "describe_text_config", "resolve_t5_folder", "t5_tensor_layout",
           "abstract_t5_encoder", "load_t5_encoder", "count_params", "T5_EMBED_ALIASES"]

# transformers ties `encoder.embed_tokens.weight` to `shared.weight` and normally saves
# only one of the two; which one survives de-duplication has changed across versions.
T5_EMBED_ALIASES = ("shared.weight", "encoder.embed_tokens.weight")


_FIX = ("Use the encoder DeepFloyd IF was trained with: the text_encoder/ of "
        "DeepFloyd/IF-I-XL-v1.0 (or that pipeline folder) or google/t5-v1_1-xxl.")
_DECODER_ONLY = ("gpt2", "llama", "mistral", "mixtral", "gemma", "gemma2", "gemma3", "qwen2", "qwen3",
                 "phi", "phi3", "opt", "gpt_neox", "gptj", "falcon", "bloom", "olmo")


def describe_text_config(d: Mapping[str, Any]) -> str | None:
  """Why config dict `d` is not a T5 encoder config (one clause), or None when it is one."""
  cls, model_type = d.get("_class_name"), d.get("model_type", "t5")
  arch = ", ".join(d.get("architectures") or ()) or "no architectures listed"
  if cls is not None:
    return f"describes a diffusers {cls} (a config.json with _class_name), not a text encoder"
  if model_type == "mt5":
    return ("describes mT5 (model_type 'mt5', multilingual T5): its 250k-piece vocabulary and "
            "embedding space differ from the English T5 v1.1 XXL that DeepFloyd IF was trained "
            "on, so IF's UNets would get text features they never saw")
  if model_type == "umt5":
    return ("describes UMT5 (model_type 'umt5'): a multilingual vocabulary other than T5 v1.1's, "
            "and a relative position bias in every layer where T5 shares the first layer's")
  if model_type in ("clip_text_model", "clip", "clip_text"):
    return (f"describes a CLIP text encoder (model_type {model_type!r}, {arch}), as Stable "
            "Diffusion and the x4 upscaler use; IF conditions on T5 v1.1 XXL")
  causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in d.get("architectures") or ())
  if model_type in _DECODER_ONLY or causal or (d.get("is_decoder") and model_type != "t5"):
    return (f"describes a decoder-only language model (model_type {model_type!r}, {arch}), not "
            "the T5 encoder IF conditions on")
  if model_type == "t5" and d.get("is_decoder"):
    return "describes a T5 decoder stack (is_decoder: true), not the T5 encoder"
  if model_type != "t5":
    return f"has model_type {model_type!r} ({arch}); expected the T5 v1.1 encoder (model_type 't5')"
  return None


def t5_config_from_dict(d: Mapping[str, Any], source: str = "config.json") -> T5Config:
  """T5Config from a config.json dict; WeightsError for configs that are not IF's kind of T5."""
  why = describe_text_config(d)
  if why:
    raise WeightsError(f"{source} {why}. {_FIX}")
  try:
    return T5Config.from_dict(d)
  except (TypeError, ValueError) as e:
    raise WeightsError(f"{source} is not a usable T5 config: {e}") from e


def resolve_t5_folder(folder: str) -> str:
  """`folder`, or its `text_encoder/` when `folder` is a pipeline download (model_index.json)."""
  return safetensors_io.resolve_component(
      folder, "text_encoder", "T5 text encoder",
      "IF-II pipelines are often saved without one. " + _FIX)


def t5_tensor_layout(tensors: Mapping[str, Any]) -> tuple[tuple, Callable[[str], bool]]:
  """(renames, ignore) mapping a transformers T5 checkpoint's names onto our encoder.

  The decoder and LM head of a full T5ForConditionalGeneration are ignored, and
  a checkpoint that kept only the tied alias of the embedding is renamed.
  """
  renames = ()
  if T5_EMBED_ALIASES[0] not in tensors and T5_EMBED_ALIASES[1] in tensors:
    renames = ((r"^shared\.weight$", T5_EMBED_ALIASES[1]),)
  return renames, _is_not_encoder


def _config_from(source: str | Mapping[str, Any] | T5Config) -> T5Config:
  if isinstance(source, T5Config):
    return source
  if isinstance(source, Mapping):
    return t5_config_from_dict(source)
  if os.path.isdir(source):
    folder = resolve_t5_folder(source)
    return t5_config_from_dict(read_config(folder), os.path.join(folder, "config.json"))
  try:
    with open(source) as f:
      return t5_config_from_dict(json.load(f), source)
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
  """Loads the T5 encoder of a Hugging Face folder (or a pipeline's), computing in `dtype`.

  Parameters are stored in `param_dtype` (default: `dtype`), e.g. bfloat16 for
  frozen inference on TPU. `place(path, array)` can put each tensor straight
  onto a mesh (see `torch_layout.load_params`). Raises WeightsError naming every
  missing, unexpected or mis-shaped tensor when folder and config disagree.
  """
  directory = resolve_t5_folder(directory)
  config = t5_config_from_dict(read_config(directory), os.path.join(directory, "config.json"))
  tensors = open_folder(directory, ("model",), variant=variant)
  param_dtype = dtype if param_dtype is None else param_dtype
  model = abstract_t5_encoder(config, dtype=dtype, param_dtype=param_dtype, remat=remat)
  renames, ignore = t5_tensor_layout(tensors)
  # Cast on the host in place of `place`'s default so that bf16 storage never
  # materialises a float32 copy of the 0.5 GB XXL embedding on device.
  if place is None:
    place = lambda path, array: jnp.asarray(np.asarray(array).astype(param_dtype))
  return load_params(model, tensors, renames=renames, source=tensors.source, ignore=ignore,
                     place=place)


def save_t5_encoder(model: T5EncoderModel, folder, *, dtype=None, variant: str | None = None) -> str:
  """Writes our encoder as a Hugging Face folder (`config.json` + `model[.variant].safetensors`)
  that `load_t5_encoder` and transformers' `T5EncoderModel.from_pretrained` load.

  Parameter names already follow transformers' (`shared.weight`, `encoder.block.N...`);
  `dtype` (e.g. np.float16) converts on the way out.
  """
  folder = epath.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  c = model.config
  config = {"architectures": ["T5EncoderModel"], "model_type": "t5", "is_encoder_decoder": False,
            "vocab_size": c.vocab_size, "d_model": c.d_model, "d_kv": c.d_kv, "d_ff": c.d_ff,
            "num_layers": c.num_layers, "num_heads": c.num_heads,
            "relative_attention_num_buckets": c.relative_attention_num_buckets,
            "relative_attention_max_distance": c.relative_attention_max_distance,
            "layer_norm_epsilon": c.layer_norm_epsilon, "feed_forward_proj": c.feed_forward_proj,
            "initializer_factor": c.initializer_factor, "pad_token_id": 0, "eos_token_id": 1,
            "tie_word_embeddings": False}
  (folder / "config.json").write_text(json.dumps(config, indent=2))
  name = f"model.{variant}.safetensors" if variant else "model.safetensors"
  save_file(export_params(model, dtype=dtype), folder / name, metadata={"format": "pt"})
  return str(folder)
