"""Tiny weight folders in the layouts the reference libraries write, for the weights tests.

Every folder here is written by transformers' or diffusers' own `save_pretrained`
(never by our writer), seeded, with random tiny weights:

- `build_if_repo`: a DeepFloyd IF-I or IF-II repository as a user's download
  looks: `model_index.json`, `unet/`, `text_encoder/` (IF-I), `tokenizer/`,
  `scheduler/` (and IF-II's `image_noising_scheduler/`), saved from an
  `IFPipeline` / `IFSuperResolutionPipeline` in float16 with
  `variant="fp16"` and a shard size that splits the UNet and T5 into shards.
- `save_layouts`: one model saved in every layout both libraries write or
  wrote: single file, sharded, fp16 variant, sharded fp16 variant, and
  diffusers' legacy sharded-variant naming.
- `wrong_models`: folders that are not what a stage or the T5 slot needs
  (Stable Diffusion x4 upscaler, an SD UNet, a VAE, mT5, CLIP, ...), shrunk
  from the reference configs to toy widths.

Fixtures that use these live in conftest.py (session) or the test modules.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pathlib
import re
import shutil

import torch

from unet_configs import TINY_IF_I, TINY_IF_II

# The tiny T5 of the IF repos: d_model must equal the tiny UNets' encoder_hid_dim (48).
TINY_T5 = dict(d_model=48, d_kv=12, d_ff=96, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
               relative_attention_num_buckets=8, relative_attention_max_distance=20)
SENTINELS = 100  # T5Tokenizer's <extra_id_N>
IF_MAX_SHARD = "100KB"  # splits the fp16 tiny UNet (~1.7 MB) and T5 (~0.2 MB) into 2+ shards
LAYOUT_SHARD = {"unet": "500KB", "t5": "100KB"}
STEMS = {"unet": "diffusion_pytorch_model", "t5": "model"}
LAYOUTS = ("single", "sharded", "fp16", "fp16_sharded", "fp16_sharded_legacy")


def reference_config(reference_dir, name: str) -> dict:
  """A reference config without its metadata keys (`_provenance`, `_param_count`, `_name_or_path`)."""
  d = json.loads((pathlib.Path(reference_dir) / name).read_text())
  return {k: v for k, v in d.items() if not k.startswith("_")}


def randomized(model: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
  """Random values in every parameter: diffusers zero-initialises some layers, and a zero
  tensor mapped to the wrong place would go unnoticed."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=g) * scale)
  return model.eval()


def t5_vocab_size(tokenizer_len: int) -> int:
  """Embedding rows for a tokenizer of `tokenizer_len` ids, rounded up to 128 like T5 v1.1's
  32128 rows for 32100 ids."""
  return int(math.ceil(tokenizer_len / 128) * 128)


def tiny_t5(vocab_size: int, seed: int, **overrides):
  from transformers import T5Config, T5EncoderModel
  torch.manual_seed(seed)
  return randomized(T5EncoderModel(T5Config(vocab_size=vocab_size, **dict(TINY_T5, **overrides))),
                    seed)


def tiny_unet(cfg: dict, seed: int):
  from diffusers import UNet2DConditionModel
  torch.manual_seed(seed)
  return randomized(UNet2DConditionModel(**cfg), seed)


def weight_files(folder) -> list[str]:
  return sorted(n for n in os.listdir(folder) if n.endswith((".safetensors", ".json"))
                and n != "config.json")


# --- IF repositories ---------------------------------------------------------------------------

