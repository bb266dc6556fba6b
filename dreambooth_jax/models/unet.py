"""The DeepFloyd-IF / Imagen-style text-conditioned UNet, in flax.nnx.

Mirrors diffusers' `UNet2DConditionModel` for the block types IF uses (and
those of Stable Diffusion's x4 upscaler, DeepFloyd's published stage III),
module for module and name for name, so diffusers state dicts map onto our
params with no renames (see `weights.unet`):

- ResnetDownsampleBlock2D / ResnetUpsampleBlock2D: resnets whose resampling is
  itself a resnet (`down=True`: 2x2 average pool; `up=True`: nearest 2x).
- SimpleCrossAttnDownBlock2D / UpBlock2D and UNetMidBlock2DSimpleCrossAttn:
  self-attention whose keys/values are extended by projected text tokens
  (`add_k_proj` / `add_v_proj`), Imagen's "text K/V added to self-attention".
- `encoder_hid_proj` (T5 4096 -> cross_attention_dim), addition embedding
  "text" (attention-pooled T5 added to the time embedding), class embedding
  "timestep" (the SR stage's augmentation level, a *float* on the 0..1000
  scale), scale-shift resnets, skip_time_act, output scale factors.
- The x4 upscaler's latent-UNet blocks (`models.latent_blocks`):
  CrossAttnDownBlock2D / CrossAttnUpBlock2D and UNetMidBlock2DCrossAttn
  (transformer blocks with text cross-attention, `only_cross_attention`,
  `use_linear_projection`), DownBlock2D / UpBlock2D (conv resampling), and
  the `num_class_embeds` table that embeds its integer noise level.

Layout is NHWC throughout (TPU-friendly); the output of IF stages has 6
channels: epsilon and the learned-range variance interpolation values.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dreambooth_jax import sharding
from dreambooth_jax.models.latent_blocks import Downsample2D, Transformer2D, Upsample2D
from dreambooth_jax.models.layers import (Conv, Dense, Embed, GroupNorm, KeyGen, LayerNorm, Rngs,
                                          activation, param, random_init)

IF_DOWN_TYPES = ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D")
IF_UP_TYPES = ("ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D")
# Latent-diffusion blocks (the SD x4 upscaler): conv resampling, transformer attention, and
# resnets that ignore resnet_skip_time_act / resnet_out_scale_factor, as diffusers builds them.
LATENT_DOWN_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
LATENT_UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
DOWN_TYPES, UP_TYPES = IF_DOWN_TYPES + LATENT_DOWN_TYPES, IF_UP_TYPES + LATENT_UP_TYPES
MID_TYPES = ("UNetMidBlock2DSimpleCrossAttn", "UNetMidBlock2DCrossAttn")
# Large negative bias diffusers adds for padded text tokens (not -inf, so a
# fully padded row still softmaxes to something finite, exactly as in PyTorch).
_MASK_BIAS = -10000.0


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The subset of diffusers' UNet2DConditionModel config that IF and the SD x4 upscaler use.

  `attention_head_dim` is diffusers' field as it uses it: the head *width* of
  SimpleCrossAttn (IF) blocks, but the head *count* of CrossAttn (transformer)
  blocks and UNetMidBlock2DCrossAttn (diffusers issue #2011).
  """

  in_channels: int = 3
  out_channels: int = 6
  sample_size: int = 64
  block_out_channels: tuple[int, ...] = (32, 64)
  down_block_types: tuple[str, ...] = ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D")
  up_block_types: tuple[str, ...] = ("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D")
  layers_per_block: tuple[int, ...] = (1, 1)
  attention_head_dim: tuple[int, ...] = (8, 8)
  only_cross_attention: tuple[bool, ...] = (False, False)
  mid_block_only_cross_attention: bool = False
  mid_block_type: str = "UNetMidBlock2DSimpleCrossAttn"
  cross_attention_dim: int = 32
  encoder_hid_dim: int | None = None
  addition_embed_type: str | None = "text"
  addition_embed_type_num_heads: int = 64
  class_embed_type: str | None = None
  num_class_embeds: int | None = None  # with class_embed_type None: a table of integer labels
  use_linear_projection: bool = False
  downsample_padding: int = 1
  act_fn: str = "gelu"
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  resnet_time_scale_shift: str = "scale_shift"
  resnet_skip_time_act: bool = False
  resnet_out_scale_factor: float = 1.0
  mid_block_scale_factor: float = 1.0
  cross_attention_norm: str | None = "group_norm"
  time_embedding_dim: int | None = None
  time_embedding_act_fn: str | None = None
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or self.block_out_channels[0] * 4

  @classmethod
  def from_diffusers(cls, d: dict[str, Any], source: str = "config") -> "UNetConfig":
    """Builds the config from a diffusers config.json dict, refusing what we do not implement."""
    n = len(d.get("down_block_types", ()))
    unsupported = {
        "mid_block_type": MID_TYPES, "time_embedding_type": ("positional",),
        "encoder_hid_dim_type": (None, "text_proj"), "addition_embed_type": (None, "text"),
        "class_embed_type": (None, "timestep"), "resnet_time_scale_shift": ("default", "scale_shift"),
        "cross_attention_norm": (None, "group_norm"), "time_cond_proj_dim": (None,),
        "timestep_post_act": (None,), "class_embeddings_concat": (False,),
        "center_input_sample": (False,), "dual_cross_attention": (False,),
        "transformer_layers_per_block": (1,), "reverse_transformer_layers_per_block": (None,),
        "attention_type": ("default",), "num_attention_heads": (None,), "downsample_padding": (0, 1),
    }
    for key, ok in unsupported.items():
      if key in d and d[key] not in ok:
        raise ValueError(f"{source}: {key}={d[key]!r} is not supported by dreambooth_jax's UNet "
                         f"(supported: {list(ok)}); it implements the DeepFloyd IF architecture "
                         "and Stable Diffusion's x4 upscaler.")
    for key in ("down_block_types", "up_block_types"):
      allowed = DOWN_TYPES if key.startswith("down") else UP_TYPES
      bad = [t for t in d.get(key, ()) if t not in allowed]
      if bad:
        raise ValueError(f"{source}: {key} contains {bad}; supported block types are {allowed}.")
    missing = [k for k in ("block_out_channels", "down_block_types", "up_block_types",
                           "layers_per_block", "cross_attention_dim") if d.get(k) is None]
    if missing:
      raise ValueError(f"{source}: required keys {missing} are missing or null.")
    if not isinstance(d["cross_attention_dim"], int):
      raise ValueError(f"{source}: cross_attention_dim={d['cross_attention_dim']!r}: only one "
                       "text width for every block is supported.")

    def per_block(value, default):
      value = default if value is None else value
      return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n

    heads = d.get("attention_head_dim", 8)
    only_cross = d.get("only_cross_attention", False)
    mid_only = d.get("mid_block_only_cross_attention")
    if mid_only is None:
      mid_only = only_cross if isinstance(only_cross, bool) else False
    encoder_hid_dim = d.get("encoder_hid_dim")
    # diffusers' default mid block is UNetMidBlock2DCrossAttn; configs of IF-block UNets
    # written without the key (this library's tiny and benchmark configs) mean IF's own.
    down, up = d["down_block_types"], d["up_block_types"]
    if_blocks = all(t in IF_DOWN_TYPES for t in down)
    mid_type = d.get("mid_block_type") or (MID_TYPES[0] if if_blocks else MID_TYPES[1])
    if len({t in IF_DOWN_TYPES for t in down} | {t in IF_UP_TYPES for t in up}
           | {mid_type == MID_TYPES[0]}) > 1:
      raise ValueError(f"{source}: down_block_types {list(down)}, up_block_types {list(up)} and "
                       f"mid_block_type {mid_type!r} mix IF's blocks ({IF_DOWN_TYPES + IF_UP_TYPES}, "
                       f"{MID_TYPES[0]}) with latent ones ({LATENT_DOWN_TYPES + LATENT_UP_TYPES}, "
                       f"{MID_TYPES[1]}); use one family.")
    return cls(
        in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4),
        sample_size=d.get("sample_size") or 64,
        block_out_channels=tuple(d["block_out_channels"]),
        down_block_types=tuple(d["down_block_types"]), up_block_types=tuple(d["up_block_types"]),
        layers_per_block=per_block(d["layers_per_block"], 2),
        attention_head_dim=tuple(h if h is not None else c for h, c in
                                 zip(per_block(heads, 8), d["block_out_channels"])),
        only_cross_attention=per_block(only_cross, False),
        mid_block_only_cross_attention=bool(mid_only), mid_block_type=mid_type,
        cross_attention_dim=d["cross_attention_dim"],
        encoder_hid_dim=encoder_hid_dim,
        addition_embed_type=d.get("addition_embed_type"),
        addition_embed_type_num_heads=d.get("addition_embed_type_num_heads") or 64,
        class_embed_type=d.get("class_embed_type"),
        num_class_embeds=d.get("num_class_embeds") if d.get("class_embed_type") is None else None,
        use_linear_projection=bool(d.get("use_linear_projection", False)),
        downsample_padding=d.get("downsample_padding", 1),
        act_fn=d.get("act_fn", "silu"), norm_num_groups=d.get("norm_num_groups", 32),
        norm_eps=d.get("norm_eps", 1e-5),
        resnet_time_scale_shift=d.get("resnet_time_scale_shift", "default"),
        resnet_skip_time_act=d.get("resnet_skip_time_act", False),
        resnet_out_scale_factor=d.get("resnet_out_scale_factor", 1.0),
        mid_block_scale_factor=d.get("mid_block_scale_factor", 1.0),
        cross_attention_norm=d.get("cross_attention_norm"),
        time_embedding_dim=d.get("time_embedding_dim"),
        time_embedding_act_fn=d.get("time_embedding_act_fn"),
        flip_sin_to_cos=d.get("flip_sin_to_cos", True), freq_shift=d.get("freq_shift", 0),
        conv_in_kernel=d.get("conv_in_kernel", 3), conv_out_kernel=d.get("conv_out_kernel", 3),
    )

  def to_diffusers(self) -> dict[str, Any]:
    """A config.json dict that `UNet2DConditionModel.from_config` rebuilds identically."""
    d = dataclasses.asdict(self)
    for k, v in d.items():
      if isinstance(v, tuple):
        d[k] = list(v)
    d.update(_class_name="UNet2DConditionModel",
             encoder_hid_dim_type="text_proj" if self.encoder_hid_dim else None,
             time_embedding_type="positional", upcast_attention=False)
    return d


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period=10000):
  """diffusers' `get_timestep_embedding`, float32, for fractional timesteps too."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  emb = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nnx.Module):
  def __init__(self, in_dim: int, dim: int, act: str, **kw):
    self.linear_1 = Dense(in_dim, dim, axes=("embed", "mlp"), **kw)
    self.linear_2 = Dense(dim, dim, axes=("mlp", "embed"), **kw)
    self.act = activation(act)

  def __call__(self, x):
    return self.linear_2(self.act(self.linear_1(x)))


class AttentionPooling(nnx.Module):
  """IF's attention pooling of T5 tokens: a mean-token query over [mean; tokens].

  Like the original it ignores the padding mask: IF was trained that way.
  """

  def __init__(self, num_heads: int, dim: int, *, rngs=None, dtype=None, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.num_heads = num_heads
    self.positional_embedding = param(rngs, nnx.initializers.normal(dim ** -0.5), (1, dim),
                                      param_dtype, (None, "embed"))
    self.k_proj = Dense(dim, dim, axes=("embed", "heads"), **kw)
    self.q_proj = Dense(dim, dim, axes=("embed", "heads"), **kw)
    self.v_proj = Dense(dim, dim, axes=("embed", "heads"), **kw)

  def __call__(self, x):
    b, _, width = x.shape
    d = width // self.num_heads
    cls = x.mean(axis=1, keepdims=True) + self.positional_embedding[...].astype(x.dtype)
    x = jnp.concatenate([cls, x], axis=1)
    heads = lambda y: y.reshape(b, -1, self.num_heads, d)
    q, k, v = heads(self.q_proj(cls)), heads(self.k_proj(x)), heads(self.v_proj(x))
    scale = 1 / math.sqrt(math.sqrt(d))  # split between q and k, as IF does for fp16 range
    w = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k * scale)
    w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(w.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, width)


class TextTimeEmbedding(nnx.Module):
  def __init__(self, text_dim: int, time_dim: int, num_heads: int, **kw):
    self.norm1 = LayerNorm(text_dim, **kw)
    self.pool = AttentionPooling(num_heads, text_dim, **kw)
    self.proj = Dense(text_dim, time_dim, axes=("embed", "mlp"), **kw)
    self.norm2 = LayerNorm(time_dim, **kw)

  def __call__(self, text):
    return self.norm2(self.proj(self.pool(self.norm1(text))))


class ResnetBlock(nnx.Module):
  """diffusers' ResnetBlock2D (pre-norm), optionally resampling (`up`/`down`).

  `temb=None` builds it without time conditioning (the VAE's resnets);
  `skip_time_act` overrides the config's (latent-UNet blocks never skip it).
  """

  def __init__(self, cin: int, cout: int, temb: int | None, cfg: UNetConfig, *, scale: float,
               up: bool = False, down: bool = False, skip_time_act: bool | None = None, **kw):
    groups, eps = cfg.norm_num_groups, cfg.norm_eps
    self.up, self.down, self.scale = up, down, scale
    self.scale_shift = cfg.resnet_time_scale_shift == "scale_shift"
    self.skip_time_act = cfg.resnet_skip_time_act if skip_time_act is None else skip_time_act
    self.act = activation(cfg.act_fn)
    self.norm1 = GroupNorm(groups, cin, eps=eps, **kw)
    self.conv1 = Conv(cin, cout, 3, **kw)
    self.time_emb_proj = (None if temb is None else
                          Dense(temb, cout * (2 if self.scale_shift else 1), axes=("embed", "mlp"), **kw))
    self.norm2 = GroupNorm(groups, cout, eps=eps, **kw)
    self.conv2 = Conv(cout, cout, 3, **kw)
    self.conv_shortcut = Conv(cin, cout, 1, **kw) if cin != cout else None

  def _resample(self, x):
    if self.up:
      return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if self.down:
      b, h, w, c = x.shape
      return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    return x

  def __call__(self, x, temb=None):
    h = self.act(self.norm1(x))
    x, h = self._resample(x), self._resample(h)
    h = self.conv1(h)
    t = (None if self.time_emb_proj is None else
         self.time_emb_proj(temb if self.skip_time_act else self.act(temb))[:, None, None, :])
    if t is None:
      h = self.norm2(h)
    elif self.scale_shift:  # fused into the norm's single multiply-add
      h = self.norm2(h, scale_shift=jnp.split(t, 2, axis=-1))
    else:
      h = self.norm2(h + t)
    h = self.conv2(self.act(h))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return (x + h) / self.scale if self.scale != 1 else x + h


class AddedKVAttention(nnx.Module):
  """diffusers' Attention + AttnAddedKVProcessor: self-attention over pixels whose
  keys/values are prefixed by the projected text tokens (Imagen's text conditioning)."""

  def __init__(self, dim: int, head_dim: int, text_dim: int, cfg: UNetConfig, *,
               only_cross: bool, **kw):
    self.heads, self.head_dim, self.only_cross = dim // head_dim, head_dim, only_cross
    self.group_norm = GroupNorm(cfg.norm_num_groups, dim, eps=1e-5, **kw)
    self.norm_cross = (GroupNorm(32, text_dim, eps=1e-5, **kw)
                       if cfg.cross_attention_norm == "group_norm" else None)
    inner = self.heads * head_dim
    self.to_q = Dense(dim, inner, axes=("embed", "heads"), **kw)
    self.to_k = None if only_cross else Dense(dim, inner, axes=("embed", "heads"), **kw)
    self.to_v = None if only_cross else Dense(dim, inner, axes=("embed", "heads"), **kw)
    self.add_k_proj = Dense(text_dim, inner, axes=("embed", "heads"), **kw)
    self.add_v_proj = Dense(text_dim, inner, axes=("embed", "heads"), **kw)
    self.to_out = nnx.List([Dense(inner, dim, axes=("heads", "embed"), **kw)])

  def __call__(self, x, text, text_bias):
    b, hgt, wid, c = x.shape
    residual = x
    h = self.group_norm(x.reshape(b, hgt * wid, c))
    if self.norm_cross is not None:
      text = self.norm_cross(text)
    split = lambda y: y.reshape(b, -1, self.heads, self.head_dim)
    q = split(self.to_q(h))
    k, v = split(self.add_k_proj(text)), split(self.add_v_proj(text))
    bias = text_bias  # [B, L] additive, or None
    if not self.only_cross:
      k = jnp.concatenate([k, split(self.to_k(h))], axis=1)
      v = jnp.concatenate([v, split(self.to_v(h))], axis=1)
      if bias is not None:
        bias = jnp.pad(bias, ((0, 0), (0, hgt * wid)))
    return self.to_out[0](dot_attention(q, k, v, bias)).reshape(b, hgt, wid, c) + residual


def dot_attention(q, k, v, bias=None, *, max_scores: int | None = None):
  """softmax(q k^T / sqrt(d) + bias) v for [B, L, H, D] inputs, softmax in float32.

  Batched matmuls in heads-major layout: XLA:CPU's YNNPACK fusion of the
  einsum form ran 7x slower (43 vs 6 ms for IF's 16x16 attention, batch 16).
  On CPU, long sequences are processed in query chunks (a `lax.map`) so each
  chunk's [B, H, c, K] score block stays in cache instead of streaming a
  [B, H, Q, K] matrix through memory three times: 3x faster at 32x32 tokens.
  Batch and heads stay vectorised, so a batch-sharded call needs no gathers.
  On TPU/GPU XLA fuses the plain form well and it is used as is, unless
  `max_scores` caps a chunk's [B, H, c, K] block on every backend (the SD x4
  upscaler VAE's 65536-token attention would otherwise need 16 GiB per image).
  """
  b, nq, h, d = q.shape
  kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
  scale = 1.0 / math.sqrt(d)
  bias = None if bias is None else bias[:, None, None, :]

  def attend(qh):  # [B, H, c, D] -> [B, H, c, D]
    s = jnp.matmul(qh, jnp.swapaxes(kh, -1, -2)).astype(jnp.float32) * scale
    if bias is not None:
      s = s + bias
    return jnp.matmul(jax.nn.softmax(s, axis=-1).astype(vh.dtype), vh)

  chunk = _query_chunk(nq, k.shape[1])
  if chunk is None and max_scores:
    chunk = _query_chunk(nq, k.shape[1] * b * h, max_scores)
  if chunk is None:
    o = jnp.swapaxes(attend(jnp.swapaxes(q, 1, 2)), 1, 2)
  else:
    qc = q.reshape(b, nq // chunk, chunk, h, d).transpose(1, 0, 3, 2, 4)
    o = jax.lax.map(attend, qc).transpose(1, 0, 3, 2, 4)
  return o.reshape(b, nq, h * d)


# None: chunk queries on the CPU backend only. experiments/plan_tpu.py sets False: it
# compiles on fake CPU devices but must plan the program a TPU runs, which has no chunks.
CHUNK_QUERIES: bool | None = None


def _query_chunk(nq: int, nk: int, target: int | None = None) -> int | None:
  """Query-chunk length (largest power of two with chunk * keys <= target): on CPU by
  default, on every backend when a `target` is given."""
  enabled = jax.default_backend() == "cpu" if CHUNK_QUERIES is None else CHUNK_QUERIES
  enabled, target = (enabled, 1 << 16) if target is None else (True, target)
  if not enabled or nq * nk <= target:
    return None
  chunk = 1
  while chunk * 2 * nk <= target and nq % (chunk * 2) == 0:
    chunk *= 2
  return chunk if chunk < nq else None


def _remat(fn, enabled: bool):
  return nnx.remat(fn) if enabled else fn


def _attentions(kind: str, dim: int, idx: int, n: int, cfg: UNetConfig, **kw):
  """The `n` attention layers of block `kind` at down-order index `idx`, or None."""
  if kind.startswith("SimpleCrossAttn"):
    return nnx.List([AddedKVAttention(dim, cfg.attention_head_dim[idx], cfg.cross_attention_dim, cfg,
                                      only_cross=cfg.only_cross_attention[idx], **kw)
                     for _ in range(n)])
  if kind.startswith("CrossAttn"):
    return nnx.List([_transformer(dim, cfg.attention_head_dim[idx], cfg,
                                  only_cross=cfg.only_cross_attention[idx], **kw) for _ in range(n)])
  return None


def _transformer(dim: int, heads: int, cfg: UNetConfig, *, only_cross: bool, **kw) -> Transformer2D:
  if dim % heads:
    raise ValueError(f"{dim} channels do not split into {heads} heads (attention_head_dim is the "
                     "head count of CrossAttn blocks)")
  return Transformer2D(dim, heads, cfg.cross_attention_dim, groups=cfg.norm_num_groups,
                       only_cross=only_cross, linear_projection=cfg.use_linear_projection, **kw)


def _resnets(cins, cout: int, cfg: UNetConfig, *, latent: bool, scale: float | None = None, **kw):
  # diffusers builds its latent blocks' resnets with output_scale_factor 1 (the mid block with
  # its own) and no skip_time_act, whatever resnet_out_scale_factor / resnet_skip_time_act say.
  scale = (1.0 if latent else cfg.resnet_out_scale_factor) if scale is None else scale
  return nnx.List([ResnetBlock(c, cout, cfg.time_embed_dim, cfg, scale=scale,
                               skip_time_act=False if latent else None, **kw) for c in cins])


def _call(m, *a):
  return m(*a)


class DownBlock(nnx.Module):
  def __init__(self, kind: str, cin: int, cout: int, idx: int, cfg: UNetConfig, *, last: bool, **kw):
    temb, s, n = cfg.time_embed_dim, cfg.resnet_out_scale_factor, cfg.layers_per_block[idx]
    latent = kind in LATENT_DOWN_TYPES
    self.resnets = _resnets([cin] + [cout] * (n - 1), cout, cfg, latent=latent, **kw)
    self.attentions = _attentions(kind, cout, idx, n, cfg, **kw)
    self.downsamplers = None if last else nnx.List([
        Downsample2D(cout, padding=cfg.downsample_padding, **kw) if latent else
        ResnetBlock(cout, cout, temb, cfg, scale=s, down=True, **kw)])

  def __call__(self, x, temb, text, bias, remat=False):
    skips = []
    for i, resnet in enumerate(self.resnets):
      x = _remat(_call, remat)(resnet, x, temb)
      if self.attentions is not None:
        x = _remat(_call, remat)(self.attentions[i], x, text, bias)
      skips.append(x)
    if self.downsamplers is not None:
      x = _remat(_call, remat)(self.downsamplers[0], x, temb)
      skips.append(x)
    return x, skips


class UpBlock(nnx.Module):
  def __init__(self, kind: str, cin: int, cout: int, cprev: int, idx: int, cfg: UNetConfig, *,
               last: bool, **kw):
    temb, s = cfg.time_embed_dim, cfg.resnet_out_scale_factor
    rev = len(cfg.block_out_channels) - 1 - idx  # per-block lists are given in down order
    n = cfg.layers_per_block[rev] + 1
    latent = kind in LATENT_UP_TYPES
    cins = [(cprev if i == 0 else cout) + (cin if i == n - 1 else cout) for i in range(n)]
    self.resnets = _resnets(cins, cout, cfg, latent=latent, **kw)
    self.attentions = _attentions(kind, cout, rev, n, cfg, **kw)
    self.upsamplers = None if last else nnx.List([
        Upsample2D(cout, **kw) if latent else
        ResnetBlock(cout, cout, temb, cfg, scale=s, up=True, **kw)])

  def __call__(self, x, skips, temb, text, bias, remat=False):
    for i, resnet in enumerate(self.resnets):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = _remat(_call, remat)(resnet, x, temb)
      if self.attentions is not None:
        x = _remat(_call, remat)(self.attentions[i], x, text, bias)
    if self.upsamplers is not None:
      x = _remat(_call, remat)(self.upsamplers[0], x, temb)
    return x


class MidBlock(nnx.Module):
  """UNetMidBlock2DSimpleCrossAttn (IF) or UNetMidBlock2DCrossAttn: resnet, attention, resnet."""

  def __init__(self, c: int, cfg: UNetConfig, **kw):
    latent, heads = cfg.mid_block_type == "UNetMidBlock2DCrossAttn", cfg.attention_head_dim[-1]
    self.resnets = _resnets([c, c], c, cfg, latent=latent, scale=cfg.mid_block_scale_factor, **kw)
    self.attentions = nnx.List([
        _transformer(c, heads, cfg, only_cross=False, **kw) if latent else
        AddedKVAttention(c, heads, cfg.cross_attention_dim, cfg,
                         only_cross=cfg.mid_block_only_cross_attention, **kw)])

  def __call__(self, x, temb, text, bias, remat=False):
    x = _remat(_call, remat)(self.resnets[0], x, temb)
    x = _remat(_call, remat)(self.attentions[0], x, text, bias)
    return _remat(_call, remat)(self.resnets[1], x, temb)


class UNet(nnx.Module):
  """`unet(sample_nhwc, timesteps, encoder_hidden_states, attention_mask=None, class_labels=None)`.

  `timesteps` and the class labels of `class_embed_type='timestep'` may be
  fractional (continuous augmentation levels); a `num_class_embeds` table (the
  x4 upscaler's noise level) takes integer labels. `attention_mask` is the
  [B, L] text mask (1 = token, 0 = padding).
  """

  def __init__(self, cfg: UNetConfig, *, rngs: Rngs = None, dtype=None,
               param_dtype=jnp.float32, remat: bool = False):
    if not len(cfg.up_block_types) == len(cfg.down_block_types) == len(cfg.block_out_channels):
      raise ValueError("down_block_types, up_block_types and block_out_channels differ in length")
    self.cfg, self.dtype, self.remat = cfg, dtype, remat
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    ch = cfg.block_out_channels
    self.conv_in = Conv(cfg.in_channels, ch[0], cfg.conv_in_kernel, **kw)
    self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim, cfg.act_fn, **kw)
    self.encoder_hid_proj = (Dense(cfg.encoder_hid_dim, cfg.cross_attention_dim, axes=("embed", "mlp"), **kw)
                             if cfg.encoder_hid_dim else None)
    self.class_embedding = (
        TimestepEmbedding(ch[0], cfg.time_embed_dim, cfg.act_fn, **kw)
        if cfg.class_embed_type == "timestep" else
        Embed(cfg.num_class_embeds, cfg.time_embed_dim, axes=("vocab", "embed"), **kw)
        if cfg.num_class_embeds else None)
    self.add_embedding = (TextTimeEmbedding(cfg.encoder_hid_dim or cfg.cross_attention_dim,
                                            cfg.time_embed_dim, cfg.addition_embed_type_num_heads, **kw)
                          if cfg.addition_embed_type == "text" else None)
    n = len(ch)
    self.down_blocks = nnx.List([
        DownBlock(kind, ch[max(i - 1, 0)], ch[i], i, cfg, last=i == n - 1, **kw)
        for i, kind in enumerate(cfg.down_block_types)])
    self.mid_block = MidBlock(ch[-1], cfg, **kw)
    rch = ch[::-1]
    self.up_blocks = nnx.List([
        UpBlock(kind, rch[min(i + 1, n - 1)], rch[i], rch[max(i - 1, 0)], i, cfg, last=i == n - 1, **kw)
        for i, kind in enumerate(cfg.up_block_types)])
    self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps, **kw)
    self.conv_out = Conv(ch[0], cfg.out_channels, cfg.conv_out_kernel, **kw)

  def __call__(self, sample, timesteps, encoder_hidden_states, attention_mask=None, class_labels=None):
    cfg = self.cfg
    dtype = self.dtype or sample.dtype
    b = sample.shape[0]
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    if sample.shape[1] % factor or sample.shape[2] % factor:
      raise ValueError(f"sample of spatial size {sample.shape[1:3]} must be divisible by {factor}")
    ch0 = cfg.block_out_channels[0]
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (b,))
    temb = self.time_embedding(
        timestep_embedding(t, ch0, cfg.flip_sin_to_cos, cfg.freq_shift).astype(dtype))
    if self.class_embedding is not None:
      if class_labels is None:
        raise ValueError("this UNet embeds class labels (an SR stage): pass class_labels, the noise "
                         "augmentation level (0..1000; integer for a num_class_embeds table)")
      if isinstance(self.class_embedding, Embed):
        ids = jnp.broadcast_to(jnp.asarray(class_labels).astype(jnp.int32), (b,))
        temb = temb + self.class_embedding(ids).astype(dtype)
      else:
        c = jnp.broadcast_to(jnp.asarray(class_labels, jnp.float32), (b,))
        temb = temb + self.class_embedding(
            timestep_embedding(c, ch0, cfg.flip_sin_to_cos, cfg.freq_shift).astype(dtype))
    text = encoder_hidden_states.astype(dtype)
    if self.add_embedding is not None:
      temb = temb + self.add_embedding(text)
    if cfg.time_embedding_act_fn:
      temb = activation(cfg.time_embedding_act_fn)(temb)
    if self.encoder_hid_proj is not None:
      text = self.encoder_hid_proj(text)
    bias = None
    if attention_mask is not None:
      bias = (1.0 - attention_mask.astype(jnp.float32)) * _MASK_BIAS

    pin = sharding.constrain_batch  # batch over the mesh's data axes, if one is set
    x = pin(self.conv_in(pin(sample.astype(dtype))))
    skips = [x]
    for block in self.down_blocks:
      x, s = block(x, temb, text, bias, remat=self.remat)
      x = pin(x)
      skips += [pin(y) for y in s]
    x = pin(self.mid_block(x, temb, text, bias, remat=self.remat))
    for block in self.up_blocks:
      n = len(block.resnets)
      x = pin(block(x, skips[-n:], temb, text, bias, remat=self.remat))
      skips = skips[:-n]
    x = activation(cfg.act_fn)(self.conv_norm_out(x))
    return self.conv_out(x)


def param_count(model_or_state) -> int:
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
  return sum(math.prod(v.shape) for v in jax.tree.leaves(state))


def abstract_unet(cfg: UNetConfig, **kw) -> UNet:
  """The UNet with ShapeDtypeStruct params: free to build at any size."""
  return nnx.eval_shape(lambda: UNet(cfg, rngs=KeyGen(0), **kw))


def init_unet(cfg: UNetConfig, seed: int = 0, **kw) -> UNet:
  """A randomly initialised UNet, deterministic in `seed` (see `layers.random_init`)."""
  return random_init(abstract_unet(cfg, **kw), seed)
