r"""Trains the world evaluator (dreambooth_jax/world/evaluator.py) on a CPU and ships it.

  python experiments/train_world_evaluator.py
  python experiments/train_world_evaluator.py --steps=300 --train_examples=3000 --out=/tmp/e.safetensors

Data: `evaluator.labelled_scene(seed, i)` for i < --train_examples: world
pretraining scenes (`scene.scene_at`), the six subjects in all six contexts
in their photo poses and in any pose (the evaluator must recognise a subject
wherever a fine-tuned model puts it, which the generator's pretraining never
shows), and decoys (a subject's look with one thing changed). Every scene is
drawn once at 64 px; its 32 px image is that one box-reduced, as the base
stage's training images are. Odd steps train on the 32 px images, which the
evaluator upsamples to 64 px itself, so generated base-stage samples are seen
as in training. Mild augmentation stands in for what generated images get
wrong: horizontal flips, a little blur, pixel noise, small brightness and
contrast changes (small: colour is a label).

The held-out set is another seed (--test_seed); the tests use a third one.
Per-attribute accuracy at 64 and 32 px is printed and stored in the file's
metadata with the run's settings. Optax AdamW, warmup + cosine decay.
Measured on the 2-core dev machine shared with two other jobs (the shipped
file, defaults): rendering 130 s, training 530 s (0.3 s/step); held-out
accuracy at 64 / 32 px: class 0.967 / 0.958, colour 0.975 / 0.973, pattern
0.719 / 0.723, context 1.000 / 1.000, subject 0.944 / 0.944 (on the subjects'
own images 0.959; decoys called "none" 0.717).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dreambooth_jax.world import evaluator as ev


def render_range(seed: int, start: int, stop: int):
  """(64 px [n, 64, 64, 3], 32 px [n, 32, 32, 3], scenes, kinds) of examples start..stop."""
  im64, im32, scenes, kinds = [], [], [], []
  for i in range(start, stop):
    s, kind = ev.labelled_scene(seed, i)
    a, b = ev.render_both(s)
    im64.append(a)
    im32.append(b)
    scenes.append(s)
    kinds.append(kind)
  return np.stack(im64), np.stack(im32), scenes, kinds


def render_set(seed: int, n: int, workers: int, targets_of) -> dict[str, np.ndarray]:
  """The labelled set of `seed`: {"64", "32", "kind", and one int array per head}."""
  chunk = 250
  ranges = [(seed, a, min(a + chunk, n)) for a in range(0, n, chunk)]
  if workers > 1:  # spawn: the parent has started JAX's threads, which fork would copy
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn")) as pool:
      parts = list(pool.map(render_range, *zip(*ranges)))
  else:
    parts = [render_range(*r) for r in ranges]
  scenes = [s for p in parts for s in p[2]]
  targets = [targets_of(s) for s in scenes]
  out = {"64": np.concatenate([p[0] for p in parts]), "32": np.concatenate([p[1] for p in parts]),
         "kind": np.asarray([k for p in parts for k in p[3]])}
  out.update({k: np.asarray([t[k] for t in targets], np.int32) for k in targets[0]})
  return out


def augment(x: jax.Array, rng: jax.Array) -> jax.Array:
  """Flips, blur, noise, brightness/contrast on [N, H, W, 3] in [-1, 1] (per example)."""
  n = x.shape[0]
  k = jax.random.split(rng, 7)
  per = lambda v: v.reshape(n, 1, 1, 1)
  x = jnp.where(per(jax.random.bernoulli(k[0], 0.5, (n,))), x[:, :, ::-1], x)
  # Separable [1, 2, 1] / 4 blur with edge padding, mixed in by a random amount on half.
  p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  b = (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4
  b = (b[:, :, :-2] + 2 * b[:, :, 1:-1] + b[:, :, 2:]) / 4
  amount = jax.random.uniform(k[1], (n,)) * jax.random.bernoulli(k[2], 0.5, (n,))
  x = x + per(amount) * (b - x)
  sigma = jax.random.uniform(k[3], (n,), maxval=0.1) * jax.random.bernoulli(k[4], 0.5, (n,))
  x = x + per(sigma) * jax.random.normal(k[5], x.shape)
  gain, shift = jax.random.uniform(k[6], (2, n), minval=-1, maxval=1) * jnp.array([[0.1], [0.05]])
  return jnp.clip(x * (1 + per(gain)) + per(shift), -1.5, 1.5)


def make_train_step(graphdef, tx):
  """The jitted update: (params, opt_state, uint8 images, {head: ids}, rng) -> (..., loss)."""

  def loss_fn(params, images, targets, rng):
    x = augment(ev.preprocess(images), rng)
    _, logits = nnx.merge(graphdef, params)(x)
    losses = {k: optax.softmax_cross_entropy_with_integer_labels(v, targets[k]).mean()
              for k, v in logits.items()}
    return sum(losses.values()), losses

  @jax.jit
  def step(params, opt_state, images, targets, rng):
    (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, targets, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, losses

  return step


def train_evaluator(evaluator, train: dict, *, steps: int, batch: int, lr: float,
                    seed: int) -> ev.WorldEvaluator:
  """`evaluator` trained on the rendered set `train` (even steps 64 px, odd steps 32 px)."""
  graphdef, params = nnx.split(evaluator.model)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps,
                                                end_value=lr * 0.02)
  tx = optax.adamw(schedule, weight_decay=1e-4)
  opt_state = tx.init(params)
  step = make_train_step(graphdef, tx)
  heads = tuple(evaluator.label_values)
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  n = len(train["64"])
  start, running = time.time(), None
  for i in range(steps):
    idx = rng.integers(0, n, batch)
    images = train["32" if i % 2 else "64"][idx]
    params, opt_state, loss, _ = step(params, opt_state, images, {k: train[k][idx] for k in heads},
                                      jax.random.fold_in(key, i))
    running = float(loss) if running is None else 0.95 * running + 0.05 * float(loss)
    if (i + 1) % 100 == 0 or i + 1 == steps:
      print(f"step {i + 1}/{steps}  loss {running:.3f}  {(time.time() - start) / (i + 1):.2f} s/step",
            flush=True)
  return ev.WorldEvaluator(nnx.merge(graphdef, params), evaluator.label_values)


def held_out_accuracy(evaluator, test: dict, size: str) -> dict[str, float]:
  """Per-head accuracy at `size`, plus the subject head on subject images and on the rest."""
  heads = tuple(evaluator.label_values)
  probs = evaluator.predict(test[size])
  correct = {k: probs[k].argmax(-1) == test[k] for k in heads}
  acc = {k: float(v.mean()) for k, v in correct.items()}
  for kind in ("subject", "decoy", "pretraining"):
    sel = test["kind"] == kind
    acc[f"subject|{kind}"] = float(correct["subject"][sel].mean())
  return acc


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=str(ev.DEFAULT_PATH))
  parser.add_argument("--train_examples", type=int, default=16000)
  parser.add_argument("--test_examples", type=int, default=1500)
  parser.add_argument("--seed", type=int, default=1)
  parser.add_argument("--test_seed", type=int, default=2)
  parser.add_argument("--steps", type=int, default=1800)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--workers", type=int, default=2, help="rendering processes")
  args = parser.parse_args()
  start = time.time()

  # == Data: drawn once, 64 px and its 32 px reduction ====================================
  evaluator = ev.WorldEvaluator.create(seed=args.seed)
  train = render_set(args.seed, args.train_examples, args.workers, evaluator.targets)
  test = render_set(args.test_seed, args.test_examples, args.workers, evaluator.targets)
  kinds, counts = np.unique(train["kind"], return_counts=True)
  render_s = time.time() - start
  print(f"rendered {args.train_examples} + {args.test_examples} scenes in {render_s:.0f} s "
        f"({dict(zip(kinds.tolist(), counts.tolist()))})", flush=True)

  # == Training ==========================================================================
  train_start = time.time()
  evaluator = train_evaluator(evaluator, train, steps=args.steps, batch=args.batch, lr=args.lr,
                              seed=args.seed)
  train_s = time.time() - train_start

  # == Held-out accuracy, the file =======================================================
  acc = {size: held_out_accuracy(evaluator, test, size) for size in ("64", "32")}
  names = list(acc["64"])
  print(f"\nheld-out accuracy (seed {args.test_seed}, {args.test_examples} images)")
  print(f"{'head':22s} {'64 px':>7s} {'32 px':>7s}")
  for k in names:
    print(f"{k:22s} {acc['64'][k]:7.3f} {acc['32'][k]:7.3f}")
  evaluator.info = dict(
      test_accuracy=acc,
      training=dict(seed=args.seed, test_seed=args.test_seed, train_examples=args.train_examples,
                    test_examples=args.test_examples, steps=args.steps, batch=args.batch,
                    lr=args.lr, mix=ev.MIX, render_s=round(render_s), train_s=round(train_s),
                    script="experiments/train_world_evaluator.py"))
  evaluator.save(args.out)
  size = pathlib.Path(args.out).stat().st_size
  print(f"\nwrote {args.out} ({size / 1e6:.2f} MB); total {time.time() - start:.0f} s "
        f"(render {render_s:.0f} s, train {train_s:.0f} s)")


if __name__ == "__main__":
  main()
