"""Stage III: Stable Diffusion's x4 latent upscaler (DeepFloyd's public 256->1024 stage).

DeepFloyd publish no stage III of their own: their docs and diffusers' run
stabilityai/stable-diffusion-x4-upscaler after IF-II. It differs from IF's
pixel stages in what a `cascade.Stage` fixes, so it is a Stage subclass that
reproduces `StableDiffusionUpscalePipeline.__call__` (diffusers 0.42):

* it diffuses 4-channel VAE latents at the *low-res* image's size (256x256
  for IF-II's 256 px) and the VAE decodes them 4x larger (1024 px);
* the low-res image is not upsampled: the pipeline's `low_res_scheduler`
  (DDPM, scaled-linear) noises it at an integer `noise_level` (at most
  `max_noise_level`, 350; IF's docs pass 100), it is concatenated to the
  latents, and the UNet embeds the same integer in a class table. Cond and
  uncond rows share one noised image, as the pipeline repeats it;
* its text is its own CLIP text encoder's last hidden state (no mask), the
  negative prompt "" for guidance; IF's T5 conditions the other stages;
* v-prediction on the scaled-linear schedule, sampled by the pipeline's DDIM
  (75 steps, guidance 9.0, eta 0, set_alpha_to_one False, steps_offset 1);
  latents start as N(0, I) (DDIM's init_noise_sigma is 1) and are decoded as
  `vae.decode(latents / scaling_factor)`, clipped to [-1, 1].

The cascade's `aug_level` is a fraction of the 1000-step schedule as for IF
(0.25 = IF-II's noise_level 250), so noise_level 100 is `sample_aug_level`
0.1; it must land on an integer level.

Fine-tuning (`stages=...+sr1024`, `loss`) trains as the upscaler was trained
(Stability's `LatentUpscaleDiffusion`): the hi-res image is VAE-encoded to a
posterior *sample* times the scaling factor (`get_first_stage_encoding`;
diffusers' training scripts do the same with `latent_dist.sample()`), the
low-res input is the image downsampled 4x and noised by the low-res scheduler,
the UNet regresses v on the scaled-linear schedule. Pretraining drew the
noise level uniformly from 0..349; DreamBooth lowers SR augmentation for
fine-tuning, so here it is one fixed integer level, `train_aug_level` (0 by
the configs: the lowest, the low-res scheduler's sigma 0.01).
"""

from __future__ import annotations

import functools
import tempfile
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.tree_util import Partial

from dreambooth_jax import cascade as cascade_lib
from dreambooth_jax import diffusion, samplers, sharding
from dreambooth_jax.models.clip import CLIPTowerConfig, abstract_clip_text_model
from dreambooth_jax.models.layers import random_init
from dreambooth_jax.models.unet import UNetConfig, abstract_unet
from dreambooth_jax.models.vae import VAEConfig, abstract_vae
from dreambooth_jax.weights import sd_upscaler

Array = jax.Array

# The published scheduler/ and low_res_scheduler/ (reference_configs/sd_x4_upscaler_*.json),
# used when a folder has none (the tiny stage).
UPSCALER_SCHEDULER = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=1e-4, beta_end=0.02,
    clip_sample=False, prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1)
UPSCALER_LOW_RES_SCHEDULER = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=1e-4, beta_end=0.02,
    clip_sample=True, prediction_type="epsilon", variance_type="fixed_small")
LOWRES_CHANNELS = 3  # the RGB image concatenated to the latents


def noise_level_of(aug_level, max_noise_level: int = sd_upscaler.MAX_NOISE_LEVEL) -> int:
  """The pipeline's integer noise_level for a cascade aug_level (a fraction of 1000 steps)."""
  level = float(aug_level) * 1000.0
  n = int(round(level))
  if abs(level - n) > 1e-3 or not 0 <= n <= max_noise_level:
    raise ValueError(f"the x4 upscaler noises its low-res input at an integer noise_level in "
                     f"[0, {max_noise_level}]; aug_level {aug_level} is noise_level {level:g}. "
                     "IF's docs use 100 (aug_level 0.1), the pipeline's default is 20 (0.02)")
  return n


@functools.partial(jax.jit, static_argnums=0)
def _run_text(graphdef, state, ids):
  return nnx.merge(graphdef, state)(ids).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, latents):
  images = nnx.merge(graphdef, state).decode_latents(latents)
  return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)


