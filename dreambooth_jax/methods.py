"""Training objectives, optimiser and the pure, jitted train step.

DreamBooth (Ruiz et al., eq. 2), per tuned cascade stage s:

    L_s = E[w_t ||x̂(α_t x + σ_t ε, c) − x||²] + λ E[w_t' ||x̂(α_t' x_pr + σ_t' ε', c_pr) − x_pr||²]

with x the subject images captioned "a [V] dog" and x_pr the class-prior
images of "a dog" sampled from the frozen cascade. The instance and prior
halves go through the UNet as one batch (one forward and backward per stage).
Super-resolution stages see their own low-res view of each image, noised at
the lowered augmentation level (`Stage.loss`).

Three methods share this one step (`config.method`), as a list of `Phase`s:

* dreambooth: the UNets of the tuned stages learn, with the prior term.
* textual_inversion (Gal et al.): only a new token's embedding row learns; the
  instance prompt ("a photo of <tok>") goes through the frozen T5 inside the
  step so the gradient reaches the row; UNets and T5 stay fixed; no prior.
* ti_then_finetune (Zeng et al.): a short textual-inversion phase for "<rare>"
  (an adjective: "a photo of <rare> dog"), then the UNets fine-tune with the
  learned row and T5 frozen and without the prior term.

The state is a plain pytree `{"params", "fixed", "opt_state", "step", "rng"}`:
`params` is what learns in the current phase ({stage: State} and/or
{"tokens": [K, d_model]}), `fixed` what an earlier phase learned and this one
keeps (the token rows in the fine-tune phase). Pretrained weights that never
learn (frozen UNets, T5) are not state: they are the `frozen` argument of
`train_step(state, batch, frozen)`, so checkpoints hold only what was learned.
A step is one optimiser update (gradient accumulation sums micro-batches inside
it) and never applies a non-finite update: if the loss or the gradients are not
finite, params and optimiser state come back unchanged and `metrics["finite"]`
is 0, so the last good state is intact for the caller to save or to stop on.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dreambooth_jax import cascade as cascade_lib
from dreambooth_jax import config_lib
from dreambooth_jax import lora as lora_lib
from dreambooth_jax.embeddings import encode_with_learned

METHODS = ("dreambooth", "textual_inversion", "ti_then_finetune")
TOKENS = "tokens"  # the key of the learned embedding rows in params / fixed
# The key in `frozen` of the frozen models a stage's loss reads besides its UNet,
# {stage: {part: state}} (`Stage.frozen_parts`: the x4 upscaler's VAE).
FROZEN_PARTS = "frozen_parts"


@dataclasses.dataclass(frozen=True)
class Phase:
  """One optimisation phase over global steps [start, end)."""
  name: str            # dreambooth | textual_inversion | finetune
  start: int
  end: int
  lr: float
  train_tokens: bool   # the learned token rows, through the frozen T5
  train_unets: bool    # the UNets of the tuned stages
  prior: bool          # the class-prior preservation term

  @property
  def steps(self) -> int:
    return self.end - self.start


def uses_learned_tokens(config) -> bool:
  return config.method in ("textual_inversion", "ti_then_finetune")


def phases(config) -> list[Phase]:
  """The method's phases; a resumed run finds its place by the global step."""
  t, method = config.train, config.method
  if method == "dreambooth":
    return [Phase("dreambooth", 0, t.steps, t.lr, False, True, bool(config.prior.enabled))]
  if method == "textual_inversion":
    return [Phase("textual_inversion", 0, t.steps, t.lr, True, False, False)]
  if method == "ti_then_finetune":
    ti = config.two_stage.ti_steps
    if not 0 < ti < t.steps:
      raise config_lib.ConfigError(
          f"config.two_stage.ti_steps={ti} must be in (0, config.train.steps={t.steps}): stage 1 "
          "(textual inversion) takes ti_steps, stage 2 (fine-tuning) the rest")
    return [Phase("textual_inversion", 0, ti, config.two_stage.ti_lr, True, False, False),
            Phase("finetune", ti, t.steps, t.lr, False, True, bool(config.prior.enabled))]
  raise config_lib.ConfigError(f"config.method={method!r}: use one of {', '.join(METHODS)}")


