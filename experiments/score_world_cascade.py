r"""How well a pretrained world cascade follows its prompts, scored by the world evaluator.

  python experiments/score_world_cascade.py --cascade=workdirs/world_pretrain/export
  python experiments/score_world_cascade.py --cascade=A --cascade=B --num=64 --grid=/tmp/g.png

Held-out scenes of the pretraining distribution (their own seed, so never seen in
training) are captioned in full ("a large blue striped box in the snow"); the
cascade samples one image per caption exactly as a world DreamBooth run does
(configs/world.py: DDPM 25 steps, guidance 4, the same noise for every
cascade); the evaluator reads class, colour, pattern, size and context off each
base (32 px) and SR (64 px) sample. The same scenes rendered by the world itself
give the evaluator's own accuracy, the ceiling; chance is 1 / number of values.
The SR stage is also scored alone, on the world's own 32 px renders as its low-res
input, with how far it moves its input's mean colour: what it loses there is its own.

This is what pretraining is judged by before a DreamBooth run can mean anything:
a cascade that ignores colour words cannot learn a two-tone subject.

`--named` asks the same of the named instances (pretrain_world.py --named): captioned
by name alone, "a zm box on the beach", is the name's colour, pattern and size drawn?
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import world as world_config  # noqa: E402
from dreambooth_jax import cascade, embeddings, grids, pipeline, sharding  # noqa: E402
from dreambooth_jax.world import evaluator as evaluator_lib  # noqa: E402
from dreambooth_jax.world import instances  # noqa: E402
from dreambooth_jax.world import scene as scene_lib  # noqa: E402

LABELS = ("class", "colour", "pattern", "size", "context")
HELD_OUT_SEED = 90_210  # pretraining draws from seed 0


def held_out_scenes(num: int) -> list[scene_lib.Scene]:
  return [scene_lib.sample_scene(scene_lib.example_rng(HELD_OUT_SEED, i)) for i in range(num)]


def named_scenes(num: int) -> list[scene_lib.Scene]:
  """Held-out scenes of the named instances, each name in turn, in a held-out pose and context:
  captioned "a zm box on the beach", they ask whether the cascade draws what a name means."""
  out = []
  for i in range(num):
    rng = scene_lib.example_rng(HELD_OUT_SEED, i)
    context = scene_lib.sample_scene(rng).context
    out.append(scene_lib.named_scene(rng, instances.INSTANCES[i % len(instances.INSTANCES)], context))
  return out


def accuracies(evaluator, images: np.ndarray, scenes) -> dict[str, float]:
  targets = [evaluator.targets(s) for s in scenes]
  acc = evaluator_lib.accuracy(evaluator, images, {k: np.asarray([t[k] for t in targets])
                                                   for k in targets[0]})
  return {k: acc[k] for k in LABELS}


def load(cascade_dir: str, sampler: str = "", steps: int = 0, sr_aug: float = -1.0,
         sr_guidance: float = -1.0, sr_colour_fix: int = -1):
  """(models, T5, mesh) of the cascade at `cascade_dir`, built as configs/world.py builds it,
  with its sampler, steps, SR augmentation level, guidance and colour fix unless given; on
  one device."""
  config = world_config.get_config(f"cascade={cascade_dir}")
  for name in ("base", "sr256"):
    config.cascade[name].sampler = sampler or config.cascade[name].sampler
    config.cascade[name].num_steps = steps or config.cascade[name].num_steps
  if sr_aug >= 0:
    config.cascade.sr256.sample_aug_level = sr_aug
  if sr_guidance >= 0:
    config.cascade.sr256.guidance_scale = sr_guidance
  if sr_colour_fix >= 0:
    config.cascade.sr256.colour_fix = bool(sr_colour_fix)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  models = pipeline.build(config, mesh)
  return models, models.load_t5(), mesh


def _encode(models, t5, captions):
  e, m = embeddings.encode_prompts(t5, models.tokenizer, captions + [""])
  return {"text": e[:-1], "mask": m[:-1]}, {"text": e[-1:], "mask": m[-1:]}


def sample(loaded, captions: list[str], seed: int) -> dict[str, np.ndarray]:
  """{stage: uint8 [N, r, r, 3]}: one image per caption, the same noise for every cascade."""
  models, t5, mesh = loaded
  cond, uncond = _encode(models, t5, captions)
  return models.cascade.sample(cond, jax.random.key(seed), uncond_embeddings=uncond,
                               batch_size=len(captions), mesh=mesh)


def sr_on_renders(loaded, captions: list[str], renders32: np.ndarray, seed: int) -> np.ndarray:
  """uint8 [N, 64, 64, 3]: the SR stage alone, its low-res input the world's own 32 px
  renders instead of the base's samples. What it loses here is the SR stage's fault alone."""
  models, t5, mesh = loaded
  cond, uncond = _encode(models, t5, captions)
  stage = models.cascade.by_name["sr256"]
  lowres = renders32.astype(np.float32) / 127.5 - 1
  x = stage.sample(stage.params, cond, cascade.broadcast_cond(uncond, len(captions)),
                   jax.random.key(seed), lowres=lowres, mesh=mesh)
  return cascade.to_uint8(x)


def colour_shift(images: np.ndarray, reference: np.ndarray) -> float:
  """Mean over images of |mean colour - the reference's| (0..255 per channel, averaged):
  a super-resolution stage should keep its input's colours."""
  a = images.astype(np.float32).mean(axis=(1, 2))
  b = reference.astype(np.float32).mean(axis=(1, 2))
  return float(np.abs(a - b).mean())


