"""Numbers from a compiled program, for `plan_tpu.py` and `plan_many.py`.

Reported numbers come from the compiled object:
  * param bytes / device: each parameter's shard shape under `compiled.input_shardings`;
  * peak / device = argument + output - alias + temp bytes of `compiled.memory_analysis()`
    (the SPMD-partitioned module is one device's program, so these are per device);
  * FLOPs: `compiled.cost_analysis()` is also per device (per partition); `analyse` checks
    it against the unpartitioned `lowered.cost_analysis()` and keeps both.
Projected time = FLOPs per device / (MFU x the device's bf16 peak, `args.peak_flops`). The
FLOPs are the ones the compiled program executes, so rematerialised forwards count; a
loop's body is counted once, whatever its trip count (XLA's cost analysis).
"""

from __future__ import annotations

import math
import os
import re
import time

import jax
import jax.numpy as jnp

from plan_programs import STAGE_OF  # first: it puts the repository on sys.path
from dreambooth_jax import sharding

GIB = 1024 ** 3


def cost(obj) -> dict:
  """`cost_analysis()` of a lowered or compiled program as one dict."""
  out = obj.cost_analysis()
  if isinstance(out, (list, tuple)):  # older jax: one dict per partition/program
    out = out[0] if out else {}
  return dict(out or {})


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
  flops_dev = float(cost(compiled).get("flops", 0.0))
  flops_global = float(cost(lowered).get("flops", 0.0))
  key = "params" if kind == "train" else None
  p_bytes = param_bytes_per_device(params, compiled, key=key)
  # The whole first argument (train: the state; others: the params), from its shardings.
  first = [a._aval for a in jax.tree.leaves(lowered.args_info[0][0])]
  arg0_bytes = sum(shard_bytes(a, sh) for a, sh in zip(first, jax.tree.leaves(compiled.input_shardings[0][0])))
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes)
  step_s = flops_dev / (args.mfu * args.peak_flops)
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
      peak_bytes_per_device=int(peak), fits=bool(peak < args.hbm_gib * GIB), hbm_gib=args.hbm_gib,
      lora_rank=int(config.lora.rank),
      flops_per_device=flops_dev, flops_unpartitioned=flops_global,
      flops_per_step_total=flops_dev * n_dev, mfu=args.mfu, step_s=step_s,
      run_s=step_s * args.steps, run_steps=args.steps, compile_s=compile_s,
      largest_reduction=largest_reduction(compiled.as_text()),
      largest_param=max(math.prod(x.shape) for x in jax.tree.leaves(params)))
  dump = os.environ.get("DREAMBOOTH_XLA_DUMP")
  if kind == "train" and dump:
    row.update(weight_copies(lowered, dump))
  if kind == "sample" and len(STAGE_OF[args.model]) == 1:
    # A whole prior set: batch calls x this stage's denoising steps. (With --model=both
    # one call runs both UNets, but the stages take different numbers of steps.)
    b = args.sample_batch or config.prior.batch_size
    steps = config.cascade[STAGE_OF[args.model][0]].num_steps
    row["prior_set_s"] = step_s * steps * math.ceil(config.prior.num_images / b)
  return row


def weight_copies(lowered, dump: str) -> dict:
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


def resident_bytes(state, mesh, rules) -> int:
  """Per-device bytes of an (abstract) param tree placed as the loaders place it: each
  tensor in the sharding its logical axes give (`sharding.placer`)."""
  shardings = sharding.param_shardings(state, mesh, rules)
  return sum(shard_bytes(x, s) for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)))

