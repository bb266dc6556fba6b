r"""TPUv4 memory and time plan for full-size IF fine-tuning, from CPU ahead-of-time compiles.

  python experiments/plan_tpu.py                                   # IF-I-XL + IF-II-L step, v4-8
  python experiments/plan_tpu.py --optimizer=adamw                 # ... with AdamW on both
  python experiments/plan_tpu.py --model=if-i-xl --mesh=v4-32 --param_dtype=bfloat16 --no-remat
  python experiments/plan_tpu.py --model=t5 --what=encode          # T5-XXL embedding pass
  python experiments/plan_tpu.py --model=if-i-xl --what=sample     # one guided prior-sampling step
  python experiments/plan_tpu.py --what=cascade     # the 3-stage sampler to 1024 px, per image
  python experiments/plan_tpu.py --tiny --json=/tmp/plan.json      # tiny models, 4 devices (test)
  python experiments/plan_tpu.py --model=if-i-xl --topology=v5e-1 --lora=16 --xla_report
                                   # ... and how much of temp is XLA:CPU's f32 weight copies

Nothing is allocated: every parameter, optimiser leaf and input is a
`ShapeDtypeStruct` carrying the sharding `dreambooth_jax.train` would give it,
and `jax.jit(...).lower(...).compile()` runs on fake CPU devices
(`--xla_force_host_platform_device_count`, set before jax is imported) laid out
like a TPUv4 slice: v4-8 = 4 chips, v4-32 = 16 chips, 32 GiB HBM each.

What is compiled (`--what`):
  train   the trainer's own step (`methods.make_train_step`), state and shardings from
          `state.setup`, batch laid out by `state.batch_layout` (micro-batch axis, batch
          axis over the data axes when it divides), state donated, as `train.run` does;
  encode  `embeddings.encode_batch`, the T5 v1.1 XXL pass over a padded 77-token batch;
  sample  one classifier-free-guided UNet call (`samplers.guided_output`, batch 2x) on the
          class-prior batch, as `priors` / `Cascade.sample` run it, frozen params;
  cascade the three-stage sampler to 1024 px (IF-I-XL, IF-II-L, then the SD x4 upscaler with
          its CLIP text encoder and VAE decode; `plan_sampler.py`): every program it runs,
          per-device peak of each phase with the weights resident by then, and time per
          1024 px image (`--model` does not apply).

Reported numbers come from the compiled object:
  * param bytes / device: each parameter's shard shape under `compiled.input_shardings`;
  * peak / device = argument + output - alias + temp bytes of `compiled.memory_analysis()`
    (the SPMD-partitioned module is one device's program, so these are per device);
  * FLOPs: `compiled.cost_analysis()` is also per device (per partition); the script checks
    it against the unpartitioned `lowered.cost_analysis()` and prints both.
Projected time = FLOPs per device / (MFU x 275 TFLOP/s), TPUv4's bf16 peak per chip. The
FLOPs are the ones the compiled program executes, so rematerialised forwards count.

The program is traced as a TPU would run it: attention without the CPU backend's query
chunks, the mesh set (`jax.set_mesh`) so the UNets pin activations to the batch axes,
and XLA:CPU's memory-minimising scheduler instead of its concurrency-optimised default.

Caveats: XLA:CPU is not XLA:TPU. Its fusion and buffer assignment differ, it computes
bfloat16 ops in float32 (extra converted copies in `temp`), all-reduces gradients where a
TPU reduce-scatters, and copies donated state it could update in place, so peaks are an
estimate (pessimistic on temp, exact on arguments). Allow ~1-2 GiB of HBM for the runtime
and program. The compile of a full-size step takes minutes and several GiB of RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

# name: (JAX devices, memory per device in GiB, bf16 dense peak FLOP/s per device). TPU
# v2/v3 expose each of a chip's two cores as a device (v2-8: 8 devices of 8 GiB, Colab's
# TPU); v4 and v5e one device per chip. A GPU is one device of its memory: gpu-80 an
# A100/H100 80 GB (priced as an A100), gpu-40 an A100 40 GB, gpu-24 an L4/A10G/RTX 4090.
TOPOLOGIES = {
    "v4-8": (4, 32.0, 275e12), "v4-32": (16, 32.0, 275e12),
    "v5e-1": (1, 16.0, 197e12), "v5e-8": (8, 16.0, 197e12),
    "v2-8": (8, 8.0, 22.5e12), "v3-8": (8, 16.0, 61.5e12),
    "gpu-80": (1, 80.0, 312e12), "gpu-40": (1, 40.0, 312e12), "gpu-24": (1, 24.0, 121e12),
}
SLICES = {name: t[0] for name, t in TOPOLOGIES.items()}
HBM_GIB = 32.0      # of the chosen topology; set in parse_args
PEAK_FLOPS = 275e12
GIB = 1024 ** 3
MODELS = ("if-i-xl", "if-ii-l", "both", "t5")
STAGE_OF = {"if-i-xl": ("base",), "if-ii-l": ("sr256",), "both": ("base", "sr256")}
TEXT_LEN = 77  # IF's T5 max length


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", choices=MODELS, default="both",
                 help="if-i-xl (base, 64 px), if-ii-l (sr256, 256 px), both (tuned together), t5")
  p.add_argument("--what", default="train", help="comma list of train, encode, sample, cascade")
  p.add_argument("--topology", "--mesh", dest="mesh", choices=tuple(TOPOLOGIES), default="v4-8",
                 help="devices, memory and peak FLOP/s: " + ", ".join(TOPOLOGIES))
  p.add_argument("--lora", type=int, default=0,
                 help="LoRA rank (0 = full fine-tuning); the frozen UNets are stored in "
                      "config.lora.base_dtype (bfloat16 for `if`)")
  p.add_argument("--lora_targets", default="attention", help="config.lora.targets")
  p.add_argument("--lora_base_dtype", default=None, help="config.lora.base_dtype (default: the "
                 "config's, bfloat16)")
  p.add_argument("--layout", default="fsdp",
                 help="fsdp (all chips on fsdp, the config default), data (all on data: "
                      "replicated params), or explicit 'data=1,fsdp=2,tensor=2'")
  p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                 help="rematerialise UNet blocks (default: the config's, on)")
  p.add_argument("--param_dtype", choices=("float32", "bfloat16"), default=None,
                 help="master weights and Adam moments (default: the config's, float32)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="compute dtype (default: the config's, bfloat16)")
  p.add_argument("--optimizer", default=None,
                 help="config.train.optimizer, e.g. adamw or 'base=adafactor,sr256=adamw' "
                      "(default: the config's, the latter)")
  p.add_argument("--batch", type=int, default=4, help="instance images per step")
  p.add_argument("--prior_batch", type=int, default=4, help="class-prior images per step")
  p.add_argument("--sample_batch", type=int, default=None,
                 help="images per prior-sampling call (default: config.prior.batch_size, 16)")
  p.add_argument("--encode_batch", type=int, default=8, help="prompts per T5 call (rounded up)")
  p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation")
  p.add_argument("--steps", type=int, default=1000, help="steps for the projected run time")
  p.add_argument("--tiny", action="store_true",
                 help="tiny UNet/T5 configs of the same architectures (the test; seconds)")
  p.add_argument("--devices", type=int, default=None,
                 help="fake devices (default: the slice's chips; --tiny: 4)")
  p.add_argument("--configs", default=None,
                 help="reference_configs folder (default $DREAMBOOTH_REFERENCE_CONFIGS or "
                      "../shared/reference_configs)")
  p.add_argument("--json", default=None, help="also write the rows here")
  p.add_argument("--xla_report", action="store_true",
                 help="read XLA's buffer report of the train step: how much of temp is float32 "
                      "copies of bf16 weights, which XLA:CPU makes and a TPU does not")
  p.add_argument("--phases", action=argparse.BooleanOptionalAction, default=True,
                 help="also print every phase of a run (load, encode, sample, train, "
                      "checkpoint, export); --what=train,encode,sample gives all of them")
  args = p.parse_args(argv)
  args.what = tuple(w.strip() for w in args.what.split(",") if w.strip())
  bad = set(args.what) - {"train", "encode", "sample", "cascade"}
  if bad:
    p.error(f"--what: unknown {sorted(bad)}")
  if args.model == "t5":
    args.what = ("encode",)
  if args.devices is None:
    args.devices = 4 if args.tiny else SLICES[args.mesh]
  global HBM_GIB, PEAK_FLOPS
  _, HBM_GIB, PEAK_FLOPS = TOPOLOGIES[args.mesh]
  return args


if __name__ == "__main__":
  # Fake devices must be requested before jax is imported (and only for our own process).
  _ARGS = parse_args()
  # XLA:CPU's default scheduler favours concurrency: it hoisted every FSDP all-gather
  # to the start of the step, holding all gathered weights at once (IF-I-XL: 49.9
  # GiB/chip instead of 27.9). TPU's scheduler is memory-aware; so is this one.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_ARGS.devices}"
                             " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()
  if _ARGS.xla_report:
    import tempfile
    import xla_memory_report  # this folder's: sys.path[0] is the script's
    os.environ["DREAMBOOTH_XLA_DUMP"] = tempfile.mkdtemp(prefix="plan_tpu_xla_")
    os.environ["XLA_FLAGS"] += xla_memory_report.dump_flags(os.environ["DREAMBOOTH_XLA_DUMP"])
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import math  # noqa: E402
import pathlib  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import imagen_dog  # noqa: E402
from dreambooth_jax import cascade as cascade_lib  # noqa: E402
from dreambooth_jax import embeddings, lora, methods, pipeline, samplers, sharding  # noqa: E402
from dreambooth_jax import state as state_lib  # noqa: E402
from dreambooth_jax.models import t5 as t5_lib  # noqa: E402
from dreambooth_jax.models import unet as unet_lib  # noqa: E402
from dreambooth_jax.weights.t5 import abstract_t5_encoder  # noqa: E402
import plan_sampler  # noqa: E402  (this folder's: sys.path[0] is the script's)


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


# ----------------------------------------------------------------------------
# Numbers from the compiled object
# ----------------------------------------------------------------------------

def _cost(obj) -> dict:
  cost = obj.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per partition/program
    cost = cost[0] if cost else {}
  return dict(cost or {})


def shard_bytes(x, sh) -> int:
  """Bytes of one device's shard of `x` under sharding `sh`."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return 8 * math.prod(x.shape)  # a threefry key is two uint32
  return math.prod(sh.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize


def param_bytes_per_device(params, compiled, argnum: int = 0, key=None) -> int:
  """Parameter bytes on one device, from the compiled program's input shardings."""
  in_sh = compiled.input_shardings[0][argnum]
  if key is not None:
    in_sh = in_sh[key]
  return sum(shard_bytes(x, s) for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(in_sh)))


