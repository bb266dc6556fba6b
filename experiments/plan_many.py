r"""The many-subject job on a TPU slice, and the whole benchmark's time: `plan_tpu.py --what=many`.

  python experiments/plan_tpu.py --what=many                  # 30 subjects, LoRA rank 4, v4-8
  python experiments/plan_tpu.py --what=many --benchmark=if,hour  # the settings that meet the hour
  python experiments/plan_tpu.py --what=many --tiny           # tiny models, the world's subjects

The job is `dreambooth_jax.train_many` with configs/dreambooth_benchmark.py
(`--benchmark`, default `if`: the 30 subjects and class nouns of the DreamBooth
dataset's prompts_and_classes.txt, read by the config and `subjects.from_config`
as the job reads them, from `--dataset`), on the config's mesh over the
topology's devices. `--set=KEY=VALUE` changes the config as `--config.KEY=VALUE`
changes the job's; `--jobs=N` plans the benchmark as N jobs of as many subjects
each (one compile answers for all). The job's padding slots (`subjects.slots`:
copies of the first subjects until the data axes divide the subject axis, 30 -> 32
on v4-8's 4 chips) are in the planned step as the job trains them. Each program
the job runs is lowered on abstract arguments with the shardings the job gives
them, and compiled:

  T5 encode  `embeddings.encode_batch` (plan_programs.lower_encode), T5 alone: the UNets
             load on first use, after the prompts are encoded
  priors     `Stage.sample` of each frozen stage, as `priors.generate_priors` runs it through
             `Cascade.sample`: the stage's own sampler, steps and guidance,
             `prior.batch_size` images a call; one prior set per distinct class prompt
  train      `train_many.jit_step` on `train_many.joint_setup`'s state (every adapter with
             a leading subject axis), `subjects.batch_layout`'s batch and the frozen UNets
  eval       `Stage.sample` with one subject's adapters bound to the frozen UNets, as
             `in_loop.generate` runs it through `Cascade.sample`: `eval.sampler`,
             `eval.num_steps`, `eval.batch_size` images a call, one subject at a time

Load, checkpoint and export are arithmetic over the same shardings (as
`plan_tpu.run_phases`). A phase's peak is its program's plus what stays resident
beside it: the other stage's frozen UNet, and while evaluating the train state.

Time is a program's FLOPs per device at the plan's MFU. A sampling program is the
whole denoising loop, whose body XLA's cost analysis counts once whatever its trip
count (checked: a 2-step and a 10-step loop read the same FLOPs), so a call takes
that times the stage's steps (the loop's set-up, a noise draw, is counted with it).

The benchmark of one method (`benchmark_rows`, `goal`): T5, a prior set per class
prompt, `train.steps` joint steps, the in-loop evaluations `config.eval` asks
for, and the benchmark's evaluation, every subject's 25 prompts x 4 images
(`BENCHMARK_IMAGES` a prompt; the prompt lists from the dataset) drawn the way
the in-loop evaluation draws (its sampler, steps and batch), all on the one slice.
Loading weights, writing PNGs and scoring them (DINO, CLIP: small encoders) are not
counted.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import ml_collections

from plan_compiled import GIB, analyse, format_row, resident_bytes
from plan_programs import (ROOT, TEXT_LEN, abstract_stage, as_on_tpu, lower_encode, text_width,
                           with_sharding)
from configs import dreambooth_benchmark
from dreambooth_jax import config_lib, lora, methods, pipeline, sharding
from dreambooth_jax import prompts as prompts_lib
from dreambooth_jax import state as state_lib
from dreambooth_jax import subjects as subjects_lib
from dreambooth_jax import train_many

# The benchmark's evaluation: its prompts per subject (the dataset's lists, read when the
# config names the dataset) and images per prompt.
BENCHMARK_PROMPTS, BENCHMARK_IMAGES = 25, 4


# ----------------------------------------------------------------------------
# The job's config and what it holds
# ----------------------------------------------------------------------------

def override(config, item: str) -> None:
  """`KEY=VALUE` (dotted key) set on `config`, VALUE read as the field's type."""
  key, eq, value = item.partition("=")
  if not eq:
    raise SystemExit(f"--set={item!r}: use KEY=VALUE, e.g. prior.num_images=100")
  parent_key, _, leaf = key.strip().rpartition(".")
  parent = config_lib.get(config, parent_key) if parent_key else config
  if parent is None or leaf not in parent:
    raise SystemExit(f"--set={item!r}: the config has no {key!r}")
  old = parent[leaf]
  if isinstance(old, bool):
    parent[leaf] = value.lower() in ("1", "true", "yes", "y")
  elif isinstance(old, (int, float, str)):
    parent[leaf] = type(old)(value)
  else:
    raise SystemExit(f"--set={item!r}: {key!r} is not a number, string or boolean")


