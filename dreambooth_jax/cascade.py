"""A cascade of pixel diffusion stages: base 64 px, then super-resolution stages.

Each `Stage` owns what the trainer must not know (vdm's split): its UNet
(split once into a graphdef and a pure param pytree), its noise schedule,
its sampler settings, and for super-resolution stages the noise-conditioning
augmentation of the low-res input. The trainer only calls `stage.loss(params,
...)` and the sampler only `stage.sample(params, ...)`.

A super-resolution stage sees `concat([x_t, lowres_up_noised], channels)` and
the augmentation level as `class_labels` on IF's 0..1000 scale, a float:

* training: the hi-res image is downsampled to the previous stage's size and
  upsampled back, then noised at `train_aug_level` (DreamBooth: 1e-5);
* sampling: the previous stage's output is upsampled and noised at
  `sample_aug_level` (IF's default noise_level 250 = 0.25).

Conditioning pytrees are dicts `{"text": [B, L, D], "mask": [B, L]}`; a stage
adds `lowres` and `aug` itself.

DeepFloyd's public stage III, Stable Diffusion's x4 latent upscaler, is a Stage
subclass (`dreambooth_jax.upscaler.LatentUpscaleStage`) with a text encoder of its
own: `Cascade.sample` hands it the prompt texts instead of T5's embeddings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.tree_util import Partial

from dreambooth_jax import diffusion, samplers
from dreambooth_jax import lora as lora_lib
from dreambooth_jax.models.unet import UNet

Array = jax.Array

# DeepFloyd IF's scheduler configs (diffusers format), used when a stage folder
# has no scheduler/ beside its unet/. Identical to the Hub's IF-I / IF-II files.
IF_STAGE_I_SCHEDULER = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=1e-4, beta_end=0.02,
    prediction_type="epsilon", variance_type="learned_range", clip_sample=True,
    clip_sample_range=1.0, thresholding=True, dynamic_thresholding_ratio=0.95,
    sample_max_value=1.5, lambda_min_clipped=-5.1)  # DDPM ignores it; DPM-Solver uses it
IF_STAGE_II_SCHEDULER = {k: v for k, v in IF_STAGE_I_SCHEDULER.items() if k != "lambda_min_clipped"}
IF_STAGE_II_SCHEDULER["sample_max_value"] = 1.0  # (IF-II's published file carries no lambda_min_clipped)
IF_IMAGE_NOISING_SCHEDULER = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=1e-4, beta_end=0.02,
    variance_type="fixed_small", thresholding=False)


@dataclasses.dataclass(frozen=True)
class StageSettings:
  """Sampling and training knobs of one stage (IF's pipeline defaults)."""

  resolution: int = 64
  guidance_scale: float = 7.0
  num_steps: int = 100
  sampler: str = "ddpm"
  eta: float = 0.0
  sample_aug_level: float = 0.25   # SR only: IF stage II noise_level=250
  train_aug_level: float = 1e-5    # SR only: DreamBooth lowers Imagen's 1e-3 to 1e-5
  weighting: str = "uniform"
  min_snr_gamma: float = 5.0
  # IF attends to all 77 text positions, padding included: IFPipeline passes the
  # attention mask to T5 only, never to the UNet, and DeepFloyd trained that way.
  # True masks padded tokens out of the UNet's attention (for models trained so).
  text_mask: bool = False
  # SR only, off as in IF: replace the sample's low frequencies by its input's
  # (`keep_lowres_colours`). For SR UNets too small to have learned them: an epsilon loss
  # gives an image's mean colour ~1/(H*W) of its weight, and the tiny world SR drifts.
  colour_fix: bool = False


class Stage:
  """One cascade stage: the UNet's graphdef, its settings and schedules; static.

  Params are a pure pytree passed to `apply`/`loss`/`sample`. The stage's own
  (pretrained or initial) params are `stage.params`: given with a concrete `unet`, or
  loaded on first use by `load_params()` when `unet` is abstract (`nnx.eval_shape`),
  so a multi-GiB UNet is read only if something runs it. `release()` drops them
  (e.g. once a train state owns a tuned stage's weights) so no second copy stays on
  the devices; `abstract_params` (shapes, dtypes, shardings) stays available.
  """

  def __init__(self, name: str, unet: UNet, settings: StageSettings, *,
               scheduler_config: Mapping[str, Any] = IF_STAGE_I_SCHEDULER,
               lowres_resolution: int | None = None,
               noising_config: Mapping[str, Any] = IF_IMAGE_NOISING_SCHEDULER,
               load_params: Callable[[], Any] | None = None):
    self.name, self.settings = name, settings
    self.graphdef, state = nnx.split(unet)
    self.abstract_params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state)
    self._load_params = load_params
    self._params = None if load_params is not None else state
    self.schedule = diffusion.DiscreteSchedule.from_config(scheduler_config)
    self.step_config = samplers.StepConfig.from_config(scheduler_config)
    self.prediction_type = scheduler_config.get("prediction_type", "epsilon")
    self.lowres_resolution = lowres_resolution
    self.noising_schedule = diffusion.DiscreteSchedule.from_config(noising_config)
    self._check_unet(unet.cfg)

  def _check_unet(self, cfg) -> None:
    """Sets `channels` (of what is diffused) and `learned_variance`; refuses a UNet that
    cannot be this kind of stage (a latent stage overrides it)."""
    name = self.name
    self.channels = cfg.in_channels // 2 if self.is_sr else cfg.in_channels
    self.learned_variance = cfg.out_channels == 2 * self.channels
    if self.is_sr and cfg.class_embed_type != "timestep":
      raise ValueError(f"stage {name!r}: a super-resolution UNet needs class_embed_type='timestep' "
                       "to see the augmentation level")
    if self.is_sr and cfg.in_channels != 2 * self.channels:
      raise ValueError(f"stage {name!r}: SR UNet in_channels must be 2x the image channels")

  @property
  def is_sr(self) -> bool:
    return self.lowres_resolution is not None

  @property
  def params(self):
    """The stage's own params, loaded on first use (see the class docstring)."""
    if self._params is None:
      if self._load_params is None:
        raise RuntimeError(f"stage {self.name!r}: its params were released and it has no loader; "
                           "pass params explicitly")
      self._params = self._load_params()
    return self._params

  @property
  def params_loaded(self) -> bool:
    return self._params is not None

  def release(self) -> None:
    """Drops the stage's own params (a loader brings them back on the next use)."""
    self._params = None

  def frozen_parts(self) -> dict:
    """Frozen models the loss reads besides the UNet, as {part: state}: the train step
    takes them as arguments (`methods.FROZEN_PARTS`), not as jit constants. None here;
    the x4 upscaler's VAE encoder."""
    return {}

  # -- the network as a function of (params, x_t, t, cond) ---------------------------------

  def apply(self, params, x, t, cond):
    # `lora.Adapted` params carry their own graphdef: this UNet with adapters on it.
    # Plain params are copied into fresh Variables at the current trace level, as
    # `Adapted.module` does: inside the sampling loop's scan they are the loop's arguments
    # (an outer trace), and the UNet's nnx.remat refuses Variables of another trace, so a
    # config with model.remat on (`if`) could not sample its class priors.
    model = (params.module() if isinstance(params, lora_lib.Adapted) else
             nnx.merge(self.graphdef, jax.tree.map(lambda v: v, params)))
    if self.is_sr:
      x = jnp.concatenate([x, cond["lowres"].astype(x.dtype)], axis=-1)
    mask = cond.get("mask") if self.settings.text_mask else None
    return model(x, t, cond["text"], mask, class_labels=cond.get("aug"))

  # -- training -----------------------------------------------------------------------------

  def loss(self, params, images: Array, text: Array, mask: Array | None, rng: Array, *,
           aug_level=None) -> tuple[Array, dict]:
    """Per-example denoising loss [B] of `images` (NHWC in [-1, 1] at this stage's size)."""
    s = self.settings
    cond = {"text": text, "mask": mask}
    rng_aug, rng_loss = jax.random.split(rng)
    if self.is_sr:
      level = s.train_aug_level if aug_level is None else aug_level
      cond["lowres"], cond["aug"] = diffusion.lowres_condition(
          images, self.lowres_resolution, level, rng_aug, self.noising_schedule)
    return diffusion.loss(lambda x, t, c: self.apply(params, x, t, c), self.schedule, images,
                          rng_loss, cond, prediction_type=self.prediction_type,
                          weighting=s.weighting, min_snr_gamma=s.min_snr_gamma,
                          learned_variance=self.learned_variance)

  # -- sampling -----------------------------------------------------------------------------

  def lowres_input(self, lowres: Array, rng: Array, aug_level=None) -> tuple[Array, Array]:
    """A previous stage's output, upsampled (IF: bilinear, align_corners) and noised."""
    level = self.settings.sample_aug_level if aug_level is None else aug_level
    r = self.settings.resolution
    up = diffusion.upsample_bilinear(lowres.astype(jnp.float32), (r, r))
    b = up.shape[0]
    frac = jnp.broadcast_to(jnp.asarray(level, jnp.float32), (b,))
    noise = jax.random.normal(rng, up.shape, jnp.float32)
    return (diffusion.q_sample(self.noising_schedule, up, self.noising_schedule.time_from_fraction(frac), noise),
            frac * 1000.0)

  def noise(self, rng: Array, batch: int, num_steps: int | None = None) -> dict[str, Array]:
    """The noise `sample(..., rng)` draws, materialised: {"x_init": x_T, "steps":
    [num_steps, B, r, r, C] per-step variance noise, "lowres": the low-res input's
    augmentation noise (SR stages)}. For feeding a reference pipeline the same draws;
    `sample` itself draws them inside its jitted loop, one step at a time."""
    r = self.settings.resolution
    shape = (batch, r, r, self.channels)
    rng_low, rng_sample = jax.random.split(rng)
    init_key, loop_key = samplers.split_rng(rng_sample)
    n = num_steps or self.settings.num_steps
    out = {"x_init": jax.random.normal(init_key, shape, jnp.float32),
           "steps": jnp.stack([samplers.step_noise(loop_key, i, shape) for i in range(n)])}
    if self.is_sr:
      out["lowres"] = jax.random.normal(rng_low, (batch, r, r, self.channels), jnp.float32)
    return out

  def sample(self, params, cond: Mapping[str, Array], uncond: Mapping[str, Array] | None,
             rng: Array, *, lowres: Array | None = None, guidance_scale=None,
             num_steps: int | None = None, aug_level=None, mesh=None, sampler: str | None = None,
             colour_fix: bool | None = None, **sample_kw) -> Array:
    """Images [B, r, r, C] in [-1, 1]. SR stages need `lowres`, the previous stage's output.
    `sampler` replaces the settings' (e.g. a faster solver for in-loop evaluation), and
    `colour_fix` the settings' `colour_fix`."""
    s = self.settings
    b = cond["text"].shape[0]
    cond, uncond = dict(cond), (dict(uncond) if uncond is not None else None)
    rng_low, rng_sample = jax.random.split(rng)
    if self.is_sr:
      if lowres is None:
        raise ValueError(f"stage {self.name!r} is super-resolution: pass lowres images")
      cond["lowres"], cond["aug"] = self.lowres_input(lowres, rng_low, aug_level)
      if uncond is not None:
        uncond["lowres"], uncond["aug"] = cond["lowres"], cond["aug"]
    x = samplers.sample(
        Partial(self.apply, params), self.schedule, (b, s.resolution, s.resolution, self.channels),
        rng_sample, cond, uncond, num_steps=num_steps or s.num_steps,
        guidance_scale=s.guidance_scale if guidance_scale is None else guidance_scale,
        sampler=sampler or s.sampler, eta=s.eta, config=self.step_config, mesh=mesh, **sample_kw)
    if self.is_sr and (s.colour_fix if colour_fix is None else colour_fix):
      x = keep_lowres_colours(x, lowres)
    return x


