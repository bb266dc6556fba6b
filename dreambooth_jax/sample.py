r"""Sample a fine-tuned cascade: a PNG grid of every stage for a prompt.

  python -m dreambooth_jax.sample --workdir=workdirs/dog --prompt="a [V] dog on the beach"

`[V]` is replaced by the workdir's identifier. The grid shows every stage (with
`config.pretrained.stage_3`, the x4 upscaler's 1024 px too); the last stage's
images are also written at full size beside it. The tuned stages come from the
latest checkpoint (`--step` picks another), the frozen stages from the
config's models; text embeddings go through the workdir's prompt cache, so
T5 is only loaded for prompts it has not seen. From Python, the same is
`dreambooth_jax.finetuned.FineTuned.load(workdir)` (`.embed`, `.generate`).

A workdir trained without a stage III samples to 1024 px with `--stage_3=` the
stabilityai/stable-diffusion-x4-upscaler download (DeepFloyd's public stage III;
its folder is checked from configs and headers before anything is built):

  python -m dreambooth_jax.sample --workdir=gs://bucket/dog --prompt="a [V] dog" \
      --stage_3=stable-diffusion-x4-upscaler
"""

from __future__ import annotations

import re

from absl import app, flags

from dreambooth_jax import finetuned, grids, utils

flags.DEFINE_string("workdir", None, "A training workdir (local or gs://...).")
flags.DEFINE_multi_string("prompt", None, "Prompt(s); [V] stands for the identifier.")
flags.DEFINE_integer("num", 4, "Images per prompt.")
flags.DEFINE_integer("seed", 0, "Sampling seed (same seed, same images).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_string("out", None, "Output PNG (default: <workdir>/samples/<prompt>.png).")
flags.DEFINE_string("stages", None, "Last stage to run, e.g. 'base' (default: all).")
flags.DEFINE_string("stage_3", None, "The stabilityai/stable-diffusion-x4-upscaler download, "
                    "added as stage III (256 -> 1024 px) to a workdir trained without one.")


def main(argv):
  del argv
  f = flags.FLAGS
  rows = finetuned.sample(f.workdir, f.prompt, num=f.num, seed=f.seed, step=f.step, upto=f.stages,
                          stage_3=f.stage_3)
  slug = re.sub(r"[^A-Za-z0-9]+", "_", rows[0][0]).strip("_")[:60] or "sample"
  out = f.out or utils.as_path(f.workdir) / "samples" / f"{slug}.png"
  grids.save_grid(out, rows)
  print(f"wrote {out}", flush=True)
  # The grid shows every stage at 128 px; the last stage's images (1024 px with the x4
  # upscaler as stage III) are also written at full size beside it.
  stage, side = grids.save_last_stage(out, rows)
  print(f"wrote the {stage} images at {side} px beside it", flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "prompt"])
  app.run(lambda argv: utils.run_cli(main, argv))