_COLLECTIVE = re.compile(r"= ([a-z0-9]+)\[([0-9,]*)\][^ ]* (all-reduce|reduce-scatter)(-start)?\(")


def largest_reduction(hlo_text: str) -> int:
  """Elements of the largest all-reduce / reduce-scatter result in a compiled module.

  With FSDP done right these are gradient reductions, no larger than a parameter;
  an activation-sized one (an attention score matrix, say) means the partitioner
  split a contraction over the weights' axis instead of gathering the weights.
  """
  return max((math.prod(int(d) for d in m.group(2).split(",") if d)
              for m in _COLLECTIVE.finditer(hlo_text)), default=0)


def analyse(kind, lowered, params, desc, args, mesh, config) -> dict:
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  n_dev = mesh.devices.size
  flops_dev = float(_cost(compiled).get("flops", 0.0))
  flops_global = float(_cost(lowered).get("flops", 0.0))
  key = "params" if kind == "train" else None
  p_bytes = param_bytes_per_device(params, compiled, key=key)
  # The whole first argument (train: the state; others: the params), from its shardings.
  first = [a._aval for a in jax.tree.leaves(lowered.args_info[0][0])]
  arg0_bytes = sum(shard_bytes(a, sh) for a, sh in zip(first, jax.tree.leaves(compiled.input_shardings[0][0])))
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes)
  step_s = flops_dev / (args.mfu * PEAK_FLOPS)
  m = config.model
  row = dict(
      what=kind, desc=desc, mesh=args.mesh if not args.tiny else f"{n_dev} cpu",
      mesh_shape=dict(mesh.shape), devices=n_dev,
      param_dtype=m.param_dtype if kind != "encode" else m.t5_dtype,
      dtype=m.dtype if kind != "encode" else m.t5_dtype, remat=bool(m.remat) and kind == "train",
      params=int(sum(math.prod(x.shape) for x in jax.tree.leaves(params))),
      param_bytes_per_device=int(p_bytes), state_bytes_per_device=int(arg0_bytes),
      argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
      alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
      peak_bytes_per_device=int(peak), fits=bool(peak < HBM_GIB * GIB), hbm_gib=HBM_GIB,
      lora_rank=int(config.lora.rank),
      flops_per_device=flops_dev, flops_unpartitioned=flops_global,
      flops_per_step_total=flops_dev * n_dev, mfu=args.mfu, step_s=step_s,
      run_s=step_s * args.steps, run_steps=args.steps, compile_s=compile_s,
      largest_reduction=largest_reduction(compiled.as_text()),
      largest_param=max(math.prod(x.shape) for x in jax.tree.leaves(params)))
  dump = os.environ.get("DREAMBOOTH_XLA_DUMP")
  if kind == "train" and dump:
    row.update(_weight_copies(lowered, dump))
  if kind == "sample" and len(STAGE_OF[args.model]) == 1:
    # A whole prior set: batch calls x this stage's denoising steps. (With --model=both
    # one call runs both UNets, but the stages take different numbers of steps.)
    b = args.sample_batch or config.prior.batch_size
    steps = config.cascade[STAGE_OF[args.model][0]].num_steps
    row["prior_set_s"] = step_s * steps * math.ceil(config.prior.num_images / b)
  return row


