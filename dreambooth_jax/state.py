"""The train state: what it holds, how it lies on the mesh, how it starts and resumes.

The state is a plain pytree (big_vision), one per phase of a method:

  {"params":    what learns now: {stage: nnx.State} and/or {"tokens": [K, d_model]},
   "fixed":     what an earlier phase learned and this one keeps (the token rows),
   "opt_state": the optimiser's state over `params`,
   "step":      int32 global step, "rng": a typed key}

Pretrained weights that never learn (frozen UNets, T5) are not state; they are
the `frozen` argument of the step. This module is the public API the CLIs,
experiments and notebooks share (as MaxText's `get_abstract_state` /
`setup_initial_state`):

  setup(...)             a phase's optimiser, abstract state (nothing allocated) and shardings
  state_shardings(...)   params by the logical rules, optimiser leaves like their param
  initial_state(...)     a phase's first state from the stages' loaded weights
  restore_state(...)     a checkpoint, read straight into those shardings
  batch_layout(...)      the step's batch: shapes and shardings (train, plan, bench)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dreambooth_jax import lora as lora_lib
from dreambooth_jax import methods, sharding, utils

TEXT_LEN = 77  # IF's T5 length: every prompt embedding is [77, d_model]


class TrainError(utils.UserError):
  """The run cannot go on; the message says why and what is intact."""


@dataclasses.dataclass
class PhaseSetup:
  """What one phase trains with: the loss stages, the optimiser, the abstract state and
  its shardings (`setup`)."""
  phase: methods.Phase
  stages: dict
  tx: Any
  abstract: dict
  shardings: dict
  text: Any = None  # a `lora.LoRAText` whose adapters learn in this phase, if any


def abstract_state(stages: Mapping[str, Any], tx_for, phase: methods.Phase, *, num_tokens: int,
                   token_width: int, text=None) -> tuple[Any, dict]:
  """(optimiser, the state of `phase` as ShapeDtypeStructs); nothing is allocated.

  `stages` ({name: cascade.Stage}) learn when the phase trains UNets; `num_tokens`
  learned token rows of `token_width` learn in `params` when it trains tokens, and
  are `fixed` otherwise (none when 0); `text` (a `lora.LoRAText`) adds T5's adapters
  to what the UNet phases learn. `tx_for(params)` builds the optimiser for
  the abstract params (its masks and labels follow their tree).
  """
  params = {}
  if phase.train_unets:
    params.update({n: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), s.abstract_params)
                   for n, s in stages.items()})
    if text is not None:
      params[lora_lib.TEXT] = text.abstract_params
  rows = jax.ShapeDtypeStruct((num_tokens, token_width), jnp.float32)
  if phase.train_tokens:
    params[methods.TOKENS] = rows
  tx = tx_for(params)
  state = dict(params=params, opt_state=jax.eval_shape(tx.init, params),
               step=jax.ShapeDtypeStruct((), jnp.int32),
               rng=jax.eval_shape(lambda: jax.random.key(0)))
  if num_tokens and not phase.train_tokens:
    state["fixed"] = {methods.TOKENS: rows}
  return tx, state


def setup(config, stages: Mapping[str, Any], phase: methods.Phase, mesh, rules, *,
          num_tokens: int, token_width: int, text=None) -> PhaseSetup:
  """`abstract_state` with the config's optimiser, and the state's shardings on `mesh`."""
  tx, abstract = abstract_state(stages, lambda params: methods.optimizer(config, params, phase),
                                phase, num_tokens=num_tokens, token_width=token_width, text=text)
  return PhaseSetup(phase, dict(stages), tx, abstract, state_shardings(abstract, mesh, rules),
                    text if phase.train_unets else None)


def checkpoint_phase(config, ckpt, step: int) -> methods.Phase:
  """The phase whose state a checkpoint holds (its metadata names it; the first if absent)."""
  all_phases = methods.phases(config)
  name = ckpt.restore_metadata(step).get("phase", all_phases[0].name)
  ends = [p for p in all_phases if p.name == name]
  if not ends:
    raise TrainError(f"checkpoint {step} in {ckpt.directory} was written in phase {name!r}, which "
                     f"config.method={config.method!r} does not have; use its own config")
  return ends[0]


def state_shardings(state: Mapping[str, Any], mesh, rules=sharding.DEFAULT_RULES) -> dict:
  """Params by the logical rules; optimiser leaves shaped like a param (Adam's moments) like
  that param; the rest (Adafactor's factored statistics, counters, token rows, step,
  rng) replicated: they are small."""
  param_sh = {name: sharding.param_shardings(p, mesh, rules) for name, p in state["params"].items()}
  by_path = {}
  for name, sh in param_sh.items():
    paths = jax.tree_util.tree_flatten_with_path(sh)[0]
    for (path, leaf), x in zip(paths, jax.tree.leaves(state["params"][name])):
      # Keyed like the optimiser state's paths, where the stage is a DictKey too.
      by_path[(str(jax.tree_util.DictKey(name)),) + tuple(str(k) for k in path)] = (leaf, tuple(x.shape))
  replicated = NamedSharding(mesh, P())

  def opt_leaf(path, x):
    keys = tuple(str(k) for k in path)
    for n in range(len(keys), 0, -1):
      sh, shape = by_path.get(keys[-n:], (None, None))
      if sh is not None and shape == tuple(x.shape):
        return sh
    return replicated

  out = dict(state, params=param_sh,
             opt_state=jax.tree_util.tree_map_with_path(opt_leaf, state["opt_state"]),
             step=replicated, rng=replicated)
  if "fixed" in state:
    out["fixed"] = jax.tree.map(lambda _: replicated, state["fixed"])
  return out


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs carrying their sharding: a restore target, or `jit(...).lower` input."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)


def put_global(x, sharding_: NamedSharding) -> jax.Array:
  """A host value (the same on every host) as a global array; works multi-host, where
  `device_put` refuses shardings that span other hosts' devices."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding_, lambda index: x[index])


def initial_state(stages: Mapping[str, Any], tx, phase: methods.Phase, shardings: dict, *,
                  rows=None, step: int = 0, rng, text=None) -> dict:
  """A phase's first state: the stages' own (loaded) weights, `rows` [K, d] for token rows,
  a new optimiser state. The weights become the state itself (already in these
  shardings, so no copy) and each stage lets go of them: the step donates the state,
  and one copy of a multi-GiB UNet is all that fits."""
  params = {}
  if phase.train_unets:
    for name, stage in stages.items():
      params[name] = jax.device_put(stage.params, shardings["params"][name])
      stage.release()
    if text is not None:  # T5's adapters (`lora.LoRAText`)
      params[lora_lib.TEXT] = jax.device_put(text.params, shardings["params"][lora_lib.TEXT])
  if phase.train_tokens:
    params[methods.TOKENS] = put_global(jax.device_get(rows), shardings["params"][methods.TOKENS])
  state = dict(params=params,
               opt_state=jax.jit(tx.init, out_shardings=shardings["opt_state"])(params),
               step=jax.jit(lambda: jnp.int32(step), out_shardings=shardings["step"])(),
               rng=jax.jit(lambda r: r, out_shardings=shardings["rng"])(rng))
  if "fixed" in shardings:
    state["fixed"] = {methods.TOKENS: put_global(jax.device_get(rows),
                                                 shardings["fixed"][methods.TOKENS])}
  return state


def restore_state(ckpt, step: int, abstract: dict, shardings: dict) -> dict:
  """Checkpoint `step` read straight into `shardings` (orbax reshards across meshes)."""
  return ckpt.restore(step, with_shardings(abstract, shardings))


def learned_rows(state: Mapping[str, Any]):
  """The learned token rows [K, d] wherever they are (learning or fixed), or None."""
  return state["params"].get(methods.TOKENS, state.get("fixed", {}).get(methods.TOKENS))


def is_phase(state: Mapping[str, Any], phase: methods.Phase) -> bool:
  """Whether `state` has the structure `phase` trains (what learns, what is fixed)."""
  learns_tokens = methods.TOKENS in state["params"]
  learns_unets = any(k != methods.TOKENS for k in state["params"])
  return learns_tokens == phase.train_tokens and learns_unets == phase.train_unets


def batch_split(mesh, batch_size: int, prior_batch_size: int) -> bool:
  """Whether the step's batch is split over the data axes: both halves must divide
  (`sharding.batch_spec`'s rule; then each host loads only its slice), else every
  device gets the whole (small) batch."""
  n = sharding.data_parallelism(mesh)
  return batch_size % n == 0 and (prior_batch_size % n == 0 or prior_batch_size == 0)


def batch_layout(mesh, resolutions: Mapping[str, int], *, batch_size: int, prior_batch_size: int,
                 grad_accum: int = 1, text_width: int, token_ids: bool = False,
                 channels: int = 3, own_text: Mapping[str, int] | None = None
                 ) -> tuple[dict, dict]:
  """(abstract batch, shardings) of `train_step`'s batch argument.

  batch[stage] = {"instance": [A, B, r, r, C], "prior": [A, Bp, r, r, C]} (no "prior"
  when prior_batch_size is 0), batch["text"] = {"instance", "class"}: one prompt's
  {"text": [A, 1, L, D], "mask": [A, 1, L]}; with `token_ids` the instance prompt is
  {"input_ids", "mask"} (the step encodes it with the learned rows). A is the
  gradient-accumulation axis; the batch axis (1) is split over the data axes when
  `batch_split`, the text is replicated. `own_text` {stage: width} names the stages
  with a text encoder of their own (the x4 upscaler's CLIP): batch[stage]["text"]
  holds their states of both prompts, shaped as batch["text"] at that width.
  """
  split = batch_split(mesh, batch_size, prior_batch_size)
  replicated = NamedSharding(mesh, P())
  image_sh = lambda shape: sharding.batch_sharding(mesh, shape, axis=1) if split else replicated
  batch, shardings_ = {}, {}
  for name, r in resolutions.items():
    halves = {"instance": batch_size, "prior": prior_batch_size}
    batch[name] = {k: jax.ShapeDtypeStruct((grad_accum, n, r, r, channels), jnp.float32)
                   for k, n in halves.items() if n}
    shardings_[name] = {k: image_sh(x.shape) for k, x in batch[name].items()}
  prompt = {"text": jax.ShapeDtypeStruct((grad_accum, 1, TEXT_LEN, text_width), jnp.float32),
            "mask": jax.ShapeDtypeStruct((grad_accum, 1, TEXT_LEN), jnp.int32)}
  instance = ({"input_ids": jax.ShapeDtypeStruct((grad_accum, 1, TEXT_LEN), jnp.int32),
               "mask": prompt["mask"]} if token_ids else prompt)
  batch["text"] = {"instance": instance, "class": dict(prompt)}
  shardings_["text"] = jax.tree.map(lambda _: replicated, batch["text"])
  for name, width in (own_text or {}).items():
    own = {"text": jax.ShapeDtypeStruct((grad_accum, 1, TEXT_LEN, width), jnp.float32),
           "mask": prompt["mask"]}
    batch[name]["text"] = {"instance": own, "class": dict(own)}
    shardings_[name]["text"] = jax.tree.map(lambda _: replicated, batch[name]["text"])
  return batch, shardings_
