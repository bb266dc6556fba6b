r"""LoRA step vs full fine-tuning step, side by side in one run: time and train-state bytes.

  python experiments/bench_lora_step.py                    # tiny default, base+sr256, 1+1 images
  python experiments/bench_lora_step.py --rank=16 --targets=attention+resnets --reps=10
  python experiments/bench_lora_step.py --quick            # one repetition (the test)

Both steps are built as `dreambooth_jax.train.run` builds them: `pipeline.build` on the
tiny config, `state.setup` / `state.initial_state`, `methods.make_train_step` jitted with
the state's shardings and donated; LoRA's frozen UNets are the step's `frozen` argument.
The same batch (instance + class prior, every tuned stage) goes to both. Repetitions
alternate (full, LoRA, full, ...) after warm-up, so both see the same background load;
the table reports medians. State bytes are the train state's arrays (params, optimiser
moments, step, rng): what a checkpoint holds.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import imagen_dog  # noqa: E402
from dreambooth_jax import lora, methods, pipeline, sharding  # noqa: E402
from dreambooth_jax import state as state_lib  # noqa: E402


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--rank", type=int, default=4)
  p.add_argument("--targets", default="attention", help="config.lora.targets")
  p.add_argument("--stages", default="base+sr256")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--prior_batch", type=int, default=1)
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--quick", action="store_true", help="one repetition, no warm-up beyond compile")
  args = p.parse_args(argv)
  if args.quick:
    args.reps, args.warmup = 1, 0
  return args


def build_step(config, models, mesh, use_lora: bool):
  """(jitted step, its first state, frozen argument) as `train.run` makes them."""
  stages = {n: models.cascade.by_name[n] for n in models.tuned}
  if use_lora:
    stages = lora.wrap(config, stages)
  phase = methods.phases(config)[0]
  ps = state_lib.setup(config, stages, phase, mesh, models.rules, num_tokens=0,
                       token_width=models.t5_width)
  frozen = {n: s.base_params for n, s in stages.items() if isinstance(s, lora.LoRAStage)}
  frozen_sh = {n: sharding.param_shardings(p, mesh, models.rules) for n, p in frozen.items()}
  state = state_lib.initial_state(stages, ps.tx, phase, ps.shardings, rng=jax.random.key(0))
  step = jax.jit(methods.make_train_step(stages, ps.tx, config.prior.weight),
                 in_shardings=(ps.shardings, None, frozen_sh), out_shardings=(ps.shardings, None),
                 donate_argnums=(0,))
  return step, state, frozen


def state_bytes(state) -> int:
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state)
             if hasattr(x, "dtype") and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


def make_batch(config, models, mesh, seed=0):
  t = config.train
  res = {n: config.cascade[n].resolution for n in models.tuned}
  abstract, sh = state_lib.batch_layout(mesh, res, batch_size=t.batch_size,
                                        prior_batch_size=t.prior_batch_size, text_width=models.t5_width)
  rng = np.random.default_rng(seed)
  def fill(x, s):
    if np.issubdtype(x.dtype, np.integer):
      return jax.device_put(np.ones(x.shape, x.dtype), s)
    return jax.device_put(rng.uniform(-1, 1, x.shape).astype(x.dtype), s)
  return jax.tree.map(fill, abstract, sh)


def main(argv=None) -> dict:
  args = parse_args(argv)
  config = imagen_dog.get_config(f"tiny,stages={args.stages},lora={args.rank}")
  config.lora.targets = args.targets
  config.train.batch_size, config.train.prior_batch_size = args.batch, args.prior_batch
  mesh = sharding.make_mesh()
  runs, batch = {}, None
  for name, use_lora in (("full", False), ("lora", True)):
    # Each its own (identical, seeded) models: the full step's donated state owns its weights.
    models = pipeline.build(config, mesh)
    batch = batch if batch is not None else make_batch(config, models, mesh)
    step, state, frozen = build_step(config, models, mesh, use_lora)
    trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    runs[name] = dict(step=step, state=state, frozen=frozen, trainable=trainable,
                      state_bytes=state_bytes(state))
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
      runs[name]["state"], _ = step(runs[name]["state"], batch, frozen)
    jax.block_until_ready(runs[name]["state"])
    runs[name]["first_s"] = time.perf_counter() - t0
  times = {name: [] for name in runs}
  for rep in range(args.warmup + args.reps):
    for name, r in runs.items():
      t0 = time.perf_counter()
      with jax.set_mesh(mesh):
        r["state"], metrics = r["step"](r["state"], batch, r["frozen"])
      jax.block_until_ready(metrics["loss"])
      if rep >= args.warmup:
        times[name].append(time.perf_counter() - t0)
  print(f"# {args.stages}, tiny cascade, {args.batch}+{args.prior_batch} images, "
        f"{len(jax.devices())} {jax.devices()[0].platform} device(s); LoRA rank {args.rank} on "
        f"{args.targets}; medians of {args.reps}")
  print(f"{'step':<6} {'trainable params':>17} {'state bytes':>13} {'first call s':>13} "
        f"{'step ms':>9} {'vs full':>8}")
  out = {}
  full_ms = statistics.median(times["full"]) * 1e3
  for name, r in runs.items():
    ms = statistics.median(times[name]) * 1e3
    out[name] = dict(trainable=r["trainable"], state_bytes=r["state_bytes"], first_s=r["first_s"],
                     step_ms=ms)
    print(f"{name:<6} {r['trainable']:>17,} {r['state_bytes']:>13,} {r['first_s']:>13.1f} "
          f"{ms:>9.1f} {ms / full_ms:>7.2f}x")
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
