"""The programs `plan_tpu.py` compiles, on abstract models: configs, meshes, stages, lowerings.

Nothing here allocates: stages are `pipeline.stage`s built from the full-size
reference configs (or tiny ones of the same architectures with `--tiny`), their
parameters `ShapeDtypeStruct`s, and every program is lowered on abstract
arguments carrying the shardings the trainer gives them. `plan_compiled.py`
reads the numbers off the compiled programs; `plan_tpu.py` is the command.

  train   the trainer's own step (`methods.make_train_step`), state and shardings from
          `state.setup`, batch laid out by `state.batch_layout`, state donated;
  encode  `embeddings.encode_batch`, the T5 v1.1 XXL pass over a padded 77-token batch;
  sample  one classifier-free-guided UNet call (`samplers.guided_output`, batch 2x) on the
          class-prior batch, as `priors` / `Cascade.sample` run it, frozen params.

Each is traced as the TPU program would be (`as_on_tpu`): attention without the
CPU backend's query chunks, and the mesh set so the UNets pin activations to the
batch axes.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))
from configs import imagen_dog  # noqa: E402
from dreambooth_jax import cascade as cascade_lib  # noqa: E402
from dreambooth_jax import embeddings, lora, methods, pipeline, samplers, sharding  # noqa: E402
from dreambooth_jax import state as state_lib  # noqa: E402
from dreambooth_jax.models import t5 as t5_lib  # noqa: E402
from dreambooth_jax.models import unet as unet_lib  # noqa: E402
from dreambooth_jax.weights.t5 import abstract_t5_encoder  # noqa: E402

STAGE_OF = {"if-i-xl": ("base",), "if-ii-l": ("sr256",), "both": ("base", "sr256")}
TEXT_LEN = 77  # IF's T5 max length


# ----------------------------------------------------------------------------
# Config, mesh and abstract models
# ----------------------------------------------------------------------------

def reference_configs_dir(args) -> pathlib.Path:
  value = args.configs or os.environ.get("DREAMBOOTH_REFERENCE_CONFIGS")
  return pathlib.Path(value) if value else ROOT.parent / "shared" / "reference_configs"


def make_config(args):
  """The `if` config (the `tiny` one with --tiny) with this run's overrides."""
  config = imagen_dog.get_config("tiny" if args.tiny else "if")
  m = config.model
  m.remat = m.remat if args.remat is None else args.remat
  m.param_dtype = args.param_dtype or m.param_dtype
  m.dtype = args.dtype or m.dtype
  if args.tiny:  # the tiny config computes in float32; plan the TPU precision anyway
    m.dtype = args.dtype or "bfloat16"
  config.train.batch_size, config.train.prior_batch_size = args.batch, args.prior_batch
  config.train.optimizer = args.optimizer or config.train.optimizer
  config.stages = "+".join(STAGE_OF.get(args.model, ("base",)))
  config.lora.rank, config.lora.targets = args.lora, args.lora_targets
  if args.lora_base_dtype is not None:
    config.lora.base_dtype = args.lora_base_dtype
  return config


def mesh_shape(layout: str) -> dict:
  if layout == "fsdp":
    return {"data": 1, "fsdp": -1, "tensor": 1}
  if layout == "data":
    return {"data": -1, "fsdp": 1, "tensor": 1}
  out = {}
  for part in layout.split(","):
    k, v = part.split("=")
    out[k.strip()] = int(v)
  return out


def tiny_unet_config(name: str, width: int) -> unet_lib.UNetConfig:
  """IF-I / IF-II features (added-KV attention, text pooling, scale-shift, SR class embedding)
  in one 32-channel level: the smallest graph that still has them, so the test compiles fast."""
  d = dict(in_channels=3, out_channels=6, block_out_channels=[32], layers_per_block=1,
           down_block_types=["SimpleCrossAttnDownBlock2D"],
           up_block_types=["SimpleCrossAttnUpBlock2D"], attention_head_dim=16,
           cross_attention_dim=32, encoder_hid_dim=width, addition_embed_type="text",
           addition_embed_type_num_heads=2, act_fn="gelu", norm_num_groups=4,
           resnet_time_scale_shift="scale_shift", cross_attention_norm="group_norm")
  if name != "base":
    d.update(in_channels=6, class_embed_type="timestep", resnet_skip_time_act=True)
  return unet_lib.UNetConfig.from_diffusers(d, source=f"plan tiny {name}")


def unet_config(args, config, name: str) -> unet_lib.UNetConfig:
  if args.tiny:
    return tiny_unet_config(name, config.tiny.t5_d_model)
  file = {"base": "if_i_xl_unet.json", "sr256": "if_ii_l_unet.json"}[name]
  with open(reference_configs_dir(args) / file) as f:
    d = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
  return unet_lib.UNetConfig.from_diffusers(d, source=file)


def abstract_stage(args, config, name: str) -> cascade_lib.Stage:
  """The stage `pipeline.build` makes (`pipeline.stage`), nothing allocated."""
  return pipeline.stage(config, name, unet_config(args, config, name),
                        scheduler=pipeline.SCHEDULERS[name], lowres_from=None if name == "base" else "base")


def t5_config(args, config) -> t5_lib.T5Config:
  if args.tiny:
    tok = pipeline.make_tokenizer(config)
    return pipeline.tiny_t5_config(config, tok)
  return reference_configs_dir(args) / "t5_v1_1_xxl.json"


def text_width(args, config) -> int:
  cfg = t5_config(args, config)
  if isinstance(cfg, t5_lib.T5Config):
    return cfg.d_model
  with open(cfg) as f:
    return int(json.load(f)["d_model"])