def keep_lowres_colours(x: Array, lowres: Array) -> Array:
  """`x` [B, R, R, C] with its low frequencies replaced by `lowres`' [B, r, r, C]:
  x + up(lowres - down(x)), clipped to [-1, 1] (down: the antialiased resize training
  makes low-res inputs with; up: IF's bilinear). The colour fix of SR pipelines such as
  StableSR: the SR stage keeps its input's colours and adds only detail."""
  low = diffusion.downsample(x, lowres.shape[1:3])
  up = diffusion.upsample_bilinear(lowres.astype(jnp.float32) - low, x.shape[1:3])
  return jnp.clip(x.astype(jnp.float32) + up, -1.0, 1.0).astype(x.dtype)


def to_uint8(images: Array) -> np.ndarray:
  """[-1, 1] floats to uint8 exactly as diffusers' IF pipelines do (scale, round).

  A batch sharded over several hosts is gathered first, so every host gets all images.
  """
  if isinstance(images, jax.Array) and not images.is_fully_addressable:
    images = multihost_utils.process_allgather(images, tiled=True)
  x = np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0.0, 1.0)
  return (x * 255).round().astype(np.uint8)


def broadcast_cond(emb: Mapping[str, Array], batch: int) -> dict:
  """Repeats a single prompt's (text, mask) over the batch; leaves batch-sized ones."""
  out = {}
  for k, v in emb.items():
    v = jnp.asarray(v)
    out[k] = jnp.broadcast_to(v, (batch,) + v.shape[1:]) if v.shape[0] == 1 else v
  return out


