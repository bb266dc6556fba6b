r"""Sample a fine-tuned cascade: a PNG grid of every stage for a prompt.

  python -m dreambooth_jax.sample --workdir=workdirs/dog --prompt="a [V] dog on the beach"

`[V]` is replaced by the workdir's identifier. The tuned stages come from the
latest checkpoint (`--step` picks another), the frozen stages from the
config's models; text embeddings go through the workdir's prompt cache, so
T5 is only loaded for prompts it has not seen.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging

import jax
import numpy as np

from dreambooth_jax import config_lib, metrics_writer, pipeline, text
from dreambooth_jax import train as train_lib

# --workdir is the training CLI's flag (defined in dreambooth_jax.train, imported above).
flags.DEFINE_multi_string("prompt", None, "Prompt(s); [V] stands for the identifier.")
flags.DEFINE_integer("num", 4, "Images per prompt.")
flags.DEFINE_integer("seed", 0, "Sampling seed (same seed, same images).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_string("out", None, "Output PNG (default: <workdir>/samples/<prompt>.png).")
flags.DEFINE_string("stages", None, "Last stage to run, e.g. 'base' (default: all).")


def load_workdir(workdir: str):
  """(config, models, identifier) of a training workdir."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise train_lib.TrainError(f"{workdir!r} has no config.json: not a dreambooth_jax.train workdir")
  config = config_lib.load(path)
  models = pipeline.build(config)
  with open(os.path.join(workdir, "identifier.json")) as f:
    identifier = text.Identifier.from_json(f.read())
  return config, models, identifier


def sample(workdir: str, prompts: list[str], *, num: int = 4, seed: int = 0, step: int | None = None,
           upto: str | None = None) -> list[tuple[str, dict[str, np.ndarray]]]:
  """[(prompt, {stage: uint8 [num, H, W, 3]})] from the workdir's fine-tuned cascade."""
  config, models, identifier = load_workdir(workdir)
  prompts = [p.replace("[V]", identifier.text) for p in prompts]
  mesh = None
  table = train_lib._encode_all(config, models, prompts + [""], workdir, mesh)
  params, restored_step = train_lib.restore_params(config, models, workdir, step)
  print(f"sampling {workdir} at step {restored_step} (identifier {identifier.text!r})", flush=True)
  from dreambooth_jax.embeddings import stack_embeddings
  uncond = stack_embeddings(table, [""])
  rows = []
  for i, prompt in enumerate(prompts):
    images = models.cascade.sample(stack_embeddings(table, [prompt]), jax.random.key(seed + i),
                                   uncond_embeddings=uncond, params=params, batch_size=num, upto=upto)
    rows.append((prompt, images))
  return rows


def main(argv):
  del argv
  f = flags.FLAGS
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  try:
    rows = sample(f.workdir, f.prompt, num=f.num, seed=f.seed, step=f.step, upto=f.stages)
  except train_lib.USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  slug = re.sub(r"[^A-Za-z0-9]+", "_", rows[0][0]).strip("_")[:60] or "sample"
  out = f.out or os.path.join(f.workdir, "samples", f"{slug}.png")
  metrics_writer.save_grid(out, rows)
  print(f"wrote {out}", flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "prompt"])
  app.run(main)