def _weight_copies(lowered, dump: str) -> dict:
  """The temp bytes XLA:CPU spends on float32 copies of the step's bf16 arguments (the
  frozen UNets), from its buffer report; the dump (~100 MB of IR) is removed after."""
  import shutil
  import xla_memory_report
  path = xla_memory_report.latest_report(dump)
  if path is None:
    raise SystemExit(f"--xla_report: XLA wrote no buffer report into {dump}")
  shapes = [a._aval.shape for a in jax.tree.leaves(lowered.args_info)
            if a._aval.dtype == jnp.bfloat16]
  with open(path) as f:
    copies = xla_memory_report.weight_copies(f.read(), shapes)
  shutil.rmtree(dump, ignore_errors=True)
  os.makedirs(dump)
  return dict(temp_weight_copy_bytes=copies.bytes, temp_weight_copy_same_layout=copies.same_layout_bytes,
              temp_weight_copy_swapped=copies.swapped_bytes, temp_weight_copy_allocations=copies.allocations)


def format_row(r: dict) -> str:
  gib = lambda b: f"{b / GIB:7.2f}"
  extra = (f"; {r['run_steps']} steps {r['run_s'] / 60:.1f} min" if r["what"] == "train" else
           f"; prior set {r['prior_set_s'] / 60:.1f} min" if "prior_set_s" in r else "")
  return (f"{r['desc']:<52} {r['mesh']:>6} {str(r['mesh_shape']):<36} "
          f"p={r['param_dtype'][:4]} c={r['dtype'][:4]} remat={'y' if r['remat'] else 'n'} | "
          f"{r['params'] / 1e9:6.3f}B params {gib(r['param_bytes_per_device'])} GiB/dev | "
          f"peak {gib(r['peak_bytes_per_device'])} GiB/dev "
          f"(arg {r['argument_bytes'] / GIB:.2f} temp {r['temp_bytes'] / GIB:.2f}) "
          f"{'FITS' if r['fits'] else 'DOES NOT FIT'} {r['hbm_gib']:.0f} GiB | "
          + (f"f32 copies of bf16 weights in temp {r['temp_weight_copy_bytes'] / GIB:.2f} GiB "
             f"({r['temp_weight_copy_same_layout'] / GIB:.2f} as laid out, "
             f"{r['temp_weight_copy_swapped'] / GIB:.2f} transposed): peak without them "
             f"{(r['peak_bytes_per_device'] - r['temp_weight_copy_bytes']) / GIB:.2f} GiB | "
             if "temp_weight_copy_bytes" in r else "") +
          f"{r['flops_per_device'] / 1e12:8.2f} TFLOP/dev/step "
          f"({r['flops_unpartitioned'] / 1e12:.2f} unpartitioned) | "
          f"{r['step_s'] * 1e3:8.1f} ms/step @ {r['mfu']:.0%} MFU{extra} | "
          f"compile {r['compile_s']:.0f} s")


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


