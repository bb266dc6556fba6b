"""stabilityai/stable-diffusion-x4-upscaler folders -> our UNet, VAE, CLIP text encoder, tokenizer.

DeepFloyd publish Stable Diffusion's x4 upscaler as IF's stage III (256 ->
1024). A Hub download is a diffusers pipeline folder:

  model_index.json        StableDiffusionUpscalePipeline, max_noise_level 350
  unet/                   UNet2DConditionModel: 4 latent + 3 low-res channels in, noise-level table
  vae/                    AutoencoderKL, scaling_factor 0.08333
  text_encoder/           transformers CLIPTextModel (OpenCLIP ViT-H text, 23 layers, width 1024)
  tokenizer/              CLIPTokenizer: vocab.json + merges.txt
  scheduler/              DDIMScheduler, v-prediction (the sampler's)
  low_res_scheduler/      DDPMScheduler that noises the low-res conditioning image

Each loader takes the pipeline folder or the component folder itself, reads
the weights in any layout `safetensors_io.open_folder` reads (single, sharded
with an index, `fp16` variant), safetensors only, and builds the model
abstractly before filling it (`torch_layout.load_params`, which lists every
missing, unexpected or mis-shaped tensor). The config is recognised first, so
a wrong folder (an IF UNet, a T5, a VAE in the UNet slot) fails with one
paragraph naming the path, what it holds and what to pass instead.

The text encoder's tensors are named `text_model.*` when transformers 4 saved
them (the published checkpoint) and without that prefix when transformers 5
did: both load. Our module keeps the `text_model.` names.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from dreambooth_jax.models.clip import CLIPTextModel, CLIPTowerConfig, abstract_clip_text_model
from dreambooth_jax.models.unet import UNet, UNetConfig, abstract_unet, param_count
from dreambooth_jax.models.vae import AutoencoderKL, VAEConfig, abstract_vae
from dreambooth_jax.tokenizer import CLIP_FILES, ClipTokenizer
from dreambooth_jax.weights import safetensors_io, torch_layout
from dreambooth_jax.weights.safetensors_io import WeightsError
from dreambooth_jax.weights.unet import describe_unet_config, resolve_unet_folder

REPO = "stabilityai/stable-diffusion-x4-upscaler"
DIFFUSERS_STEM, TRANSFORMERS_STEM = "diffusion_pytorch_model", "model"
MAX_NOISE_LEVEL = 350  # StableDiffusionUpscalePipeline's default, also in the Hub's model_index.json
_DOWNLOAD = f"download {REPO} (`huggingface-cli download {REPO} --local-dir DIR`) and pass DIR"
_EXPECTED = {
    "unet": ("Stable Diffusion's x4 upscaler UNet (UNet2DConditionModel with in_channels 7 = 4 "
             "latent + 3 low-res image channels and num_class_embeds for the noise level)"),
    "vae": "the upscaler's AutoencoderKL (the latent codec, scaling_factor 0.08333)",
    "text_encoder": ("a transformers CLIPTextModel (the upscaler's OpenCLIP ViT-H text encoder, "
                     "width 1024)"),
}
_TEXT_PREFIX = "text_model."  # transformers 4's CLIPTextModel wrapper, absent in transformers 5


def resolve(folder: str, component: str) -> str:
  """`folder`, or its `component/` when `folder` is the pipeline download."""
  return safetensors_io.resolve_component(folder, component, f"{component}/",
                                          f"Pass the {REPO} download, or {_DOWNLOAD}.")


def _wrong(folder: str, component: str, what: str, fix: str = "") -> WeightsError:
  fix = fix or f"Pass the {component}/ of {REPO} (or the whole download) instead."
  return WeightsError(f"{folder}: config.json describes {what}, but the x4 upscaler's {component} "
                      f"must be {_EXPECTED[component]}. {fix}")


# --- configs -----------------------------------------------------------------------------------

def unet_config(folder: str) -> UNetConfig:
  """The UNetConfig of the upscaler UNet in `folder` (already resolved); WeightsError otherwise."""
  d = safetensors_io.read_config(folder)
  kind, what = describe_unet_config(d)
  if kind != "sd_x4_upscaler":
    fix = ("DeepFloyd IF's own UNets load with weights.load_unet; stage III is the separate "
           f"{REPO} download: {_DOWNLOAD}." if kind in ("base", "sr", "if_other") else "")
    raise _wrong(folder, "unet", what, fix)
  try:
    return UNetConfig.from_diffusers(dict(d), source=os.path.join(folder, "config.json"))
  except ValueError as e:
    raise WeightsError(f"{e} Expected {_EXPECTED['unet']}.") from e


def vae_config(folder: str) -> VAEConfig:
  d = safetensors_io.read_config(folder)
  if d.get("_class_name") != "AutoencoderKL":
    raise _wrong(folder, "vae", describe_unet_config(d)[1])
  try:
    return VAEConfig.from_diffusers(d, source=os.path.join(folder, "config.json"))
  except (TypeError, ValueError) as e:
    raise WeightsError(f"{e} Expected {_EXPECTED['vae']}.") from e


def text_encoder_config(folder: str) -> CLIPTowerConfig:
  d = safetensors_io.read_config(folder)
  if d.get("model_type") != "clip_text_model":
    what = describe_unet_config(d)[1]
    if "_class_name" not in d:  # a transformers config: name its type rather than guess
      arch = ", ".join(d.get("architectures") or ()) or "no architectures listed"
      what = f"a transformers model of model_type {d.get('model_type')!r} ({arch})"
    raise _wrong(folder, "text_encoder", what)
  try:
    return CLIPTowerConfig.from_hf_text(d, source=os.path.join(folder, "config.json"))
  except (TypeError, ValueError) as e:
    raise WeightsError(f"{e} Expected {_EXPECTED['text_encoder']}.") from e


def text_encoder_layout(tensors) -> tuple[tuple, Callable[[str], bool]]:
  """(renames, ignore) of a CLIPTextModel checkpoint: transformers 5 names lack `text_model.`;
  transformers 4 saved the constant `position_ids` buffer, which we compute instead."""
  renames = ()
  if not any(k.startswith(_TEXT_PREFIX) for k in tensors):
    renames = ((r"^text_model\.", ""),)
  return renames, lambda k: k.endswith("embeddings.position_ids")


# --- loaders -----------------------------------------------------------------------------------

def _fill(model, tensors, dtype, place, renames=(), ignore=lambda k: False):
  # Cast on the host, so an fp16 file loaded as float32 (or the reverse) reaches devices once.
  if place is None:
    place = lambda path, array: jnp.asarray(np.asarray(array).astype(dtype))
  return torch_layout.load_params(model, tensors, renames=renames, source=tensors.source,
                                  ignore=ignore, place=place)


def load_upscaler_unet(folder: str, dtype=jnp.float32, *, compute_dtype=None,
                       variant: str | None = None, remat: bool = False, place=None) -> UNet:
  """The x4 upscaler UNet of a pipeline (or unet/) folder: params in `dtype`, math in
  `compute_dtype` (default `dtype`). Call it as `unet(latents_and_lowres_nhwc, t, text,
  class_labels=noise_level)`: 7 channels in (4 noisy latent + 3 low-res image)."""
  folder = resolve(folder, "unet")
  cfg = unet_config(folder)
  tensors = safetensors_io.open_folder(folder, (DIFFUSERS_STEM,), variant)
  model = abstract_unet(cfg, dtype=compute_dtype or dtype, param_dtype=dtype, remat=remat)
  return _fill(model, tensors, dtype, place)


def load_vae(folder: str, dtype=jnp.float32, *, compute_dtype=None, variant: str | None = None,
             place=None) -> AutoencoderKL:
  """The AutoencoderKL of a pipeline (or vae/) folder; `vae.cfg.scaling_factor` from its config.

  diffusers upcasts this VAE to float32 for decoding (force_upcast; the original
  notes "the decoder seems to break in half precision"): keep `compute_dtype` float32.
  """
  folder = resolve(folder, "vae")
  cfg = vae_config(folder)
  tensors = safetensors_io.open_folder(folder, (DIFFUSERS_STEM,), variant)
  return _fill(abstract_vae(cfg, dtype=compute_dtype or dtype, param_dtype=dtype), tensors, dtype, place)


def load_text_encoder(folder: str, dtype=jnp.float32, *, compute_dtype=None,
                      variant: str | None = None, place=None) -> CLIPTextModel:
  """The CLIPTextModel of a pipeline (or text_encoder/) folder, saved by transformers 4 or 5."""
  folder = resolve(folder, "text_encoder")
  cfg = text_encoder_config(folder)
  tensors = safetensors_io.open_folder(folder, (TRANSFORMERS_STEM,), variant)
  renames, ignore = text_encoder_layout(tensors)
  model = abstract_clip_text_model(cfg, dtype=compute_dtype or dtype, param_dtype=dtype)
  return _fill(model, tensors, dtype, place, renames, ignore)


def load_tokenizer(folder: str, **kwargs) -> ClipTokenizer:
  """The CLIP tokenizer of a pipeline (or tokenizer/) folder: vocab.json + merges.txt."""
  resolved = resolve(folder, "tokenizer")
  missing = [n for n in CLIP_FILES if not os.path.isfile(os.path.join(resolved, n))]
  if missing:
    holds = ("a T5 SentencePiece tokenizer (spiece.model), DeepFloyd IF's, not the upscaler's CLIP "
             "tokenizer; " if os.path.isfile(os.path.join(resolved, "spiece.model")) else "")
    raise WeightsError(f"{resolved!r} has no {' and '.join(missing)}: it holds "
                       f"{holds or 'no CLIP BPE files; '}the x4 upscaler's tokenizer is CLIP's "
                       f"byte-level BPE. Pass the tokenizer/ of {REPO} (or the whole download), or "
                       f"{_DOWNLOAD}.")
  try:
    return ClipTokenizer.from_pretrained(resolved, **kwargs)
  except (OSError, ValueError, KeyError) as e:
    raise WeightsError(f"{resolved}: cannot read CLIP's tokenizer from vocab.json + merges.txt "
                       f"({e}); re-download them from {REPO}.") from e


def read_scheduler_config(folder: str, component: str = "scheduler") -> dict[str, Any]:
  """`<pipeline>/<component>/scheduler_config.json` as a dict (`scheduler` or `low_res_scheduler`)."""
  path = os.path.join(resolve(folder, component), "scheduler_config.json")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise WeightsError(f"{path}: cannot read the {component} config ({e}); re-download {component}/ "
                       f"of {REPO}.") from e


def download_root(folder: str) -> str | None:
  """The x4 upscaler download `folder` is (or whose unet/ it is), else None.

  How a cascade's stage_3 tells DeepFloyd's public stage III from an IF-style pixel UNet:
  by the UNet's config only. A bare upscaler UNet folder with no pipeline around it
  raises, as the stage also needs the VAE, the text encoder and the tokenizer.
  """
  try:
    unet_dir = resolve_unet_folder(folder)
    kind = describe_unet_config(safetensors_io.read_config(unet_dir))[0]
  except WeightsError:
    return None  # not a readable UNet: the IF checks name what is wrong
  if kind != "sd_x4_upscaler":
    return None
  if os.path.normpath(unet_dir) != os.path.normpath(folder):
    return folder
  parent = os.path.dirname(os.path.normpath(folder))
  if os.path.isfile(os.path.join(parent, "model_index.json")):
    return parent
  raise WeightsError(f"{folder}: holds the x4 upscaler's UNet only, but stage III also needs its "
                     f"vae/, text_encoder/, tokenizer/ and schedulers: pass the whole {REPO} "
                     f"download (the folder with model_index.json), or {_DOWNLOAD}.")


# --- the whole pipeline ------------------------------------------------------------------------

@dataclasses.dataclass
class SDUpscaler:
  """Every part of a loaded x4 upscaler download."""

  unet: UNet
  vae: AutoencoderKL
  text_encoder: CLIPTextModel
  tokenizer: ClipTokenizer
  scheduler: dict[str, Any]           # DDIMScheduler config (v-prediction)
  low_res_scheduler: dict[str, Any]   # DDPMScheduler config that noises the low-res image
  max_noise_level: int                # the largest noise_level (class label) the pipeline accepts


def max_noise_level(folder: str) -> int:
  """model_index.json's max_noise_level (the pipeline's default, 350, when absent)."""
  path = os.path.join(folder, "model_index.json")
  if not os.path.isfile(path):
    return MAX_NOISE_LEVEL
  try:
    with open(path) as f:
      return int(json.load(f).get("max_noise_level", MAX_NOISE_LEVEL))
  except (OSError, ValueError, TypeError) as e:
    raise WeightsError(f"{path}: not a readable model_index.json ({e}); re-download it.") from e


def check_compatible(unet_cfg: UNetConfig, text_cfg: CLIPTowerConfig, vae_cfg: VAEConfig,
                     vocab_size: int | None, folder: str) -> None:
  """Raises WeightsError when the components cannot have been trained together."""
  problems = []
  if unet_cfg.cross_attention_dim != text_cfg.hidden_size:
    problems.append(f"the UNet attends to text of width {unet_cfg.cross_attention_dim} but the text "
                    f"encoder outputs width {text_cfg.hidden_size}")
  if unet_cfg.out_channels != vae_cfg.latent_channels or unet_cfg.in_channels != vae_cfg.latent_channels + 3:
    problems.append(f"the UNet takes {unet_cfg.in_channels} channels and predicts {unet_cfg.out_channels}, "
                    f"but the VAE's latents have {vae_cfg.latent_channels} (+3 low-res image channels)")
  if vocab_size is not None and vocab_size > text_cfg.vocab_size:
    problems.append(f"the tokenizer has {vocab_size} ids but the text encoder embeds "
                    f"{text_cfg.vocab_size}")
  if problems:
    raise WeightsError(f"{folder}: the components do not belong together: {'; '.join(problems)}. "
                       f"Use unet/, vae/, text_encoder/ and tokenizer/ of one {REPO} download.")


def load_sd_upscaler(folder: str, dtype=jnp.float32, *, compute_dtype=None,
                     variant: str | None = None) -> SDUpscaler:
  """Every component of an x4 upscaler pipeline folder (see the module docstring).

  The VAE is kept in float32 whatever `dtype` is (diffusers' force_upcast).
  Configs and headers of all components are checked (`check_sd_upscaler`)
  before any tensor is read, so a broken download fails in milliseconds.
  """
  check_sd_upscaler(folder, variant=variant)
  tokenizer = load_tokenizer(folder)
  return SDUpscaler(
      unet=load_upscaler_unet(folder, dtype, compute_dtype=compute_dtype, variant=variant),
      vae=load_vae(folder, jnp.float32, variant=variant),
      text_encoder=load_text_encoder(folder, dtype, compute_dtype=compute_dtype, variant=variant),
      tokenizer=tokenizer, scheduler=read_scheduler_config(folder, "scheduler"),
      low_res_scheduler=read_scheduler_config(folder, "low_res_scheduler"),
      max_noise_level=max_noise_level(folder))


def check_sd_upscaler(folder: str, *, variant: str | None = None) -> dict[str, int]:
  """Checks an x4 upscaler download reading configs and safetensors headers only.

  Returns the parameter count of each weighted component ({unet, vae,
  text_encoder}). Raises one WeightsError listing every broken component.
  """
  errors, counts, cfgs = [], {}, {}
  parts = {
      "unet": (unet_config, lambda c: abstract_unet(c), DIFFUSERS_STEM),
      "vae": (vae_config, lambda c: abstract_vae(c), DIFFUSERS_STEM),
      "text_encoder": (text_encoder_config, lambda c: abstract_clip_text_model(c), TRANSFORMERS_STEM),
  }
  for name, (config_of, abstract, stem) in parts.items():
    try:
      sub = resolve(folder, name)
      cfgs[name] = config_of(sub)
      tensors = safetensors_io.open_folder(sub, (stem,), variant)
      renames, ignore = text_encoder_layout(tensors) if name == "text_encoder" else ((), lambda k: False)
      model = abstract(cfgs[name])
      torch_layout.check_params(model, tensors, renames=renames, source=tensors.source, ignore=ignore)
      counts[name] = param_count(model)
    except WeightsError as e:
      errors.append(str(e))
  vocab = None
  try:
    vocab = load_tokenizer(folder).vocab_size
  except WeightsError as e:
    errors.append(str(e))
  if not errors and len(cfgs) == 3:
    try:
      check_compatible(cfgs["unet"], cfgs["text_encoder"], cfgs["vae"], vocab, folder)
    except WeightsError as e:
      errors.append(str(e))
  if errors:
    raise WeightsError(errors[0] if len(errors) == 1 else
                       f"{len(errors)} parts of the x4 upscaler are unusable:\n\n" + "\n\n".join(errors))
  return counts
