"""Many subjects in one job: their folders, identifiers, batches, optimiser and loss.

`train_many` trains S subjects with one jitted step on one frozen cascade. Every
tuned stage is a `lora.LoRAStage(stage, settings, subjects=S)`: each adapter has a
leading subject axis (logical axis "subjects", sharded by the rules), and that
stacked tree is all the train state and the optimiser hold.

The step is `methods.make_train_step` with `joint_loss`: the lone run's
`methods.dreambooth_loss` vmapped over the subject axis of the adapters and of the
batch, the frozen weights and the step's rng closed over (shared, not copied).
Each subject's slice of the computation is then exactly the lone step's (same
shapes, same noise draws), and the loss is the SUM of the subjects' losses, so the
gradient of subject s's adapters is the one it gets alone. Vmap rather than
routing each example to its subject's adapter (a gather inside every adapted
layer) for that reason: a routed batch draws its noise for all subjects'
examples together, so no subject would see the noise its lone run sees. The rest stays per subject by construction:
`clip_per_subject` clips each subject's slice of the gradient by its own norm
(a global norm would couple them) and AdamW is elementwise. Adafactor is refused:
its factored second moments would mix the subject axis with the others.

`config.train.subject_chunk` > 0 trains that many subjects per device at a time: a
loop over chunks of subjects inside the step, each iteration taking subjects from every
device's share of the axis (see `_in_chunks`), so a chip holds one chunk's activations,
not every subject's. Each iteration computes its subjects' gradients itself (a
`custom_vjp` whose residuals are those gradients, adapter-sized): checkpointing the loop
body instead would run each chunk's forward pass again in the backward pass. The
per-subject numbers are the vmap's.

Subjects are ordered by name (the subject axis): a config read back from JSON
gives the same order.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from dreambooth_jax import config_lib, data, identifiers, methods, sharding, utils
from dreambooth_jax import lora as lora_lib
from dreambooth_jax import state as state_lib


@dataclasses.dataclass(frozen=True)
class Subject:
  name: str
  dir: str
  class_noun: str
  identifier: str = ""  # "" = rare tokens sampled for this subject


def from_config(config) -> list[Subject]:
  """`config.subjects` ({name: {dir, class_noun, identifier}}) in subject-axis order."""
  table = config.get("subjects")
  if not table:
    raise config_lib.ConfigError("config.subjects is empty: name at least one subject, e.g. "
                                 "configs/dreambooth_benchmark.py:subjects=dog+cat2")
  return [Subject(name, str(s.dir), str(s.class_noun), str(s.get("identifier", "")))
          for name, s in sorted(table.items())]


def check_config(config) -> None:
  """What a many-subject job needs of the single-subject settings it reuses."""
  if config.method != "dreambooth":
    raise config_lib.ConfigError(f"config.method={config.method!r}: a many-subject job trains "
                                 "DreamBooth only (one LoRA adapter per subject)")
  if not lora_lib.enabled(config):
    raise config_lib.ConfigError("config.lora.rank=0: a many-subject job trains one LoRA adapter "
                                 "per subject on a shared frozen cascade; set e.g. :lora=4")
  if lora_lib.adapts_text(config):
    raise config_lib.ConfigError("config.lora.text_encoder=True: T5 is shared by every subject "
                                 "here, so its adapters cannot be per subject; set it False")
  if int(config.train.get("subject_chunk", 0)) < 0:
    raise config_lib.ConfigError(f"config.train.subject_chunk={config.train.subject_chunk}: "
                                 "subjects per device per iteration; 0 = all at once")
  used = set(methods.optimizer_per_group(config.train.get("optimizer", "adamw"),
                                         config_lib.parse_stages(config.stages)).values())
  if used != {"adamw"}:
    raise config_lib.ConfigError(
        f"config.train.optimizer={config.train.optimizer!r}: use 'adamw' for many subjects; "
        "Adafactor's factored moments would mix the subjects' adapters")


def load_all(subjects: Sequence[Subject], resolutions: Mapping[str, int], *, min_size: int
             ) -> dict[str, data.SubjectData]:
  """Every subject's folder loaded and validated before anything expensive; all bad
  folders (missing, empty, corrupt or small images) in one `DataError` paragraph that
  names each subject and its path."""
  out, problems = {}, []
  for s in subjects:
    try:
      out[s.name] = data.SubjectData.from_folder(s.dir, resolutions, min_size=min_size)
    except data.DataError as e:
      # One paragraph: data.py lists bad files one per line; here each subject is a sentence.
      said = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
      problems.append((s, said, e.problems))
  if problems:
    said = " ".join(f"Subject {s.name!r} ({s.dir}): {msg}" for s, msg, _ in problems)
    raise data.DataError(
        f"{len(problems)} of {len(subjects)} subject folders cannot be trained on; nothing was "
        f"built or trained. {said} Fix the folders (or drop those subjects from "
        "config.subjects) and run again.", [p for _, _, ps in problems for p in ps])
  return out


def lone_config(config, subject: Subject, identifier: str = "") -> ml_collections.ConfigDict:
  """The single-subject config of one subject of the job: what `train.run` would train it
  with alone, and what `finetuned.FineTuned.load` reads from its workdir."""
  c = ml_collections.ConfigDict(config.to_dict())
  del c["subjects"]
  if "subject_chunk" in c.train:  # how the job loops over its subjects: no lone setting
    del c.train["subject_chunk"]
  c.subject.update(dir=subject.dir, class_noun=subject.class_noun,
                   identifier=identifier or subject.identifier)
  return c


def resolve_identifiers(config, tokenizer, subjects: Sequence[Subject], folders: Mapping[str, Any]
                        ) -> dict[str, identifiers.Identifier]:
  """Each subject's identifier, stored in its folder's identifier.json (read back on resume).
  Rare tokens are seeded per subject (config.seed + its index) and redrawn until no two
  subjects share one: a shared identifier would make one subject's prompt the other's."""
  s_cfg, taken, out = config.subject, set(), {}
  for i, s in enumerate(subjects):
    path = utils.as_path(folders[s.name]) / "identifier.json"
    if path.exists():
      ident = identifiers.Identifier.from_json(path.read_text()).verify(tokenizer)
    else:
      seed = config.seed + i
      while True:
        ident = identifiers.from_settings(
            tokenizer, s.identifier, class_noun=s.class_noun,
            template=s_cfg.instance_template, num_tokens=s_cfg.identifier_tokens, seed=seed,
            id_range=s_cfg.identifier_id_range)
        if s.identifier or ident.text not in taken:
          break
        seed += len(subjects)
      utils.write_text(path, ident.to_json())
    if ident.text in taken:
      raise config_lib.ConfigError(f"subject {s.name!r}: identifier {ident.text!r} is another "
                                   "subject's too; give each subject its own")
    taken.add(ident.text)
    out[s.name] = ident
  return out


def clip_per_subject(max_norm: float) -> optax.GradientTransformation:
  """`optax.clip_by_global_norm` for each subject alone: every leaf's leading axis is the
  subject, and subject s's slice is scaled by its own norm over all of its leaves."""
  def update(updates, state, params=None):
    del params
    leaves = jax.tree.leaves(updates)
    if not leaves:
      return updates, state
    sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(1, x.ndim)))
             for x in leaves)
    norm = jnp.sqrt(sq)  # [S]

    def clip(x):
      n = norm.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
      return jnp.where(n < max_norm, x, (x / n) * max_norm)
    return jax.tree.map(clip, updates), state
  return optax.GradientTransformation(optax.init_empty_state, update)