def benchmark_config(args):
  """configs/dreambooth_benchmark.py at `args.benchmark` (`if`, or `tiny` with --tiny) with
  the dataset folder and `args.set` applied."""
  spec = args.benchmark or ("tiny" if args.tiny else "if")
  if not args.tiny and "dataset=" not in spec:
    dataset = args.dataset or str(ROOT.parent / "shared" / "dreambooth_dataset")
    spec = f"{spec},dataset={dataset}"
  config = dreambooth_benchmark.get_config(spec)
  if args.tiny:  # the tiny config computes in float32; plan the TPU precision anyway
    config.model.dtype = "bfloat16"
  for item in args.set or ():
    override(config, item)
  subjects_lib.check_config(config)
  return config


@dataclasses.dataclass
class Job:
  """The job's subjects (subject-axis order), their distinct class prompts, the tuned
  stages, how many prompts T5 encodes and each subject's benchmark images."""
  names: list[str]
  class_prompts: list[str]
  tuned: tuple[str, ...]
  prompts: int
  bench_images: dict[str, int]


def job_of(config) -> Job:
  """What `train_many.run` derives from the config before building anything (identifiers
  stand in as '<vN>': only the number of distinct prompts depends on them)."""
  subjects = subjects_lib.from_config(config)
  names = [s.name for s in subjects]
  pairs = {s.name: prompts_lib.instance_and_class(subjects_lib.lone_config(config, s, f"<v{i}>"),
                                                  f"<v{i}>") for i, s in enumerate(subjects)}
  classes = list(dict.fromkeys(p[1] for p in pairs.values()))
  e = config.eval
  prompts_of = {n: BENCHMARK_PROMPTS for n in names}
  if e.protocol == "dreambooth" and e.dataset:
    from dreambooth_jax.evaluation import benchmark
    bench = benchmark.load_benchmark(e.dataset)
    listed = {s.name for s in bench.subjects}
    prompts_of = {n: len(bench.prompts_for(n, "[V]")) if n in listed else BENCHMARK_PROMPTS
                  for n in names}
  in_loop = min(e.num_prompts, BENCHMARK_PROMPTS) * len(names) if e.every else 0
  # Distinct prompts: each subject's instance prompt, the class prompts, "", the evaluations'.
  prompts = len(names) + len(classes) + 1 + in_loop + sum(prompts_of.values())
  return Job(names, classes, config_lib.parse_stages(config.stages), prompts=prompts,
             bench_images={n: p * BENCHMARK_IMAGES for n, p in prompts_of.items()})


# ----------------------------------------------------------------------------
# The programs the job runs, lowered on abstract arguments
# ----------------------------------------------------------------------------

