"""Vision Transformer (transformers' `ViTModel`) in flax.nnx, for DINO ViT-S/16 features.

The DreamBooth evaluation protocol scores subject fidelity with the CLS token
of DINO ViT-S/16 (`facebook/dino-vits16`): `ViTModel(pixels).last_hidden_state[:, 0]`,
i.e. the CLS token *after* the final layernorm, no pooler. This module mirrors
that model module for module, named after the state-dict keys that
`save_pretrained` writes (transformers 5 renamed the modules internally but
still saves the legacy names `encoder.layer.N.attention.attention.query`, which
are also the names on the hub), so the importer needs no renames.

Layout is NHWC: inputs are float images [B, H, W, 3] already normalised (see
`dreambooth_jax.evaluation.preprocess`). The multi-head attention helper here is
shared with `models.clip`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dreambooth_jax.models.layers import Conv, Dense, LayerNorm, activation, param

# Finite "minus infinity" for masked attention logits: a fully masked row then
# softmaxes to a uniform distribution instead of NaN, and the NaN cannot leak
# into unmasked rows through 0 * NaN in the value product.
_MASKED = float(jnp.finfo(jnp.float32).min)


def attention(q, k, v, mask=None):
  """Softmax attention over [B, T, heads, head_dim] tensors; logits and softmax in float32.

  `mask` is boolean, broadcastable to [B, heads, Tq, Tk]; True = may attend.
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
  if mask is not None:
    s = jnp.where(mask, s, _MASKED)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _pair(x) -> tuple[int, int]:
  return (int(x[0]), int(x[1])) if isinstance(x, (list, tuple)) else (int(x), int(x))


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """The fields of transformers' ViTConfig that shape the model; defaults are ViTConfig's."""

  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  image_size: tuple[int, int] = (224, 224)
  patch_size: tuple[int, int] = (16, 16)
  num_channels: int = 3
  qkv_bias: bool = True

  @property
  def grid(self) -> tuple[int, int]:
    return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

  @classmethod
  def from_hf(cls, d: dict[str, Any], source: str = "config") -> "ViTConfig":
    """From a Hugging Face ViT config.json dict (e.g. facebook/dino-vits16's)."""
    if d.get("model_type", "vit") != "vit":
      raise ValueError(f"{source}: model_type {d.get('model_type')!r} is not 'vit'; expected a "
                       "ViTModel folder such as facebook/dino-vits16.")
    defaults = cls()
    get = lambda k: d.get(k) if d.get(k) is not None else getattr(defaults, k)
    cfg = cls(hidden_size=int(get("hidden_size")), num_hidden_layers=int(get("num_hidden_layers")),
              num_attention_heads=int(get("num_attention_heads")),
              intermediate_size=int(get("intermediate_size")), hidden_act=str(get("hidden_act")),
              layer_norm_eps=float(get("layer_norm_eps")), image_size=_pair(get("image_size")),
              patch_size=_pair(get("patch_size")), num_channels=int(get("num_channels")),
              qkv_bias=bool(get("qkv_bias")))
    if cfg.hidden_size % cfg.num_attention_heads:
      raise ValueError(f"{source}: hidden_size {cfg.hidden_size} is not divisible by "
                       f"num_attention_heads {cfg.num_attention_heads}.")
    activation(cfg.hidden_act)  # fails early on an activation we do not implement
    return cfg


class ViTOutput(NamedTuple):
  last_hidden_state: jax.Array  # [B, 1 + patches, hidden], after the final layernorm
  cls: jax.Array                # [B, hidden] = last_hidden_state[:, 0]: the DINO feature


class _Linear(nnx.Module):
  """Holder giving a Dense the extra path level of transformers' `...output.dense`."""

  def __init__(self, dense: Dense):
    self.dense = dense

  def __call__(self, x):
    return self.dense(x)