class _Lazy:
  """A part's state, built by `load` on first use and dropped by `release`."""

  def __init__(self, load: Callable[[], Any]):
    self._load, self._value = load, None

  def get(self):
    if self._value is None:
      self._value = self._load()
    return self._value

  def release(self) -> None:
    self._value = None


class LatentUpscaleStage(cascade_lib.Stage):
  """The x4 upscaler as a cascade stage (see the module docstring).

  `params` are the UNet's (as for every stage); the VAE, the CLIP text encoder
  and its tokenizer are loaded on first use and dropped by `release()`.
  `settings.resolution` is the decoded image's side, 4x `lowres_resolution`.
  """

  own_text_encoder = True  # Cascade.sample hands it prompt texts (`embed_pair`), not T5's

  def __init__(self, name: str, unet, vae, text_encoder, settings: cascade_lib.StageSettings, *,
               lowres_resolution: int, load_params: Callable[[], Any] | None,
               load_vae: Callable[[], Any], load_text_encoder: Callable[[], Any],
               load_tokenizer: Callable[[], Any],
               scheduler_config: Mapping[str, Any] = UPSCALER_SCHEDULER,
               low_res_scheduler_config: Mapping[str, Any] = UPSCALER_LOW_RES_SCHEDULER,
               max_noise_level: int = sd_upscaler.MAX_NOISE_LEVEL):
    self.vae_cfg = vae.cfg
    super().__init__(name, unet, settings, scheduler_config=scheduler_config,
                     lowres_resolution=lowres_resolution, noising_config=low_res_scheduler_config,
                     load_params=load_params)
    self.max_noise_level = int(max_noise_level)
    self.vae_graphdef = nnx.graphdef(vae)
    self.text_graphdef = nnx.graphdef(text_encoder)
    self._vae, self._text = _Lazy(load_vae), _Lazy(load_text_encoder)
    self._tokenizer = _Lazy(load_tokenizer)
    factor = self.vae_cfg.downsample_factor
    if settings.resolution != factor * lowres_resolution:
      raise ValueError(f"stage {name!r}: the x4 upscaler decodes {lowres_resolution}x"
                       f"{lowres_resolution} latents to {factor * lowres_resolution} px, but its "
                       f"resolution is set to {settings.resolution}; set "
                       f"cascade.{name}.resolution={factor * lowres_resolution}")
    noise_level_of(settings.sample_aug_level, self.max_noise_level)  # fails at build, not at use

  def _check_unet(self, cfg: UNetConfig) -> None:
    self.channels, self.learned_variance = cfg.out_channels, False
    if not cfg.num_class_embeds or cfg.in_channels != cfg.out_channels + LOWRES_CHANNELS:
      raise ValueError(f"stage {self.name!r}: the x4 upscaler's UNet takes latents + the RGB "
                       f"low-res image and embeds an integer noise level (num_class_embeds); got "
                       f"in_channels {cfg.in_channels}, out_channels {cfg.out_channels}")
    if cfg.out_channels != self.vae_cfg.latent_channels:
      raise ValueError(f"stage {self.name!r}: the UNet predicts {cfg.out_channels} channels, the "
                       f"VAE's latents have {self.vae_cfg.latent_channels}")

  def release(self) -> None:
    super().release()
    for part in (self._vae, self._text, self._tokenizer):
      part.release()

  # -- text: the stage's own CLIP ------------------------------------------------------------

  @property
  def tokenizer(self):
    return self._tokenizer.get()

  def embed(self, prompts: Sequence[str]) -> dict[str, Array]:
    """{"text": [len(prompts), 77, width]} as the pipeline's encode_prompt: CLIP's last hidden
    state of the prompts as typed (no IF caption cleaning), padded to 77, no mask."""
    ids = self.tokenizer(list(prompts))["input_ids"]
    return {"text": _run_text(self.text_graphdef, self._text.get(), jnp.asarray(ids))}

  def embed_pair(self, prompts: str | Sequence[str], batch: int, *, guided: bool):
    """(cond, uncond) for `batch` images from one prompt or one per image; uncond is the
    negative prompt "" when `guided` (as the pipeline's default), else None."""
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(texts) not in (1, batch):
      raise ValueError(f"stage {self.name!r}: {len(texts)} prompts for {batch} images")
    both = self.embed(texts + [""] if guided else texts)["text"]  # one encoder call
    cond = cascade_lib.broadcast_cond({"text": both[:len(texts)]}, batch)
    return cond, (cascade_lib.broadcast_cond({"text": both[len(texts):]}, batch) if guided else None)

  # -- training ------------------------------------------------------------------------------

  def frozen_parts(self) -> dict:
    """The VAE, whose encoder makes the latents the loss diffuses (frozen, replicated)."""
    return {"vae": self._vae.get()}

  def train_noise_level(self, aug_level=None) -> int:
    """The integer noise_level the loss noises the low-res input at (`train_aug_level`)."""
    return noise_level_of(self.settings.train_aug_level if aug_level is None else aug_level,
                          self.max_noise_level)

  def loss_draws(self, rng: Array, batch: int) -> dict[str, Array]:
    """What `loss(..., rng)` draws, materialised (for feeding a reference the same draws):
    {"posterior": the VAE posterior's standard normal, "lowres": the low-res image's
    noise, "t": timesteps [B], "noise": the latents' noise}."""
    r = self.lowres_resolution  # the latents' side too: the VAE is f/4, the upscaler x4
    k_post, k_low, k_t, k_noise = jax.random.split(rng, 4)
    latent = (batch, r, r, self.vae_cfg.latent_channels)
    return {"posterior": jax.random.normal(k_post, latent, jnp.float32),
            "lowres": jax.random.normal(k_low, (batch, r, r, LOWRES_CHANNELS), jnp.float32),
            "t": self.schedule.sample_t(k_t, batch),
            "noise": jax.random.normal(k_noise, latent, jnp.float32)}

  def loss(self, params, images: Array, text: Array, mask: Array | None, rng: Array, *,
           aug_level=None, parts: Mapping[str, Any] | None = None,
           draws: Mapping[str, Array] | None = None) -> tuple[Array, dict]:
    """Per-example v-prediction loss [B] of `images` [B, 4r, 4r, 3] in [-1, 1] (see the
    module docstring). `text`: its CLIP's states of the prompts, not T5's. `parts`: the
    frozen VAE's state (`frozen_parts`; the step passes it, so it is an argument of the
    compiled program); `draws` replace the random draws (`loss_draws`)."""
    s, r = self.settings, self.lowres_resolution
    images = jnp.asarray(images, jnp.float32)
    if images.shape[1:] != (s.resolution, s.resolution, LOWRES_CHANNELS):
      raise ValueError(f"stage {self.name!r} trains on [B, {s.resolution}, {s.resolution}, 3] "
                       f"images, got {images.shape}")
    level = self.train_noise_level(aug_level)
    d = self.loss_draws(rng, images.shape[0]) if draws is None else draws
    vae = nnx.merge(self.vae_graphdef, self._vae.get() if parts is None else parts["vae"])
    # Frozen: no gradient reaches the VAE, and none of its activations are kept.
    latents = jax.lax.stop_gradient(vae.encode_latents(images, noise=d["posterior"]))
    low, labels = self.lowres_input(diffusion.downsample(images, r), None, level / 1000.0,
                                    noise=d["lowres"])
    cond = {"text": text, "mask": mask, "lowres": low, "aug": labels}
    return diffusion.loss(lambda x, t, c: self.apply(params, x, t, c), self.schedule,
                          latents.astype(jnp.float32), rng, cond,
                          prediction_type=self.prediction_type, weighting=s.weighting,
                          min_snr_gamma=s.min_snr_gamma, t=d["t"], noise=d["noise"])

  # -- sampling ------------------------------------------------------------------------------

  def lowres_input(self, lowres: Array, rng: Array, aug_level=None, *,
                   noise: Array | None = None) -> tuple[Array, Array]:
    """(noised low-res image, integer noise_level [B]): `low_res_scheduler.add_noise(image,
    noise, noise_level)` at the image's own size (no upsampling)."""
    level = noise_level_of(self.settings.sample_aug_level if aug_level is None else aug_level,
                           self.max_noise_level)
    image = jnp.asarray(lowres, jnp.float32)
    r = self.lowres_resolution
    if image.shape[1:] != (r, r, LOWRES_CHANNELS):
      raise ValueError(f"stage {self.name!r} upscales [B, {r}, {r}, 3] images, got {image.shape}")
    if noise is None:
      noise = jax.random.normal(rng, image.shape, jnp.float32)
    levels = jnp.full((image.shape[0],), level, jnp.int32)
    return diffusion.q_sample(self.noising_schedule, image, levels, noise), levels

  def _draws_step_noise(self) -> bool:
    s = self.settings
    return s.sampler == "ddpm" or (s.sampler == "ddim" and s.eta > 0)

  def noise(self, rng: Array, batch: int, num_steps: int | None = None) -> dict[str, Array]:
    """What `sample(..., rng)` draws: {"x_init": initial latents, "lowres": the low-res image's
    noise, and "steps" when the sampler adds noise per step (DDIM at eta 0 does not)}."""
    r = self.lowres_resolution
    rng_low, rng_sample = jax.random.split(rng)
    init_key, loop_key = samplers.split_rng(rng_sample)
    shape = (batch, r, r, self.channels)
    out = {"x_init": jax.random.normal(init_key, shape, jnp.float32),
           "lowres": jax.random.normal(rng_low, (batch, r, r, LOWRES_CHANNELS), jnp.float32)}
    if self._draws_step_noise():
      n = num_steps or self.settings.num_steps
      out["steps"] = jnp.stack([samplers.step_noise(loop_key, i, shape) for i in range(n)])
    return out

  def sample(self, params, cond: Mapping[str, Array], uncond: Mapping[str, Array] | None,
             rng: Array, *, lowres: Array | None = None, guidance_scale=None,
             num_steps: int | None = None, aug_level=None, mesh=None,
             lowres_noise: Array | None = None, return_latents: bool = False,
             **sample_kw) -> Array:
    """Images [B, 4r, 4r, 3] in [-1, 1] from `lowres` [B, r, r, 3] (the previous stage's
    output). cond / uncond: {"text": CLIP states} from `embed` (uncond: of ""). `x_init`,
    `lowres_noise` (and `noise`) stand in for the draws, as `noise()` names them."""
    if lowres is None:
      raise ValueError(f"stage {self.name!r} is super-resolution: pass lowres images")
    s = self.settings
    rng_low, rng_sample = jax.random.split(rng)
    image, levels = self.lowres_input(lowres, rng_low, aug_level, noise=lowres_noise)
    cond = {"text": cond["text"], "lowres": image, "aug": levels}
    uncond = None if uncond is None else {"text": uncond["text"], "lowres": image, "aug": levels}
    r, b = self.lowres_resolution, image.shape[0]
    latents = samplers.sample(
        Partial(self.apply, params), self.schedule, (b, r, r, self.channels), rng_sample, cond,
        uncond, num_steps=num_steps or s.num_steps,
        guidance_scale=s.guidance_scale if guidance_scale is None else guidance_scale,
        sampler=s.sampler, eta=s.eta, config=self.step_config, mesh=mesh, clip_output=False,
        **sample_kw)
    images = _decode(self.vae_graphdef, self._vae.get(), latents)
    return (images, latents) if return_latents else images