def lower_joint_step(args, config, mesh, rules, job: Job):
  """`train_many`'s jitted step on its abstract state, batch layout and frozen UNets."""
  (phase,) = methods.phases(config)
  width = text_width(args, config)
  stages = {n: abstract_stage(args, config, n) for n in job.tuned}
  ps = train_many.joint_setup(config, stages, len(job.names), phase, mesh, rules, token_width=width)
  frozen = {n: s.stage.abstract_params for n, s in ps.stages.items()}
  frozen_sh = {n: sharding.param_shardings(p, mesh, rules) for n, p in frozen.items()}
  step = train_many.jit_step(config, ps, job.names, frozen_sh)
  t = config.train
  prior_n = t.prior_batch_size if phase.prior else 0
  batch, layout = subjects_lib.batch_layout(
      mesh, {n: config.cascade[n].resolution for n in job.tuned}, num_subjects=len(job.names),
      batch_size=t.batch_size, prior_batch_size=prior_n, grad_accum=t.grad_accum, text_width=width)
  state = state_lib.with_shardings(ps.abstract, ps.shardings)
  split = layout[job.tuned[0]]["instance"].spec[1] is not None
  ways, _, chunk = subjects_lib.subject_loop(len(job.names), t.get("subject_chunk", 0), mesh)
  loop = f", {len(job.names) // ways // chunk} x {chunk} a device" if chunk else ""
  desc = (f"{'+'.join(job.tuned)} LoRA r={config.lora.rank} x {len(job.names)} subjects "
          f"{t.batch_size}+{prior_n} img each (subjects {'split' if split else 'replicated'}"
          f"{loop})")
  lowered = step.lower(state, with_sharding(batch, layout), with_sharding(frozen, frozen_sh))
  return lowered, state["params"], desc


def subject_loop_trips(config, num_subjects: int, mesh) -> float:
  """How many loop bodies the joint step's FLOPs are, for `config.train.subject_chunk`:
  XLA's cost analysis counts a loop's body once, and `lax.map` runs a device's share of
  subjects that do not fill a last chunk after the loop (counted once too)."""
  ways, _, chunk = subjects_lib.subject_loop(num_subjects, config.train.get("subject_chunk", 0),
                                             mesh)
  share = num_subjects // ways
  return share / (chunk + share % chunk) if chunk else 1.0


def lower_stage_sample(args, config, mesh, rules, name: str, *, batch: int, adapters: bool,
                       sampler: str | None = None, num_steps: int | None = None):
  """`Stage.sample` of stage `name` on `batch` images, guided, as `Cascade.sample` calls it:
  the frozen UNet (priors), or with `adapters` one subject's LoRA adapters bound to it
  (`LoRAStage.bind`, the job's in-loop evaluation). SR stages get the previous stage's
  images. `sampler` / `num_steps` None: the stage's own."""
  stage = abstract_stage(args, config, name)
  width = text_width(args, config)
  batch_sh = lambda shape: sharding.batch_sharding(mesh, shape)
  spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype,
                                                                sharding=batch_sh(shape))
  frozen = stage.abstract_params
  params = with_sharding(frozen, sharding.param_shardings(frozen, mesh, rules))
  how = "frozen"
  if adapters:
    lone = lora.LoRAStage(stage, lora.settings(config))
    own = lone.abstract_params
    own = with_sharding(own, sharding.param_shardings(own, mesh, rules))
    params, how = lone.bind(params, own), f"+ LoRA r={config.lora.rank}"
  cond = {"text": spec((batch, TEXT_LEN, width)), "mask": spec((batch, TEXT_LEN), jnp.int32)}
  r = stage.lowres_resolution
  lowres = spec((batch, r, r, 3)) if stage.is_sr else None
  steps = num_steps or stage.settings.num_steps
  used = sampler or stage.settings.sampler

  def run(params, cond, uncond, rng, lowres):
    return stage.sample(params, cond, uncond, rng, lowres=lowres, num_steps=steps, mesh=mesh,
                        sampler=used)

  rng = jax.eval_shape(lambda: jax.random.key(0))
  lowered = jax.jit(run).lower(params, cond, cond, rng, lowres)
  res = stage.settings.resolution
  desc = f"{name} {how} {used} loop CFG {batch}x2 img {res} px (FLOPs: 1 of {steps} steps)"
  return lowered, params, desc, steps


# ----------------------------------------------------------------------------
# The plan: every program, the phases' memory, the benchmark's time
# ----------------------------------------------------------------------------

