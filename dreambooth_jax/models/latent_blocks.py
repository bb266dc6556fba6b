"""The blocks of diffusers' latent-diffusion models (Stable Diffusion family), in flax.nnx.

DeepFloyd's published stage III is Stable Diffusion's x4 upscaler, whose UNet
and VAE are built from blocks the IF UNets do not use. They mirror diffusers
module for module and name for name, so state dicts map with no renames:

- `Attention`: diffusers' `Attention` with the default processor: separate
  q/k/v projections (bias-free in transformer blocks, biased in the VAE), keys
  and values from the text when a context is given, `to_out.0`.
- `BasicTransformerBlock` / `Transformer2D`: self-attention, cross-attention
  and a GEGLU feed-forward, each pre-LayerNorm and residual, between a
  GroupNorm + `proj_in` and a `proj_out` (Linear with `use_linear_projection`,
  1x1 Conv otherwise) and the block's residual.
- `Downsample2D` (3x3 stride-2 conv) and `Upsample2D` (nearest 2x + 3x3
  conv), the resampling of CrossAttnDownBlock2D / DownBlock2D and of the VAE,
  where IF resamples inside a resnet.

Layout is NHWC, like the rest of the zoo.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dreambooth_jax.models.layers import Conv, Dense, GroupNorm, LayerNorm


def _dot_attention(q, k, v, bias=None, max_scores=None):
  # unet.py owns the attention kernel (and the CPU query-chunking switch that
  # experiments/plan_tpu.py flips on that module), and imports this file: import late.
  from dreambooth_jax.models.unet import dot_attention
  return dot_attention(q, k, v, bias, max_scores=max_scores)


class Attention(nnx.Module):
  """Multi-head attention over [B, L, dim] tokens; keys/values from `context` when given.

  `max_scores` caps one query chunk's score block on every backend (see
  `unet.dot_attention`): the VAE's single-head attention over 256x256 latents
  would otherwise hold a 65536 x 65536 float32 matrix (16 GiB) per image.
  """

  def __init__(self, dim: int, heads: int, head_dim: int, *, context_dim: int | None = None,
               qkv_bias: bool = False, max_scores: int | None = None, **kw):
    inner = heads * head_dim
    self.heads, self.head_dim, self.max_scores = heads, head_dim, max_scores
    self.to_q = Dense(dim, inner, axes=("embed", "heads"), use_bias=qkv_bias, **kw)
    self.to_k = Dense(context_dim or dim, inner, axes=("embed", "heads"), use_bias=qkv_bias, **kw)
    self.to_v = Dense(context_dim or dim, inner, axes=("embed", "heads"), use_bias=qkv_bias, **kw)
    self.to_out = nnx.List([Dense(inner, dim, axes=("heads", "embed"), **kw)])

  def __call__(self, x, context=None, bias=None):
    b = x.shape[0]
    context = x if context is None else context.astype(x.dtype)
    split = lambda y: y.reshape(b, -1, self.heads, self.head_dim)
    o = _dot_attention(split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context)),
                       bias, self.max_scores)
    return self.to_out[0](o)


class GEGLU(nnx.Module):
  """Linear to twice the width, then value * gelu(gate) (exact GELU, as diffusers)."""

  def __init__(self, dim: int, inner: int, **kw):
    self.proj = Dense(dim, 2 * inner, axes=("embed", "mlp"), **kw)

  def __call__(self, x):
    value, gate = jnp.split(self.proj(x), 2, axis=-1)
    return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
  def __init__(self, dim: int, mult: int = 4, **kw):
    # net.1 is torch's parameter-free Dropout: the None keeps net.2's index, and its name.
    self.net = nnx.List([GEGLU(dim, dim * mult, **kw), None,
                         Dense(dim * mult, dim, axes=("mlp", "embed"), **kw)])

  def __call__(self, x):
    return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
  """attn1 (self-, or with `only_cross` text cross-attention), attn2 (text), GEGLU MLP."""

  def __init__(self, dim: int, heads: int, text_dim: int, *, only_cross: bool, **kw):
    self.only_cross = only_cross
    head_dim = dim // heads
    self.norm1 = LayerNorm(dim, eps=1e-5, **kw)
    self.attn1 = Attention(dim, heads, head_dim, context_dim=text_dim if only_cross else None, **kw)
    self.norm2 = LayerNorm(dim, eps=1e-5, **kw)
    self.attn2 = Attention(dim, heads, head_dim, context_dim=text_dim, **kw)
    self.norm3 = LayerNorm(dim, eps=1e-5, **kw)
    self.ff = FeedForward(dim, **kw)

  def __call__(self, x, text, text_bias=None):
    # attn1 never sees the text mask, even when it attends to the text: diffusers hands
    # it the UNet's pixel `attention_mask` (unused by Stable Diffusion) and the text mask
    # (`encoder_attention_mask`) only to attn2. Mirrored so masked prompts match too.
    x = self.attn1(self.norm1(x), text if self.only_cross else None) + x
    x = self.attn2(self.norm2(x), text, text_bias) + x
    return self.ff(self.norm3(x)) + x


class Transformer2D(nnx.Module):
  """diffusers' Transformer2DModel on NHWC feature maps, one transformer block deep."""

  def __init__(self, dim: int, heads: int, text_dim: int, *, groups: int, only_cross: bool,
               linear_projection: bool, **kw):
    self.norm = GroupNorm(groups, dim, eps=1e-6, **kw)
    # A 1x1 conv and a Linear are the same map on channels; only the stored shape differs.
    proj = ((lambda a, b: Dense(a, b, axes=("embed", "mlp"), **kw)) if linear_projection else
            (lambda a, b: Conv(a, b, 1, **kw)))
    self.proj_in = proj(dim, dim)
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(dim, heads, text_dim, only_cross=only_cross, **kw)])
    self.proj_out = proj(dim, dim)

  def __call__(self, x, text, text_bias=None):
    b, h, w, c = x.shape
    y = self.proj_in(self.norm(x)).reshape(b, h * w, c)
    for block in self.transformer_blocks:
      y = block(y, text, text_bias)
    return self.proj_out(y.reshape(b, h, w, c)) + x


class Downsample2D(nnx.Module):
  """3x3 conv of stride 2. `padding=0` pads right/bottom by one first (the VAE's encoder)."""

  def __init__(self, c: int, *, padding: int = 1, **kw):
    self.pad = padding == 0
    self.conv = Conv(c, c, 3, stride=2, padding=padding, **kw)

  def __call__(self, x, temb=None):  # temb: called like the IF UNet's resnet resamplers
    if self.pad:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return self.conv(x)


class Upsample2D(nnx.Module):
  """Nearest-neighbour 2x, then a 3x3 conv."""

  def __init__(self, c: int, **kw):
    self.conv = Conv(c, c, 3, **kw)

  def __call__(self, x, temb=None):
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
