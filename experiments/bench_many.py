r"""N subjects in one job vs one job per subject, on the tiny models (CPU): wall time.

  python experiments/bench_many.py                       # 4 subjects, 20 steps, base stage
  python experiments/bench_many.py --subjects=6 --steps=40 --stages=base+sr256
  python experiments/bench_many.py --quick               # 2 subjects, 3 steps, smoke sizes

Two arms, the same subjects, steps, batches and class priors per subject:

  joint       one `train_many.run` over the N subjects (configs/dreambooth_benchmark.py:tiny);
  sequential  N `train.run`s, one per subject, each with the lone config the job equals
              (`subjects.lone_config`): the benchmark trained one job at a time.

Each arm runs in a child process of its own with an empty JAX compilation cache, so
neither gains from the other's compiles; inside the sequential arm the cache works as
it does for a user running the jobs one after another (the second job compiles
nothing). "wall" is `run()` from entry to return: model build, T5, class priors
(sampled once per class by the job, once per job by the sequential arm), compiles,
steps, checkpoints, export; interpreter start and imports are left out. "step" is the
median time between consecutive steps in metrics.jsonl (the steady state, first step
and its compile excluded); "per subject-step" divides the joint step by N.

On CPU the joint step still computes every subject's UNet passes, so its step time
grows with N; what the job saves is the per-job work (build, T5, priors, compiles) and,
on a TPU slice, the frozen weights' gathers, which this CPU benchmark cannot show.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARMS = ("joint", "sequential")


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--subjects", type=int, default=4, help="how many world subjects (1-6)")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--stages", default="base", help="stages to tune, e.g. base+sr256")
  p.add_argument("--quick", action="store_true", help="2 subjects, 3 steps, smoke sizes "
                 "(runlocal: 2 class images, 2 sampling steps)")
  p.add_argument("--keep", default="", help="keep the workdirs in this folder")
  p.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)      # child process
  p.add_argument("--workdir", help=argparse.SUPPRESS)                 # child process
  p.add_argument("--out", help=argparse.SUPPRESS)                     # child process
  args = p.parse_args(argv)
  if args.quick:
    args.subjects, args.steps = 2, 3
  if not 1 <= args.subjects <= 6 or args.steps < 2:
    p.error("--subjects: 1 to 6 (the world's subjects); --steps: at least 2")
  return args


def job_config(args):
  """The joint job's config; its lone configs are the sequential arm's."""
  sys.path.insert(0, str(ROOT))
  from configs import world
  from dreambooth_jax import config_lib
  names = sorted(world.CLASS_NOUNS)[:args.subjects]
  spec = (f"{ROOT / 'configs' / 'dreambooth_benchmark.py'}:tiny,subjects={'+'.join(names)},"
          f"steps={args.steps},eval_every=0" + (",runlocal" if args.quick else ""))
  c = config_lib.from_file(spec)
  c.stages = args.stages
  c.train.steps = args.steps
  c.checkpoint.update(every=args.steps, async_save=False)  # one save, at the end
  c.log.update(every=1, tensorboard=False)  # every step's time in metrics.jsonl
  return c


def step_seconds(workdir) -> float:
  """The median time between consecutive training steps in a workdir's metrics.jsonl."""
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  times = [r["time"] for r in sorted((r for r in rows if "loss" in r), key=lambda r: r["step"])]
  return statistics.median(b - a for a, b in zip(times[1:], times[2:]))


def child(args) -> dict:
  """One arm, in this (child) process: {wall_s, step_s: [per run]}."""
  from dreambooth_jax import subjects as subjects_lib
  from dreambooth_jax import train as train_lib
  from dreambooth_jax import train_many
  config = job_config(args)
  started = time.perf_counter()
  if args.arm == "joint":
    train_many.run(config, args.workdir)
    steps = [step_seconds(args.workdir)]
  else:
    steps = []
    for s in subjects_lib.from_config(config):
      folder = os.path.join(args.workdir, s.name)
      train_lib.run(subjects_lib.lone_config(config, s), folder)
      steps.append(step_seconds(folder))
  return dict(wall_s=time.perf_counter() - started, step_s=steps)


def run_arm(args, arm: str, root: str) -> dict:
  cache = os.path.join(root, f"jax_cache_{arm}")  # empty: the arm pays its own compiles
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
  out = os.path.join(root, f"{arm}.json")
  cmd = [sys.executable, __file__, f"--arm={arm}", f"--workdir={os.path.join(root, arm)}",
         f"--out={out}", f"--subjects={args.subjects}", f"--steps={args.steps}",
         f"--stages={args.stages}"] + (["--quick"] if args.quick else [])
  r = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if r.returncode:
    raise SystemExit(f"the {arm} arm failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n"
                     f"{r.stderr[-4000:]}")
  return json.loads(pathlib.Path(out).read_text())


def main(argv):
  args = parse_args(argv)
  if args.arm:  # a child: one arm, its numbers to --out
    pathlib.Path(args.out).write_text(json.dumps(child(args)))
    return None
  root = args.keep or tempfile.mkdtemp(prefix="bench_many_")
  os.makedirs(root, exist_ok=True)
  try:
    res = {arm: run_arm(args, arm, root) for arm in ARMS}
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
  n = args.subjects
  joint, seq = res["joint"], res["sequential"]
  joint_step = joint["step_s"][0]
  seq_step = statistics.mean(seq["step_s"])  # one subject's step, mean over the lone runs
  print(f"# {n} subjects x {args.steps} steps, stages {args.stages}, tiny cascade"
        f"{' (runlocal sizes)' if args.quick else ''}, LoRA rank 4, on "
        f"{os.cpu_count()} CPU core(s); each arm in its own process and compilation cache")
  print(f"{'arm':<26} {'runs':>4} {'wall s':>8} {'step s':>8} {'per subject-step s':>19}")
  print(f"{'joint (one job)':<26} {1:>4} {joint['wall_s']:>8.1f} {joint_step:>8.3f} "
        f"{joint_step / n:>19.3f}")
  print(f"{'sequential (a job each)':<26} {n:>4} {seq['wall_s']:>8.1f} {seq_step:>8.3f} "
        f"{seq_step:>19.3f}")
  print(f"{'sequential / joint':<26} {'':>4} {seq['wall_s'] / joint['wall_s']:>7.2f}x "
        f"{'':>8} {seq_step / (joint_step / n):>18.2f}x")
  return dict(subjects=n, steps=args.steps, stages=args.stages, joint=joint, sequential=seq,
              wall_ratio=seq["wall_s"] / joint["wall_s"],
              subject_step_ratio=seq_step / (joint_step / n))


if __name__ == "__main__":
  main(sys.argv[1:])