def text_sensitivity(loaded, captions: list[str], seed: int, timesteps=(100, 500, 900)
                     ) -> dict[int, float]:
  """How much the caption moves the base UNet: mean over captions of
  |eps(x_t, caption) - eps(x_t, "")| / |eps(x_t, "")| on one random x_t per caption, at
  each t. A cascade whose samples ignore their captions shows it here first."""
  models, t5, _ = loaded
  cond, uncond = _encode(models, t5, captions)
  stage = models.cascade.stages[0]
  n, r = len(captions), stage.settings.resolution
  x = jax.random.normal(jax.random.key(seed), (n, r, r, 3))
  uncond = jax.tree.map(lambda v: jax.numpy.repeat(v, n, 0), uncond)
  # Weights and x_t are arguments, not closed-over constants XLA would try to fold.
  eps = jax.jit(lambda p, x, c, t: stage.apply(p, x, jax.numpy.full((n,), t), c)[..., :3])
  out = {}
  for t in timesteps:
    a, b = (np.asarray(eps(stage.params, x, c, t)) for c in (cond, uncond))
    out[t] = float(np.mean(np.linalg.norm((a - b).reshape(n, -1), axis=1)
                           / np.linalg.norm(b.reshape(n, -1), axis=1)))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--cascade", action="append", required=True,
                 help="an export of pretrain_world.py (IF-I/, IF-II/); repeat to compare")
  p.add_argument("--num", type=int, default=64, help="held-out captions (one image each)")
  p.add_argument("--seed", type=int, default=0, help="the sampling noise, shared by every cascade")
  p.add_argument("--sampler", default="", help="instead of configs/world.py's (ddpm), e.g. dpmpp_2m")
  p.add_argument("--steps", type=int, default=0, help="instead of configs/world.py's (25)")
  p.add_argument("--sr_aug", type=float, default=-1.0,
                 help="the SR stage's sampling augmentation level instead of configs/world.py's (0.25)")
  p.add_argument("--sr_guidance", type=float, default=-1.0,
                 help="the SR stage's guidance scale instead of configs/world.py's (4)")
  p.add_argument("--sr_colour_fix", type=int, default=-1, choices=(-1, 0, 1),
                 help="1/0: the SR stage keeps its input's colours or not, instead of "
                      "configs/world.py's (1)")
  p.add_argument("--sensitivity", action="store_true",
                 help="also print how much the caption moves the base UNet's epsilon (cond vs \"\")")
  p.add_argument("--named", action="store_true",
                 help="caption named instances by name instead (\"a zm box on the beach\"; "
                      "dreambooth_jax/world/instances.py): colour, pattern and size are the name's")
  p.add_argument("--grid", default=None, help="also save the first 8 samples of each cascade here")
  args = p.parse_args(argv)

  evaluator = evaluator_lib.WorldEvaluator.load()
  scenes = named_scenes(args.num) if args.named else held_out_scenes(args.num)
  captions = [scene_lib.caption(s, "name_context" if args.named else "full") for s in scenes]
  real = {"sr256": np.stack([evaluator_lib.render_both(s)[0] for s in scenes]),
          "base": np.stack([evaluator_lib.render_both(s)[1] for s in scenes])}
  chance = {k: 1 / len(evaluator.label_values[k]) for k in LABELS}
  rows = [("chance", "-", chance), ("world images (ceiling)", "64 px", accuracies(evaluator, real["sr256"], scenes)),
          ("world images (ceiling)", "32 px", accuracies(evaluator, real["base"], scenes))]
  grid, sensitivity, shifts = [], {}, {}
  for folder in args.cascade:
    loaded = load(folder, args.sampler, args.steps, args.sr_aug, args.sr_guidance,
                  args.sr_colour_fix)
    out = sample(loaded, captions, args.seed)
    for stage, size in (("base", "32 px"), ("sr256", "64 px")):
      rows.append((folder, f"{stage} {size}", accuracies(evaluator, out[stage], scenes)))
    alone = sr_on_renders(loaded, captions, real["base"], args.seed)
    rows.append((folder, "sr256 64 px on the 32 px renders", accuracies(evaluator, alone, scenes)))
    shifts[folder] = (colour_shift(out["sr256"], out["base"]), colour_shift(alone, real["sr256"]))
    grid += [(f"{pathlib.Path(folder).name}: {captions[i]}", {k: v[i:i + 1] for k, v in out.items()})
             for i in range(min(8, args.num))]
    if args.sensitivity:
      sensitivity[folder] = text_sensitivity(loaded, captions[:16], args.seed)

  what = "captions naming an instance" if args.named else "full captions"
  print(f"\n{args.num} held-out {what}, one sample each; evaluator top-1 accuracy\n")
  print("| cascade | images | " + " | ".join(LABELS) + " |")
  print("| --- | --- | " + " | ".join("---" for _ in LABELS) + " |")
  for name, what, acc in rows:
    print(f"| {name} | {what} | " + " | ".join(f"{acc[k]:.2f}" for k in LABELS) + " |")
  print("\n| cascade | SR colour shift from its base sample | SR colour shift on the renders |\n"
        "| --- | --- | --- |")
  for folder, (from_base, on_renders) in shifts.items():
    print(f"| {folder} | {from_base:.1f} | {on_renders:.1f} |")
  print(f"(mean |mean colour - its input's|, 0..255; the 32 px renders against their 64 px "
        f"originals: {colour_shift(real['base'], real['sr256']):.1f})")
  if args.sensitivity:
    print("\n| cascade | " + " | ".join(f"|eps(c) - eps('')| / |eps('')| at t={t}" for t in (100, 500, 900))
          + " |\n| --- |" + " --- |" * 3)
    for folder, sens in sensitivity.items():
      print(f"| {folder} | " + " | ".join(f"{v:.4f}" for v in sens.values()) + " |")
  if args.grid:
    grids.save_grid(args.grid, grid)
    print(f"\nsamples: {args.grid}")
  return rows, sensitivity


if __name__ == "__main__":
  main(sys.argv[1:])