def build_if_repo(folder, stage: str, spiece_dir: str, seed: int = 0) -> str:
  """A tiny DeepFloyd IF-I (`stage="I"`) or IF-II (`"II"`) repository in the Hub layout.

  IF-II is saved with `text_encoder=None`, as IF-II is run (its prompts are
  embedded by the IF-I T5), so its model_index.json lists the text encoder as
  null; IF-I carries the T5. Only fp16 variant files are written.
  """
  from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline
  from transformers import T5Tokenizer

  folder = pathlib.Path(folder)
  tokenizer = T5Tokenizer.from_pretrained(spiece_dir)
  # IF's published scheduler configs (cascade.IF_*; equal to reference_configs/if_scheduler_*
  # .json, which test_weights_layouts checks when ../shared is there): no ../shared needed.
  from dreambooth_jax import cascade
  table = {"if_scheduler_stage_i.json": cascade.IF_STAGE_I_SCHEDULER,
           "if_scheduler_stage_ii.json": cascade.IF_STAGE_II_SCHEDULER,
           "if_image_noising_scheduler.json": cascade.IF_IMAGE_NOISING_SCHEDULER}
  sched = lambda name: DDPMScheduler.from_config(table[name])
  common = dict(tokenizer=tokenizer, scheduler=None, safety_checker=None, feature_extractor=None,
                watermarker=None, requires_safety_checker=False)
  if stage == "I":
    common.update(scheduler=sched("if_scheduler_stage_i.json"))
    pipe = IFPipeline(text_encoder=tiny_t5(t5_vocab_size(len(tokenizer)), seed + 1),
                      unet=tiny_unet(TINY_IF_I, seed), **common)
  else:
    common.update(scheduler=sched("if_scheduler_stage_ii.json"))
    pipe = IFSuperResolutionPipeline(
        text_encoder=None, unet=tiny_unet(TINY_IF_II, seed),
        image_noising_scheduler=sched("if_image_noising_scheduler.json"), **common)
  # `.to(dtype)` on the pipeline, as a user converting a download does; diffusers warns that
  # from_pretrained(dtype=) is preferred for models that keep float32 modules (IF has none).
  pipe.to(torch.float16)
  pipe.save_pretrained(folder, variant="fp16", max_shard_size=IF_MAX_SHARD)
  # The Hub's tokenizer/ was written by transformers 4, which saved spiece.model; transformers 5
  # writes only tokenizer.json. Readers of spiece.model (ours) need the Hub's layout.
  shutil.copy(os.path.join(spiece_dir, "spiece.model"), folder / "tokenizer" / "spiece.model")
  _check_fp16_only(folder, ("unet", "text_encoder") if stage == "I" else ("unet",))
  return str(folder)


def _check_fp16_only(folder: pathlib.Path, sharded: tuple[str, ...]):
  """The builder's own sanity check: what save_pretrained wrote is the layout we mean to test."""
  for component in ("unet", "text_encoder"):
    if not (folder / component).is_dir():
      continue
    names = weight_files(folder / component)
    stem = STEMS["unet" if component == "unet" else "t5"]
    index = f"{stem}.safetensors.index.fp16.json"
    shards = [n for n in names if re.fullmatch(rf"{stem}\.fp16-\d{{5}}-of-\d{{5}}\.safetensors", n)]
    assert set(names) == {index, *shards}, f"{component}: unexpected files {names}"
    assert component not in sharded or len(shards) >= 2, f"{component} is not sharded: {names}"


# --- every layout of one model -----------------------------------------------------------------

def save_layouts(model, root, kind: str) -> dict[str, str]:
  """`model` (a diffusers UNet or transformers T5, float32) saved in every layout in LAYOUTS.

  Returns {layout: folder}. The fp16 layouts are saved from a float16 copy, so
  they hold only fp16 files; the legacy layout renames the sharded fp16 save
  to diffusers' pre-0.28 names (`<stem>.safetensors.fp16.index.json` over
  `<stem>-00001-of-0000N.fp16.safetensors`), which no installed writer emits.
  """
  root = pathlib.Path(root)
  shard, stem = LAYOUT_SHARD[kind], STEMS[kind]
  half = copy.deepcopy(model).half()
  out = {}
  for layout in LAYOUTS[:4]:
    folder = root / layout
    m = half if layout.startswith("fp16") else model
    kw = dict(max_shard_size=shard) if layout.endswith("sharded") else {}
    m.save_pretrained(folder, variant="fp16" if m is half else None, **kw)
    out[layout] = str(folder)
  for layout, folder in out.items():  # guard against a library changing its naming
    names = weight_files(folder)
    sharded, variant = layout.endswith("sharded"), layout.startswith("fp16")
    assert (len(names) > 2) == sharded, (layout, names)
    assert all((".fp16" in n) == variant for n in names), (layout, names)
  legacy = root / "fp16_sharded_legacy"
  shutil.copytree(out["fp16_sharded"], legacy)
  index_path = legacy / f"{stem}.safetensors.index.fp16.json"
  index = json.loads(index_path.read_text())
  rename = {}
  for name in set(index["weight_map"].values()):
    m = re.fullmatch(rf"{stem}\.fp16-(\d{{5}}-of-\d{{5}})\.safetensors", name)
    rename[name] = f"{stem}-{m.group(1)}.fp16.safetensors"
    os.rename(legacy / name, legacy / rename[name])
  index["weight_map"] = {k: rename[v] for k, v in index["weight_map"].items()}
  (legacy / f"{stem}.safetensors.fp16.index.json").write_text(json.dumps(index, indent=2))
  index_path.unlink()
  out["fp16_sharded_legacy"] = str(legacy)
  return out