# -- building the stage --------------------------------------------------------------------------

def _placed(abstract, mesh, rules, dtype=None):
  return None if mesh is None else sharding.placer(nnx.state(abstract), mesh, rules, dtype)


def vae_rules(rules=sharding.DEFAULT_RULES) -> tuple:
  """The VAE's placement rules from the cascade's: replicated. Its 55M weights are 0.2 GiB;
  FSDP-sharded, XLA's partitioner split its 1024 px convolutions over their input channels
  and all-reduced the whole batch's activations: 8.0 GiB of temp per image per chip
  instead of 2.5 (XLA:CPU, one image per device; experiments/README.md)."""
  return sharding.replicated(rules)


def load_stage(name: str, folder: str, settings: cascade_lib.StageSettings, *,
               lowres_resolution: int, mesh=None, rules=sharding.DEFAULT_RULES,
               dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False,
               variant: str | None = None) -> LatentUpscaleStage:
  """The stage of a stabilityai/stable-diffusion-x4-upscaler download (checked with
  `sd_upscaler.check_sd_upscaler` first): configs now, every tensor on first use, each
  into its sharding on `mesh`. The VAE stays float32 (diffusers' force_upcast) and is
  replicated (`vae_rules`)."""
  unet_cfg = sd_upscaler.unet_config(sd_upscaler.resolve(folder, "unet"))
  vae_cfg = sd_upscaler.vae_config(sd_upscaler.resolve(folder, "vae"))
  text_cfg = sd_upscaler.text_encoder_config(sd_upscaler.resolve(folder, "text_encoder"))
  unet = abstract_unet(unet_cfg, dtype=dtype, param_dtype=param_dtype, remat=remat)
  vae = abstract_vae(vae_cfg, dtype=jnp.float32)
  text = abstract_clip_text_model(text_cfg, dtype=dtype, param_dtype=param_dtype)
  load_unet = lambda: nnx.state(sd_upscaler.load_upscaler_unet(
      folder, param_dtype, compute_dtype=dtype, variant=variant, remat=remat,
      place=_placed(unet, mesh, rules, param_dtype)))
  load_vae = lambda: nnx.state(sd_upscaler.load_vae(
      folder, jnp.float32, variant=variant,
      place=_placed(vae, mesh, vae_rules(rules), jnp.float32)))
  load_text = lambda: nnx.state(sd_upscaler.load_text_encoder(
      folder, param_dtype, compute_dtype=dtype, variant=variant,
      place=_placed(text, mesh, rules, param_dtype)))
  return LatentUpscaleStage(
      name, unet, vae, text, settings, lowres_resolution=lowres_resolution, load_params=load_unet,
      load_vae=load_vae, load_text_encoder=load_text,
      load_tokenizer=lambda: sd_upscaler.load_tokenizer(folder),
      scheduler_config=sd_upscaler.read_scheduler_config(folder, "scheduler"),
      low_res_scheduler_config=sd_upscaler.read_scheduler_config(folder, "low_res_scheduler"),
      max_noise_level=sd_upscaler.max_noise_level(folder))


