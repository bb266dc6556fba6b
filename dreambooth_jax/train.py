r"""DreamBooth fine-tuning of a cascade: `python -m dreambooth_jax.train --config=... --workdir=...`.

  python -m dreambooth_jax.train --config=configs/imagen_dog.py --workdir=workdirs/dog

One readable `main()` in sections, big_vision style: config -> mesh -> subject
data (validated before anything expensive) -> identifier and prompts -> text
embeddings (T5 once, cached, then released) -> cascade -> class priors (frozen
cascade, cached) -> state (resume: workdir checkpoint, else pretrained/random
init) -> jitted sharded `train_step` -> checkpoints, metrics, sample grids ->
diffusers export of every tuned stage.

Errors a user can fix (bad images, unknown config keys, missing weights,
non-finite loss) end the run with one paragraph on stderr and exit code 2;
nothing already in the workdir is overwritten by a failing run.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
from flax import nnx

from dreambooth_jax import checkpoint as checkpoint_lib
from dreambooth_jax import config_lib, data, embeddings, methods, metrics_writer, pipeline, priors
from dreambooth_jax import sharding, text, utils
from dreambooth_jax.weights import WeightsError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/imagen_dog.py[:arg]).",
                                          lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, caches, logs and exports go.")


class TrainError(RuntimeError):
  """The run cannot go on; the message says why and what is intact."""


# Errors a user fixes (not bugs): reported as one paragraph, exit code 2.
USER_ERRORS = (data.DataError, WeightsError, config_lib.ConfigError, TrainError, utils.PathError)


def _instance_and_class_prompts(config, identifier):
  s = config.subject
  return (text.instance_prompt(identifier, s.class_noun, template=s.instance_template),
          text.class_prompt(s.class_noun, template=s.class_template))


def sample_prompts(config, identifier) -> list[str]:
  templates = list(config.log.sample_prompts)
  if "{class_noun}" not in config.subject.instance_template:  # the identifier is the subject
    templates = [t.replace("{identifier} {class_noun}", "{identifier}") for t in templates]
  return [t.format(identifier=str(identifier), class_noun=config.subject.class_noun)
          for t in templates]


def _resolve_identifier(config, tokenizer, workdir) -> text.Identifier:
  """The identifier of this workdir: reused on resume; else the learned token, a user-given
  word, or sampled rare tokens (seeded)."""
  path = utils.as_path(workdir) / "identifier.json"
  s = config.subject
  if path.exists():
    ident = text.Identifier.from_json(path.read_text())
    ident.verify(tokenizer)
    if s.identifier and s.identifier != ident.text:
      raise TrainError(f"{workdir} was trained with identifier {ident.text!r}, but "
                       f"config.subject.identifier={s.identifier!r}; use a new --workdir.")
    return ident
  if methods.uses_learned_tokens(config):
    token = config.learned_token.text
    ident = text.Identifier(token, tuple(tokenizer.encode(token, add_eos=False)), "learned",
                            pieces=(config.learned_token.init_word or s.class_noun,))
  else:
    ident = text.resolve_identifier(tokenizer, s.identifier or None, class_noun=s.class_noun,
                                    template=s.instance_template, num_tokens=s.identifier_tokens,
                                    seed=config.seed, id_range=tuple(s.identifier_id_range))
  utils.write_text(path, ident.to_json())
  return ident


def has_learned(tokenizer, prompt: str) -> bool:
  return any(token in prompt for token in tokenizer.learned_tokens)


def _encode_all(config, models, prompts, workdir, mesh, rows=None, t5=None):
  """{prompt: PromptEmbedding} through the workdir's cache; `rows` embed learned tokens
  (their digest is part of the cache key, so new rows never read stale entries)."""
  cache = embeddings.PromptEmbeddingCache(utils.as_path(workdir) / "prompt_embeddings")
  load = (lambda: t5) if t5 is not None else models.load_t5
  encode = lambda ps: embeddings.encode_prompts(load(), models.tokenizer, ps, mesh=mesh,
                                                learned_rows=rows)
  fingerprint = models.text_fingerprint
  if rows is not None:
    fingerprint = checkpoint_lib.fingerprint([fingerprint, np.asarray(rows).tobytes().hex()])
  return cache.get_or_compute(prompts, encode, fingerprint)


def _place_state(state, mesh, rules):
  """Params by the logical rules; optimiser leaves like the param they mirror; the rest
  (learned token rows, step, rng) replicated."""
  param_sh = {name: sharding.param_shardings(p, mesh, rules) for name, p in state["params"].items()}
  flat_params = {}
  for name, sh in param_sh.items():
    paths = jax.tree_util.tree_flatten_with_path(sh)[0]
    for (path, leaf), x in zip(paths, jax.tree.leaves(state["params"][name])):
      # Keyed like the optimiser state's paths, where the stage is a DictKey too.
      flat_params[(str(jax.tree_util.DictKey(name)),) + tuple(str(k) for k in path)] = (
          leaf, tuple(x.shape))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def opt_leaf(path, x):
    # A leaf shaped like its param (Adam's moments) is sharded like it; others
    # (Adafactor's factored row/column statistics, counters) are small: replicated.
    keys = tuple(str(k) for k in path)
    for n in range(len(keys), 0, -1):
      sh, shape = flat_params.get(keys[-n:], (None, None))
      if sh is not None and shape == tuple(x.shape):
        return sh
    return replicated

  opt_sh = jax.tree_util.tree_map_with_path(opt_leaf, state["opt_state"])
  out = dict(state, params=param_sh, opt_state=opt_sh, step=replicated, rng=replicated)
  if "fixed" in state:
    out["fixed"] = jax.tree.map(lambda _: replicated, state["fixed"])
  return out


def _rules(config):
  return pipeline.rules_of(config)


def _mesh_and_rules(config):
  return sharding.make_mesh(dict(config.mesh)), _rules(config)


def _abstract_state(config, models, mesh, rules, phase=None):
  """(loss stages, optimiser, abstract train state, its shardings) of `phase`; allocates
  nothing. Learned token rows are in `params` while they learn, in `fixed` after.
  `phase` defaults to the method's first."""
  phase = phase or methods.phases(config)[0]
  stages = {name: models.cascade.by_name[name] for name in models.tuned}
  params = {}
  if phase.train_unets:
    params.update({n: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), s.abstract_params)
                   for n, s in stages.items()})
  rows = jax.ShapeDtypeStruct((len(models.tokenizer.learned_tokens), models.t5_width), jnp.float32)
  if phase.train_tokens:
    params[methods.TOKENS] = rows
  tx = methods.optimizer(config, params, phase)
  abstract = dict(params=params, opt_state=jax.eval_shape(tx.init, params),
                  step=jax.ShapeDtypeStruct((), jnp.int32),
                  rng=jax.eval_shape(lambda: jax.random.key(0)))
  if methods.uses_learned_tokens(config) and not phase.train_tokens:
    abstract["fixed"] = {methods.TOKENS: rows}
  return stages, tx, abstract, _place_state(abstract, mesh, rules)