def phase_of_step(all_phases: list[Phase], step: int) -> Phase:
  """The phase that runs step `step` + 1 (the last phase once training is done)."""
  for phase in all_phases:
    if step < phase.end:
      return phase
  return all_phases[-1]


def learning_rate(config, phase: Phase) -> optax.Schedule:
  t, lr = config.train, phase.lr
  if t.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif t.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, max(1, phase.steps - t.warmup_steps))
  else:
    raise ValueError(f"config.train.schedule={t.schedule!r}: use 'constant' or 'cosine'")
  if t.warmup_steps:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, t.warmup_steps), main],
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


OPTIMIZERS = ("adamw", "adafactor")


def _base_optimizer(t, name: str, lr: optax.Schedule) -> optax.GradientTransformation:
  """AdamW keeps two moments per param (8 bytes in float32; `mu_dtype=bfloat16` makes
  it 6). Adafactor, which Imagen trained its base model with (Adam its SR models),
  keeps factored second moments and no first: about 0 bytes per param. With
  `multiply_by_parameter_scale=False` its learning rate is an absolute step like Adam's."""
  if name == "adamw":
    return optax.adamw(lr, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                       mu_dtype=t.get("mu_dtype") or None)
  if name == "adafactor":
    return optax.adafactor(lr, multiply_by_parameter_scale=False, decay_rate=0.8,
                           clipping_threshold=1.0, weight_decay_rate=t.weight_decay or None)
  raise config_lib.ConfigError(
      f"config.train.optimizer: unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}, "
      "or per stage, e.g. 'base=adafactor,sr256=adamw'")


def optimizer_per_group(spec: str, groups) -> dict[str, str]:
  """`config.train.optimizer` ('adamw', or per stage 'base=adafactor,sr256=adamw',
  unnamed groups taking AdamW) -> {group: optimizer name}."""
  if "=" not in spec:
    return {g: spec for g in groups}
  pairs = [item.split("=", 1) for item in spec.split(",") if item.strip()]
  table = {k.strip(): v.strip() for k, v in pairs}
  unknown = set(table) - set(groups) - {"base", "sr256", "sr1024"}
  if unknown:
    raise config_lib.ConfigError(
        f"config.train.optimizer={spec!r}: unknown stage(s) {sorted(unknown)}; use base, sr256, sr1024")
  return {g: table.get(g, "adamw") for g in groups}


def optimizer(config, params, phase: Phase, *, clip_by=optax.clip_by_global_norm
              ) -> optax.GradientTransformation:
  """`config.train.optimizer` with clipping and the phase's schedule; UNet params outside
  `config.train.trainable` stay fixed (learned token rows always learn). With one
  optimizer the global norm is clipped over every trained param; with several, over
  each optimizer's params (stages are independent models). `clip_by(max_norm)` is the
  clipping transform (many-subject jobs clip each subject's slice by its own norm)."""
  t = config.train
  lr = learning_rate(config, phase)
  names = optimizer_per_group(t.get("optimizer", "adamw"), params)  # old configs: AdamW
  clip = lambda: clip_by(t.grad_clip) if t.grad_clip else optax.identity()
  mask = trainable_mask(params, t.trainable)
  for key in (TOKENS, lora_lib.TEXT):  # token rows and T5's adapters always learn
    if key in params:
      mask[key] = jax.tree.map(lambda _: True, params[key])
  used = sorted(set(names.values()))
  if len(used) == 1:
    tx = optax.chain(clip(), _base_optimizer(t, used[0], lr))
    if all(jax.tree.leaves(mask)):
      return tx
    labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
  labels = {g: jax.tree.map(lambda m, n=names[g]: n if m else "freeze", mask[g]) for g in params}
  transforms = {n: optax.chain(clip(), _base_optimizer(t, n, lr)) for n in used}
  return optax.multi_transform(dict(transforms, freeze=optax.set_to_zero()), labels)


