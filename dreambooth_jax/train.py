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

from dreambooth_jax import checkpoint as checkpoint_lib
from dreambooth_jax import config_lib, data, embeddings, methods, metrics_writer, pipeline, priors
from dreambooth_jax import sharding, text
from dreambooth_jax.weights import WeightsError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/imagen_dog.py[:arg]).",
                                          lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, caches, logs and exports go.")


class TrainError(RuntimeError):
  """The run cannot go on; the message says why and what is intact."""


# Errors a user fixes (not bugs): reported as one paragraph, exit code 2.
USER_ERRORS = (data.DataError, WeightsError, config_lib.ConfigError, TrainError)


def _instance_and_class_prompts(config, identifier):
  s = config.subject
  return (text.instance_prompt(identifier, s.class_noun, template=s.instance_template),
          text.class_prompt(s.class_noun, template=s.class_template))


def sample_prompts(config, identifier) -> list[str]:
  return [p.format(identifier=str(identifier), class_noun=config.subject.class_noun)
          for p in config.log.sample_prompts]


def _resolve_identifier(config, tokenizer, workdir) -> text.Identifier:
  """The identifier of this workdir: reused on resume, sampled (seeded) or user-given otherwise."""
  path = os.path.join(workdir, "identifier.json")
  s = config.subject
  if os.path.isfile(path):
    with open(path) as f:
      ident = text.Identifier.from_json(f.read())
    ident.verify(tokenizer)
    if s.identifier and s.identifier != ident.text:
      raise TrainError(f"{workdir} was trained with identifier {ident.text!r}, but "
                       f"config.subject.identifier={s.identifier!r}; use a new --workdir.")
    return ident
  ident = text.resolve_identifier(tokenizer, s.identifier or None, class_noun=s.class_noun,
                                  template=s.instance_template, num_tokens=s.identifier_tokens,
                                  seed=config.seed, id_range=tuple(s.identifier_id_range))
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(ident.to_json())
  os.replace(tmp, path)
  return ident


def _encode_all(config, models, prompts, workdir, mesh):
  cache = embeddings.PromptEmbeddingCache(os.path.join(workdir, "prompt_embeddings"))
  encode = lambda ps: embeddings.encode_prompts(models.load_t5(), models.tokenizer, ps, mesh=mesh)
  return cache.get_or_compute(prompts, encode, models.text_fingerprint)


def _batch_spec(mesh, batch: int, ndim: int):
  """Batch axis (axis 1, after the micro-batch axis) over the data axes when it divides."""
  axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
  n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
  spec = [None, axes if axes and batch % n == 0 else None] + [None] * (ndim - 2)
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def _place_state(state, mesh, rules):
  """Params by the logical rules; optimiser leaves like the param they mirror; scalars replicated."""
  param_sh = {name: sharding.param_shardings(p, mesh, rules) for name, p in state["params"].items()}
  flat_params = {}
  for name, sh in param_sh.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(sh)[0]:
      flat_params[(name,) + tuple(str(k) for k in path)] = leaf
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def opt_leaf(path, x):
    keys = tuple(str(k) for k in path)
    for n in range(len(keys), 0, -1):
      sh = flat_params.get(keys[-n:])
      if sh is not None and len(sh.spec) <= x.ndim:
        return sh
    return replicated

  opt_sh = jax.tree_util.tree_map_with_path(opt_leaf, state["opt_state"])
  return dict(state, params=param_sh, opt_state=opt_sh,
              step=replicated, rng=replicated)


def _rules(config):
  return tuple(json.loads(config.sharding_rules)) if config.sharding_rules else sharding.DEFAULT_RULES


def _mesh_and_rules(config):
  return sharding.make_mesh(dict(config.mesh)), _rules(config)


def _abstract_state(config, models, mesh, rules):
  """(tuned stages, optimiser, abstract train state, its shardings); allocates nothing."""
  stages = {name: models.cascade.by_name[name] for name in models.tuned}
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), methods.param_states(stages))
  tx = methods.optimizer(config, params)
  abstract = dict(params=params, opt_state=jax.eval_shape(tx.init, params),
                  step=jax.ShapeDtypeStruct((), jnp.int32),
                  rng=jax.eval_shape(lambda: jax.random.key(0)))
  return stages, tx, abstract, _place_state(abstract, mesh, rules)