def resident_bytes(state, mesh, rules) -> int:
  """Per-device bytes of an (abstract) param tree placed as the loaders place it: each
  tensor in the sharding its logical axes give (`sharding.placer`)."""
  shardings = sharding.param_shardings(state, mesh, rules)
  return sum(shard_bytes(x, s) for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)))


def run_phases(args, config, mesh, rules, compiled: dict) -> list[dict]:
  """Per-device peak of every phase of `dreambooth_jax.train.run`, in its order.

  load       the cascade's UNets, each tensor read straight into its sharding
             (`pipeline.build` -> `Stage.params`); T5 is not loaded yet
  encode     T5 on the mesh while the prompts are encoded (then released), no UNet yet
  sample     class priors: every stage's weights + the guided sampling call
  train      the step (state donated) + stages that stay frozen
  checkpoint async orbax save: device arrays are copied to host, nothing new on device
  export     tuned params fetched to the host leaf by leaf, written as diffusers folders
  The compiled phases take their peak from `compiled` (this run's rows); load,
  checkpoint and export are arithmetic over the same shardings.
  """
  stages = {n: abstract_stage(args, config, n) for n in STAGE_OF[args.model]}
  unet_bytes = {n: resident_bytes(s.abstract_params, mesh, rules) for n, s in stages.items()}
  total_unet = sum(unet_bytes.values())
  tuned = set(STAGE_OF[args.model])
  adapted = lora.wrap(config, stages)
  uses_lora = lora.enabled(config)
  # Resident beside the train state: frozen stages; with LoRA every UNet (the adapters' base).
  frozen = total_unet if uses_lora else sum(b for n, b in unet_bytes.items() if n not in tuned)
  state_bytes = compiled["train"]["state_bytes_per_device"] if "train" in compiled else None
  params_host = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                    for n, s in adapted.items() if n in tuned for x in jax.tree.leaves(s.abstract_params))
  rows = [dict(phase="load", peak=total_unet, host=0,
               note=f"UNets {', '.join(f'{n} {b / GIB:.2f}' for n, b in unet_bytes.items())} GiB/dev")]
  if "encode" in compiled:
    rows.append(dict(phase="encode", peak=compiled["encode"]["peak_bytes_per_device"], host=0,
                     note="T5 only; released before the UNets load"))
  if "sample" in compiled:
    rows.append(dict(phase="sample", peak=compiled["sample"]["peak_bytes_per_device"], host=0,
                     note="every stage's weights + one guided call"))
  if "train" in compiled:
    # With LoRA the frozen UNets are arguments of the compiled step: already in its peak.
    outside = 0 if uses_lora else frozen
    train_peak = compiled["train"]["peak_bytes_per_device"] + outside
    rows.append(dict(phase="train", peak=train_peak, host=0,
                     note="step (state donated)" + (" + frozen UNets (arguments)" if uses_lora else
                                                    " + frozen stages" if frozen else "")))
    rows.append(dict(phase="checkpoint", peak=state_bytes + frozen, host=state_bytes * mesh.devices.size,
                     note="state copied to host by the async save"))
    rows.append(dict(phase="export", peak=state_bytes + frozen, host=2 * params_host,
                     note=("adapters on host + their peft tensors" if uses_lora else
                           "tuned params on host + their diffusers tensors")))
  return rows