def dreambooth_loss(stages: Mapping[str, cascade_lib.Stage], params: Mapping[str, Any],
                    batch: Mapping[str, Any], rng: jax.Array, prior_weight: float):
  """Eq. 2 summed over tuned stages; returns (loss, metrics).

  batch[stage] = {"instance": [Bi, r, r, 3], "prior": [Bp, r, r, 3]} (prior may be
  absent: no prior preservation); batch["text"] = {"instance": {"text", "mask"},
  "class": {...}} with a leading axis of 1 (one prompt each). A stage with a text
  encoder of its own (the x4 upscaler's CLIP) has its prompts' states in
  batch[stage]["text"], shaped the same; its frozen models besides the UNet are in
  params[FROZEN_PARTS][stage].
  """
  total, metrics = 0.0, {}
  for i, (name, stage) in enumerate(sorted(stages.items())):
    text = batch[name].get("text", batch.get("text"))
    x_inst = batch[name]["instance"]
    parts = [x_inst]
    texts = [jnp.broadcast_to(text["instance"]["text"], (x_inst.shape[0],) +
                              text["instance"]["text"].shape[1:])]
    masks = [jnp.broadcast_to(text["instance"]["mask"], (x_inst.shape[0],) +
                              text["instance"]["mask"].shape[1:])]
    x_prior = batch[name].get("prior")
    if x_prior is not None:
      parts.append(x_prior)
      texts.append(jnp.broadcast_to(text["class"]["text"], (x_prior.shape[0],) +
                                    text["class"]["text"].shape[1:]))
      masks.append(jnp.broadcast_to(text["class"]["mask"], (x_prior.shape[0],) +
                                    text["class"]["mask"].shape[1:]))
    frozen_parts = params.get(FROZEN_PARTS, {}).get(name)
    per_example, m = stage.loss(params[name], jnp.concatenate(parts), jnp.concatenate(texts),
                                jnp.concatenate(masks), jax.random.fold_in(rng, i),
                                **({"parts": frozen_parts} if frozen_parts else {}))
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


def global_norm(tree) -> jax.Array:
  """The l2 norm of all leaves of `tree` together, summed in float32 whatever their dtype
  (bf16 sums of squares lose precision); 0 for an empty tree. Logged for grads, params
  and updates."""
  leaves = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]
  return jnp.sqrt(sum(leaves)) if leaves else jnp.float32(0)