def optimizer(config, params, phase: methods.Phase) -> optax.GradientTransformation:
  """The lone run's optimiser (`methods.optimizer`) with per-subject clipping."""
  return methods.optimizer(config, params, phase, clip_by=clip_per_subject)


def slots(names: Sequence[str], mesh) -> list[str]:
  """The subject axis of a job over `names` on `mesh`: the names, then padding slots
  (copies of the first subjects, computed on their data, so that every device does the
  same work) until the mesh's data axes divide the count. An axis they do not divide is
  not split at all: 30 subjects on 4 chips would put every adapter, batch and activation
  of all 30 on every chip. A padding slot's loss is left out of the sum (`joint_loss`),
  so its adapters get no gradient, and nothing is logged, evaluated or exported for it."""
  pad = -len(names) % sharding.data_parallelism(mesh)
  return list(names) + [names[i % len(names)] for i in range(pad)]


def joint_loss(names: Sequence[str], subject_chunk: int = 0):
  """`loss(stages, params, batch, rng, prior_weight)` for `methods.make_train_step`: the sum
  over subjects of `dreambooth_loss`, each subject's adapters on its own slice of the
  batch (leading subject axis after the micro-batch one). Metrics: the sums, and each
  subject's own as 'subject/<name>/...'. Slots after `names` are padding (`slots`):
  computed, as the even split needs, but neither summed nor logged. `subject_chunk` > 0:
  that many subjects per device at a time (`config.train.subject_chunk`); 0, or at least
  a device's share: all."""
  def loss(stages, params, batch, rng, prior_weight):
    adapters = {n: params[n].adapters for n in stages}
    # The frozen weights and the rng, shared by every subject (not mapped, not differentiated).
    shared = ({n: dataclasses.replace(params[n], adapters=None) for n in stages}, rng)

    num_slots = jax.tree.leaves(adapters)[0].shape[0]
    ways, axes, chunk = subject_loop(num_slots, subject_chunk)

    def one(adapters_s, batch_s, shared):
      bound, rng = shared
      own = {n: dataclasses.replace(bound[n], adapters=adapters_s[n]) for n in stages}
      # The subject axis holds the data parallelism: the UNet's batch pins go on it.
      with sharding.batch_split_outside() if axes else contextlib.nullcontext():
        return methods.dreambooth_loss(stages, own, batch_s, rng, prior_weight)

    if chunk:
      losses, per_subject = _in_chunks(one, chunk, ways, axes)(adapters, batch, shared)
    else:
      losses, per_subject = jax.vmap(one, in_axes=(0, 0, None), spmd_axis_name=axes)(
          adapters, batch, shared)
    n = len(names)  # the padding slots' gradients are zero: their loss is not in the sum
    metrics = {k: jnp.sum(v[:n]) for k, v in per_subject.items()}
    for i, name in enumerate(names):
      metrics.update({f"subject/{name}/{k}": v[i] for k, v in per_subject.items()})
    return jnp.sum(losses[:n]), metrics
  return loss