class Cascade:
  """Stages in order (base first). `params` maps stage name -> param pytree."""

  def __init__(self, stages: Sequence[Stage]):
    if not stages:
      raise ValueError("a cascade needs at least one stage")
    if stages[0].is_sr:
      raise ValueError(f"the first stage {stages[0].name!r} must be a base (non-SR) stage")
    for prev, stage in zip(stages, stages[1:]):
      if not stage.is_sr or stage.lowres_resolution != prev.settings.resolution:
        raise ValueError(f"stage {stage.name!r} must be super-resolution from "
                         f"{prev.settings.resolution} px (stage {prev.name!r})")
    self.stages = list(stages)
    self.by_name = {s.name: s for s in stages}

  @property
  def params(self) -> dict[str, Any]:
    """The params each stage was built with (pretrained or random init); loads them all."""
    return {s.name: s.params for s in self.stages}

  def sample(self, prompt_embeddings: Mapping[str, Array], rng: Array, *,
             uncond_embeddings: Mapping[str, Array] | None = None, params=None,
             batch_size: int | None = None, upto: str | None = None,
             guidance_scale: Mapping[str, float] | None = None,
             num_steps: Mapping[str, int] | None = None,
             aug_level: Mapping[str, float] | None = None, mesh=None,
             as_uint8: bool = True, prompts: str | Sequence[str] | None = None,
             sampler: Mapping[str, str] | None = None,
             colour_fix: Mapping[str, bool] | None = None) -> dict[str, Any]:
    """Runs the cascade; returns {stage name: images} for every stage run.

    prompt_embeddings / uncond_embeddings: {"text": [B or 1, L, D], "mask": [B or 1, L]};
      uncond (the empty prompt) enables classifier-free guidance.
    params: {stage: params} overriding the built-in ones (e.g. fine-tuned).
    upto: last stage to run (default all). Per-stage dicts override settings.
    prompts: the prompt texts (one, or one per image), for stages with a text encoder
      of their own (`own_text_encoder`: the x4 upscaler's CLIP; negative prompt "").
      Without them the cascade ends before such a stage (naming it in `upto` raises):
      callers that hold only T5 embeddings keep the IF stages they had. (Class
      priors pass the class prompt when such a stage is tuned.)
    sampler: {stage: 'ddpm' | 'ddim' | 'dpmpp_2m'} for the IF stages named (with
      `num_steps`: a faster solver than the settings' for in-loop evaluation); a stage
      with its own text encoder keeps its own sampler.
    colour_fix: {SR stage: bool} instead of the settings' `colour_fix` (IF stages).
    Deterministic for a given rng: stage i uses fold_in(rng, i).
    """
    params = dict(params or {})  # stages not given run their own params, loaded on use
    b = batch_size or int(jnp.asarray(prompt_embeddings["text"]).shape[0])
    cond = broadcast_cond(prompt_embeddings, b)
    uncond = broadcast_cond(uncond_embeddings, b) if uncond_embeddings is not None else None
    out, lowres = {}, None
    for i, stage in enumerate(self.stages):
      stage_cond, stage_uncond = cond, uncond
      own_encoder = getattr(stage, "own_text_encoder", False)  # the x4 upscaler
      if own_encoder:
        if prompts is None:
          if stage.name == upto:
            raise ValueError(f"stage {stage.name!r} encodes the prompt with its own text encoder: "
                             "pass prompts= (the texts) to Cascade.sample")
          logging.info("cascade ends before stage %r: it needs the prompt texts (prompts=)",
                       stage.name)
          break
        stage_cond, stage_uncond = stage.embed_pair(prompts, b, guided=uncond is not None)
      own = ({"sampler": sampler[stage.name]}  # the upscaler keeps its own
             if stage.name in (sampler or {}) and not own_encoder else {})
      if stage.name in (colour_fix or {}) and not own_encoder:
        own["colour_fix"] = colour_fix[stage.name]
      x = stage.sample(params[stage.name] if stage.name in params else stage.params, stage_cond,
                       stage_uncond, jax.random.fold_in(rng, i), lowres=lowres,
                       guidance_scale=(guidance_scale or {}).get(stage.name),
                       num_steps=(num_steps or {}).get(stage.name),
                       aug_level=(aug_level or {}).get(stage.name), mesh=mesh, **own)
      out[stage.name] = to_uint8(x) if as_uint8 else x
      lowres = x
      if stage.name == upto:
        break
    return out

  def noise(self, rng: Array, batch: int, *, num_steps: Mapping[str, int] | None = None,
            upto: str | None = None) -> dict[str, dict[str, Array]]:
    """{stage: Stage.noise} of what `sample(rng, batch_size=batch)` draws at every stage."""
    out = {}
    for i, stage in enumerate(self.stages):
      out[stage.name] = stage.noise(jax.random.fold_in(rng, i), batch,
                                    (num_steps or {}).get(stage.name))
      if stage.name == upto:
        break
    return out


def scheduler_config_for(unet_dir: str, default: Mapping[str, Any],
                         subfolder: str = "scheduler") -> dict:
  """The scheduler config beside a diffusers `unet/` folder, else IF's default."""
  path = os.path.join(os.path.dirname(os.path.abspath(unet_dir)), subfolder, "scheduler_config.json")
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  return dict(default)
