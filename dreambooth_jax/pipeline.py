"""From a config to models: the cascade, the tokenizer and a lazily loaded T5.

Two kinds of model come out of one config:

* `model.kind = "tiny"`: randomly initialised tiny UNets and T5 of the real
  architectures (seeded, so every process and every resume builds the same
  ones) and the packaged tiny SentencePiece model. Runs on CPU in minutes.
* `model.kind = "pretrained"`: DeepFloyd IF stage I/II folders and a T5 v1.1
  folder given in `config.pretrained`; a third 256->1024 stage if given: the
  stabilityai/stable-diffusion-x4-upscaler download (DeepFloyd's public stage
  III, a latent upscaler with its own VAE and CLIP text encoder,
  `dreambooth_jax.upscaler`) or an IF-style pixel SR UNet. `config.tiny.x4_upscaler`
  gives the tiny cascade a tiny random x4 upscaler (`configs/imagen_dog.py:stage3`).

Every stage up to the highest tuned one is part of the cascade (frozen stages
generate the class priors and the low-res inputs of samples), and for samples
the next stage too when it is available.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
from flax import nnx

from dreambooth_jax import cascade as cascade_lib
from dreambooth_jax import config_lib, embeddings, sharding, utils
from dreambooth_jax import lora as lora_lib
from dreambooth_jax import upscaler as upscaler_lib
from dreambooth_jax.models import t5 as t5_lib
from dreambooth_jax.models.layers import KeyGen, random_init
from dreambooth_jax.models.unet import UNetConfig, abstract_unet
from dreambooth_jax.tokenizer import Tokenizer
from dreambooth_jax.weights import load_unet
from dreambooth_jax.weights import preflight as weights_preflight
from dreambooth_jax.weights import sd_upscaler
from dreambooth_jax.weights.t5 import abstract_t5_encoder, load_t5_encoder

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
PRETRAINED_KEYS = {"base": "stage_1", "sr256": "stage_2", "sr1024": "stage_3"}
SCHEDULERS = {"base": cascade_lib.IF_STAGE_I_SCHEDULER, "sr256": cascade_lib.IF_STAGE_II_SCHEDULER,
              "sr1024": cascade_lib.IF_STAGE_II_SCHEDULER}


@dataclasses.dataclass
class Models:
  cascade: cascade_lib.Cascade        # stages load their UNets on first use, sharded
  tokenizer: Tokenizer
  load_t5: Callable[[], nnx.Module]   # loads (or builds) the encoder, sharded, when called
  text_fingerprint: str                # names what determines a prompt's embedding
  weights_fingerprint: str             # names the frozen cascade (for the class-prior cache)
  tuned: tuple[str, ...]               # stages being fine-tuned (or whose loss TI uses)
  t5_width: int                        # d_model: the width of a learned token row
  mesh: jax.sharding.Mesh | None = None  # where weights are placed when loaded
  rules: tuple = sharding.DEFAULT_RULES

  def encode(self, prompts, cache_dir, *, rows=None, t5=None, salt: str = "") -> dict:
    """{prompt: PromptEmbedding} through the prompt cache at `cache_dir`: T5 is loaded
    (onto the mesh) only when a prompt is missing, and released right after unless
    the caller passes its own `t5`. `rows` [K, d] embed learned tokens; their digest
    is part of the cache key, so new rows never read stale entries. `salt` names
    what else makes a given `t5` differ from the config's (LoRA adapters' digest)."""
    cache = embeddings.PromptEmbeddingCache(cache_dir)
    load = (lambda: t5) if t5 is not None else self.load_t5
    encode = lambda ps: embeddings.encode_prompts(load(), self.tokenizer, ps, mesh=self.mesh,
                                                  learned_rows=rows)
    fingerprint = self.text_fingerprint
    if rows is not None:
      fingerprint = utils.fingerprint([fingerprint, np.asarray(rows).tobytes().hex()])
    if salt:
      fingerprint = utils.fingerprint([fingerprint, salt])
    return cache.get_or_compute(prompts, encode, fingerprint)


def _dtype(name: str):
  try:
    return jnp.dtype(name)
  except TypeError as e:
    raise config_lib.ConfigError(f"unknown dtype {name!r}; use float32 or bfloat16") from e


def tiny_unet_config(name: str, config: ml_collections.ConfigDict) -> UNetConfig:
  """IF-I / IF-II architectures at toy width (every IF feature on)."""
  t, res = config.tiny, config.cascade[name].resolution
  if name == "base":
    ch = t.unet_channels
    return UNetConfig.from_diffusers(dict(
        sample_size=res, in_channels=3, out_channels=6, block_out_channels=[ch, 2 * ch],
        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
        layers_per_block=1, attention_head_dim=16, cross_attention_dim=2 * ch,
        encoder_hid_dim=t.t5_d_model, addition_embed_type="text", addition_embed_type_num_heads=4,
        act_fn="gelu", norm_num_groups=8, resnet_time_scale_shift="scale_shift",
        cross_attention_norm="group_norm"), source=f"tiny {name}")
  ch = t.sr_channels
  return UNetConfig.from_diffusers(dict(
      sample_size=res, in_channels=6, out_channels=6, block_out_channels=[ch, 2 * ch, 4 * ch],
      down_block_types=["ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
      up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"],
      layers_per_block=1, attention_head_dim=16, cross_attention_dim=4 * ch,
      encoder_hid_dim=t.t5_d_model, addition_embed_type="text", addition_embed_type_num_heads=4,
      class_embed_type="timestep", time_embedding_dim=8 * ch, time_embedding_act_fn="gelu",
      act_fn="gelu", norm_num_groups=8, resnet_time_scale_shift="scale_shift",
      resnet_skip_time_act=True, resnet_out_scale_factor=1.4142271248762552,
      mid_block_scale_factor=1.4142271248762552, cross_attention_norm="group_norm"),
      source=f"tiny {name}")


def _stage_names(config, tuned: tuple[str, ...]) -> list[str]:
  order = list(config_lib.STAGES)
  last = max(order.index(s) for s in tuned)
  if config.model.kind == "tiny":
    last = max(last, 2 if tiny_x4_upscaler(config) else 1)  # samples show base and sr256 (+ III)
    return order[:last + 1]
  names = []
  for i, name in enumerate(order):
    given = bool(config.pretrained[PRETRAINED_KEYS[name]])
    if i <= last and not given:
      raise config_lib.ConfigError(
          f"stage {name!r} is needed (stages={config.stages!r}) but "
          f"config.pretrained.{PRETRAINED_KEYS[name]} is empty: pass "
          f"--config.pretrained.{PRETRAINED_KEYS[name]}=/path/to/model")
    if given and (i <= last or names == order[:i]):
      names.append(name)
  return names


def stage_names(config) -> list[str]:
  """The stages `build(config)` makes, in order, from the config alone (no folder read)."""
  return _stage_names(config, config_lib.parse_stages(config.stages))


def tiny_x4_upscaler(config) -> bool:
  """Whether the tiny cascade's sr1024 is a tiny x4 latent upscaler (`config.tiny.x4_upscaler`,
  opt-in: a third stage to compile would slow every tiny run and test)."""
  return config.model.kind == "tiny" and bool(config.get("tiny", {}).get("x4_upscaler", False))


def check_pretrained_folders(config) -> weights_preflight.Preflight | None:
  """Checks every pretrained folder a config names before any data or model work.

  Reads configs and safetensors headers only (milliseconds): each UNet is the kind
  its stage needs, every tensor name and shape matches its config, every shard is
  there, T5's width fits the UNets and the tokenizer fits T5. All broken folders
  are reported at once; None for the tiny models.
  """
  if config.model.kind != "pretrained":
    return None
  tuned = config_lib.parse_stages(config.stages)
  for key in ("t5", "tokenizer"):
    if not config.pretrained[key]:
      raise config_lib.ConfigError(f"config.pretrained.{key} is empty: pass the folder of the "
                                   "T5 v1.1 XXL encoder / its tokenizer (spiece.model), e.g. "
                                   "IF-I-XL-v1.0/text_encoder and IF-I-XL-v1.0/tokenizer")
  unets = {PRETRAINED_KEYS[n]: config.pretrained[PRETRAINED_KEYS[n]] for n in _stage_names(config, tuned)}
  return weights_preflight.check_pretrained(unets, t5=config.pretrained.t5,
                                            tokenizer=config.pretrained.tokenizer)


def rules_of(config) -> tuple:
  """The logical sharding rules of a config: `config.sharding_rules` or the defaults."""
  rules = config.get("sharding_rules")
  if not rules:
    return sharding.DEFAULT_RULES
  if isinstance(rules, str):  # older workdirs stored the rules as a JSON string
    rules = json.loads(rules)
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> Models:
  """The cascade, the tokenizer and the T5 loader of a config; nothing heavy is loaded.

  Weights load when first used, each tensor straight into the sharding its logical
  axes give on `mesh` (default: every device on fsdp), so no device ever holds a
  whole multi-GiB UNet or T5 and host memory stays at about one tensor.
  """
  tuned = config_lib.parse_stages(config.stages)
  if config.model.kind not in ("tiny", "pretrained"):
    raise config_lib.ConfigError(f"config.model.kind={config.model.kind!r}: use tiny or pretrained")
  checked = check_pretrained_folders(config)
  mesh = mesh if mesh is not None else sharding.make_mesh()
  rules = rules_of(config)
  dtype, param_dtype = _dtype(config.model.dtype), unet_param_dtype(config)
  tiny = config.model.kind == "tiny"
  text_mask = bool(config.model.get("unet_text_mask", False))
  stages, prints = [], []
  names = _stage_names(config, tuned)
  for i, name in enumerate(names):
    if name == "sr1024" and (tiny_x4_upscaler(config) if tiny else checked.upscaler is not None):
      stage3, print_ = _x4_upscaler_stage(config, name, names[i - 1], tuned, checked, mesh, rules)
      stages.append(stage3)
      prints.append(print_)
      continue
    if tiny:
      cfg = tiny_unet_config(name, config)
      load = functools.partial(_tiny_unet_params, cfg, config.tiny.seed * 100 + i, mesh, rules,
                               dtype=dtype, param_dtype=param_dtype, remat=config.model.remat)
      sched = SCHEDULERS[name]
      prints.append(f"tiny:{name}:{config.tiny.seed}:{cfg}")
    else:
      found = checked.unets[PRETRAINED_KEYS[name]]
      folder, cfg = found.folder, found.config
      load = functools.partial(_pretrained_unet_params, folder, cfg, mesh, rules, dtype=dtype,
                               param_dtype=param_dtype, remat=config.model.remat)
      sched = cascade_lib.scheduler_config_for(folder, SCHEDULERS[name])
      prints.append(_folder_fingerprint(folder))
    prints.append(f"text_mask={text_mask}")
    if param_dtype != _dtype(config.model.param_dtype):  # LoRA's frozen UNets in another dtype
      prints.append(f"param_dtype={param_dtype}")
    stages.append(stage(config, name, cfg, scheduler=sched, lowres_from=names[i - 1] if i else None,
                        load_params=load))
  tokenizer = make_tokenizer(config)
  t5_dtype = _dtype(config.model.t5_dtype)
  if tiny:
    t5_config = tiny_t5_config(config, tokenizer)
    load_t5 = functools.partial(_tiny_t5, t5_config, config.tiny.seed + 7, t5_dtype, mesh, rules)
    text_print = embeddings.encoder_fingerprint(load_t5(), tokenizer, dtype=str(t5_dtype))
    width = t5_config.d_model
  else:
    # remat: textual inversion backpropagates through the frozen T5-XXL.
    folder = checked.t5.folder
    load_t5 = lambda: load_t5_encoder(
        folder, t5_dtype, remat=config.model.remat,
        place=sharding.placer(nnx.state(abstract_t5_encoder(folder, t5_dtype)), mesh, rules, t5_dtype))
    text_print = embeddings.encoder_fingerprint(folder, tokenizer, dtype=str(t5_dtype))
    width = checked.t5.config.d_model
  weights_print = hashlib.sha256("\n".join(prints + [text_print]).encode()).hexdigest()[:32]
  learned = config.get("learned_token", {}).get("text")
  if learned:  # after the fingerprints: a learned token changes no plain prompt
    tokenizer = tokenizer.with_learned_tokens([learned])
  return Models(cascade_lib.Cascade(stages), tokenizer, load_t5, text_print, weights_print, tuned,
                width, mesh, rules)


def unet_param_dtype(config):
  """What the UNets are stored in: `config.model.param_dtype`, or with LoRA (every UNet
  frozen) `config.lora.base_dtype` when set."""
  s = lora_lib.settings(config)  # validates config.lora before anything is built
  return _dtype((s.base_dtype if s else "") or config.model.param_dtype)


def stage(config, name: str, unet_config: UNetConfig, *, scheduler, lowres_from: str | None = None,
          load_params=None) -> cascade_lib.Stage:
  """Stage `name` of a config on an abstract UNet (nothing allocated): its settings, its
  scheduler, and `load_params` to load its weights on first use. `lowres_from` names
  the stage an SR stage upsamples."""
  m = config.model
  abstract = abstract_unet(unet_config, dtype=_dtype(m.dtype), param_dtype=unet_param_dtype(config),
                           remat=m.remat)
  return cascade_lib.Stage(
      name, abstract, stage_settings(config, name), scheduler_config=scheduler,
      load_params=load_params,
      lowres_resolution=None if lowres_from is None else config.cascade[lowres_from].resolution)


def stage_settings(config, name: str) -> cascade_lib.StageSettings:
  """Stage `name`'s sampling and training settings from `config.cascade[name]`."""
  s = config.cascade[name]
  return cascade_lib.StageSettings(
      resolution=s.resolution, guidance_scale=s.guidance_scale, num_steps=s.num_steps,
      sampler=s.sampler, sample_aug_level=s.sample_aug_level, train_aug_level=s.train_aug_level,
      # A config saved before these keys existed gets the dataclass's defaults.
      weighting=s.get("weighting", cascade_lib.StageSettings.weighting),
      min_snr_gamma=s.get("min_snr_gamma", cascade_lib.StageSettings.min_snr_gamma),
      colour_fix=bool(s.get("colour_fix", False)),
      text_mask=bool(config.model.get("unet_text_mask", False)))