def job_configs(config, jobs: int) -> list:
  """The benchmark's subjects as `jobs` jobs of as many subjects each (contiguous in subject
  order), each a config of its own (`subjects=` of configs/dreambooth_benchmark.py)."""
  names = sorted(config.subjects)
  if jobs < 1 or len(names) % jobs:
    raise SystemExit(f"--jobs={jobs} must divide the {len(names)} subjects")
  per = len(names) // jobs
  out = []
  for k in range(jobs):
    c = ml_collections.ConfigDict(config.to_dict()) if jobs > 1 else config
    keep = set(names[k * per:(k + 1) * per])
    for n in names:
      if n not in keep:
        del c.subjects[n]
    out.append(c)
  return out


def padded(config, mesh):
  """(`config` with train_many's padding slots on `mesh` as subjects of their own, copies
  of its first ones; how many): the subject axis the job's step trains."""
  names = sorted(config.subjects)
  extra = len(subjects_lib.slots(names, mesh)) - len(names)
  if not extra:
    return config, 0
  c = ml_collections.ConfigDict(config.to_dict())
  for i in range(extra):
    c.subjects[f"{names[i % len(names)]}_pad{i}"] = dict(c.subjects[names[i % len(names)]])
  return c, extra


def plan_many(args) -> list[dict]:
  configs = job_configs(benchmark_config(args), args.jobs)
  config, jobs = configs[0], [job_of(c) for c in configs]
  job = jobs[0]  # every job has as many subjects: one compile answers for all
  mesh = sharding.make_mesh(dict(config.mesh), devices=jax.devices()[:args.devices])
  with_pads, extra = padded(config, mesh)
  trained = job_of(with_pads)
  rules = pipeline.rules_of(config)
  e, p = config.eval, config.prior
  pads = f" + {extra} padding" if extra else ""
  print(f"# the many-subject job: {len(job.names)} subjects{pads} ({len(jobs)} job(s) of the "
        f"benchmark's {sum(len(j.names) for j in jobs)}), {len(job.class_prompts)} class prompts, "
        f"LoRA rank {config.lora.rank}, stages {'+'.join(job.tuned)}, mesh {dict(mesh.shape)}",
        flush=True)
  programs = {"encode": ("encode", lambda: lower_encode(args, config, mesh, rules) + (1,))}
  for n in job.tuned:
    programs[f"priors {n}"] = ("sample", lambda n=n: lower_stage_sample(
        args, config, mesh, rules, n, batch=p.batch_size, adapters=False))
  programs["train"] = ("train", lambda: lower_joint_step(
      args, with_pads, mesh, rules, trained) + (1,))
  for n in job.tuned:
    programs[f"eval {n}"] = ("sample", lambda n=n: lower_stage_sample(
        args, config, mesh, rules, n, batch=e.batch_size, adapters=True, sampler=e.sampler,
        num_steps=e.num_steps))
  rows = {}
  for key, (kind, lower_fn) in programs.items():
    t0 = time.perf_counter()
    lowered, params, desc, steps = as_on_tpu(mesh, lower_fn)
    lower_s = time.perf_counter() - t0
    row = analyse("train" if kind == "train" else "many", lowered, params, desc, args, mesh, config)
    row.update(what=f"many:{key}", lower_s=lower_s, loop_steps=steps)
    if key == "train":  # the subject loop's body counted once: the step is that many bodies
      trips = subject_loop_trips(config, len(trained.names), mesh)
      for k in ("flops_per_device", "flops_per_step_total", "step_s", "run_s"):
        row[k] *= trips
    print(format_row(row), flush=True)
    rows[key] = row
  phases = job_phases(config, trained, rows, mesh, rules, args)
  bench = benchmark_rows(config, jobs, rows, args.encode_batch, sharding.data_parallelism(mesh),
                         pad=extra)
  verdict = goal(bench, args.goal_minutes)
  for line in format_plan(phases, bench, verdict, args):
    print(line, flush=True)
  return (list(rows.values()) + [dict(what="many_phase", **r) for r in phases]
          + [dict(what="many_time", **r) for r in bench] + [dict(what="many_goal", **verdict)])


