r"""DreamBooth fine-tuning of a cascade: `python -m dreambooth_jax.train --config=... --workdir=...`.

  python -m dreambooth_jax.train --config=configs/imagen_dog.py --workdir=workdirs/dog

One readable `run()` in sections, big_vision style: config -> mesh -> subject
data (validated before anything expensive) -> identifier and prompts -> text
embeddings (T5 once, cached, then released) -> class priors (the frozen cascade,
cached) -> state (resume: workdir checkpoint, else pretrained/random init) ->
jitted sharded `train_step` -> checkpoints, metrics, sample grids -> diffusers
export of every tuned stage. The step, its batches and its sample grids are
closures inside `run()` (as big_vision's `update_fn`); the state API is
`dreambooth_jax.state`.

Errors a user can fix (bad images, unknown config keys, missing weights,
non-finite loss) end the run with one paragraph on stderr and exit code 2;
nothing already in the workdir is overwritten by a failing run.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from dreambooth_jax import checkpoint as checkpoint_lib
from dreambooth_jax import config_lib, data, embeddings, grids, methods, metrics_writer
from dreambooth_jax import lora as lora_lib
from dreambooth_jax import pipeline, priors
from dreambooth_jax import prompts as prompts_lib
from dreambooth_jax import sharding, state as state_lib, utils

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/imagen_dog.py[:arg]).",
                                          lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, caches, logs and exports go (local or "
                    "gs://...).")

TrainError = state_lib.TrainError


def run(config, workdir):
  """The whole job; importable (tests, notebooks) as `train.run(config, workdir)`."""
  # == Setup: distributed, mesh, workdir ==========================================
  initialize_distributed(config)
  tuned = config_lib.parse_stages(config.stages)
  mesh, rules = sharding.make_mesh(dict(config.mesh)), pipeline.rules_of(config)
  all_phases = methods.phases(config)
  if methods.uses_learned_tokens(config) and not config.learned_token.text:
    raise config_lib.ConfigError(f"config.method={config.method!r} learns a token: set "
                                 "config.learned_token.text, e.g. '<rare>'")
  lead = jax.process_index() == 0
  workdir = utils.workdir(workdir)  # local or gs://...; a missing backend fails here
  t = config.train
  started = time.perf_counter()
  cache = utils.compilation_cache(config.get("compilation_cache", ""))  # a rerun compiles nothing
  logging.info("compilation cache: %s", cache or "off")

  # == Input checks before any expensive work =======================================
  pipeline.check_pretrained_folders(config)
  subject_dir = config.subject.dir or str(data.default_subject_dir())
  resolutions = {s: config.cascade[s].resolution for s in tuned}
  subject = data.SubjectData.from_folder(subject_dir, resolutions,
                                         min_size=min(config.subject.min_size, max(resolutions.values())))
  logging.info("subject: %d images from %s", len(subject.paths), subject_dir)
  if lead:
    config_lib.save(config, workdir / "config.json")

  # == Models, identifier, prompts ===============================================
  models = pipeline.build(config, mesh)  # weights load later, when used, into their shardings
  tok = models.tokenizer
  identifier = prompts_lib.resolve_identifier(config, tok, workdir)
  instance_prompt, class_prompt = prompts_lib.instance_and_class(config, identifier)
  print(f"{config.method}: identifier {identifier.text!r} ({identifier.source}); instance prompt "
        f"{instance_prompt!r}, class prompt {class_prompt!r}", flush=True)
  previews = prompts_lib.previews(config, identifier)
  learned = lambda p: prompts_lib.has_learned(tok, p)

  # == Text embeddings: T5 once, cached; nothing keeps it alive afterwards =========
  # (Prompts with a learned token are encoded with the current rows when needed.)
  cache_dir = workdir / "prompt_embeddings"
  table = models.encode([p for p in [instance_prompt, class_prompt, ""] + previews
                         if not learned(p)], cache_dir)
  emb = lambda ps: embeddings.stack_embeddings(table, ps)
  uncond = emb([""])
  # A tuned stage with a text encoder of its own (the x4 upscaler's frozen CLIP) reads the
  # prompts as typed through it, as its pipeline does at sampling: both embedded once.
  own_text = {}
  for name in tuned:
    stage = models.cascade.by_name[name]
    if getattr(stage, "own_text_encoder", False):
      states = np.asarray(stage.embed([instance_prompt, class_prompt])["text"])
      own_text[name] = {k: {"text": states[i:i + 1], "mask": np.ones((1, states.shape[1]), np.int32)}
                        for i, k in enumerate(("instance", "class"))}

  # == Class priors from the frozen cascade ===========================================
  prior_images = None
  if any(p.prior for p in all_phases):
    upto = [s.name for s in models.cascade.stages if s.name in tuned][-1]
    spec = priors.PriorSpec.from_cascade(models.cascade, class_prompt, config.prior.num_images,
                                         upto=upto, fingerprint=models.weights_fingerprint,
                                         seed=config.prior.seed, batch_size=config.prior.batch_size)
    prior_images = priors.ensure_priors(models.cascade, spec, emb([class_prompt]), uncond,
                                        workdir / "class_priors", mesh=mesh,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())
    # Kept uint8, converted per batch: 1000 class images at 1024 px (a tuned stage III) are
    # 3 GiB of host memory as uint8, 12 GiB as float32.
    prior_images = {s: prior_images[s] for s in tuned}
  # Frozen stages keep their weights (class priors, sample grids); a tuned stage's pretrained
  # weights move into the train state below, or are never needed when it is restored.

  # == State: resume from the workdir, else the built (pretrained / random) params =====
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.checkpoint.keep,
                                     async_save=config.checkpoint.async_save)
  # TI backprops through T5; T5's adapters learn on it: either way it stays loaded.
  t5 = (models.load_t5() if methods.uses_learned_tokens(config) or lora_lib.adapts_text(config)
        else None)
  stages = {n: models.cascade.by_name[n] for n in tuned}
  adapted = lora_lib.wrap(config, stages)  # LoRA: adapters learn on the frozen UNets
  text_adapters = lora_lib.text_adapters(config, t5)  # and on T5's attention, if asked
  setup = lambda phase: state_lib.setup(config, adapted if phase.train_unets else stages, phase, mesh,
                                        rules, num_tokens=len(tok.learned_tokens),
                                        token_width=models.t5_width, text=text_adapters)
  start = ckpt.latest_step()
  if start is not None:
    ps = setup(state_lib.checkpoint_phase(config, ckpt, start))
    if ps.phase.train_unets:
      for stage in ps.stages.values():
        stage.release()  # the checkpoint holds them; no pretrained copy (LoRA keeps its base)
    state = state_lib.restore_state(ckpt, start, ps.abstract, ps.shardings)
    print(f"resumed from {workdir} at step {start} ({ps.phase.name})", flush=True)
  else:
    ps = setup(all_phases[0])
    rows = (methods.initial_token_rows(t5, tok, [config.learned_token.init_word or
                                                 config.subject.class_noun])
            if t5 is not None else None)
    state = state_lib.initial_state(ps.stages, ps.tx, ps.phase, ps.shardings, rows=rows, step=0,
                                    rng=jax.random.key(config.seed), text=ps.text)

  # == The step of a phase, its batches, its sample grids (closures) ===================
  replicated = NamedSharding(mesh, P())
  start_step = int(state["step"])

  def compile_step(ps: state_lib.PhaseSetup):
    """The jitted step and what it reads but never learns: UNets the phase keeps fixed,
    T5 while token rows or its adapters learn, placed by the rules (already there:
    no copy), and a tuned stage's other frozen models (the x4 upscaler's VAE)."""
    frozen, graphdef = {}, None
    for n, s in ps.stages.items():
      if not ps.phase.train_unets:
        frozen[n] = s.params
      elif isinstance(s, lora_lib.LoRAStage):
        frozen[n] = s.base_params  # what the adapters are added to
    if ps.phase.train_tokens or ps.text is not None:
      graphdef, frozen["t5"] = nnx.split(t5)
    frozen_sh = {k: sharding.param_shardings(v, mesh, rules) for k, v in frozen.items()}
    # A stage's other frozen models (the x4 upscaler's VAE) keep the placement they were
    # loaded with (the VAE is replicated: upscaler.vae_rules).
    parts = {n: s.frozen_parts() for n, s in ps.stages.items()}
    parts = {n: p for n, p in parts.items() if p}
    if parts:
      frozen[methods.FROZEN_PARTS] = parts
      frozen_sh[methods.FROZEN_PARTS] = jax.tree.map(lambda x: x.sharding, parts)
    step_fn = jax.jit(methods.make_train_step(ps.stages, ps.tx, config.prior.weight,
                                              t5_graphdef=graphdef, text=ps.text),
                      in_shardings=(ps.shardings, None, frozen_sh), out_shardings=(ps.shardings, None),
                      donate_argnums=(0,))
    return step_fn, jax.device_put(frozen, frozen_sh)

  def phase_text(ps: state_lib.PhaseSetup, state):
    """The instance and class prompts as the step reads them, with the accumulation axis."""
    def ids(prompt):
      t = tok([prompt])
      return {"input_ids": t["input_ids"], "mask": t["attention_mask"]}
    if ps.text is not None:  # T5's adapters learn: the step encodes both prompts
      text = {"instance": ids(instance_prompt), "class": ids(class_prompt)}
      return jax.tree.map(lambda x: np.broadcast_to(x, (t.grad_accum,) + x.shape), text)
    if ps.phase.train_tokens:  # token ids; the step encodes them with the rows it learns
      instance = ids(instance_prompt)
    elif learned(instance_prompt):  # rows fixed: encode once
      rows = np.asarray(jax.device_get(state_lib.learned_rows(state)))
      instance = embeddings.stack_embeddings(
          models.encode([instance_prompt], cache_dir, rows=rows, t5=t5), [instance_prompt])
    else:
      instance = emb([instance_prompt])
    text = {"instance": instance, "class": emb([class_prompt])}
    return jax.tree.map(lambda x: np.broadcast_to(x, (t.grad_accum,) + x.shape), text)

  def make_batch(ps: state_lib.PhaseSetup, step: int, text, layout):
    """This host's slice of step `step`'s images, as global arrays laid out as `layout`."""
    prior_n = t.prior_batch_size if ps.phase.prior and prior_images is not None else 0
    use_prior = prior_n > 0
    split = state_lib.batch_split(mesh, t.batch_size, prior_n)
    host = dict(process_index=jax.process_index(), process_count=jax.process_count()) if split else {}
    batch = {name: {"instance": [], "prior": []} for name in tuned}
    for k in range(t.grad_accum):
      micro = step * t.grad_accum + k
      inst = subject.batch(config.seed, micro, t.batch_size, flip=config.subject.flip, **host)
      idx = None
      if use_prior:
        idx = data.batch_indices(config.prior.seed, micro, prior_n, config.prior.num_images)[0]
        idx = idx[data.host_slice(prior_n, **host)] if split else idx
      for name in tuned:
        batch[name]["instance"].append(inst[name])
        if idx is not None:
          batch[name]["prior"].append(data.to_model_range(prior_images[name][idx]))
    put = lambda sh, x: jax.make_array_from_process_local_data(sh, x)
    out = {name: {k: put(layout[name][k], np.stack(v)) for k, v in batch[name].items() if v}
           for name in tuned}
    out["text"] = jax.tree.map(lambda x: put(replicated, x), text)
    for name, own in own_text.items():  # the same prompts, through the stage's own encoder
      out[name]["text"] = jax.tree.map(
          lambda x: put(replicated, np.broadcast_to(x, (t.grad_accum,) + x.shape)), own)
    return out

  def write_samples(ps: state_lib.PhaseSetup, state, step: int):
    """Every preview prompt x log.num_samples, sampled in batches shaped exactly as the
    class-prior batches (same size, same mesh): the cascade's sampling programs, compiled
    for the priors, are reused instead of compiled again for the grid. Past the priors'
    stages, a stage III (`config.pretrained.stage_3`) takes them to 1024 px, written
    at full size beside the grid too."""
    params = lora_lib.bind_all(ps.stages, {name: p for name, p in state["params"].items()
                                           if name in ps.stages})
    rows = state_lib.learned_rows(state)
    rows = None if rows is None else np.asarray(jax.device_get(rows))
    table_now, encoder, uncond_now = dict(table), t5, uncond
    uses = [p for p in previews if learned(p)]
    if ps.text is not None:  # T5 learns too: every prompt, "" included, through it now
      encoder = ps.text.bind(nnx.state(t5), state["params"][lora_lib.TEXT]).module()
      uses = list(previews) + [""]
    if uses:  # the current rows / adapters, not cached: they change every step
      e, m = embeddings.encode_prompts(encoder, tok, uses, learned_rows=rows)
      table_now.update({p: embeddings.PromptEmbedding(e[i], m[i]) for i, p in enumerate(uses)})
      uncond_now = embeddings.stack_embeddings(table_now, [""])
    n = config.log.num_samples
    wanted = [p for p in previews for _ in range(n)]
    size = config.prior.batch_size if prior_images is not None else len(wanted)
    images = sample_previews(models.cascade, table_now, uncond_now, wanted, batch=size,
                             params=params, mesh=mesh)
    grid = [(p, {k: v[i * n:(i + 1) * n] for k, v in images.items()}) for i, p in enumerate(previews)]
    if lead:
      path = workdir / "samples" / f"step_{step:06d}.png"
      grids.save_grid(path, grid)
      if getattr(models.cascade.stages[-1], "own_text_encoder", False):
        grids.save_last_stage(path, grid)  # 1024 px images say little as grid tiles

  # == Phases (one for DreamBooth and TI, two for ti_then_finetune) ====================
  writer = metrics_writer.MetricsWriter(workdir, tensorboard=config.log.tensorboard and lead)
  progress = utils.StepProgress(int(state["step"]), t.steps, disable=not lead)
  for phase in all_phases[all_phases.index(ps.phase):]:
    if int(state["step"]) >= phase.end and phase is not all_phases[-1]:
      continue  # a checkpoint at this phase's end: the next phase starts from it
    if not state_lib.is_phase(state, phase):  # entering the next phase
      ps = setup(phase)
      state = state_lib.initial_state(ps.stages, ps.tx, phase, ps.shardings,
                                      rows=state_lib.learned_rows(state), step=int(state["step"]),
                                      rng=state["rng"], text=ps.text)
      print(f"phase {phase.name}: steps {phase.start + 1}-{phase.end}", flush=True)
    step_fn, frozen = compile_step(ps)
    text = phase_text(ps, state)
    _, layout = state_lib.batch_layout(
        mesh, resolutions, batch_size=t.batch_size, grad_accum=t.grad_accum,
        prior_batch_size=t.prior_batch_size if phase.prior and prior_images is not None else 0,
        text_width=models.t5_width,
        own_text={n: v["instance"]["text"].shape[-1] for n, v in own_text.items()})
    for step in range(int(state["step"]), phase.end):
      batch = make_batch(ps, step, text, layout)
      with jax.set_mesh(mesh):  # traced with the mesh: the UNets pin activations' batch axis
        state, metrics = step_fn(state, batch, frozen)
      metrics = jax.device_get(metrics)
      if step == start_step:
        print(f"first step done {time.perf_counter() - started:.1f} s after start "
              f"(compilation cache: {cache or 'off'})", flush=True)
      done = step + 1
      record_step(config, done, phase.end, state, metrics, ckpt=ckpt, writer=writer,
                  progress=progress, workdir=workdir, what=f"loss={metrics['loss']}",
                  metadata=dict(step=done, identifier=identifier.text, phase=phase.name))
      if config.log.sample_every and (done % config.log.sample_every == 0 or done == t.steps):
        write_samples(ps, state, done)
  progress.close()
  ckpt.wait()

  # == Export what was learned: tuned UNets in diffusers format, token rows ============
  params = to_host(state["params"])
  rows = state_lib.learned_rows(state)
  if lead:
    info = dict(identifier=identifier.text, class_noun=config.subject.class_noun,
                instance_prompt=instance_prompt, class_prompt=class_prompt, method=config.method,
                stages=list(tuned), prompt_preprocessing=tok.preprocess,
                unet_text_mask=bool(config.model.unet_text_mask), steps=int(state["step"]),
                config=json.loads(config_lib.to_json(config)))
    lora_stages = {n: s for n, s in ps.stages.items() if isinstance(s, lora_lib.LoRAStage)}
    unets = {n: (stages[n].graphdef, params[n]) for n in tuned if n in params and n not in lora_stages}
    if rows is not None:
      info["learned_tokens"] = {identifier.text: identifier.pieces[0] if identifier.pieces else ""}
    if lora_stages:  # adapters in export/<stage>/, merged UNets in export/<stage>_merged/
      info.update(lora_lib.export_all(utils.absolute(workdir) / "export", lora_stages, params,
                                      text=ps.text, text_base=None if t5 is None else nnx.state(t5)))
    export = checkpoint_lib.export_final(workdir, unets, info)
    if rows is not None:
      checkpoint_lib.export_token_rows(export, tok.learned_tokens, np.asarray(jax.device_get(rows)))
  writer.close()
  print(f"done: {t.steps} steps; checkpoint, export/ and samples/ in {workdir}", flush=True)
  return state


def sample_previews(cascade, table, uncond, prompts, *, batch: int, params, mesh
                    ) -> dict[str, np.ndarray]:
  """{stage: uint8 [len(prompts), H, W, 3]} of `prompts` (one per image, each in `table`),
  sampled `batch` at a time (the last batch padded with its last prompt, the padding
  dropped), batch k with key 1234 + k. The prompt texts go along (`prompts=`): a stage
  with a text encoder of its own, the x4 upscaler as stage III, reads them, so with
  `config.pretrained.stage_3` the previews reach 1024 px."""
  images = {}
  for k, begin in enumerate(range(0, len(prompts), batch)):
    chunk = list(prompts[begin:begin + batch])
    padded = chunk + [chunk[-1]] * (batch - len(chunk))
    out = cascade.sample(embeddings.stack_embeddings(table, padded), jax.random.key(1234 + k),
                         uncond_embeddings=uncond, params=params, batch_size=batch, mesh=mesh,
                         prompts=padded)
    for stage_name, x in out.items():
      images.setdefault(stage_name, []).append(x[:len(chunk)])
  return {k: np.concatenate(v) for k, v in images.items()}


def record_step(config, done: int, end: int, state, metrics, *, ckpt, writer, progress, workdir,
                what: str, metadata: dict, fix: str = "check the subject images") -> None:
  """After step `done`: stop on a non-finite update (`what` says which loss; the last good
  checkpoint stays intact), else progress, the metrics every config.log.every steps and a
  checkpoint every config.checkpoint.every, both at the phase's `end` too."""
  if not metrics["finite"]:
    ckpt.wait()
    raise TrainError(f"non-finite loss or gradients at step {done} ({what}); the update was not "
                     f"applied and the last good checkpoint (step {ckpt.latest_step()}) in "
                     f"{workdir} is intact. Lower config.train.lr or {fix}.")
  progress.update(metrics)
  if done % config.log.every == 0 or done == end:
    writer.write(done, metrics)
  if done % config.checkpoint.every == 0 or done == end:
    ckpt.save(done, state, metadata)