def check_x4_tuning(config, name: str = "sr1024") -> None:
  """What tuning the x4 upscaler (`stages=...+sr1024`) supports: full fine-tuning of its
  UNet with the DreamBooth loss. Learned T5 tokens cannot reach it (its prompts go
  through its own CLIP), and LoRA on it is not built."""
  why = None
  if config.method in ("textual_inversion", "ti_then_finetune"):
    why = (f"config.method={config.method!r} learns a T5 token row, but the x4 upscaler reads "
           "its prompts through its own CLIP text encoder, which the row never reaches")
  elif lora_lib.settings(config) is not None:
    why = "LoRA adapters on the x4 upscaler's UNet are not implemented (set lora.rank=0)"
  if why:
    raise config_lib.ConfigError(
        f"config.stages={config.stages!r} fine-tunes {name}, the x4 latent upscaler: {why}; "
        f"or drop {name} from config.stages and let it sample 256 -> 1024 frozen")


def _x4_upscaler_stage(config, name, lowres_from, tuned, checked, mesh, rules):
  """(stage, fingerprint) of Stage III as Stable Diffusion's x4 latent upscaler: the
  stage_3 download, or a tiny random one. Tuned (`stages=...+sr1024`), its UNet learns
  in latent space (`LatentUpscaleStage.loss`) at `train_aug_level`'s noise level."""
  if name in tuned:
    check_x4_tuning(config, name)
  settings, low = stage_settings(config, name), config.cascade[lowres_from].resolution
  dtype, param_dtype = _dtype(config.model.dtype), unet_param_dtype(config)
  try:
    if checked is None:
      stage3, print_ = upscaler_lib.tiny_stage(
          name, settings, lowres_resolution=low, seed=config.tiny.seed, mesh=mesh, rules=rules,
          dtype=dtype, param_dtype=param_dtype)
    else:
      folder = checked.upscaler.folder
      stage3 = upscaler_lib.load_stage(name, folder, settings, lowres_resolution=low, mesh=mesh,
                                       rules=rules, dtype=dtype, param_dtype=param_dtype,
                                       remat=config.model.remat)
  except ValueError as e:  # settings the upscaler cannot take (resolution, noise level)
    raise config_lib.ConfigError(str(e)) from e
  if name in tuned:  # checked at build, not at the first step
    try:
      stage3.train_noise_level()
    except ValueError as e:
      raise config_lib.ConfigError(
          f"config.cascade.{name}.train_aug_level={settings.train_aug_level}: {e}") from e
  if checked is None:
    return stage3, print_
  parts = (sd_upscaler.resolve(folder, part) for part in ("unet", "vae", "text_encoder"))
  return stage3, "x4_upscaler:" + ":".join(_folder_fingerprint(p) for p in parts)