def _put_global(x, sharding):
  """Places a host value (the same on every host) as a global array; works multi-host,
  where `device_put` refuses shardings that span other hosts' devices."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)


def _checkpoint_phase(config, ckpt, step: int) -> methods.Phase:
  """The phase whose state a checkpoint holds (its metadata names it; dreambooth if absent)."""
  all_phases = methods.phases(config)
  name = ckpt.restore_metadata(step).get("phase", all_phases[0].name)
  ends = [p for p in all_phases if p.name == name]
  if not ends:
    raise TrainError(f"checkpoint {step} in {ckpt.directory} was written in phase {name!r}, which "
                     f"config.method={config.method!r} does not have; use its own config")
  return ends[0]


def restore_params(config, models, workdir: str, step: int | None = None):
  """What a workdir checkpoint learned: ({stage: State} and/or {"tokens": rows}, step).

  Restored onto this machine's devices (all on fsdp), whatever mesh trained them:
  orbax reshards, so a TPU-trained workdir samples on a laptop.
  """
  mesh, rules = models.mesh, models.rules
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise TrainError(f"{workdir!r} has no checkpoint yet; train first")
  phase = _checkpoint_phase(config, ckpt, step)
  _, _, abstract, shardings = _abstract_state(config, models, mesh, rules, phase)
  state = ckpt.restore(step, _with_shardings(abstract, shardings))
  return {**state.get("fixed", {}), **state["params"]}, step


def main(argv=None):
  del argv
  config, workdir = _CONFIG.value, flags.FLAGS.workdir
  if config is None:
    raise config_lib.ConfigError("pass --config=configs/imagen_dog.py[:variant]")
  workdir = workdir or os.path.join("workdirs", "dreambooth")
  return run(config, workdir)


def run(config, workdir: str):
  """The whole job; importable (tests, notebooks) as `train.run(config, workdir)`."""
  # == Setup: distributed, mesh, workdir ==========================================
  d = config.distributed
  if d.initialize:
    jax.distributed.initialize(coordinator_address=d.coordinator_address or None,
                               num_processes=d.num_processes or None, process_id=d.process_id,
                               local_device_ids=[int(x) for x in d.local_device_ids.split(",")]
                               if d.local_device_ids else None)
  tuned = config_lib.parse_stages(config.stages)
  mesh, rules = _mesh_and_rules(config)
  all_phases = methods.phases(config)
  if methods.uses_learned_tokens(config) and not config.learned_token.text:
    raise config_lib.ConfigError(f"config.method={config.method!r} learns a token: set "
                                 "config.learned_token.text, e.g. '<rare>'")
  lead = jax.process_index() == 0
  workdir = utils.workdir(workdir)  # local or gs://...; a missing backend fails here

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
  identifier = _resolve_identifier(config, tok, workdir)
  instance_prompt, class_prompt = _instance_and_class_prompts(config, identifier)
  print(f"{config.method}: identifier {identifier.text!r} ({identifier.source}); instance prompt "
        f"{instance_prompt!r}, class prompt {class_prompt!r}", flush=True)
  previews = sample_prompts(config, identifier)

  # == Text embeddings: T5 once, cached; nothing keeps it alive afterwards =========
  # (Prompts with a learned token are encoded with the current rows when needed.)
  plain = [p for p in [instance_prompt, class_prompt, ""] + previews if not has_learned(tok, p)]
  table = _encode_all(config, models, plain, workdir, mesh)
  emb = lambda prompts: embeddings.stack_embeddings(table, prompts)
  uncond = emb([""])

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
    prior_images = {s: data.to_model_range(prior_images[s]) for s in tuned}
  # Frozen stages keep their weights (class priors, sample grids); a tuned stage's pretrained
  # weights move into the train state below, or are not needed when it is restored.

  # == State: resume from the workdir, else the built (pretrained / random) params =====
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.checkpoint.keep,
                                     async_save=config.checkpoint.async_save)
  t5 = None  # loaded once, only by methods that learn token rows
  if methods.uses_learned_tokens(config):
    t5 = models.load_t5()
  start = ckpt.latest_step()
  if start is not None:
    phase = _checkpoint_phase(config, ckpt, start)
    stages, tx, abstract, shardings = _abstract_state(config, models, mesh, rules, phase)
    if phase.train_unets:
      for stage in stages.values():
        stage.release()  # the checkpoint holds them; no pretrained copy beside it
    state = ckpt.restore(start, _with_shardings(abstract, shardings))
    print(f"resumed from {workdir} at step {start} ({phase.name})", flush=True)
  else:
    phase = all_phases[0]
    rows = (methods.initial_token_rows(t5, tok, [config.learned_token.init_word or
                                                 config.subject.class_noun])
            if t5 is not None else None)
    stages, tx, abstract, shardings = _abstract_state(config, models, mesh, rules, phase)
    state = _fresh_state(config, stages, tx, phase, shardings, rows=rows, step=0,
                         rng=jax.random.key(config.seed))

  # == Phases (one for DreamBooth and TI, two for ti_then_finetune) ====================
  writer = metrics_writer.MetricsWriter(workdir, tensorboard=config.log.tensorboard and lead)
  info = dict(identifier=identifier.text, class_noun=config.subject.class_noun,
              instance_prompt=instance_prompt, class_prompt=class_prompt, method=config.method,
              stages=list(tuned), prompt_preprocessing=tok.preprocess,
              unet_text_mask=bool(config.model.unet_text_mask),
              config=json.loads(config_lib.to_json(config)))
  progress = metrics_writer.progress(int(state["step"]), config.train.steps, disable=not lead)
  for phase in all_phases[all_phases.index(phase):]:
    if int(state["step"]) >= phase.end and phase is not all_phases[-1]:
      continue  # a checkpoint at this phase's end: the next phase starts from it
    if not _state_is_phase(state, phase):  # entering the next phase
      rows = _learned_rows(state)
      stages, tx, abstract, shardings = _abstract_state(config, models, mesh, rules, phase)
      state = _fresh_state(config, stages, tx, phase, shardings, rows=rows,
                           step=int(state["step"]), rng=state["rng"])
      print(f"phase {phase.name}: steps {phase.start + 1}-{phase.end}", flush=True)
    state = _train_phase(config, models, phase, state, stages, tx, shardings, mesh, rules, t5=t5,
                         subject=subject, prior_images=prior_images, emb=emb, uncond=uncond,
                         instance_prompt=instance_prompt, class_prompt=class_prompt,
                         previews=previews, ckpt=ckpt, writer=writer, progress=progress,
                         workdir=workdir, identifier=identifier)
  progress.close()
  ckpt.wait()

  # == Export what was learned: tuned UNets in diffusers format, token rows ============
  params = _to_host(state["params"])
  rows = _learned_rows(state)
  if lead:
    unets = {n: (stages[n].graphdef, params[n]) for n in tuned if n in params}
    if rows is not None:
      info["learned_tokens"] = {identifier.text: identifier.pieces[0] if identifier.pieces else ""}
    export = checkpoint_lib.export_final(workdir, unets, dict(info, steps=int(state["step"])))
    if rows is not None:
      checkpoint_lib.export_token_rows(export, tok.learned_tokens, np.asarray(jax.device_get(rows)))
  writer.close()
  print(f"done: {config.train.steps} steps; checkpoint, export/ and samples/ in {workdir}", flush=True)
  return state


def _to_host(tree):
  """Host numpy copies of a sharded pytree, one leaf at a time: a leaf is whole on a
  device only while it is gathered (multi-host), never the whole tree."""
  if jax.process_count() == 1:
    return jax.device_get(tree)  # fetches each leaf's shards; nothing is gathered on device
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def _learned_rows(state):
  return state["params"].get(methods.TOKENS, state.get("fixed", {}).get(methods.TOKENS))


def _state_is_phase(state, phase) -> bool:
  """Whether `state` has the structure `phase` trains (what learns, what is fixed)."""
  learns_tokens = methods.TOKENS in state["params"]
  learns_unets = any(k != methods.TOKENS for k in state["params"])
  return learns_tokens == phase.train_tokens and learns_unets == phase.train_unets


def _fresh_state(config, stages, tx, phase, shardings, *, rows, step: int, rng):
  """A phase's initial state: built UNet params, the token rows, a new optimiser state."""
  params = {}
  if phase.train_unets:
    # The loaded weights become the state (already in these shardings: no copy), and the
    # stage lets go of them: the step donates the state, and one copy is all that fits.
    for n, stage in stages.items():
      params[n] = jax.device_put(stage.params, shardings["params"][n])
      stage.release()
  if phase.train_tokens:
    params[methods.TOKENS] = _put_global(jax.device_get(rows), shardings["params"][methods.TOKENS])
  state = dict(params=params,
               opt_state=jax.jit(tx.init, out_shardings=shardings["opt_state"])(params),
               step=jax.jit(lambda: jnp.int32(step), out_shardings=shardings["step"])(),
               rng=jax.jit(lambda r: r, out_shardings=shardings["rng"])(rng))
  if "fixed" in shardings:
    state["fixed"] = {methods.TOKENS: _put_global(jax.device_get(rows),
                                                  shardings["fixed"][methods.TOKENS])}
  return state