# The upscaler's architecture at toy width: its block types, only_cross_attention pattern,
# noise-level table, linear projections and an f/4 VAE; CPU-sized.
TINY_UNET = dict(
    in_channels=7, out_channels=4, block_out_channels=[16, 16, 32, 32], layers_per_block=1,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    only_cross_attention=[True, True, True, False], attention_head_dim=8, norm_num_groups=4,
    cross_attention_dim=32, num_class_embeds=1000, use_linear_projection=True, act_fn="silu",
    downsample_padding=1, mid_block_scale_factor=1)
TINY_VAE = dict(block_out_channels=[8, 16, 16], layers_per_block=1, norm_num_groups=4,
                latent_channels=4, scaling_factor=0.08333)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                 hidden_act="gelu", max_position_embeddings=77)


@functools.lru_cache(maxsize=None)
def _tiny_tokenizer_folder() -> tuple[str, int]:
  """(folder, vocab size) of a tiny byte-level CLIP BPE, written once per process (a few KB)."""
  from dreambooth_jax.evaluation.tiny_encoders import write_clip_tokenizer
  folder = tempfile.mkdtemp(prefix="tiny_clip_tokenizer_")
  return folder, write_clip_tokenizer(folder)


def tiny_stage(name: str, settings: cascade_lib.StageSettings, *, lowres_resolution: int,
               seed: int = 0, mesh=None, rules=sharding.DEFAULT_RULES, dtype=jnp.float32,
               param_dtype=jnp.float32) -> tuple[LatentUpscaleStage, str]:
  """A random x4 upscaler of the real architecture at toy width (seeded), and a string naming
  it for fingerprints. Its tokenizer is a tiny byte-level CLIP BPE."""
  tokenizer_folder, vocab = _tiny_tokenizer_folder()
  unet_cfg = UNetConfig.from_diffusers(dict(TINY_UNET, sample_size=lowres_resolution),
                                       source=f"tiny {name}")
  vae_cfg = VAEConfig.from_diffusers(dict(TINY_VAE), source=f"tiny {name} vae")
  text_cfg = CLIPTowerConfig.from_hf_text(dict(TINY_TEXT, vocab_size=vocab, eos_token_id=vocab - 1,
                                               bos_token_id=vocab - 2, pad_token_id=vocab - 1),
                                          source=f"tiny {name} text encoder")
  unet = abstract_unet(unet_cfg, dtype=dtype, param_dtype=param_dtype)
  vae = abstract_vae(vae_cfg, dtype=jnp.float32)
  text = abstract_clip_text_model(text_cfg, dtype=dtype, param_dtype=param_dtype)
  init = lambda abstract, k, rules=rules: lambda: nnx.state(
      random_init(abstract, seed * 100 + k, place=_placed(abstract, mesh, rules)))
  stage = LatentUpscaleStage(
      name, unet, vae, text, settings, lowres_resolution=lowres_resolution,
      load_params=init(unet, 30), load_vae=init(vae, 31, vae_rules(rules)),
      load_text_encoder=init(text, 32),
      load_tokenizer=lambda: sd_upscaler.load_tokenizer(tokenizer_folder))
  return stage, f"tiny:{name}:x4_upscaler:{seed}:{unet_cfg}:{vae_cfg}:{text_cfg}"