def subject_loop(num_subjects: int, subject_chunk: int, mesh=None):
  """How the joint step of `num_subjects` runs on `mesh` (default: the one `jax.set_mesh`
  set): (ways, axes, chunk). The subject axis splits `ways` ways over the mesh axes
  `axes` (the data axes when they divide it, as `batch_layout` lays out the batch; 1,
  None: replicated); `chunk` subjects per device an iteration of the loop, 0 = no loop
  (`subject_chunk` 0, or at least a device's share)."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  axes = None if mesh.empty else sharding.batch_spec(mesh, (num_subjects,))[0]
  ways = sharding.data_parallelism(mesh) if axes else 1
  return ways, axes, subject_chunk if 0 < subject_chunk < num_subjects // ways else 0


def _in_chunks(one, chunk: int, ways: int, axes):
  """`vmap(one, (0, 0, None))` as a loop over chunks of `chunk` subjects per device:
  `(adapters, batch, shared) -> (losses [S], metrics [S])`, differentiable in the adapters.

  Device d holds subjects [d*S/ways, (d+1)*S/ways) (its share). Iteration i takes
  subjects [i*chunk, (i+1)*chunk) of every share, device by device ([S] -> [ways, n,
  chunk] -> [n, ways*chunk]), so each iteration's subject axis splits over the devices
  as the whole axis did and nothing is gathered. (Chunks laid out [chunk, ways], the
  split axis second, made XLA all-reduce activations of 335M elements at chunk 2.) A
  share that chunks do not divide ends with one smaller call after the loop.
  The forward pass computes each chunk's gradients as it goes and keeps only those:
  subject s's loss depends on its adapters alone, so they are its slice of the sum's
  gradient, and the backward pass scales them by the losses' cotangents.
  """
  def pin(x, axis):  # the batch's subjects stay on the devices that hold them
    if not axes:
      return x
    mesh = jax.sharding.get_abstract_mesh()
    return jax.lax.with_sharding_constraint(x, sharding.batch_spec(mesh, x.shape, axis=axis))

  def loop(fn, adapters, batch):
    share = jax.tree.leaves(batch)[0].shape[0] // ways
    n, rest = divmod(share, chunk)
    shares = lambda x: x.reshape((ways, share) + x.shape[1:])

    def chunks(x):  # [S] -> [n, ways*chunk]
      x = shares(x)[:, :n * chunk].reshape((ways, n, chunk) + x.shape[1:])
      return jnp.swapaxes(x, 0, 1).reshape((n, ways * chunk) + x.shape[3:])

    def unchunk(y):  # [n, ways*chunk] -> [ways, n*chunk]
      y = jnp.swapaxes(y.reshape((n, ways, chunk) + y.shape[2:]), 0, 1)
      return y.reshape((ways, n * chunk) + y.shape[3:])

    out = jax.lax.map(jax.vmap(fn, spmd_axis_name=axes), (jax.tree.map(chunks, adapters),
                                     jax.tree.map(lambda x: pin(chunks(x), 1), batch)))
    out = jax.tree.map(unchunk, out)
    if rest:
      last = lambda x: shares(x)[:, n * chunk:].reshape((ways * rest,) + x.shape[1:])
      tail = jax.vmap(fn, spmd_axis_name=axes)((jax.tree.map(last, adapters),
                           jax.tree.map(lambda x: pin(last(x), 0), batch)))
      out = jax.tree.map(lambda y, t: jnp.concatenate(
          [y, t.reshape((ways, rest) + t.shape[1:])], axis=1), out, tail)
    return jax.tree.map(lambda y: y.reshape((ways * share,) + y.shape[2:]), out)

  @jax.custom_vjp
  def run(adapters, batch, shared):
    return loop(lambda ab: one(*ab, shared), adapters, batch)

  def forward(adapters, batch, shared):
    def with_grads(ab):
      (value, metrics), grads = jax.value_and_grad(one, has_aux=True)(*ab, shared)
      return value, metrics, grads
    losses, metrics, grads = loop(with_grads, adapters, batch)
    return (losses, metrics), grads

  def backward(grads, cotangents):
    per_subject = cotangents[0]  # [S]; the metrics' cotangents are zero (logged, not a loss)
    scale = lambda g: g * per_subject.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype)
    return jax.tree.map(scale, grads), None, None  # the batch and shared weights: not trained

  run.defvjp(forward, backward)
  return run


def batch_layout(mesh, resolutions: Mapping[str, int], *, num_subjects: int, batch_size: int,
                 prior_batch_size: int, grad_accum: int, text_width: int) -> tuple[dict, dict]:
  """(abstract batch, shardings) of the joint step: `state.batch_layout`'s with a subject
  axis after the accumulation one: batch[stage] = {"instance": [A, S, B, r, r, 3], "prior":
  [A, S, Bp, r, r, 3]}, batch["text"][k] = {"text": [A, S, 1, L, D], "mask": [A, S, 1, L]}.
  Images split their subject axis over the data axes when it divides; text is replicated."""
  one, _ = state_lib.batch_layout(mesh, resolutions, batch_size=batch_size,
                                  prior_batch_size=prior_batch_size, grad_accum=grad_accum,
                                  text_width=text_width)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[:1] + (num_subjects,) + x.shape[1:],
                                                      x.dtype), one)
  replicated = NamedSharding(mesh, P())
  shardings = {n: jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.shape, axis=1), v)
               for n, v in batch.items() if n != "text"}
  shardings["text"] = jax.tree.map(lambda _: replicated, batch["text"])
  return batch, shardings


def subject_state(state, lone_abstract, index: int):
  """Subject `index`'s slice of the joint state, shaped as a lone run's state (params and
  optimiser moments lose the subject axis; counters, step and rng are shared)."""
  def one(x, a):
    return x[index] if x.ndim == len(a.shape) + 1 and tuple(x.shape[1:]) == tuple(a.shape) else x
  # Leaf by leaf, not tree.map: the adapters' Variables carry their logical axes as
  # metadata, "subjects" included, so the two trees differ in structure, not in order.
  leaves, treedef = jax.tree.flatten(lone_abstract)
  return jax.tree.unflatten(treedef, [one(x, a) for x, a in zip(jax.tree.leaves(state), leaves)])
