"""The three-stage sampler to 1024 px in `plan_tpu.py --what=cascade`: its programs and sums.

`Cascade.sample(..., prompts=...)` on real weights runs, in this order (each
model stays on the devices once loaded, T5 excepted):

  T5 encode     the prompt and "" (FineTuned.embed; T5 is released right after)
  base          IF-I-XL, `cascade.base.num_steps` guided calls at 64 px
  sr256         IF-II-L, `cascade.sr256.num_steps` guided calls at 256 px
  CLIP encode   the upscaler's own text encoder on the prompt and ""
  sr1024 UNet   the x4 upscaler, `cascade.sr1024.num_steps` guided DDIM calls on
                256x256x4 latents (+ the noised 256 px image, the noise level)
  VAE decode    256x256x4 latents -> 1024x1024 px, float32 (diffusers' force_upcast)

`plan_tpu.py` compiles one program per row (this module lowers the stage-III
ones: `x4_upscaler`, `lower_clip_encode`, `lower_x4_guided`, `lower_vae_decode`)
and `sampler_phases` adds them up: each phase's peak is its program's peak
plus the weights already resident, and its time is the program's FLOPs at the
plan's MFU times how often it runs. Time per image is the slice's time for a
batch divided by the batch: the batch is split over the chips, so this is
throughput, and a batch's latency is `batch` times it.

FLOPs of the VAE decode come from a lowering with its mid-block attention
unchunked: at 256x256 latents that attention spans 65536 tokens and runs as a
`lax.map` over query chunks (`vae.MAX_SCORES`, on every backend), and XLA's
cost analysis counts a loop's body once, not once per trip (an 8-trip
`lax.map` of matmuls reads 1/8 of the unrolled FLOPs). Memory is the chunked
program's, the one that runs.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from dreambooth_jax import pipeline, samplers, sharding, upscaler
from dreambooth_jax.models import vae as vae_lib
from dreambooth_jax.models.clip import CLIPTowerConfig, abstract_clip_text_model
from dreambooth_jax.models.unet import UNetConfig, abstract_unet
from dreambooth_jax.models.vae import VAEConfig, abstract_vae

GIB = 1024 ** 3
TEXT_LEN = 77  # CLIP's max length, as the upscaler pipeline pads
REFERENCE_FILES = {"unet": "sd_x4_upscaler_unet.json", "vae": "sd_x4_upscaler_vae.json",
                   "text_encoder": "sd_x4_upscaler_text_encoder.json"}


def _reference(configs_dir: pathlib.Path, part: str) -> dict:
  with open(configs_dir / REFERENCE_FILES[part]) as f:
    return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


class X4Parts:
  """Stage III with its abstract UNet, VAE and CLIP text encoder (shapes only)."""

  def __init__(self, stage: upscaler.LatentUpscaleStage, unet, vae_cfg: VAEConfig, text):
    self.stage, self.unet, self.vae_cfg, self.text = stage, unet, vae_cfg, text

  def vae(self, *, chunked: bool = True):
    """The abstract VAE; `chunked=False` builds its mid attention without query chunks (the
    program whose cost analysis counts every FLOP, see the module docstring)."""
    saved = vae_lib.MAX_SCORES
    vae_lib.MAX_SCORES = saved if chunked else None  # read when MidAttention is built
    try:
      return abstract_vae(self.vae_cfg, dtype=jnp.float32)
    finally:
      vae_lib.MAX_SCORES = saved


def x4_upscaler(config, configs_dir: pathlib.Path | None, *, tiny: bool = False) -> X4Parts:
  """Stage III as `upscaler.load_stage` builds it from the download (its dtypes: UNet and
  CLIP at the config's compute/param dtypes, the VAE in float32), from the full-size
  reference configs, or from `upscaler.TINY_*` with `tiny`. Nothing is loaded: its
  loaders would only run if something sampled."""
  low = config.cascade.sr256.resolution
  if tiny:
    unet_cfg = UNetConfig.from_diffusers(dict(upscaler.TINY_UNET, sample_size=low), source="tiny")
    vae_cfg = VAEConfig.from_diffusers(dict(upscaler.TINY_VAE), source="tiny vae")
    text_cfg = CLIPTowerConfig.from_hf_text(dict(upscaler.TINY_TEXT, vocab_size=512),
                                            source="tiny text encoder")
  else:
    unet_cfg = UNetConfig.from_diffusers(_reference(configs_dir, "unet"),
                                         source=REFERENCE_FILES["unet"])
    vae_cfg = VAEConfig.from_diffusers(_reference(configs_dir, "vae"), source=REFERENCE_FILES["vae"])
    text_cfg = CLIPTowerConfig.from_hf_text(_reference(configs_dir, "text_encoder"),
                                            source=REFERENCE_FILES["text_encoder"])
  dtype, param_dtype = jnp.dtype(config.model.dtype), pipeline.unet_param_dtype(config)
  unet = abstract_unet(unet_cfg, dtype=dtype, param_dtype=param_dtype, remat=config.model.remat)
  text = abstract_clip_text_model(text_cfg, dtype=dtype, param_dtype=param_dtype)

  def never():
    raise RuntimeError("the plan compiles stage III; it never loads weights")

  stage = upscaler.LatentUpscaleStage(
      "sr1024", unet, abstract_vae(vae_cfg, dtype=jnp.float32), text,
      pipeline.stage_settings(config, "sr1024"), lowres_resolution=low, load_params=never,
      load_vae=never, load_text_encoder=never, load_tokenizer=never)
  return X4Parts(stage, unet, vae_cfg, text)


def _placed(state, mesh, rules):
  """An abstract param tree in the shardings the loaders give it (`sharding.placer`)."""
  shardings = sharding.param_shardings(state, mesh, rules)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def _batch(mesh, shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, shape))


def lower_clip_encode(parts: X4Parts, mesh, rules, prompts: int = 2):
  """The upscaler's CLIP on `prompts` texts (the prompt and "", as `embed_pair` calls it):
  (lowered, params, description). The ids are replicated: two rows do not split."""
  graphdef, state = nnx.split(parts.text)
  params = _placed(state, mesh, rules)
  ids = jax.ShapeDtypeStruct((prompts, TEXT_LEN), jnp.int32,
                             sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  run = jax.jit(lambda p, i: nnx.merge(graphdef, p)(i).astype(jnp.float32), keep_unused=True)
  return run.lower(params, ids), params, f"x4 CLIP text encode {prompts}x{TEXT_LEN}"


def lower_x4_guided(parts: X4Parts, mesh, rules, batch: int):
  """One guided call of the upscaler's UNet as `LatentUpscaleStage.sample` makes it: latents
  [B, r, r, 4] with the noised low-res image [B, r, r, 3] concatenated, the integer noise
  level as its class label, CLIP states of width 1024, cond and uncond in one call."""
  stage = parts.stage
  r, width = stage.lowres_resolution, parts.text.cfg.hidden_size
  params = _placed(stage.abstract_params, mesh, rules)
  cond = {"text": _batch(mesh, (batch, TEXT_LEN, width)),
          "lowres": _batch(mesh, (batch, r, r, upscaler.LOWRES_CHANNELS)),
          "aug": _batch(mesh, (batch,), jnp.int32)}
  x = _batch(mesh, (batch, r, r, stage.channels))

  def guided(params, x, t, cond):
    return samplers.guided_output(lambda x, t, c: stage.apply(params, x, t, c), x, t, cond, cond,
                                  stage.settings.guidance_scale)

  lowered = jax.jit(guided, keep_unused=True).lower(params, x, jax.ShapeDtypeStruct((), jnp.float32), cond)
  return lowered, params, f"x4 upscaler UNet sample step CFG {batch}x2 latents {r}x{r}"


def lower_vae_decode(parts: X4Parts, mesh, rules, batch: int, *, chunked: bool = True):
  """The VAE decode of `batch` latents to images 4x their side, clipped, as the stage runs
  it (float32): (lowered, params, description)."""
  vae = parts.vae(chunked=chunked)
  graphdef, state = nnx.split(vae)
  params = _placed(state, mesh, upscaler.vae_rules(rules))  # replicated, as the stage loads it
  r = parts.stage.lowres_resolution
  z = _batch(mesh, (batch, r, r, parts.vae_cfg.latent_channels))
  # keep_unused: the encoder is loaded with the VAE (resident) though the decode never reads it
  decode = jax.jit(lambda p, z: jnp.clip(nnx.merge(graphdef, p).decode_latents(z), -1.0, 1.0),
                   keep_unused=True)
  side = r * parts.vae_cfg.downsample_factor
  return decode.lower(params, z), params, f"x4 VAE decode {batch} latents {r}x{r} -> {side} px"


# ----------------------------------------------------------------------------
# The sums: phases in sampling order, resident weights, time per image.
# ----------------------------------------------------------------------------

# (phase, compiled row key, the stage whose num_steps counts its calls or None for one call
# per batch, the models resident from earlier phases).
PHASES = (
    ("T5 encode", "t5", None, ()),
    ("base UNet", "base", "base", ()),
    ("sr256 UNet", "sr256", "sr256", ("base",)),
    ("sr1024 CLIP encode", "clip", None, ("base", "sr256")),
    ("sr1024 UNet", "x4_unet", "sr1024", ("base", "sr256", "clip")),
    ("sr1024 VAE decode", "vae", None, ("base", "sr256", "clip", "x4_unet")),
)


def sampler_phases(rows: dict[str, dict], steps: dict[str, int], batch: int, hbm_bytes: float,
                   side: int = 1024) -> tuple[list[dict], dict]:
  """(a dict per phase, the totals) of one `Cascade.sample` call of `batch` images.

  rows: {key of PHASES: a plan_tpu row} with `peak_bytes_per_device`,
  `param_bytes_per_device` (the weights a phase leaves resident) and `step_s` (one
  program run at the plan's MFU); "vae" also `flops_full_per_device` (see the module
  docstring). steps: {stage: denoising steps}."""
  out, latency = [], 0.0
  for phase, key, stage, resident_keys in PHASES:
    row = rows[key]
    resident = sum(rows[k]["param_bytes_per_device"] for k in resident_keys)
    calls = steps[stage] if stage else 1
    call_s = row["step_s"]
    if "flops_full_per_device" in row:  # the decode's loop, counted per trip
      call_s *= row["flops_full_per_device"] / row["flops_per_device"]
    seconds = calls * call_s
    latency += seconds
    peak = row["peak_bytes_per_device"] + resident
    out.append(dict(phase=phase, key=key, calls=calls, call_s=call_s, seconds=seconds,
                    per_image_s=seconds / batch, resident=resident,
                    program_peak=row["peak_bytes_per_device"], peak=peak,
                    fits=bool(peak < hbm_bytes)))
  peak = max(p["peak"] for p in out)
  totals = dict(batch=batch, side=side, latency_s=latency, per_image_s=latency / batch, peak=peak,
                peak_phase=max(out, key=lambda p: p["peak"])["phase"], fits=bool(peak < hbm_bytes))
  return out, totals


def format_phases(phases: list[dict], totals: dict, hbm_gib: float) -> list[str]:
  """The table `plan_tpu.py --what=cascade` prints, one line per phase, then the totals."""
  lines = [f"  {'phase':<18} {'calls':>5} {'ms/call':>9} {'s/batch':>8} {'s/image':>8} "
           f"{'resident':>9} {'program':>8} {'peak GiB/dev':>12}"]
  for p in phases:
    lines.append(f"  {p['phase']:<18} {p['calls']:>5} {p['call_s'] * 1e3:>9.1f} "
                 f"{p['seconds']:>8.2f} {p['per_image_s']:>8.3f} {p['resident'] / GIB:>9.2f} "
                 f"{p['program_peak'] / GIB:>8.2f} {p['peak'] / GIB:>12.2f}"
                 f"{'' if p['fits'] else '  DOES NOT FIT'}")
  lines.append(f"  one batch of {totals['batch']} images to {totals['side']} px: {totals['latency_s']:.1f} s; "
               f"{totals['per_image_s']:.2f} s of the slice per image; peak "
               f"{totals['peak'] / GIB:.2f} GiB/dev in {totals['peak_phase']} "
               f"({'fits' if totals['fits'] else 'DOES NOT FIT'} {hbm_gib:.0f} GiB)")
  return lines