def _put_global(x, sharding):
  """Places a host value (the same on every host) as a global array; works multi-host,
  where `device_put` refuses shardings that span other hosts' devices."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)


def restore_params(config, models, workdir: str, step: int | None = None):
  """The tuned stages' params of a workdir checkpoint: ({stage: State}, step).

  Restored onto this machine's devices (all on fsdp), whatever mesh trained them:
  orbax reshards, so a TPU-trained workdir samples on a laptop.
  """
  mesh, rules = sharding.make_mesh(), _rules(config)
  _, _, abstract, shardings = _abstract_state(config, models, mesh, rules)
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise TrainError(f"{workdir!r} has no checkpoint yet; train first")
  return ckpt.restore(step, _with_shardings(abstract, shardings))["params"], step


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
  if config.method != "dreambooth":
    raise config_lib.ConfigError(f"config.method={config.method!r}: only 'dreambooth' is implemented")
  lead = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)

  # == Input checks before any expensive work =======================================
  pipeline.check_pretrained_folders(config)
  subject_dir = config.subject.dir or str(data.default_subject_dir())
  resolutions = {s: config.cascade[s].resolution for s in tuned}
  subject = data.SubjectData.from_folder(subject_dir, resolutions,
                                         min_size=min(config.subject.min_size, max(resolutions.values())))
  logging.info("subject: %d images from %s", len(subject.paths), subject_dir)
  if lead:
    config_lib.save(config, os.path.join(workdir, "config.json"))

  # == Models, identifier, prompts ===============================================
  models = pipeline.build(config)
  identifier = _resolve_identifier(config, models.tokenizer, workdir)
  instance_prompt, class_prompt = _instance_and_class_prompts(config, identifier)
  print(f"identifier: {identifier.text!r} ({identifier.source}); instance prompt "
        f"{instance_prompt!r}, class prompt {class_prompt!r}", flush=True)
  previews = sample_prompts(config, identifier)

  # == Text embeddings: T5 once, cached; nothing keeps it alive afterwards =========
  table = _encode_all(config, models, [instance_prompt, class_prompt, ""] + previews, workdir, mesh)
  emb = lambda prompts: embeddings.stack_embeddings(table, prompts)
  uncond = emb([""])

  # == Class priors from the frozen cascade ===========================================
  prior_images = None
  if config.prior.enabled:
    upto = [s.name for s in models.cascade.stages if s.name in tuned][-1]
    spec = priors.PriorSpec.from_cascade(models.cascade, class_prompt, config.prior.num_images,
                                         upto=upto, fingerprint=models.weights_fingerprint,
                                         seed=config.prior.seed, batch_size=config.prior.batch_size)
    prior_images = priors.ensure_priors(models.cascade, spec, emb([class_prompt]), uncond,
                                        os.path.join(workdir, "class_priors"), mesh=mesh,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())
    prior_images = {s: data.to_model_range(prior_images[s]) for s in tuned}

  # == State: resume from the workdir, else the built (pretrained / random) params =====
  stages, tx, abstract, shardings = _abstract_state(config, models, mesh, rules)
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.checkpoint.keep,
                                     async_save=config.checkpoint.async_save)
  start = ckpt.latest_step()
  if start is not None:
    state = ckpt.restore(start, _with_shardings(abstract, shardings))
    print(f"resumed from {workdir} at step {start}", flush=True)
  else:
    params = jax.tree.map(_put_global, methods.param_states(stages), shardings["params"])
    state = dict(params=params,
                 opt_state=jax.jit(tx.init, out_shardings=shardings["opt_state"])(params),
                 step=jax.jit(lambda: jnp.int32(0), out_shardings=shardings["step"])(),
                 rng=jax.jit(lambda: jax.random.key(config.seed), out_shardings=shardings["rng"])())
  start = int(state["step"])

  # == The jitted, sharded train step ==================================================
  step_fn = jax.jit(methods.make_train_step(stages, tx, config.prior.weight),
                    in_shardings=(shardings, None), out_shardings=(shardings, None),
                    donate_argnums=(0,))
  t = config.train
  accum = t.grad_accum
  text_batch = {"instance": emb([instance_prompt]), "class": emb([class_prompt])}
  text_batch = jax.tree.map(lambda x: np.broadcast_to(x, (accum,) + x.shape), text_batch)

  # The batch axis is split over the data axes when it divides (each host then
  # loads only its slice); otherwise it is replicated and every host loads it all.
  n_data = mesh.shape["data"] * mesh.shape["fsdp"]

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
      if prior_images is not None:
        idx = data.batch_indices(config.prior.seed, micro, t.prior_batch_size, config.prior.num_images)[0]
        if split:
          idx = idx[data.host_slice(t.prior_batch_size, **host)]
        for name in tuned:
          batch[name]["prior"].append(prior_images[name][idx])
    for name in tuned:
      batch[name] = {k: np.stack(v) for k, v in batch[name].items() if v}
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    spec = lambda x: _batch_spec(mesh, x.shape[1] * jax.process_count(), x.ndim) if split else replicated
    put = lambda x: jax.make_array_from_process_local_data(spec(x), x)
    out = {name: jax.tree.map(put, batch[name]) for name in tuned}
    out["text"] = jax.tree.map(lambda x: jax.make_array_from_process_local_data(replicated, x),
                               batch["text"])
    return out

  # == Train loop ======================================================================
  writer = metrics_writer.MetricsWriter(workdir, tensorboard=config.log.tensorboard and lead)
  info = dict(identifier=identifier.text, class_noun=config.subject.class_noun,
              instance_prompt=instance_prompt, class_prompt=class_prompt, method=config.method,
              stages=list(tuned), config=json.loads(config_lib.to_json(config)))
  progress = metrics_writer.progress(start, t.steps, disable=not lead)
  last_good = start
  for step in range(start, t.steps):
    batch = make_batch(step)
    state, metrics = step_fn(state, batch)
    metrics = jax.device_get(metrics)
    if not metrics["finite"]:
      ckpt.wait()
      raise TrainError(f"non-finite loss or gradients at step {step + 1} (loss={metrics['loss']}); "
                       f"the update was not applied and the last good checkpoint (step "
                       f"{ckpt.latest_step()}) in {workdir} is intact. Lower config.train.lr or "
                       "check the subject images.")
    done = step + 1
    progress.update(metrics)
    if done % config.log.every == 0 or done == t.steps:
      writer.write(done, metrics)
    if done % config.checkpoint.every == 0 or done == t.steps:
      ckpt.save(done, state, dict(step=done, identifier=identifier.text))
      last_good = done
    if config.log.sample_every and (done % config.log.sample_every == 0 or done == t.steps):
      _write_samples(models, state, emb(previews), uncond, previews, workdir, done, mesh, config)
  progress.close()
  ckpt.wait()

  # == Export every tuned stage in diffusers format ======================================
  params = (multihost_utils.process_allgather(state["params"], tiled=True) if jax.process_count() > 1
            else jax.device_get(state["params"]))  # every host takes part in the gather
  if lead:
    checkpoint_lib.export_final(workdir, {n: (stages[n].graphdef, params[n]) for n in tuned},
                                dict(info, steps=last_good))
  writer.close()
  print(f"done: {t.steps} steps; checkpoint, export/ and samples/ in {workdir}", flush=True)
  return state


def _write_samples(models, state, cond, uncond, prompts, workdir, step, mesh, config):
  params = {name: p for name, p in state["params"].items()}
  n = config.log.num_samples
  rows = []
  for i, prompt in enumerate(prompts):
    c = jax.tree.map(lambda x: x[i:i + 1], cond)
    images = models.cascade.sample(c, jax.random.key(1234 + i), uncond_embeddings=uncond,
                                   params=params, batch_size=n, mesh=None)
    rows.append((prompt, images))
  if jax.process_index() == 0:
    metrics_writer.save_grid(os.path.join(workdir, "samples", f"step_{step:06d}.png"), rows)


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
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO; -v 0 brings it back
  try:
    main(argv)
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(cli, flags_parser=parse_flags)
