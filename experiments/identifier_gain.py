r"""Where a DreamBooth run put its subject: the base UNet's denoising error, per noise level,
on the subject's photos and on class images, with the identifier in the prompt and without.

  python experiments/identifier_gain.py --workdir=workdirs/zigzag_ball
  python experiments/identifier_gain.py --workdir=A --workdir=B --timesteps=50,400,800

For each training workdir (and once for the frozen model it started from) the base
stage predicts the noise of x_t = alpha_t x_0 + sigma_t eps, for the same x_0, t and eps,
given "a [V] [class]" and given "a [class]". The mean squared error is printed per t:

  instance   the subject's training photos (what the instance loss fits)
  class      the first workdir's class-prior images ("a [class]" as the frozen model drew it)
  gain       error without the identifier minus error with it: what [V] buys

A run that learned the subject through its identifier has a clear gain on the photos at
the high noise levels, where x_t no longer shows which photo it was and only the text
can say; sampling starts there. A gain near zero with a low error means the photos were
fitted through the image (memorised at low noise), which a sample from pure noise
cannot use.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dreambooth_jax import data, diffusion, finetuned, sharding  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", action="append", required=True, help="a DreamBooth run; repeat")
  p.add_argument("--timesteps", default="50,200,400,600,800,950")
  p.add_argument("--draws", type=int, default=6, help="noise draws per image and t")
  p.add_argument("--class_images", type=int, default=8)
  return p.parse_args(argv)


def class_images(workdir: pathlib.Path, num: int, r: int) -> np.ndarray:
  paths = sorted((workdir / "class_priors" / "base").glob("*.png"))[:num]
  if not paths:
    raise SystemExit(f"{workdir}/class_priors/base has no images: give a run with prior "
                     "preservation first (its priors are every run's class images)")
  return data.to_model_range(np.stack([
      np.asarray(Image.open(p).convert("RGB").resize((r, r), Image.BICUBIC)) for p in paths]))


def errors(stage, eps, params, images, cond, timesteps, draws) -> list[float]:
  """Mean squared epsilon error per t of `eps(params, x_t, t, cond)` (the stage's jitted
  UNet), the same (t, noise) draws for every call."""
  n = images.shape[0]
  out = []
  for t in timesteps:
    tt = jnp.full((n,), t, jnp.int32)
    err = []
    for k in range(draws):
      noise = jax.random.normal(jax.random.key(1000 * t + k), images.shape)
      pred = eps(params, diffusion.q_sample(stage.schedule, images, tt, noise), tt, cond)
      err.append(float(jnp.mean(jnp.square(pred - noise))))
    out.append(float(np.mean(err)))
  return out


def main(argv=None) -> list[tuple[str, str, dict[str, list[float]]]]:
  """Prints the table; returns its rows: (model, images, {"with"/"without": [error per t]})."""
  args = parse_args(argv)
  timesteps = [int(t) for t in args.timesteps.split(",")]
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  workdirs = [pathlib.Path(w) for w in args.workdir]
  rows = []
  classes = None
  for i, w in enumerate(workdirs):
    tuned = finetuned.FineTuned.load(w, mesh=mesh)
    stage = tuned.models.cascade.by_name["base"]
    r = stage.settings.resolution
    if classes is None:
      classes = class_images(w, args.class_images, r)
    folder = tuned.config.subject.dir or data.default_subject_dir()  # as train.py reads it
    photos = data.SubjectData.from_folder(folder, {"base": r},
                                          min_size=min(tuned.config.subject.min_size, r))
    inst = data.to_model_range(photos.images["base"])
    noun = tuned.class_noun
    # One jitted UNet per workdir (its graphdef; compiled once per image count).
    eps = jax.jit(lambda p, x, t, c: stage.apply(p, x, t, c)[..., :3])
    models = [("frozen", stage.params)] if i == 0 else []
    models.append((w.name, tuned.params["base"]))
    for label, params in models:
      for what, x in (("instance", inst), ("class", classes)):
        n = x.shape[0]
        err = {}
        for key, prompt in (("with", f"a [V] {noun}"), ("without", f"a {noun}")):
          e = tuned.embed([prompt] * n)
          err[key] = errors(stage, eps, params, jnp.asarray(x),
                            {"text": e["text"], "mask": e["mask"]}, timesteps, args.draws)
        rows.append((label, what, err))
  print(f"mean squared epsilon error of the base UNet, t = {timesteps}")
  print("| model | images | prompt | " + " | ".join(f"t={t}" for t in timesteps) + " |")
  print("| --- | --- | --- |" + " ---: |" * len(timesteps))
  for label, what, err in rows:
    for key in ("with", "without"):
      print(f"| {label} | {what} | {key} [V] | " + " | ".join(f"{v:.4f}" for v in err[key]) + " |")
    gain = np.array(err["without"]) - np.array(err["with"])
    print(f"| {label} | {what} | gain of [V] | " + " | ".join(f"{v:+.4f}" for v in gain) + " |")
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