def job_phases(config, job: Job, rows: dict, mesh, rules, args) -> list[dict]:
  """Per-device peak of every phase of `train_many.run`, in its order."""
  stages = {n: abstract_stage(args, config, n) for n in job.tuned}
  unet = {n: resident_bytes(s.abstract_params, mesh, rules) for n, s in stages.items()}
  frozen = sum(unet.values())
  state = rows["train"]["state_bytes_per_device"]
  adapters_host = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                      for s in lora.wrap(config, stages).values()
                      for x in jax.tree.leaves(s.abstract_params)) * len(job.names)
  program = lambda key: rows[key]["peak_bytes_per_device"]
  out = [dict(phase="load", peak=frozen, program=0, resident=frozen,
              note="frozen UNets " + ", ".join(f"{n} {b / GIB:.2f}" for n, b in unet.items()))]
  out.append(dict(phase="T5 encode", peak=program("encode"), program=program("encode"), resident=0,
                  note="T5 alone; the UNets load after"))
  for n in job.tuned:  # the other stage's UNet stays loaded once the first batch ran
    other = frozen - unet[n]
    out.append(dict(phase=f"priors {n}", peak=program(f"priors {n}") + other,
                    program=program(f"priors {n}"), resident=other,
                    note="frozen UNets + the sampling loop"))
  out.append(dict(phase="train", peak=program("train"), program=program("train"), resident=0,
                  note="state donated; frozen UNets are arguments"))
  for n in job.tuned:
    other = frozen - unet[n] + state
    out.append(dict(phase=f"eval {n}", peak=program(f"eval {n}") + other,
                    program=program(f"eval {n}"), resident=other,
                    note="train state + frozen UNets + one subject's loop"))
  out.append(dict(phase="checkpoint", peak=state + frozen, program=0, resident=state + frozen,
                  host=state * mesh.devices.size, note="state to host (async save)"))
  out.append(dict(phase="export", peak=state + frozen, program=0, resident=state + frozen,
                  host=2 * adapters_host, note="every subject's adapters + peft tensors on host"))
  for r in out:
    r.setdefault("host", 0)
    r["fits"] = bool(r["peak"] < args.hbm_gib * GIB)
  return out


# ----------------------------------------------------------------------------
# The benchmark's time (pure arithmetic over the compiled programs' seconds)
# ----------------------------------------------------------------------------

def evaluation_steps(config) -> list[int]:
  """The steps `in_loop.JobEvaluation.due` evaluates at (step 0 with `eval.at_start`)."""
  every, end = int(config.eval.every), int(config.train.steps)
  if not every:
    return []
  return ([0] if config.eval.at_start else []) + [s for s in range(1, end + 1)
                                                  if s % every == 0 or s == end]