# --- folders that hold the wrong model ---------------------------------------------------------

def _shrunk_x4_upscaler(reference_dir) -> dict:
  cfg = reference_config(reference_dir, "sd_x4_upscaler_unet.json")
  cfg.update(block_out_channels=[32, 32, 64, 64], cross_attention_dim=32, norm_num_groups=8,
             layers_per_block=1, attention_head_dim=8, sample_size=16)
  return cfg


def build_x4_upscaler(folder, reference_dir) -> str:
  """stabilityai/stable-diffusion-x4-upscaler at toy width: model_index.json, unet/, vae/,
  scheduler/, low_res_scheduler/ (text_encoder/ and tokenizer/ are left out: not needed)."""
  from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
  folder = pathlib.Path(folder)
  torch.manual_seed(0)
  UNet2DConditionModel(**_shrunk_x4_upscaler(reference_dir)).save_pretrained(folder / "unet")
  vae = reference_config(reference_dir, "sd_x4_upscaler_vae.json")
  vae.update(block_out_channels=[8, 16, 16], norm_num_groups=8, layers_per_block=1)
  AutoencoderKL(**vae).save_pretrained(folder / "vae")
  DDIMScheduler.from_config(reference_config(reference_dir, "sd_x4_upscaler_scheduler.json")
                            ).save_pretrained(folder / "scheduler")
  DDPMScheduler.from_config(reference_config(reference_dir, "sd_x4_upscaler_low_res_scheduler.json")
                            ).save_pretrained(folder / "low_res_scheduler")
  # The Hub's model_index.json (reference_configs/sd_x4_upscaler_scheduler.json, provenance).
  (folder / "model_index.json").write_text(json.dumps({
      "_class_name": "StableDiffusionUpscalePipeline", "_diffusers_version": "0.9.0.dev0",
      "low_res_scheduler": ["diffusers", "DDPMScheduler"], "max_noise_level": 350,
      "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
      "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
  return str(folder)


def build_sd_unet(folder) -> str:
  """A Stable Diffusion 1.x-style text-to-image UNet at toy width (CLIP width 768 kept)."""
  from diffusers import UNet2DConditionModel
  torch.manual_seed(0)
  UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64],
      down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
      up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1,
      cross_attention_dim=768, attention_head_dim=8, norm_num_groups=8).save_pretrained(folder)
  return str(folder)


def build_text_models(root, reference_dir) -> dict[str, str]:
  """Text models that are not IF's T5 encoder, each saved by transformers: {name: folder}."""
  import transformers as tf
  root = pathlib.Path(root)
  small = dict(vocab_size=128)
  clip = reference_config(reference_dir, "sd_x4_upscaler_text_encoder.json")
  clip.update(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
              vocab_size=128)
  models = {
      "mt5": tf.MT5EncoderModel(tf.MT5Config(**small, **TINY_T5)),
      "umt5": tf.UMT5EncoderModel(tf.UMT5Config(**small, **TINY_T5)),
      "clip": tf.CLIPTextModel(tf.CLIPTextConfig(**clip)),
      "llama": tf.LlamaForCausalLM(tf.LlamaConfig(
          **small, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
          num_attention_heads=4, num_key_value_heads=4)),
      "gpt2": tf.GPT2LMHeadModel(tf.GPT2Config(**small, n_embd=32, n_layer=1, n_head=4,
                                                bos_token_id=1, eos_token_id=1)),
      "t5_decoder": tf.T5EncoderModel(tf.T5Config(**small, **TINY_T5)),
  }
  out = {}
  torch.manual_seed(0)
  for name, model in models.items():
    model.save_pretrained(root / name)
    out[name] = str(root / name)
  # A T5 stack configured as a decoder (is_decoder: true), e.g. cut out of a full T5.
  path = root / "t5_decoder" / "config.json"
  path.write_text(json.dumps(dict(json.loads(path.read_text()), is_decoder=True), indent=2))
  return out
