"""DeepFloyd IF / diffusers UNet folders <-> our flax UNet.

A diffusers UNet folder holds `config.json` and `diffusion_pytorch_model*.safetensors`
in any layout `safetensors_io.open_folder` reads (single, sharded, `fp16` variant).
A whole pipeline folder (`model_index.json` + `unet/`, as a Hub download of
DeepFloyd/IF-I-XL-v1.0 is) is accepted and resolved to its `unet/`. Our module
tree mirrors diffusers' names exactly, so the mapping needs no renames; only
kernel layouts change (see `torch_layout`).

Before anything is built, the config is recognised (`describe_unet_config`):
a folder holding another kind of model (an IF stage in the wrong slot, Stable
Diffusion's x4 upscaler that DeepFloyd publish as stage III, an SD UNet, a
VAE, a text encoder) fails with one paragraph saying what it is and what the
role needs, instead of a traceback from deep inside the config parser.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax.numpy as jnp
from etils import epath

from dreambooth_jax.models.unet import IF_DOWN_TYPES, UNet, UNetConfig, abstract_unet
from dreambooth_jax.weights import safetensors_io, torch_layout
from dreambooth_jax.weights.safetensors_io import WeightsError

WEIGHTS_STEM = "diffusion_pytorch_model"
ROLES = ("stage_1", "stage_2", "stage_3")

_EXPECTED = {
    "base": ("an IF stage-I base pixel UNet (UNet2DConditionModel with in_channels 3, no class "
             "embedding, ResnetDownsampleBlock2D/SimpleCrossAttnDownBlock2D blocks), e.g. the "
             "unet/ of DeepFloyd/IF-I-XL-v1.0"),
    "sr": ("an IF-style super-resolution pixel UNet (UNet2DConditionModel with in_channels 6 = "
           "noisy image + upsampled low-res image, class_embed_type 'timestep' for the "
           "augmentation level), e.g. the unet/ of DeepFloyd/IF-II-L-v1.0"),
    None: ("a DeepFloyd IF-style pixel UNet (UNet2DConditionModel with ResnetDownsampleBlock2D/"
           "SimpleCrossAttnDownBlock2D blocks), e.g. the unet/ of DeepFloyd/IF-I-XL-v1.0"),
}
_VAE_CLASSES = ("AutoencoderKL", "VQModel", "AutoencoderTiny", "AsymmetricAutoencoderKL",
                "ConsistencyDecoderVAE", "AutoencoderDC")
_SD_VERSIONS = {768: "1.x", 1024: "2.x", 2048: "XL"}


def role_kind(role: str | None) -> str | None:
  """'base' for stage_1, 'sr' for stage_2/stage_3, None for no role (any IF UNet)."""
  if role not in (None, *ROLES):
    raise ValueError(f"unknown UNet role {role!r}; use one of {ROLES} or None")
  return None if role is None else ("base" if role == "stage_1" else "sr")


def describe_unet_config(d: Mapping[str, Any]) -> tuple[str, str]:
  """(kind, description) of the model a diffusers/transformers config.json dict describes.

  Kinds: 'base' and 'sr' (IF stages), 'if_other', 'sd_x4_upscaler', 'sd', 'latent_unet',
  'unet2d', 'vae', 'scheduler', 'text_encoder', 'diffusers' (another class), 'unknown'.
  """
  cls = d.get("_class_name")
  if cls is None and ("model_type" in d or "architectures" in d):
    arch = (d.get("architectures") or ["?"])[0]
    return "text_encoder", (f"a transformers {arch} (model_type {d.get('model_type')!r}), i.e. a "
                            "text encoder, not a UNet")
  if cls in _VAE_CLASSES:
    return "vae", (f"a VAE ({cls}), the latent image codec of a latent-diffusion pipeline, not a "
                   "UNet")
  if cls and cls.endswith("Scheduler"):
    return "scheduler", f"a noise scheduler config ({cls}), not a model"
  if cls == "UNet2DModel":
    return "unet2d", ("an unconditional diffusers UNet2DModel (no text conditioning), not a "
                      "text-conditioned IF UNet")
  if cls not in (None, "UNet2DConditionModel"):
    return "diffusers", f"a diffusers {cls}, not a UNet2DConditionModel"
  if "down_block_types" not in d:
    return "unknown", "a config.json without UNet keys (no down_block_types)"
  down = list(d.get("down_block_types") or ())
  cin, ctype = d.get("in_channels", 4), d.get("class_embed_type")
  cross = d.get("cross_attention_dim")
  if cin == 7 and d.get("num_class_embeds"):
    return "sd_x4_upscaler", (
        "Stable Diffusion's x4 upscaler UNet (stabilityai/stable-diffusion-x4-upscaler: a latent "
        f"UNet with in_channels 7 = 4 latent + 3 low-res image channels, num_class_embeds "
        f"{d.get('num_class_embeds')} for the noise level, {_blocks(down)}, text of width {cross})")
  if down and all(t in IF_DOWN_TYPES for t in down):
    if cin == 3 and ctype is None:
      return "base", ("a DeepFloyd IF stage-I base UNet (pixel space, in_channels 3, no class "
                      "embedding)")
    if cin == 6 and ctype == "timestep":
      return "sr", ("a DeepFloyd IF stage-II super-resolution UNet (pixel space, in_channels 6 = "
                    "noisy image + upsampled low-res image, class_embed_type 'timestep')")
    return "if_other", (f"an IF-architecture UNet with in_channels {cin} and class_embed_type "
                        f"{ctype!r}, which is neither IF stage I (3, None) nor IF-II (6, 'timestep')")
  if cin in (4, 8, 9) and any("CrossAttn" in t for t in down):
    version = _SD_VERSIONS.get(cross if isinstance(cross, int) else -1, "")
    what = {4: "text-to-image", 8: "instruct-pix2pix", 9: "inpainting"}[cin]
    return "sd", (f"a Stable Diffusion{' ' + version if version else ''} {what} UNet (latent space, "
                  f"in_channels {cin}, {_blocks(down)}, text of width {cross})")
  return "latent_unet", f"a UNet2DConditionModel with in_channels {cin} and {_blocks(down)}"


def _blocks(down) -> str:
  return "/".join(dict.fromkeys(down)) + " blocks"


def _sibling_note(folder: str) -> str:
  """What the pipeline around a unet/ folder says about it (x4 upscaler: vae/, low_res_scheduler/)."""
  parent = os.path.dirname(os.path.normpath(folder))
  index = os.path.join(parent, "model_index.json")
  siblings = [s for s in ("vae", "low_res_scheduler") if os.path.isdir(os.path.join(parent, s))]
  note = ""
  if os.path.isfile(index):
    try:
      with open(index) as f:
        note = f" It sits in a {json.load(f).get('_class_name', 'diffusers')} pipeline folder"
    except (OSError, ValueError):
      note = " It sits in a diffusers pipeline folder"
    note += f" with {', '.join(s + '/' for s in siblings)} beside it." if siblings else "."
  return note


def check_unet_role(d: Mapping[str, Any], folder: str, role: str | None = None) -> str:
  """Raises WeightsError unless config dict `d` (of `folder`) is an IF UNet fit for `role`.

  `role`: 'stage_1' (base), 'stage_2' / 'stage_3' (super-resolution) or None
  (any IF-architecture UNet). Returns the kind (see `describe_unet_config`).
  """
  want = role_kind(role)
  kind, what = describe_unet_config(d)
  if kind == want or (want is None and kind in ("base", "sr", "if_other", "unknown")):
    return kind
  if kind == "unknown":  # no recognisable family: `UNetConfig.from_diffusers` names the keys
    return kind
  given = f"{folder} (given as {role})" if role else folder
  also = (" (or, as stage III, the stabilityai/stable-diffusion-x4-upscaler download)"
          if role == "stage_3" else "")
  head = (f"{given}: config.json describes {what}, but {role or 'this loader'} needs "
          f"{_EXPECTED[want]}{also}.")
  if kind == "sr" and want == "base":
    fix = ("This is the stage-II upscaler: pass it as stage_2 and give stage_1 the IF-I download "
           "(DeepFloyd/IF-I-XL-v1.0, -L or -M).")
  elif kind == "base" and want == "sr":
    fix = ("This is the stage-I base model: pass it as stage_1 and give " + str(role) + " an IF-II "
           "download (DeepFloyd/IF-II-L-v1.0 or -M).")
  elif kind == "sd_x4_upscaler":
    fix = ("This is DeepFloyd's published stage III, Stable Diffusion's latent x4 upscaler, not an "
           "IF pixel UNet: give the whole download (the folder with model_index.json, unet/, vae/, "
           "text_encoder/, tokenizer/) as config.pretrained.stage_3, where the cascade loads it "
           "with weights.sd_upscaler (load_sd_upscaler / upscaler.load_stage)."
           + _sibling_note(folder))
  elif kind in ("sd", "latent_unet"):
    fix = ("dreambooth_jax fine-tunes DeepFloyd IF-style pixel cascades, not latent-diffusion "
           "models; for Stable Diffusion use diffusers' train_dreambooth.py." + _sibling_note(folder))
  elif kind == "text_encoder":
    fix = ("Pass the UNet folder (config.json + diffusion_pytorch_model*.safetensors, or the "
           "pipeline folder that holds unet/) here, and the T5 text encoder as the T5 folder.")
  elif kind in ("vae", "scheduler", "diffusers", "unet2d"):
    fix = ("Pass the pipeline's unet/ folder (or the pipeline folder that holds it) instead."
           + _sibling_note(folder))
  else:  # an IF-architecture UNet of unexpected channels
    fix = "Check that this folder is the DeepFloyd IF download meant for " + str(role) + "."
  raise WeightsError(f"{head} {fix}")


def resolve_unet_folder(folder: str) -> str:
  """`folder`, or its `unet/` when `folder` is a whole pipeline (model_index.json) or holds one."""
  return safetensors_io.resolve_component(folder, "unet", "UNet")


def unet_config_from_dict(d: Mapping[str, Any], folder: str, role: str | None = None) -> UNetConfig:
  """UNetConfig of config dict `d` of `folder`, after `check_unet_role`; WeightsError on failure."""
  check_unet_role(d, folder, role)
  source = os.path.join(folder, "config.json")
  try:
    return UNetConfig.from_diffusers(dict(d), source=source)
  except (TypeError, ValueError) as e:
    raise WeightsError(f"{e} Expected {_EXPECTED[role_kind(role)]}.") from e


def unet_config_from_folder(folder: str, role: str | None = None) -> UNetConfig:
  """The UNetConfig of a UNet (or pipeline) folder; WeightsError if it is not an IF UNet."""
  folder = resolve_unet_folder(folder)
  return unet_config_from_dict(safetensors_io.read_config(folder), folder, role)


def load_unet(folder: str, dtype=jnp.float32, *, compute_dtype=None, variant: str | None = None,
              remat: bool = False, place=None, role: str | None = None) -> UNet:
  """Loads a diffusers UNet2DConditionModel folder (IF stage I/II layout) into our UNet.

  `folder` may be the pipeline folder holding `unet/`. Params are stored in
  `dtype`; math runs in `compute_dtype` (default: `dtype`). `place(path, array)`
  may put each tensor on devices as it is read (sharded loading of
  multi-billion-parameter UNets without a host copy of the whole). `role`
  ('stage_1', 'stage_2', 'stage_3') also checks the UNet fits that stage.
  Raises WeightsError naming a wrong kind of model, or any missing, unexpected
  or mis-shaped tensor.
  """
  folder = resolve_unet_folder(folder)
  cfg = unet_config_from_dict(safetensors_io.read_config(folder), folder, role)
  tensors = safetensors_io.open_folder(folder, (WEIGHTS_STEM,), variant)
  model = abstract_unet(cfg, dtype=compute_dtype or dtype, param_dtype=dtype, remat=remat)
  return torch_layout.load_params(model, tensors, dtype=dtype, source=tensors.source, place=place)


def save_unet_diffusers(unet: UNet, folder: str, dtype=None, variant: str | None = None) -> str:
  """Writes `unet` as a diffusers folder that `UNet2DConditionModel.from_pretrained` loads.

  `dtype` (e.g. np.float16) converts on the way out; default keeps the param dtype.
  `variant` names the file as diffusers does (`diffusion_pytorch_model.fp16.safetensors`).
  """
  folder = epath.Path(folder)  # local or remote (gs://...)
  folder.mkdir(parents=True, exist_ok=True)
  tensors = torch_layout.export_params(unet, dtype=dtype)
  name = f"{WEIGHTS_STEM}.{variant}.safetensors" if variant else f"{WEIGHTS_STEM}.safetensors"
  safetensors_io.save_file(tensors, folder / name, metadata={"format": "pt"})
  config = unet.cfg.to_diffusers()
  config["_diffusers_version"] = "0.42.1"
  (folder / "config.json").write_text(json.dumps(config, indent=2))
  return str(folder)
