r"""What fewer sampling steps cost in class-prior quality, on the pretrained world cascade.

  python experiments/prior_quality.py                       # "a ball", 48 images per setting
  python experiments/prior_quality.py --prompt="a cup" --num=96

Class priors are the frozen model's own images of "a [class noun]"; DreamBooth
samples hundreds of them before training (IF: 100 ancestral DDPM steps at the
base, 50 at SR). DPM-Solver++(2M) (`sampler="dpmpp_2m"`) gets similar images
in far fewer steps. Each row samples the same prompt with the same seeds
through the whole world cascade (configs/world.py's models) and scores the
64 px images with the world evaluator:

  class     mean P(the prompt's class noun): is it still a ball?
  DIV       mean 1 - cos of evaluator features over distinct pairs: variety
  FD        Frechet distance of evaluator features to the world's own renders
            of the class (pretraining distribution): distance from what the
            model was trained to draw (lower is better; real vs real on a
            second set of renders gives the noise floor)
  s/img     wall time per image on this machine, compile excluded

Rows: the paper's DDPM 100+50, DDPM with fewer steps, and DPM-Solver++(2M)
at 25, 15 and 8 steps per stage.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import numpy as np
from scipy import linalg

from dreambooth_jax import config_lib, embeddings, pipeline, sharding
from dreambooth_jax.evaluation import metrics
from dreambooth_jax.evaluation.world_protocol import cosine_distance
from dreambooth_jax.world import evaluator as evaluator_lib
from dreambooth_jax.world import scene

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETTINGS = (("ddpm", 100, 50), ("ddpm", 25, 25), ("dpmpp_2m", 25, 25), ("dpmpp_2m", 15, 15),
            ("dpmpp_2m", 8, 8))


def frechet(a: np.ndarray, b: np.ndarray) -> float:
  """Frechet distance between Gaussians fitted to feature rows a and b (as FID)."""
  mu_a, mu_b = a.mean(0), b.mean(0)
  ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root, _ = linalg.sqrtm(ca @ cb, disp=False)
  return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * root.real))


def renders(cls: str, n: int, seed: int) -> np.ndarray:
  """n world renders of class `cls` at 64 px, from the pretraining distribution of `seed`."""
  out, i = [], 0
  while len(out) < n:
    s, _ = scene.scene_at(seed, i)
    if s.cls == cls:
      out.append(scene.render(s, 64))
    i += 1
  return np.stack(out)


def sample(prompt: str, sampler: str, base_steps: int, sr_steps: int, num: int, batch: int,
           seed: int) -> tuple[np.ndarray, float]:
  """(uint8 [num, 64, 64, 3] from the world cascade, seconds per image after compiling)."""
  config = config_lib.from_file(f"{ROOT / 'configs' / 'world.py'}")
  for name, steps in (("base", base_steps), ("sr256", sr_steps)):
    config.cascade[name].update(sampler=sampler, num_steps=steps)
  mesh = sharding.make_mesh()
  models = pipeline.build(config, mesh)
  text, mask = embeddings.encode_prompts(models.load_t5(), models.tokenizer, [prompt, ""],
                                         mesh=mesh)
  cond, uncond = ({"text": text[i:i + 1], "mask": mask[i:i + 1]} for i in (0, 1))
  run = lambda i: models.cascade.sample(cond, jax.random.key(seed * 1000 + i),
                                        uncond_embeddings=uncond, batch_size=batch,
                                        mesh=mesh)["sr256"]
  run(0)  # compile
  start, images = time.perf_counter(), []
  for i in range(-(-num // batch)):
    images.append(np.asarray(run(i)))
  return np.concatenate(images)[:num], (time.perf_counter() - start) / (len(images) * batch)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--prompt", default="a ball")
  p.add_argument("--num", type=int, default=48, help="images per setting")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="also save each setting's images (.npz) here")
  args = p.parse_args(argv)
  cls = args.prompt.split()[-1]
  judge = evaluator_lib.WorldEvaluator.load()
  k = judge.index("class", cls)
  real = judge.features(renders(cls, 256, seed=11))
  floor = frechet(judge.features(renders(cls, args.num, seed=12)), real)
  print(f"prompt {args.prompt!r}, {args.num} images per row; real vs real FD {floor:.3f}")
  print("| sampler | steps (base+SR) | class P | DIV | FD to renders | s/img |")
  print("| --- | --- | --- | --- | --- | --- |")
  saved = {}
  for sampler, base_steps, sr_steps in SETTINGS:
    images, per_image = sample(args.prompt, sampler, base_steps, sr_steps, args.num, args.batch,
                               args.seed)
    probs, feats = judge.predict_and_features(images)
    div = metrics.mean_pairwise_distance(cosine_distance, feats)[0]
    print(f"| {sampler} | {base_steps}+{sr_steps} | {probs['class'][:, k].mean():.3f} | "
          f"{div:.3f} | {frechet(feats, real):.3f} | {per_image:.2f} |", flush=True)
    saved[f"{sampler}_{base_steps}_{sr_steps}"] = images
  if args.out:
    np.savez_compressed(args.out, **saved)


if __name__ == "__main__":
  main()
