"""Training objectives, optimiser and the pure, jitted train step.

DreamBooth (Ruiz et al., eq. 2), per tuned cascade stage s:

    L_s = E[w_t ||x̂(α_t x + σ_t ε, c) − x||²] + λ E[w_t' ||x̂(α_t' x_pr + σ_t' ε', c_pr) − x_pr||²]

with x the subject images captioned "a [V] dog" and x_pr the class-prior
images of "a dog" sampled from the frozen cascade. The instance and prior
halves go through the UNet as one batch (one forward and backward per stage).
Super-resolution stages see their own low-res view of each image, noised at
the lowered augmentation level (`Stage.loss`).

The state is a plain pytree `{"params": {stage: State}, "opt_state", "step",
"rng"}`; `train_step(state, batch)` is one optimiser update (gradient
accumulation sums micro-batches inside it) and never applies
a non-finite update: if the loss or the gradients are not finite, params and
optimiser state come back unchanged and `metrics["finite"]` is 0, so the last
good state is intact for the caller to save or to stop on.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dreambooth_jax import cascade as cascade_lib


def learning_rate(config) -> optax.Schedule:
  t = config.train
  if t.schedule == "constant":
    main = optax.constant_schedule(t.lr)
  elif t.schedule == "cosine":
    main = optax.cosine_decay_schedule(t.lr, max(1, t.steps - t.warmup_steps))
  else:
    raise ValueError(f"config.train.schedule={t.schedule!r}: use 'constant' or 'cosine'")
  if t.warmup_steps:
    return optax.join_schedules([optax.linear_schedule(0.0, t.lr, t.warmup_steps), main],
                                [t.warmup_steps])
  return main


def trainable_mask(params: Mapping[str, Any], pattern: str) -> Any:
  """True for params whose 'stage/path/to/param' matches `pattern` ('all' = everything)."""
  if pattern in ("all", "", ".*"):
    return jax.tree.map(lambda _: True, params)
  regex = re.compile(pattern)
  def label(path, _):
    name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    return bool(regex.search(name))
  return jax.tree_util.tree_map_with_path(label, params)


def optimizer(config, params) -> optax.GradientTransformation:
  """AdamW with clipping and a schedule; params outside `config.train.trainable` stay fixed."""
  t = config.train
  tx = optax.chain(
      optax.clip_by_global_norm(t.grad_clip) if t.grad_clip else optax.identity(),
      optax.adamw(learning_rate(config), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay))
  mask = trainable_mask(params, t.trainable)
  if all(jax.tree.leaves(mask)):
    return tx
  labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def dreambooth_loss(stages: Mapping[str, cascade_lib.Stage], params: Mapping[str, Any],
                    batch: Mapping[str, Any], rng: jax.Array, prior_weight: float):
  """Eq. 2 summed over tuned stages; returns (loss, metrics).

  batch[stage] = {"instance": [Bi, r, r, 3], "prior": [Bp, r, r, 3]} (prior may be
  absent: no prior preservation); batch["text"] = {"instance": {"text", "mask"},
  "class": {...}} with a leading axis of 1 (one prompt each).
  """
  total, metrics = 0.0, {}
  for i, (name, stage) in enumerate(sorted(stages.items())):
    x_inst = batch[name]["instance"]
    parts = [x_inst]
    texts = [jnp.broadcast_to(batch["text"]["instance"]["text"], (x_inst.shape[0],) +
                              batch["text"]["instance"]["text"].shape[1:])]
    masks = [jnp.broadcast_to(batch["text"]["instance"]["mask"], (x_inst.shape[0],) +
                              batch["text"]["instance"]["mask"].shape[1:])]
    x_prior = batch[name].get("prior")
    if x_prior is not None:
      parts.append(x_prior)
      texts.append(jnp.broadcast_to(batch["text"]["class"]["text"], (x_prior.shape[0],) +
                                    batch["text"]["class"]["text"].shape[1:]))
      masks.append(jnp.broadcast_to(batch["text"]["class"]["mask"], (x_prior.shape[0],) +
                                    batch["text"]["class"]["mask"].shape[1:]))
    per_example, m = stage.loss(params[name], jnp.concatenate(parts), jnp.concatenate(texts),
                                jnp.concatenate(masks), jax.random.fold_in(rng, i))
    n = x_inst.shape[0]
    inst = per_example[:n].mean()
    loss = inst
    metrics[f"{name}/instance_loss"] = inst
    if x_prior is not None:
      prior = per_example[n:].mean()
      loss = loss + prior_weight * prior
      metrics[f"{name}/prior_loss"] = prior
    metrics[f"{name}/loss"] = loss
    total = total + loss
  metrics["loss"] = total
  return total, metrics


def _global_norm(tree) -> jax.Array:
  leaves = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]
  return jnp.sqrt(sum(leaves)) if leaves else jnp.float32(0)


def make_train_step(stages: Mapping[str, cascade_lib.Stage], tx: optax.GradientTransformation,
                    prior_weight: float):
  """`train_step(state, batch) -> (state, metrics)`, pure; jit it with shardings and donation.

  `batch` leaves have a leading micro-batch axis (gradient accumulation).
  """
  def loss_fn(params, micro, rng):
    return dreambooth_loss(stages, params, micro, rng, prior_weight)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch):
    params = state["params"]
    rng = jax.random.fold_in(state["rng"], state["step"])
    accum = jax.tree.leaves(batch)[0].shape[0]

    # Micro-batches unrolled in Python, not a lax.scan: XLA:CPU ran the UNet's
    # backward pass ~9x slower inside a while loop (3.0 vs 0.32 s per step for
    # the tiny cascade), and accumulation counts are small.
    grads, metrics = None, []
    for i in range(accum):
      micro = jax.tree.map(lambda x: x[i], batch)
      (_, m), g = grad_fn(params, micro, jax.random.fold_in(rng, i))
      g = jax.tree.map(lambda x: x.astype(jnp.float32) / accum, g)
      grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
      metrics.append(m)
    metrics = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *metrics)
    updates, new_opt = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    g_norm = _global_norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(g_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = dict(state, params=keep(new_params, params), opt_state=keep(new_opt, state["opt_state"]),
                     step=state["step"] + finite.astype(state["step"].dtype))
    metrics.update(l2_grads=g_norm, l2_params=_global_norm(params), l2_updates=_global_norm(updates),
                   finite=finite.astype(jnp.float32))
    return new_state, metrics

  return train_step


def param_states(stages: Mapping[str, cascade_lib.Stage]) -> dict[str, nnx.State]:
  return {name: stage.params for name, stage in stages.items()}
