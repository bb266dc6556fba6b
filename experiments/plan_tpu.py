r"""TPUv4 memory and time plan for full-size IF fine-tuning, from CPU ahead-of-time compiles.

  python experiments/plan_tpu.py                                   # IF-I-XL + IF-II-L step, v4-8
  python experiments/plan_tpu.py --optimizer=adamw                 # ... with AdamW on both
  python experiments/plan_tpu.py --model=if-i-xl --mesh=v4-32 --param_dtype=bfloat16 --no-remat
  python experiments/plan_tpu.py --model=t5 --what=encode          # T5-XXL embedding pass
  python experiments/plan_tpu.py --model=if-i-xl --what=sample     # one guided prior-sampling step
  python experiments/plan_tpu.py --what=cascade     # the 3-stage sampler to 1024 px, per image
  python experiments/plan_tpu.py --what=many        # 30 subjects in one job, the benchmark's hour
  python experiments/plan_tpu.py --tiny --json=/tmp/plan.json      # tiny models, 4 devices (test)
  python experiments/plan_tpu.py --model=if-i-xl --topology=v5e-1 --lora=16 --xla_report
                                   # ... and how much of temp is XLA:CPU's f32 weight copies

Nothing is allocated: every parameter, optimiser leaf and input is a
`ShapeDtypeStruct` carrying the sharding `dreambooth_jax.train` would give it,
and `jax.jit(...).lower(...).compile()` runs on fake CPU devices
(`--xla_force_host_platform_device_count`, set before jax is imported) laid out
like a TPUv4 slice: v4-8 = 4 chips, v4-32 = 16 chips, 32 GiB HBM each.

What is compiled (`--what`; the programs are plan_programs.py's, their numbers plan_compiled.py's):
  train   the trainer's own step (`methods.make_train_step`), state and shardings from
          `state.setup`, batch laid out by `state.batch_layout` (micro-batch axis, batch
          axis over the data axes when it divides), state donated, as `train.run` does;
  encode  `embeddings.encode_batch`, the T5 v1.1 XXL pass over a padded 77-token batch;
  sample  one classifier-free-guided UNet call (`samplers.guided_output`, batch 2x) on the
          class-prior batch, as `priors` / `Cascade.sample` run it, frozen params;
  cascade the three-stage sampler to 1024 px (IF-I-XL, IF-II-L, then the SD x4 upscaler with
          its CLIP text encoder and VAE decode; `plan_sampler.py`): every program it runs,
          per-device peak of each phase with the weights resident by then, and time per
          1024 px image (`--model` does not apply);
  many    the many-subject job (`train_many`, configs/dreambooth_benchmark.py; `plan_many.py`):
          T5, class-prior and in-loop evaluation sampling loops, the joint step of every
          subject, memory per phase, and the whole benchmark's time against --goal_minutes
          (its own config: --benchmark, --set; `--model`, `--lora`, the batch flags do not apply).

Peak / device = argument + output - alias + temp bytes of `compiled.memory_analysis()` and
FLOPs per device from `compiled.cost_analysis()` (the SPMD-partitioned module is one
device's program), checked against the unpartitioned `lowered.cost_analysis()`.
Projected time = FLOPs per device / (MFU x the topology's bf16 peak, 275 TFLOP/s per TPUv4
chip). The FLOPs are the ones the compiled program executes, so rematerialised forwards count.

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
MODELS = ("if-i-xl", "if-ii-l", "both", "t5")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", choices=MODELS, default="both",
                 help="if-i-xl (base, 64 px), if-ii-l (sr256, 256 px), both (tuned together), t5")
  p.add_argument("--what", default="train", help="comma list of train, encode, sample, cascade, "
                 "many")
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
  many = p.add_argument_group("--what=many (plan_many.py): the many-subject job and the "
                              "benchmark's time")
  many.add_argument("--benchmark", default=None, help="configs/dreambooth_benchmark.py's argument "
                    "(default: if; --tiny: tiny), e.g. 'if,subjects=dog+cat2'")
  many.add_argument("--dataset", default=None, help="the DreamBooth dataset folder (default "
                    "../shared/dreambooth_dataset)")
  many.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="a config change, e.g. --set=prior.num_images=100 (repeatable)")
  many.add_argument("--jobs", type=int, default=1, help="the benchmark's subjects as this many "
                    "jobs of as many subjects each (`subjects=`; it must divide them)")
  many.add_argument("--goal_minutes", type=float, default=60.0,
                    help="the benchmark (training + evaluation) must take less")
  args = p.parse_args(argv)
  args.what = tuple(w.strip() for w in args.what.split(",") if w.strip())
  bad = set(args.what) - {"train", "encode", "sample", "cascade", "many"}
  if bad:
    p.error(f"--what: unknown {sorted(bad)}")
  if args.model == "t5":
    args.what = ("encode",)
  if args.devices is None:
    args.devices = 4 if args.tiny else SLICES[args.mesh]
  _, args.hbm_gib, args.peak_flops = TOPOLOGIES[args.mesh]
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

# This folder's modules (sys.path[0] is the script's): the programs, their numbers, and the
# plans of the three-stage sampler and of the many-subject job.
from plan_programs import (LOWER, STAGE_OF, as_on_tpu, abstract_stage,  # noqa: E402
                           imagen_dog, lower, make_config, mesh_shape, reference_configs_dir)
from plan_compiled import GIB, analyse, cost, format_row, resident_bytes  # noqa: E402
from dreambooth_jax import lora, pipeline, sharding  # noqa: E402
import plan_many  # noqa: E402
import plan_sampler  # noqa: E402  (this folder's: sys.path[0] is the script's)


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


def format_phase(r: dict, hbm_gib: float) -> str:
  fits = "fits" if r["peak"] < hbm_gib * GIB else "DOES NOT FIT"
  return (f"  {r['phase']:<10} peak {r['peak'] / GIB:7.2f} GiB/dev ({fits} {hbm_gib:.0f} GiB)"
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
      row["flops_full_per_device"] = float(cost(full).get("flops", 0.0)) / mesh.devices.size
    print(format_row(row), flush=True)
    rows[key] = row
  steps = {n: config.cascade[n].num_steps for n in ("base", "sr256", "sr1024")}
  phases, totals = plan_sampler.sampler_phases(rows, steps, b, args.hbm_gib * GIB,
                                               side=config.cascade.sr1024.resolution)
  print(f"# the three-stage sampler, {b} images per call, phase by phase (per device; time at "
        f"{args.mfu:.0%} MFU; s/image = the slice's seconds per image):", flush=True)
  for line in plan_sampler.format_phases(phases, totals, args.hbm_gib):
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
    if kind in ("cascade", "many"):
      rows += plan_cascade(args, mesh) if kind == "cascade" else plan_many.plan_many(args)
      continue
    t0 = time.perf_counter()
    lowered, params, desc = lower(kind, args, config, mesh, rules)
    lower_s = time.perf_counter() - t0
    row = analyse(kind, lowered, params, desc, args, mesh, config)
    row["lower_s"] = lower_s
    rows.append(row)
    print(format_row(row), flush=True)
  if args.phases and set(args.what) - {"cascade", "many"}:
    print("# the whole run, phase by phase (per device):", flush=True)
    for r in run_phases(args, config, mesh, rules, {r["what"]: r for r in rows}):
      print(format_phase(r, args.hbm_gib), flush=True)
      rows.append(dict(what="phase", **r))
  return rows


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  if len(jax.devices()) < args.devices:
    raise SystemExit(f"need {args.devices} devices, have {len(jax.devices())}: run as a script "
                     "(it sets --xla_force_host_platform_device_count) or set XLA_FLAGS")
  print(f"# {args.mesh} plan: {args.devices} devices of {args.hbm_gib:.0f} GiB, "
        f"{args.peak_flops / 1e12:.0f} "
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