class ViTSelfAttention(nnx.Module):
  def __init__(self, cfg: ViTConfig, **kw):
    h = cfg.hidden_size
    self.heads = cfg.num_attention_heads
    self.query = Dense(h, h, axes=("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
    self.key = Dense(h, h, axes=("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
    self.value = Dense(h, h, axes=("embed", "heads"), use_bias=cfg.qkv_bias, **kw)

  def __call__(self, x):
    b, t, c = x.shape
    split = lambda y: y.reshape(b, t, self.heads, c // self.heads)
    o = attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
    return o.reshape(b, t, c)


class ViTAttention(nnx.Module):
  def __init__(self, cfg: ViTConfig, **kw):
    self.attention = ViTSelfAttention(cfg, **kw)
    self.output = _Linear(Dense(cfg.hidden_size, cfg.hidden_size, axes=("heads", "embed"), **kw))

  def __call__(self, x):
    return self.output(self.attention(x))


class ViTLayer(nnx.Module):
  """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

  def __init__(self, cfg: ViTConfig, **kw):
    h, eps = cfg.hidden_size, cfg.layer_norm_eps
    self.act = activation(cfg.hidden_act)
    self.layernorm_before = LayerNorm(h, eps=eps, **kw)
    self.attention = ViTAttention(cfg, **kw)
    self.layernorm_after = LayerNorm(h, eps=eps, **kw)
    self.intermediate = _Linear(Dense(h, cfg.intermediate_size, axes=("embed", "mlp"), **kw))
    self.output = _Linear(Dense(cfg.intermediate_size, h, axes=("mlp", "embed"), **kw))

  def __call__(self, x):
    x = x + self.attention(self.layernorm_before(x))
    return x + self.output(self.act(self.intermediate(self.layernorm_after(x))))


class ViTEncoder(nnx.Module):
  def __init__(self, cfg: ViTConfig, **kw):
    self.layer = nnx.List([ViTLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers)])

  def __call__(self, x):
    for layer in self.layer:
      x = layer(x)
    return x


class ViTPatchEmbeddings(nnx.Module):
  def __init__(self, cfg: ViTConfig, **kw):
    if cfg.patch_size[0] != cfg.patch_size[1]:
      raise ValueError(f"non-square patches {cfg.patch_size} are not supported")
    p = cfg.patch_size[0]
    self.projection = Conv(cfg.num_channels, cfg.hidden_size, p, stride=p, padding=0, **kw)

  def __call__(self, pixels):
    y = self.projection(pixels)  # [B, H/p, W/p, C]
    # Row-major flattening of the grid, as torch's `flatten(2).transpose(1, 2)` on NCHW.
    return y.reshape(y.shape[0], -1, y.shape[-1])


class ViTEmbeddings(nnx.Module):
  def __init__(self, cfg: ViTConfig, *, rngs=None, param_dtype=jnp.float32, dtype=None):
    kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.cfg = cfg
    n = cfg.grid[0] * cfg.grid[1]
    init = nnx.initializers.truncated_normal(0.02)
    self.cls_token = param(rngs, init, (1, 1, cfg.hidden_size), param_dtype, (None, None, "embed"))
    self.position_embeddings = param(rngs, init, (1, n + 1, cfg.hidden_size), param_dtype,
                                     (None, "length", "embed"))
    self.patch_embeddings = ViTPatchEmbeddings(cfg, **kw)

  def __call__(self, pixels):
    b, hgt, wid, ch = pixels.shape
    if (hgt, wid) != self.cfg.image_size or ch != self.cfg.num_channels:
      # transformers can bicubically interpolate the position table for other
      # sizes; the evaluation protocol always feeds the trained 224x224, so we
      # refuse instead of silently approximating torch's bicubic kernel.
      raise ValueError(
          f"ViT expects NHWC images of {self.cfg.image_size[0]}x{self.cfg.image_size[1]}x"
          f"{self.cfg.num_channels}, got {hgt}x{wid}x{ch} (shape {pixels.shape}); resize and "
          "center-crop first (dreambooth_jax.evaluation.preprocess). Position-embedding interpolation "
          "is not supported.")
    x = self.patch_embeddings(pixels)
    dtype = x.dtype
    cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    return x + self.position_embeddings[...].astype(dtype)


class ViT(nnx.Module):
  """transformers' ViTModel without the pooler (`add_pooling_layer=False`).

  `dtype` is the compute dtype (None: the param dtype); layernorm statistics
  and softmax run in float32 regardless.
  """

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs | None = None, dtype=None,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.cfg = cfg
    self.embeddings = ViTEmbeddings(cfg, **kw)
    self.encoder = ViTEncoder(cfg, **kw)
    self.layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)

  def __call__(self, pixels) -> ViTOutput:
    """pixels: normalised float images [B, H, W, C] -> ViTOutput."""
    dtype = self.layernorm.dtype or self.layernorm.scale[...].dtype
    x = self.embeddings(jnp.asarray(pixels, dtype))
    h = self.layernorm(self.encoder(x))
    return ViTOutput(last_hidden_state=h, cls=h[:, 0])

  def encode_image(self, pixels) -> jax.Array:
    """The DINO feature: CLS token of the final hidden state, [B, hidden] (not normalised)."""
    return self(pixels).cls


def abstract_vit(cfg: ViTConfig, **kw) -> ViT:
  """The model with ShapeDtypeStruct params: shapes and logical axes, no memory."""
  return nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0), **kw))