def _tiny_unet_params(cfg, seed, mesh, rules, *, dtype, param_dtype, remat):
  abstract = abstract_unet(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat)
  place = sharding.placer(nnx.state(abstract), mesh, rules)  # host values straight to shards
  return nnx.state(random_init(abstract, seed, place=place))


def _pretrained_unet_params(folder, cfg, mesh, rules, *, dtype, param_dtype, remat):
  abstract = nnx.state(abstract_unet(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat))
  unet = load_unet(folder, param_dtype, compute_dtype=dtype, remat=remat,
                   place=sharding.placer(abstract, mesh, rules, param_dtype))
  return nnx.state(unet)


def _tiny_t5(t5_config, seed, dtype, mesh, rules):
  abstract = nnx.eval_shape(lambda: t5_lib.T5EncoderModel(t5_config, dtype=dtype, param_dtype=dtype,
                                                          rngs=KeyGen(0)))
  return random_init(abstract, seed, place=sharding.placer(nnx.state(abstract), mesh, rules))


def tiny_t5_config(config, tokenizer: Tokenizer) -> t5_lib.T5Config:
  t = config.tiny
  return t5_lib.T5Config(vocab_size=tokenizer.vocab_size, d_model=t.t5_d_model,
                         d_kv=t.t5_d_model // t.t5_heads, d_ff=t.t5_d_ff, num_layers=t.t5_layers,
                         num_heads=t.t5_heads, feed_forward_proj="gated-gelu")


def make_tokenizer(config) -> Tokenizer:
  """The config's T5 tokenizer (the packaged tiny one, or the pretrained folder's), with
  its prompt preprocessing."""
  # Configs saved before prompt preprocessing existed ran prompts as typed.
  mode = config.model.get("prompt_preprocessing", "none")
  if config.model.kind == "tiny":
    folder = config.tiny.tokenizer or os.path.join(ASSETS, "tiny_t5")
  else:  # a tokenizer/ folder, or the pipeline folder holding one (checked by the preflight)
    folder = weights_preflight.check_tokenizer_folder(config.pretrained.tokenizer).folder
  return Tokenizer.from_pretrained(folder, preprocess=mode)


def _folder_fingerprint(folder: str) -> str:
  h = hashlib.sha256()
  embeddings.hash_weights_folder(h, folder)  # config, headers and sampled bytes
  return h.hexdigest()


def stage_info(models: Models) -> dict:
  """JSON-able description of the cascade, for logs and the export."""
  return {s.name: dict(resolution=s.settings.resolution, tuned=s.name in models.tuned,
                       super_resolution=s.is_sr) for s in models.cascade.stages}