def format_phase(r: dict) -> str:
  fits = "fits" if r["peak"] < HBM_GIB * GIB else "DOES NOT FIT"
  return (f"  {r['phase']:<10} peak {r['peak'] / GIB:7.2f} GiB/dev ({fits} {HBM_GIB:.0f} GiB)"
          f"  host {r['host'] / GIB:7.2f} GiB  {r['note']}")


# ----------------------------------------------------------------------------
# The three-stage sampler to 1024 px (--what=cascade; its stage III in plan_sampler.py)
# ----------------------------------------------------------------------------

def plan_cascade(args, mesh) -> list[dict]:
  """Compiles every program `Cascade.sample(..., prompts=...)` runs on the way to 1024 px
  (T5, IF-I-XL and IF-II-L guided calls, the x4 upscaler's CLIP, UNet and VAE decode) on
  `mesh`, prints a row for each and then the sampler's phases (`plan_sampler`)."""
  config = make_config(args)
  if args.tiny:  # the tiny cascade's x4 upscaler is opt-in (`:stage3`)
    config.cascade.sr1024 = imagen_dog.get_config("tiny,stage3").cascade.sr1024
  rules = pipeline.rules_of(config)
  b = args.sample_batch or config.prior.batch_size
  parts = plan_sampler.x4_upscaler(config, reference_configs_dir(args), tiny=args.tiny)
  stage = lambda model: argparse.Namespace(**dict(vars(args), model=model, sample_batch=b))
  programs = {  # key: (analyse's kind, the lowering)
      "t5": ("encode", lambda: LOWER["encode"](args, config, mesh, rules)),
      "base": ("sample", lambda: LOWER["sample"](stage("if-i-xl"), config, mesh, rules)),
      "sr256": ("sample", lambda: LOWER["sample"](stage("if-ii-l"), config, mesh, rules)),
      "clip": ("cascade", lambda: plan_sampler.lower_clip_encode(parts, mesh, rules)),
      "x4_unet": ("cascade", lambda: plan_sampler.lower_x4_guided(parts, mesh, rules, b)),
      "vae": ("cascade", lambda: plan_sampler.lower_vae_decode(parts, mesh, rules, b)),
  }
  rows = {}
  for key, (kind, lower_fn) in programs.items():
    t0 = time.perf_counter()
    lowered, params, desc = as_on_tpu(mesh, lower_fn)
    lower_s = time.perf_counter() - t0
    row = analyse(kind, lowered, params, desc, args, mesh, config)
    row.update(what=f"cascade:{key}", lower_s=lower_s)
    row.pop("prior_set_s", None)  # a prior set is not what this plan times
    if key == "vae":  # float32 throughout; every trip of its attention loop counted
      row.update(param_dtype="float32", dtype="float32")
      full, _, _ = as_on_tpu(mesh, lambda: plan_sampler.lower_vae_decode(parts, mesh, rules, b,
                                                                         chunked=False))
      row["flops_full_per_device"] = float(_cost(full).get("flops", 0.0)) / mesh.devices.size
    print(format_row(row), flush=True)
    rows[key] = row
  steps = {n: config.cascade[n].num_steps for n in ("base", "sr256", "sr1024")}
  phases, totals = plan_sampler.sampler_phases(rows, steps, b, HBM_GIB * GIB,
                                               side=config.cascade.sr1024.resolution)
  print(f"# the three-stage sampler, {b} images per call, phase by phase (per device; time at "
        f"{args.mfu:.0%} MFU; s/image = the slice's seconds per image):", flush=True)
  for line in plan_sampler.format_phases(phases, totals, HBM_GIB):
    print(line, flush=True)
  return (list(rows.values()) + [dict(what="cascade_phase", **p) for p in phases]
          + [dict(what="cascade_total", **totals)])


