r"""Many subjects, one job: `python -m dreambooth_jax.train_many --config=... --workdir=...`.

  python -m dreambooth_jax.train_many --config=configs/dreambooth_benchmark.py:tiny,runlocal \
    --workdir=workdirs/tiny_all

`dreambooth_jax.train` for a list of subjects (`config.subjects`), each with its
own identifier, class noun, photos and LoRA adapters, trained by ONE jitted step
on one frozen cascade (see dreambooth_jax/subjects.py for why each subject's
adapters then equal its lone run's). One readable `run()` in train.py's
sections: config -> mesh -> every subject folder (validated before anything
expensive) -> identifiers and prompts -> text embeddings (T5 once, cached) ->
class priors (one cache per distinct class prompt, shared by the subjects of that
class) -> state (resume: workdir checkpoint, else the adapters' initial draw) ->
jitted sharded step -> checkpoints, metrics -> per subject, a lone run's export.

With `config.eval.every` > 0 the job evaluates every subject in the loop
(dreambooth_jax/evaluation/in_loop.py: the protocol's metrics on a prompt subset,
logged as learning curves), keeps per subject the step `config.eval.select` chooses
(dreambooth_jax/evaluation/selection.py), and ends with the benchmark's report.

The subject axis is split over the mesh's data axes; when they do not divide the
number of subjects, padding slots fill it (`subjects.slots`: computed on copies of
the first subjects' data, left out of the loss, never exported).

Workdir: checkpoints/ (the joint state), class_priors/<class prompt>/,
prompt_embeddings/, metrics.jsonl, export/<subject>/ (the diffusers LoRA folders
and dreambooth.json a lone run writes in its export/, and selection.json: which
step and why), and subjects/<subject>/: a lone run's workdir (its config,
identifier and chosen checkpoint), which `python -m dreambooth_jax.sample
--workdir=.../subjects/<subject>` samples. With evaluation: eval/step_<N>/ (scores
and a grid per subject), report.md and report.json. The job draws no sample grids.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time

from absl import app, flags, logging

import jax
import numpy as np

from dreambooth_jax import checkpoint as checkpoint_lib
from dreambooth_jax import config_lib, data, embeddings, methods, metrics_writer
from dreambooth_jax import lora as lora_lib
from dreambooth_jax import pipeline, priors, sharding, state as state_lib
from dreambooth_jax import subjects as subjects_lib
from dreambooth_jax import train as train_lib
from dreambooth_jax import prompts as prompts_lib
from dreambooth_jax import utils


TrainError = state_lib.TrainError


def _slug(prompt: str) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_") or "empty"


def _eval_every(config) -> int:
  return int(config.eval.get("every", 0)) if config.get("eval") else 0


def joint_setup(config, stages, num_subjects: int, phase, mesh, rules, *, token_width: int
                ) -> state_lib.PhaseSetup:
  """What the job trains: every tuned stage ({name: cascade stage}) a `LoRAStage` with a
  subject axis, the per-subject optimiser, the abstract state and its shardings (also
  what experiments/plan_many.py lowers)."""
  settings = lora_lib.settings(config)
  joint = {n: lora_lib.LoRAStage(s, settings, subjects=num_subjects) for n, s in stages.items()}
  tx, abstract = state_lib.abstract_state(
      joint, lambda params: subjects_lib.optimizer(config, params, phase), phase, num_tokens=0,
      token_width=token_width)
  return state_lib.PhaseSetup(phase, joint, tx, abstract,
                              state_lib.state_shardings(abstract, mesh, rules))


def jit_step(config, ps: state_lib.PhaseSetup, names, frozen_shardings):
  """The one step of every subject, `(state, batch, frozen) -> (state, metrics)`, jitted with
  the state donated and sharded as `ps` says; `frozen`: the shared frozen UNets."""
  return jax.jit(methods.make_train_step(ps.stages, ps.tx, config.prior.weight,
                                         loss=subjects_lib.joint_loss(
                                             names, config.train.get("subject_chunk", 0))),
                 in_shardings=(ps.shardings, None, frozen_shardings),
                 out_shardings=(ps.shardings, None), donate_argnums=(0,))


def run(config, workdir):
  """The whole job; importable as `train_many.run(config, workdir)`; returns the joint state."""
  # == Setup: distributed, mesh, workdir ==========================================
  train_lib.initialize_distributed(config)
  subjects_lib.check_config(config)
  tuned = config_lib.parse_stages(config.stages)
  mesh, rules = sharding.make_mesh(dict(config.mesh)), pipeline.rules_of(config)
  (phase,) = methods.phases(config)
  lead = jax.process_index() == 0
  workdir = utils.workdir(workdir)
  t = config.train
  started = time.perf_counter()
  cache = utils.compilation_cache(config.get("compilation_cache", ""))
  logging.info("compilation cache: %s", cache or "off")

  # == Input checks before any expensive work: every subject folder ==================
  pipeline.check_pretrained_folders(config)
  subjects = subjects_lib.from_config(config)
  names = [s.name for s in subjects]
  resolutions = {s: config.cascade[s].resolution for s in tuned}
  photos = subjects_lib.load_all(subjects, resolutions,
                                 min_size=min(config.subject.min_size, max(resolutions.values())))
  print(f"{len(subjects)} subjects: " + ", ".join(f"{n} ({len(photos[n].paths)} images)"
                                                 for n in names), flush=True)
  evaluation = None
  if _eval_every(config):  # the evaluation package only when asked (the rule checked here)
    from dreambooth_jax.evaluation import in_loop
    evaluation = in_loop.JobEvaluation(config, subjects, workdir)
  if lead:
    config_lib.save(config, workdir / "config.json")

  # == Models, identifiers, prompts ===================================================
  models = pipeline.build(config, mesh)
  tok = models.tokenizer
  folders = {n: workdir / "subjects" / n for n in names}  # each a lone run's workdir
  for folder in folders.values():
    folder.mkdir(parents=True, exist_ok=True)
  idents = subjects_lib.resolve_identifiers(config, tok, subjects, folders)
  lone = {s.name: subjects_lib.lone_config(config, s, idents[s.name].text) for s in subjects}
  prompts = {n: prompts_lib.instance_and_class(lone[n], idents[n]) for n in names}
  for n in names:
    print(f"  {n}: identifier {idents[n].text!r} ({idents[n].source}); instance prompt "
          f"{prompts[n][0]!r}, class prompt {prompts[n][1]!r}", flush=True)

  # == Text embeddings: T5 once, cached, for every subject's prompts ===================
  wanted = [p for n in names for p in prompts[n]] + [""]
  if evaluation:  # the evaluation's prompts, each subject's identifier filled in
    wanted += evaluation.prompts({n: functools.partial(prompts_lib.fill, lone[n], idents[n])
                                  for n in names})
  table = models.encode(list(dict.fromkeys(wanted)), workdir / "prompt_embeddings")
  emb = lambda ps: embeddings.stack_embeddings(table, ps)

  # == Class priors: one cache per distinct class prompt ==============================
  prior_images = {}
  if phase.prior:
    upto = [s.name for s in models.cascade.stages if s.name in tuned][-1]
    for class_prompt in dict.fromkeys(prompts[n][1] for n in names):
      spec = priors.PriorSpec.from_cascade(
          models.cascade, class_prompt, config.prior.num_images, upto=upto,
          fingerprint=models.weights_fingerprint, seed=config.prior.seed,
          batch_size=config.prior.batch_size)
      images = priors.ensure_priors(models.cascade, spec, emb([class_prompt]), emb([""]),
                                    workdir / "class_priors" / _slug(class_prompt), mesh=mesh,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
      prior_images[class_prompt] = {s: data.to_model_range(images[s]) for s in tuned}

  # == State: resume from the workdir, else every subject from the lone run's start ====
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.checkpoint.keep,
                                     async_save=config.checkpoint.async_save)
  settings = lora_lib.settings(config)
  # The subject axis: the subjects, then padding slots until the data axes divide it.
  slots = subjects_lib.slots(names, mesh)
  if len(slots) > len(names):
    print(f"  {len(slots) - len(names)} padding slot(s): {len(slots)} slots split over the "
          f"mesh's {sharding.data_parallelism(mesh)}-way data axes", flush=True)
  ps = joint_setup(config, {n: models.cascade.by_name[n] for n in tuned}, len(slots), phase,
                   mesh, rules, token_width=models.t5_width)
  joint, tx = ps.stages, ps.tx
  start = ckpt.latest_step()
  if start is not None:
    meta = ckpt.restore_metadata(start)
    stored = meta.get("subjects")
    if stored != names:
      raise TrainError(f"{workdir} holds a job over subjects {stored}, not {names}; use a new "
                       "--workdir (the subject axis of its adapters is that list)")
    stored_slots = meta.get("slots", len(names))  # jobs from before padding: one per subject
    if stored_slots != len(slots):
      raise TrainError(f"{workdir} holds a job of {stored_slots} subject slots (padded for "
                       f"its mesh's data axes), this mesh needs {len(slots)}: resume with the "
                       "same config.mesh data sizes, or use a new --workdir")
    state = state_lib.restore_state(ckpt, start, ps.abstract, ps.shardings)
    print(f"resumed from {workdir} at step {start}", flush=True)
  else:
    state = state_lib.initial_state(joint, tx, phase, ps.shardings, step=0,
                                    rng=jax.random.key(config.seed))

  # == The step and its batches ========================================================
  frozen = {n: s.base_params for n, s in joint.items()}  # the adapters' shared frozen UNets
  frozen_sh = {n: sharding.param_shardings(v, mesh, rules) for n, v in frozen.items()}
  frozen = jax.device_put(frozen, frozen_sh)
  lone_stages = {n: lora_lib.LoRAStage(models.cascade.by_name[n], settings) for n in tuned}
  lone_ps = state_lib.setup(lone[names[0]], lone_stages, phase, mesh, rules, num_tokens=0,
                            token_width=models.t5_width)  # a lone run's state: the same for all
  step_fn = jit_step(config, ps, names, frozen_sh)
  prior_n = t.prior_batch_size if phase.prior else 0
  _, layout = subjects_lib.batch_layout(mesh, resolutions, num_subjects=len(slots),
                                        batch_size=t.batch_size, prior_batch_size=prior_n,
                                        grad_accum=t.grad_accum, text_width=models.t5_width)
  text = {k: {f: np.stack([emb([prompts[n][i]])[f] for n in slots]) for f in ("text", "mask")}
          for i, k in enumerate(("instance", "class"))}  # [S, 1, L(, D)]
  text = jax.tree.map(lambda x: np.broadcast_to(x, (t.grad_accum,) + x.shape), text)

  def make_batch(step: int):
    """Step `step`'s images: each subject's batch as its lone run draws it (same seeds),
    its class's prior images; the whole global batch on every host (it is small)."""
    batch = {n: {"instance": [], "prior": []} for n in tuned}
    for k in range(t.grad_accum):
      micro = step * t.grad_accum + k
      idx = (data.batch_indices(config.prior.seed, micro, prior_n, config.prior.num_images)[0]
             if prior_n else None)
      inst = [photos[n].batch(config.seed, micro, t.batch_size, flip=config.subject.flip)
              for n in slots]
      for stage in tuned:
        batch[stage]["instance"].append(np.stack([x[stage] for x in inst]))
        if idx is not None:
          batch[stage]["prior"].append(np.stack([prior_images[prompts[n][1]][stage][idx]
                                                 for n in slots]))
    host = {n: {k: np.stack(v) for k, v in batch[n].items() if v} for n in tuned}
    host["text"] = text
    return jax.tree.map(state_lib.put_global, host, layout)

  # == In-loop evaluation: each subject's adapters on the shared frozen UNets ==========
  def keep(i: int, step: int):
    """Subject i's state of `step` (the current state's) as its lone workdir's checkpoint:
    the step its rule chose so far (keep=1: the one chosen before goes)."""
    with checkpoint_lib.Checkpointer(folders[names[i]], keep=1, async_save=False) as own:
      if step not in own.all_steps():
        own.save(step, subjects_lib.subject_state(state, lone_ps.abstract, i),
                 dict(step=step, identifier=idents[names[i]].text, phase=phase.name))

  def params_of(i: int):
    own = subjects_lib.subject_state(state["params"], lone_ps.abstract["params"], i)
    return {n: lone_stages[n].bind(frozen[n], own[n]) for n in tuned}

  def evaluate(step: int):
    scalars = evaluation.evaluate(step, params_of, table, mesh=mesh, lead=lead)
    writer.write(step, scalars)
    for i, n in enumerate(names):
      if evaluation.choose(n, step)["step"] == step:  # the choice moved here (see selection.py)
        keep(i, step)
    print(f"eval at step {step}: " + ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in
                                               scalars.items() if k.startswith("eval_mean/"))
          + " (mean over subjects)", flush=True)

  writer = metrics_writer.MetricsWriter(workdir, tensorboard=config.log.tensorboard and lead)
  start_step = int(state["step"])
  if evaluation:
    evaluation.load(models.cascade)
    evaluation.resume(start_step)
    # Resumed: the steps after the checkpoint run again, so what they kept goes; the
    # checkpoint's own step, if its evaluation chose it, is kept from the restored state.
    for i, n in enumerate(names):
      with checkpoint_lib.Checkpointer(folders[n], keep=1, async_save=False) as own:
        for later in [k for k in own.all_steps() if k > start_step]:
          own.delete(later)
      if start_step in evaluation.history:
        if evaluation.choose(n, start_step)["step"] == start_step:
          keep(i, start_step)
    if start_step not in evaluation.history and (
        (start_step and evaluation.due(start_step, phase.end)) or
        (not start_step and config.eval.at_start)):
      evaluate(start_step)  # a job stopped between its checkpoint and its evaluation

  # == Train ===========================================================================
  progress = utils.StepProgress(start_step, t.steps, disable=not lead)
  for step in range(start_step, phase.end):
    with jax.set_mesh(mesh):
      state, metrics = step_fn(state, make_batch(step), frozen)
    metrics = jax.device_get(metrics)
    if step == start_step:
      print(f"first step done {time.perf_counter() - started:.1f} s after start", flush=True)
    done = step + 1
    bad = [n for n in names if not np.isfinite(metrics[f"subject/{n}/loss"])]
    train_lib.record_step(config, done, phase.end, state, metrics, ckpt=ckpt, writer=writer,
                          progress=progress, workdir=workdir,
                          what=f"subjects: {', '.join(bad) or 'loss finite, gradients not'}",
                          metadata=dict(step=done, phase=phase.name, subjects=names,
                                        slots=len(slots)),
                          fix="check those subjects' images")
    if evaluation and evaluation.due(done, phase.end):
      evaluate(done)
  progress.close()
  ckpt.wait()

  # == Per subject: the chosen step's lone workdir (config, identifier, checkpoint), export ==
  done = int(state["step"])
  choices = {}
  for i, s in enumerate(subjects):
    c = lone[s.name]
    choice = choices[s.name] = (
        evaluation.choose(s.name, done) if evaluation else
        dict(rule="last", step=done, reason="no in-loop evaluation (config.eval.every=0): the "
                                            "last step"))
    step = choice["step"]
    if step == done:
      keep(i, done)  # a rerun of a finished job: already there
    with checkpoint_lib.Checkpointer(folders[s.name], keep=1, async_save=False) as own_ckpt:
      if step not in own_ckpt.all_steps():
        raise TrainError(f"subject {s.name!r}: its rule chose step {step}, whose adapters are "
                         f"not in {folders[s.name]} (a resumed job whose evaluations differ from "
                         "the first run's?); rerun in a new --workdir")
      own = (subjects_lib.subject_state(state, lone_ps.abstract, i) if step == done else
             state_lib.restore_state(own_ckpt, step, lone_ps.abstract, lone_ps.shardings))
    own_params = train_lib.to_host(own["params"])  # every process: a gather, multi-host
    print(f"  {s.name}: {choice['reason']}", flush=True)
    if lead:
      config_lib.save(c, folders[s.name] / "config.json")
      export = utils.absolute(workdir) / "export" / s.name
      info = dict(identifier=idents[s.name].text, class_noun=s.class_noun,
                  instance_prompt=prompts[s.name][0], class_prompt=prompts[s.name][1],
                  method=config.method, stages=list(tuned), prompt_preprocessing=tok.preprocess,
                  unet_text_mask=bool(config.model.unet_text_mask), steps=step, job_steps=done,
                  config=json.loads(config_lib.to_json(c)))
      info.update(lora_lib.export_all(export, lone_stages, own_params))
      utils.write_json(export / checkpoint_lib.EXPORT_INFO, info, indent=2, default=str)
      utils.write_json(export / "selection.json", dict(choice, subject=s.name, job_steps=done))
  if evaluation and lead:
    evaluation.write_report(workdir, choices, settings=dict(
        method=config.method, lora_rank=settings.rank, steps=done, stages=list(tuned)),
        title=f"{config.method}, LoRA rank {settings.rank}: {len(names)} subjects, {done} steps")
    print(f"report: {workdir / 'report.md'}", flush=True)
  writer.close()
  print(f"done: {done} steps of {len(names)} subjects; export/<subject>/ and subjects/<subject>/ "
        f"in {workdir}", flush=True)
  return state


def main(argv=None):
  del argv
  # --config and --workdir are train.py's flags (absl flags are process-wide; importing
  # train defined them).
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if config is None:
    raise config_lib.ConfigError("pass --config=configs/dreambooth_benchmark.py[:variant]")
  return run(config, workdir or os.path.join("workdirs", "dreambooth_many"))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(lambda argv: utils.run_cli(main, argv), flags_parser=train_lib.parse_flags)