def benchmark_rows(config, jobs: list[Job], rows: dict, encode_batch: int, data_parallel: int,
                   pad: int = 0) -> list[dict]:
  """[{phase, runs, each_s, seconds, how}] of the whole benchmark, run as `jobs` (each job's
  T5 pass and class priors its own); rows[key]["step_s"] is one run of that program (a
  sampling loop: one denoising step), the same for every job (they have as many subjects;
  `pad` more slots each, trained but neither sampled for nor evaluated)."""
  e, p, t = config.eval, config.prior, config.train
  tuned, subjects = jobs[0].tuned, sum(len(j.names) for j in jobs)
  prior_steps = {n: config.cascade[n].num_steps for n in tuned}  # the stages' own
  eval_steps = {n: e.num_steps for n in tuned}
  call = lambda prefix, steps: sum(steps[n] * rows[f"{prefix} {n}"]["step_s"] for n in tuned)
  said = lambda prefix, steps: " + ".join(f"{steps[n]} x {rows[f'{prefix} {n}']['step_s']:.3f} s"
                                          for n in tuned)
  prior_call, eval_call = call("priors", prior_steps), call("eval", eval_steps)
  t5_b = -(-encode_batch // data_parallel) * data_parallel
  prior_batches = -(-p.num_images // p.batch_size) if methods.phases(config)[0].prior else 0
  classes = sum(len(j.class_prompts) for j in jobs)
  evals = evaluation_steps(config)
  texts = e.num_prompts * e.num_images + e.num_class_images
  images = sum(k for j in jobs for k in j.bench_images.values())
  per_job = "" if len(jobs) == 1 else f" in each of {len(jobs)} jobs"
  out = [
      dict(phase="T5 encode", runs=sum(-(-j.prompts // t5_b) for j in jobs),
           each_s=rows["encode"]["step_s"],
           how=f"{sum(j.prompts for j in jobs)} prompts, {t5_b} a call"),
      dict(phase="class priors", runs=classes * prior_batches, each_s=prior_call,
           how=f"{classes} class prompts x {prior_batches} calls of {p.batch_size} "
               f"({p.num_images} a class{per_job}); a call: {said('priors', prior_steps)}"),
      dict(phase="training", runs=t.steps * len(jobs), each_s=rows["train"]["step_s"],
           how=f"{t.steps} joint steps of {len(jobs[0].names)}{f' + {pad} padding' if pad else ''} "
               f"subjects{per_job}"),
      dict(phase="in-loop evaluation", runs=len(evals) * subjects * -(-texts // e.batch_size),
           each_s=eval_call,
           how=f"{len(evals)} evaluations x {subjects} subjects x {-(-texts // e.batch_size)} "
               f"calls of {e.batch_size} ({texts} images); a call: {said('eval', eval_steps)}"),
      dict(phase="benchmark evaluation",
           runs=sum(-(-k // e.batch_size) for j in jobs for k in j.bench_images.values()),
           each_s=eval_call,
           how=f"{images} images ({images // subjects} a subject), {e.batch_size} a call, "
               f"{e.sampler} {e.num_steps} steps a stage"),
  ]
  for r in out:
    r["seconds"] = r["runs"] * r["each_s"]
  return out


def goal(rows: list[dict], minutes: float) -> dict:
  """Whether the phases' seconds add up to under `minutes`, by how much, and which phase
  dominates (its share of the total)."""
  total = sum(r["seconds"] for r in rows)
  top = max(rows, key=lambda r: r["seconds"])
  return dict(total_s=total, goal_s=minutes * 60.0, meets=bool(total < minutes * 60.0),
              margin_s=minutes * 60.0 - total, dominant=top["phase"],
              dominant_share=top["seconds"] / total if total else 0.0)


def format_plan(phases: list[dict], bench: list[dict], verdict: dict, args) -> list[str]:
  """The two tables `--what=many` prints: memory per phase, then the benchmark's time."""
  gib = lambda b: f"{b / GIB:.2f}"
  lines = [f"# the job, phase by phase (per device, {args.hbm_gib:.0f} GiB):",
           f"  {'phase':<14} {'peak GiB':>9} {'program':>8} {'resident':>9} {'host GiB':>9}  what"]
  for r in phases:
    lines.append(f"  {r['phase']:<14} {gib(r['peak']):>9} {gib(r['program']):>8} "
                 f"{gib(r['resident']):>9} {gib(r['host']):>9}  {r['note']}"
                 f"{'' if r['fits'] else '  DOES NOT FIT'}")
  lines.append(f"# the benchmark of one method on {args.mesh} at {args.mfu:.0%} MFU:")
  for r in bench:
    lines.append(f"  {r['phase']:<21} {r['runs']:>6} x {r['each_s']:8.3f} s = "
                 f"{r['seconds'] / 60:7.1f} min  ({r['how']})")
  v = verdict
  lines.append(f"  total {v['total_s'] / 60:.1f} min: the {v['goal_s'] / 60:.0f}-minute goal is "
               + (f"MET with {v['margin_s'] / 60:.1f} min to spare" if v["meets"] else
                  f"NOT MET, over by {-v['margin_s'] / 60:.1f} min")
               + f"; {v['dominant']} dominates ({v['dominant_share']:.0%})")
  return lines