def with_sharding(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


# ----------------------------------------------------------------------------
# The three programs, lowered on abstract arguments
# ----------------------------------------------------------------------------

def lower_train(args, config, mesh, rules):
  """The trainer's jitted step on the trainer's abstract state and batch layout
  (`state.setup`, `state.batch_layout`: the functions `train.run` uses)."""
  width = text_width(args, config)
  stages = lora.wrap(config, {n: abstract_stage(args, config, n) for n in STAGE_OF[args.model]})
  ps = state_lib.setup(config, stages, methods.phases(config)[0], mesh, rules, num_tokens=0,
                       token_width=width)
  # LoRA: the frozen UNets are the step's third argument, as `train.run` passes them.
  frozen = {n: s.stage.abstract_params for n, s in stages.items() if isinstance(s, lora.LoRAStage)}
  frozen_sh = {n: sharding.param_shardings(p, mesh, rules) for n, p in frozen.items()}
  t = config.train
  batch, batch_sh = state_lib.batch_layout(
      mesh, {n: s.settings.resolution for n, s in stages.items()}, batch_size=t.batch_size,
      prior_batch_size=t.prior_batch_size, grad_accum=t.grad_accum, text_width=width)
  step = jax.jit(methods.make_train_step(stages, ps.tx, config.prior.weight),
                 in_shardings=(ps.shardings, batch_sh, frozen_sh), out_shardings=(ps.shardings, None),
                 donate_argnums=(0,))
  state = state_lib.with_shardings(ps.abstract, ps.shardings)
  split = state_lib.batch_split(mesh, t.batch_size, t.prior_batch_size)
  how = f"LoRA r={config.lora.rank}" if frozen else "train"
  desc = (f"{'+'.join(stages)} {how} {t.batch_size}+{t.prior_batch_size} img "
          f"({'batch split' if split else 'batch replicated'})")
  lowered = step.lower(state, with_sharding(batch, batch_sh), with_sharding(frozen, frozen_sh))
  return lowered, state["params"], desc


def lower_encode(args, config, mesh, rules):
  """`embeddings.encode_batch` on T5 with sharded params, as `encode_prompts` places them."""
  dtype = jnp.dtype(config.model.t5_dtype)
  t5 = (nnx.eval_shape(lambda: t5_lib.T5EncoderModel(t5_config(args, config), dtype=dtype,
                                                     param_dtype=dtype, rngs=nnx.Rngs(0)))
        if args.tiny else abstract_t5_encoder(t5_config(args, config), dtype))
  graphdef, params = nnx.split(t5)
  params = with_sharding(params, sharding.param_shardings(params, mesh, rules))
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  b = -(-args.encode_batch // shards) * shards
  batch_sh = sharding.batch_sharding(mesh, (b, TEXT_LEN))
  ids = jax.ShapeDtypeStruct((b, TEXT_LEN), jnp.int32, sharding=batch_sh)
  lowered = embeddings.encode_batch.lower(params, None, ids, ids, graphdef=graphdef, mesh=mesh)
  return lowered, params, f"t5 encode {b}x{TEXT_LEN} ({config.model.t5_dtype})"


def lower_sample(args, config, mesh, rules):
  """One guided denoising call per stage, on the class-prior sampling batch."""
  width = text_width(args, config)
  b = args.sample_batch or config.prior.batch_size
  batch_sh = lambda ndim: sharding.batch_sharding(mesh, (b,) + (1,) * (ndim - 1))
  stages = {n: abstract_stage(args, config, n) for n in STAGE_OF[args.model]}
  params = {n: with_sharding(s.params, sharding.param_shardings(s.params, mesh, rules))
            for n, s in stages.items()}
  inputs = {}
  for name, s in stages.items():
    r = s.settings.resolution
    prompt = {"text": jax.ShapeDtypeStruct((b, TEXT_LEN, width), jnp.float32,
                                           sharding=batch_sh(3)),
              "mask": jax.ShapeDtypeStruct((b, TEXT_LEN), jnp.int32, sharding=batch_sh(2))}
    if s.is_sr:  # the low-res image and its augmentation level ride in the conditioning
      prompt["lowres"] = jax.ShapeDtypeStruct((b, r, r, s.channels), jnp.float32,
                                              sharding=batch_sh(4))
      prompt["aug"] = jax.ShapeDtypeStruct((b,), jnp.float32, sharding=batch_sh(1))
    inputs[name] = dict(x=jax.ShapeDtypeStruct((b, r, r, s.channels), jnp.float32,
                                               sharding=batch_sh(4)),
                        cond=prompt, uncond=prompt)

  def guided(params, inputs, t):
    return {n: samplers.guided_output(lambda x, tt, c: s.apply(params[n], x, tt, c),
                                      inputs[n]["x"], t, inputs[n]["cond"], inputs[n]["uncond"],
                                      s.settings.guidance_scale)
            for n, s in stages.items()}

  lowered = jax.jit(guided).lower(params, inputs, jax.ShapeDtypeStruct((), jnp.float32))
  return lowered, params, f"{'+'.join(stages)} sample step CFG {b}x2 img"


LOWER = dict(train=lower_train, encode=lower_encode, sample=lower_sample)


def lower(kind: str, args, config, mesh, rules):
  """(lowered, params, description) of `kind`, traced as the TPU program would be."""
  return as_on_tpu(mesh, lambda: LOWER[kind](args, config, mesh, rules))


def as_on_tpu(mesh, lower_fn):
  """`lower_fn()` traced as the TPU program would be."""
  # Attention as a TPU runs it: the CPU backend's query chunking (a lax.map whose
  # backward keeps every chunk's probabilities) is not part of the TPU program.
  unet_lib.CHUNK_QUERIES = False
  try:
    with jax.set_mesh(mesh):  # as the trainer traces: UNets pin activations' batch axis
      return lower_fn()
  finally:
    unet_lib.CHUNK_QUERIES = None