def _frozen_inputs(models, phase, stages, mesh, rules, t5):
  """What the step reads but never learns, placed by the rules: UNets the phase keeps
  fixed, and T5 while token rows learn."""
  frozen = {}
  if not phase.train_unets:
    frozen.update({n: s.params for n, s in stages.items()})
  graphdef = None
  if phase.train_tokens:
    graphdef, frozen["t5"] = nnx.split(t5)
  shardings = {k: sharding.param_shardings(v, mesh, rules) for k, v in frozen.items()}
  return jax.device_put(frozen, shardings), shardings, graphdef


def _train_phase(config, models, phase, state, stages, tx, shardings, mesh, rules, *, t5, subject,
                 prior_images, emb, uncond, instance_prompt, class_prompt, previews, ckpt, writer,
                 progress, workdir, identifier):
  """Steps state["step"] .. phase.end of one phase: batches, the jitted step, checkpoints,
  metrics and sample grids."""
  t, tuned, tok = config.train, models.tuned, models.tokenizer
  frozen, frozen_sh, t5_graphdef = _frozen_inputs(models, phase, stages, mesh, rules, t5)
  step_fn = jax.jit(methods.make_train_step(stages, tx, config.prior.weight, t5_graphdef=t5_graphdef),
                    in_shardings=(shardings, None, frozen_sh), out_shardings=(shardings, None),
                    donate_argnums=(0,))
  accum = t.grad_accum
  if phase.train_tokens:  # token ids; the step encodes them with the rows it learns
    ids = tok([instance_prompt])
    instance = {"input_ids": ids["input_ids"], "mask": ids["attention_mask"]}
  elif has_learned(tok, instance_prompt):  # rows fixed: encode once
    rows = np.asarray(jax.device_get(_learned_rows(state)))
    instance = embeddings.stack_embeddings(
        _encode_all(config, models, [instance_prompt], workdir, mesh, rows=rows, t5=t5),
        [instance_prompt])
  else:
    instance = emb([instance_prompt])
  text_batch = {"instance": instance, "class": emb([class_prompt])}
  text_batch = jax.tree.map(lambda x: np.broadcast_to(x, (accum,) + x.shape), text_batch)
  use_prior = phase.prior and prior_images is not None

  # The batch axis is split over the data axes when it divides (each host then
  # loads only its slice); otherwise it is replicated and every host loads it all.
  n_data = sharding.data_parallelism(mesh)

  def make_batch(step):
    batch = {"text": text_batch}
    for name in tuned:
      batch[name] = {"instance": [], "prior": []}
    split = t.batch_size % n_data == 0 and t.prior_batch_size % n_data == 0
    host = dict(process_index=jax.process_index(), process_count=jax.process_count()) if split else {}
    for k in range(accum):
      micro = step * accum + k
      inst = subject.batch(config.seed, micro, t.batch_size, flip=config.subject.flip, **host)
      for name in tuned:
        batch[name]["instance"].append(inst[name])
      if use_prior:
        idx = data.batch_indices(config.prior.seed, micro, t.prior_batch_size, config.prior.num_images)[0]
        if split:
          idx = idx[data.host_slice(t.prior_batch_size, **host)]
        for name in tuned:
          batch[name]["prior"].append(prior_images[name][idx])
    for name in tuned:
      batch[name] = {k: np.stack(v) for k, v in batch[name].items() if v}
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    spec = lambda x: (sharding.batch_sharding(mesh, (x.shape[0], x.shape[1] * jax.process_count()),
                                              axis=1) if split else replicated)
    put = lambda x: jax.make_array_from_process_local_data(spec(x), x)
    out = {name: jax.tree.map(put, batch[name]) for name in tuned}
    out["text"] = jax.tree.map(lambda x: jax.make_array_from_process_local_data(replicated, x),
                               batch["text"])
    return out

  for step in range(int(state["step"]), phase.end):
    batch = make_batch(step)
    with jax.set_mesh(mesh):  # traced with the mesh: the UNets pin activations' batch axis
      state, metrics = step_fn(state, batch, frozen)
    metrics = jax.device_get(metrics)
    if not metrics["finite"]:
      ckpt.wait()
      raise TrainError(f"non-finite loss or gradients at step {step + 1} (loss={metrics['loss']}); "
                       f"the update was not applied and the last good checkpoint (step "
                       f"{ckpt.latest_step()}) in {workdir} is intact. Lower config.train.lr or "
                       "check the subject images.")
    done = step + 1
    progress.update(metrics)
    if done % config.log.every == 0 or done == phase.end:
      writer.write(done, metrics)
    if done % config.checkpoint.every == 0 or done == phase.end:
      ckpt.save(done, state, dict(step=done, identifier=identifier.text, phase=phase.name))
    if config.log.sample_every and (done % config.log.sample_every == 0 or done == t.steps):
      _write_samples(config, models, state, emb, uncond, previews, workdir, done, mesh, t5)
  return state


def _write_samples(config, models, state, emb, uncond, prompts, workdir, step, mesh, t5):
  params = {name: p for name, p in state["params"].items() if name != methods.TOKENS}
  rows = _learned_rows(state)
  learned = [p for p in prompts if has_learned(models.tokenizer, p)]
  table = {}
  if learned:  # current rows, not cached: they change every step
    e, m = embeddings.encode_prompts(t5, models.tokenizer, learned,
                                     learned_rows=np.asarray(jax.device_get(rows)))
    table = {p: embeddings.PromptEmbedding(e[i], m[i]) for i, p in enumerate(learned)}
  n = config.log.num_samples
  out = []
  for i, prompt in enumerate(prompts):
    c = (embeddings.stack_embeddings(table, [prompt]) if prompt in table else emb([prompt]))
    images = models.cascade.sample(c, jax.random.key(1234 + i), uncond_embeddings=uncond,
                                   params=params, batch_size=n, mesh=None)
    out.append((prompt, images))
  if jax.process_index() == 0:
    metrics_writer.save_grid(utils.as_path(workdir) / "samples" / f"step_{step:06d}.png", out)


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


def cli(argv):
  utils.run_cli(main, argv, USER_ERRORS)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(cli, flags_parser=parse_flags)