def make_train_step(stages: Mapping[str, cascade_lib.Stage], tx: optax.GradientTransformation,
                    prior_weight: float, *, t5_graphdef=None, text=None, loss=None):
  """`train_step(state, batch, frozen={}) -> (state, metrics)`, pure; jit it with shardings
  and donation of `state`.

  `stages`: the stages whose loss is summed (their UNets in `state["params"]` when
  they learn, else in `frozen`; a `lora.LoRAStage` learns adapters in `params` on
  its frozen weights in `frozen`; a stage's other frozen models, the x4 upscaler's
  VAE, are in `frozen[FROZEN_PARTS]`). `frozen` may hold "t5" (params of the
  `t5_graphdef` encoder) for phases that learn token rows; the instance text
  in `batch` is then token ids ({"input_ids", "mask"}) encoded inside the step.
  With `text` (a `lora.LoRAText`) T5's adapters learn in `params["text_encoder"]`
  on `frozen["t5"]`, and the instance and class prompts are token ids, encoded in
  the step by the adapted T5 (with the token rows, learned or fixed, if any).
  `batch` leaves have a leading micro-batch axis (gradient accumulation). `loss` replaces
  `dreambooth_loss` (same signature and return), e.g. the sum over subjects of
  `train_many`'s one-step-many-subjects job.
  """
  loss = dreambooth_loss if loss is None else loss

  def encoder(params, frozen, rng):
    if text is not None and lora_lib.TEXT in params:
      return text.bind(frozen["t5"], params[lora_lib.TEXT], jax.random.fold_in(rng, 104729)).module()
    return nnx.merge(t5_graphdef, frozen["t5"])  # an argument, not differentiated

  def loss_fn(params, fixed, frozen, micro, rng):
    every = {**frozen, **fixed, **params}
    for name, stage in stages.items():  # LoRA: the learned adapters on the frozen weights
      if name in params and name in frozen and hasattr(stage, "bind"):
        every[name] = stage.bind(frozen[name], params[name], jax.random.fold_in(rng, 7919))
    text = dict(micro.get("text", {}))  # none when every stage brings its own (x4 upscaler)
    ids = [k for k, v in text.items() if "input_ids" in v]
    if ids:  # token ids: through T5 here, so gradients reach the rows or T5's adapters
      t5 = encoder(params, frozen, rng)
      rows = params.get(TOKENS, fixed.get(TOKENS))
      for k in ids:
        emb = encode_with_learned(t5, rows, text[k]["input_ids"], text[k]["mask"])
        text[k] = {"text": emb.astype(jnp.float32), "mask": text[k]["mask"]}
    return loss(stages, every, dict(micro, text=text), rng, prior_weight)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch, frozen=None):
    frozen = frozen or {}
    params, fixed = state["params"], state.get("fixed", {})
    rng = jax.random.fold_in(state["rng"], state["step"])
    accum = jax.tree.leaves(batch)[0].shape[0]

    # Micro-batches unrolled in Python, not a lax.scan: XLA:CPU ran the UNet's
    # backward pass ~9x slower inside a while loop (3.0 vs 0.32 s per step for
    # the tiny cascade), and accumulation counts are small.
    grads, metrics = None, []
    for i in range(accum):
      micro = jax.tree.map(lambda x: x[i], batch)
      (_, m), g = grad_fn(params, fixed, frozen, micro, jax.random.fold_in(rng, i))
      g = jax.tree.map(lambda x: x.astype(jnp.float32) / accum, g)
      grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
      metrics.append(m)
    metrics = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *metrics)
    g_norm = global_norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(g_norm)
    l2_params = global_norm(params)

    def apply(operands):
      params, opt_state, grads = operands
      updates, new_opt = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), new_opt, global_norm(updates)

    # A cond, not a select between old and new: the update can then write params and
    # moments in place; a select keeps both copies alive (12 GiB/chip for IF-I-XL).
    new_params, new_opt, l2_updates = jax.lax.cond(
        finite, apply, lambda ops: (ops[0], ops[1], jnp.zeros((), jnp.float32)),
        (params, state["opt_state"], grads))
    new_state = dict(state, params=new_params, opt_state=new_opt,
                     step=state["step"] + finite.astype(state["step"].dtype))
    metrics.update(l2_grads=g_norm, l2_params=l2_params, l2_updates=l2_updates,
                   finite=finite.astype(jnp.float32))
    return new_state, metrics

  return train_step


def param_states(stages: Mapping[str, cascade_lib.Stage]) -> dict[str, nnx.State]:
  return {name: stage.params for name, stage in stages.items()}


def initial_token_rows(t5: nnx.Module, tokenizer, init_words: list[str]) -> jax.Array:
  """[K, d_model] float32: row k starts as the mean T5 embedding of init word k's pieces.

  (Textual inversion wants one-piece init words; a word the vocabulary splits
  is averaged rather than refused, as diffusers' TI scripts do not allow.)
  """
  table = t5.shared.embedding[...]
  rows = []
  for word in init_words:
    ids = tokenizer.encode(word, add_eos=False)
    ids = [i for i in ids if i >= 0 and tokenizer.id_to_piece(i) != "▁"] or ids
    if not ids:
      raise config_lib.ConfigError(f"config.learned_token.init_word={word!r} has no tokens")
    rows.append(jnp.mean(table[jnp.asarray(ids)].astype(jnp.float32), axis=0))
  return jnp.stack(rows)
