"""diffusers' AutoencoderKL in flax.nnx: the latent codec of Stable Diffusion's x4 upscaler.

DeepFloyd's published stage III (stabilityai/stable-diffusion-x4-upscaler)
diffuses in the latent space of an f/4 KL autoencoder: fine-tuning encodes
the 1024x1024 subject images to 256x256x4 latents (`encode_latents`), and
sampling decodes its latents back (`decode_latents`). Both scale by the
config's `scaling_factor` (0.08333 for the upscaler, not SD's 0.18215), as
the diffusers pipelines do: latents = sample * scaling_factor.

Module for module and name for name it mirrors diffusers (`encoder.*`,
`decoder.*`, `quant_conv`, `post_quant_conv`), so state dicts map with no
renames (`weights.sd_upscaler.load_vae`). Its resnets are the UNet's
`ResnetBlock` without time conditioning; its resampling and attention are
`models.latent_blocks`'. Layout is NHWC; images are in [-1, 1].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dreambooth_jax.models.latent_blocks import Attention, Downsample2D, Upsample2D
from dreambooth_jax.models.layers import Conv, GroupNorm, KeyGen, activation
from dreambooth_jax.models.unet import ResnetBlock, UNetConfig

# Score-block cap of the mid-block attention on every backend: at 256x256 latents its single
# head attends over 65536 tokens, a 16 GiB float32 score matrix per image unchunked.
MAX_SCORES = 1 << 26


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The fields of diffusers' AutoencoderKL config that shape the model and its latents."""

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  act_fn: str = "silu"
  sample_size: int = 256
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @property
  def downsample_factor(self) -> int:
    """Image pixels per latent pixel along each side (4 for the x4 upscaler's VAE)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, d: dict[str, Any], source: str = "config") -> "VAEConfig":
    """From a diffusers AutoencoderKL config.json dict; ValueError for what we do not build."""
    if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
      raise ValueError(f"{source}: _class_name {d.get('_class_name')!r} is not AutoencoderKL.")
    n = len(d.get("block_out_channels") or ())
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
      types = list(d.get(key) or [block] * n)
      if types != [block] * n:
        raise ValueError(f"{source}: {key}={types}; only {block} blocks, one per "
                         f"block_out_channels entry ({n}), are supported.")
    if not n:
      raise ValueError(f"{source}: block_out_channels is missing or empty.")
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in d.items() if k in fields and v is not None}
    values["block_out_channels"] = tuple(values["block_out_channels"])
    cfg = cls(**values)
    bad = [c for c in cfg.block_out_channels if c % cfg.norm_num_groups]
    if bad:
      raise ValueError(f"{source}: block_out_channels {bad} not divisible by norm_num_groups "
                       f"{cfg.norm_num_groups}.")
    activation(cfg.act_fn)
    return cfg


def _resnet_config(cfg: VAEConfig) -> UNetConfig:
  # The fields `ResnetBlock` reads: the VAE's resnets use eps 1e-6 and no time embedding.
  return UNetConfig(norm_num_groups=cfg.norm_num_groups, norm_eps=1e-6, act_fn=cfg.act_fn,
                    resnet_time_scale_shift="default", resnet_skip_time_act=False)


class MidAttention(Attention):
  """UNetMidBlock2D's attention: one head over all pixels, GroupNorm in, residual out."""

  def __init__(self, c: int, groups: int, **kw):
    super().__init__(c, 1, c, qkv_bias=True, max_scores=MAX_SCORES, **kw)
    self.group_norm = GroupNorm(groups, c, eps=1e-6, **kw)

  def __call__(self, x):
    b, h, w, c = x.shape
    return super().__call__(self.group_norm(x).reshape(b, h * w, c)).reshape(b, h, w, c) + x


class MidBlock(nnx.Module):
  def __init__(self, c: int, cfg: VAEConfig, **kw):
    rcfg = _resnet_config(cfg)
    self.resnets = nnx.List([ResnetBlock(c, c, None, rcfg, scale=1.0, **kw) for _ in range(2)])
    self.attentions = nnx.List([MidAttention(c, cfg.norm_num_groups, **kw)
                                if cfg.mid_block_add_attention else None])

  def __call__(self, x):
    x = self.resnets[0](x)
    if self.attentions[0] is not None:
      x = self.attentions[0](x)
    return self.resnets[1](x)


class Block(nnx.Module):
  """DownEncoderBlock2D (`down`) or UpDecoderBlock2D: resnets, then the resampler if any."""

  def __init__(self, cin: int, cout: int, n: int, cfg: VAEConfig, *, down: bool, resample: bool,
               **kw):
    rcfg = _resnet_config(cfg)
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, None, rcfg, scale=1.0, **kw)
                             for i in range(n)])
    sampler = (lambda: Downsample2D(cout, padding=0, **kw)) if down else (lambda: Upsample2D(cout, **kw))
    resamplers = nnx.List([sampler()]) if resample else None
    if down:
      self.downsamplers = resamplers
    else:
      self.upsamplers = resamplers
    self._resamplers = "downsamplers" if down else "upsamplers"

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    resamplers = getattr(self, self._resamplers)
    return x if resamplers is None else resamplers[0](x)


class Encoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, **kw):
    ch, groups, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
    self.act = activation(cfg.act_fn)
    self.conv_in = Conv(cfg.in_channels, ch[0], 3, **kw)
    self.down_blocks = nnx.List([
        Block(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, cfg, down=True, resample=i < n - 1, **kw)
        for i in range(n)])
    self.mid_block = MidBlock(ch[-1], cfg, **kw)
    self.conv_norm_out = GroupNorm(groups, ch[-1], eps=1e-6, **kw)
    self.conv_out = Conv(ch[-1], 2 * cfg.latent_channels, 3, **kw)  # mean and log-variance

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    return self.conv_out(self.act(self.conv_norm_out(self.mid_block(x))))


class Decoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, **kw):
    rch, groups, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
    self.act = activation(cfg.act_fn)
    self.conv_in = Conv(cfg.latent_channels, rch[0], 3, **kw)
    self.mid_block = MidBlock(rch[0], cfg, **kw)
    self.up_blocks = nnx.List([
        Block(rch[max(i - 1, 0)], rch[i], cfg.layers_per_block + 1, cfg, down=False,
              resample=i < n - 1, **kw) for i in range(n)])
    self.conv_norm_out = GroupNorm(groups, rch[-1], eps=1e-6, **kw)
    self.conv_out = Conv(rch[-1], cfg.out_channels, 3, **kw)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(self.act(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """`encode(images) -> (mean, logvar)`, `decode(z) -> images`, and the scaled-latent pair
  `encode_latents` / `decode_latents` that diffusion runs on. NHWC, images in [-1, 1]."""

  def __init__(self, cfg: VAEConfig, *, rngs=None, dtype=None, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.cfg, self.dtype = cfg, dtype
    lat = cfg.latent_channels
    self.encoder = Encoder(cfg, **kw)
    self.decoder = Decoder(cfg, **kw)
    self.quant_conv = Conv(2 * lat, 2 * lat, 1, **kw) if cfg.use_quant_conv else None
    self.post_quant_conv = Conv(lat, lat, 1, **kw) if cfg.use_post_quant_conv else None

  def _check(self, x, channels: int, factor: int, what: str):
    if x.ndim != 4 or x.shape[-1] != channels or x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"AutoencoderKL.{what} takes NHWC arrays with {channels} channels and "
                       f"sides divisible by {factor}, got shape {x.shape}")

  def encode(self, images) -> tuple[jax.Array, jax.Array]:
    """The posterior's mean and log-variance [B, H/f, W/f, latent], log-variance clipped to
    [-30, 20] as diffusers' DiagonalGaussianDistribution does. Unscaled."""
    self._check(images, self.cfg.in_channels, self.cfg.downsample_factor, "encode")
    moments = self.encoder(images.astype(self.dtype or images.dtype))
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z) -> jax.Array:
    """Unscaled latents [B, h, w, latent] -> images [B, h*f, w*f, out_channels]."""
    self._check(z, self.cfg.latent_channels, 1, "decode")
    z = z.astype(self.dtype or z.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def encode_latents(self, images, key: jax.Array | None = None, *,
                     noise: jax.Array | None = None) -> jax.Array:
    """The latents diffusion trains on: a posterior sample (the mean when neither `key` nor
    `noise` is given), shifted and scaled as the diffusers pipelines do. `noise` is the
    posterior's standard normal draw itself (what `latent_dist.sample()` draws)."""
    mean, logvar = self.encode(images)
    z = mean
    if key is not None and noise is None:
      noise = jax.random.normal(key, mean.shape, jnp.float32)
    if noise is not None:
      z = mean + jnp.exp(0.5 * logvar) * noise.astype(mean.dtype)
    shift = self.cfg.shift_factor or 0.0
    return (z - shift) * self.cfg.scaling_factor if shift else z * self.cfg.scaling_factor

  def decode_latents(self, latents) -> jax.Array:
    """Images from the latents diffusion samples: decode(latents / scaling_factor + shift)."""
    z = latents / self.cfg.scaling_factor
    return self.decode(z + self.cfg.shift_factor if self.cfg.shift_factor else z)

  def __call__(self, images) -> jax.Array:
    """Reconstruction through the posterior mean (AutoencoderKL's forward, no sampling)."""
    return self.decode(self.encode(images)[0])


def abstract_vae(cfg: VAEConfig, **kw) -> AutoencoderKL:
  """The VAE with ShapeDtypeStruct params: free to build at any size."""
  return nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=KeyGen(0), **kw))