def initialize_distributed(config) -> None:
  """`jax.distributed.initialize` as `config.distributed` asks (multi-host jobs), else nothing."""
  d = config.distributed
  if d.initialize:
    jax.distributed.initialize(coordinator_address=d.coordinator_address or None,
                               num_processes=d.num_processes or None, process_id=d.process_id,
                               local_device_ids=[int(x) for x in d.local_device_ids.split(",")]
                               if d.local_device_ids else None)


def to_host(tree):
  """Host numpy copies of a sharded pytree, one leaf at a time: a leaf is whole on a
  device only while it is gathered (multi-host), never the whole tree."""
  if jax.process_count() == 1:
    return jax.device_get(tree)  # fetches each leaf's shards; nothing is gathered on device
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def main(argv=None):
  del argv
  config, workdir = _CONFIG.value, flags.FLAGS.workdir
  if config is None:
    raise config_lib.ConfigError("pass --config=configs/imagen_dog.py[:variant]")
  return run(config, workdir or os.path.join("workdirs", "dreambooth"))


def parse_flags(argv):
  """absl flag parsing whose config errors (unknown keys, bad variants) read as one paragraph."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - config files raise anything; all are user errors here
    cause = e
    while getattr(cause, "__cause__", None) is not None:
      cause = cause.__cause__
    msg = cause.args[0] if isinstance(cause, KeyError) and cause.args else str(cause)
    msg = str(msg).strip().splitlines()
    print("error: " + " ".join(line.strip() for line in msg if line.strip() and
                               not line.startswith(("Traceback", "  File", "    "))),
          file=sys.stderr, flush=True)
    print("Override only keys that exist in the config (see configs/imagen_dog.py).", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(lambda argv: utils.run_cli(main, argv), flags_parser=parse_flags)