def plan(args) -> list[dict]:
  config = make_config(args)
  devices = jax.devices()[:args.devices]
  mesh = sharding.make_mesh(mesh_shape(args.layout), devices=devices)
  rules = pipeline.rules_of(config)
  rows = []
  for kind in args.what:
    if kind == "cascade":
      rows += plan_cascade(args, mesh)
      continue
    t0 = time.perf_counter()
    lowered, params, desc = lower(kind, args, config, mesh, rules)
    lower_s = time.perf_counter() - t0
    row = analyse(kind, lowered, params, desc, args, mesh, config)
    row["lower_s"] = lower_s
    rows.append(row)
    print(format_row(row), flush=True)
  if args.phases and set(args.what) - {"cascade"}:
    print("# the whole run, phase by phase (per device):", flush=True)
    for r in run_phases(args, config, mesh, rules, {r["what"]: r for r in rows}):
      print(format_phase(r), flush=True)
      rows.append(dict(what="phase", **r))
  return rows


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  if len(jax.devices()) < args.devices:
    raise SystemExit(f"need {args.devices} devices, have {len(jax.devices())}: run as a script "
                     "(it sets --xla_force_host_platform_device_count) or set XLA_FLAGS")
  print(f"# {args.mesh} plan: {args.devices} devices of {HBM_GIB:.0f} GiB, {PEAK_FLOPS / 1e12:.0f} "
        f"TFLOP/s bf16 each; "
        f"memory and FLOPs per device (XLA:CPU SPMD, partitioned module); time at "
        f"{args.mfu:.0%} MFU", flush=True)
  rows = plan(args)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
