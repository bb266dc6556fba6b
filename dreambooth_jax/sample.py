r"""Sample a fine-tuned cascade: a PNG grid of every stage for a prompt.

  python -m dreambooth_jax.sample --workdir=workdirs/dog --prompt="a [V] dog on the beach"

`[V]` is replaced by the workdir's identifier. The tuned stages come from the
latest checkpoint (`--step` picks another), the frozen stages from the
config's models; text embeddings go through the workdir's prompt cache, so
T5 is only loaded for prompts it has not seen.

From Python, `FineTuned.load(workdir)` is the handle that `evaluate` and the
notebooks use: `.embed(prompts)` and `.generate(prompts, num, seed)`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

from absl import app, flags

import jax
import numpy as np

from dreambooth_jax import config_lib, embeddings, methods, metrics_writer, pipeline, text, utils
from dreambooth_jax import train as train_lib

# --workdir is the training CLI's flag (defined in dreambooth_jax.train, imported above).
flags.DEFINE_multi_string("prompt", None, "Prompt(s); [V] stands for the identifier.")
flags.DEFINE_integer("num", 4, "Images per prompt.")
flags.DEFINE_integer("seed", 0, "Sampling seed (same seed, same images).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_string("out", None, "Output PNG (default: <workdir>/samples/<prompt>.png).")
flags.DEFINE_string("stages", None, "Last stage to run, e.g. 'base' (default: all).")


def load_workdir(workdir):
  """(config, models, identifier) of a training workdir (local or remote)."""
  workdir = utils.as_path(workdir)
  path = workdir / "config.json"
  if not path.exists():
    raise train_lib.TrainError(f"{str(workdir)!r} has no config.json: not a dreambooth_jax.train "
                               "workdir")
  config = config_lib.load(path)
  models = pipeline.build(config)
  identifier = text.Identifier.from_json((workdir / "identifier.json").read_text())
  return config, models, identifier


@dataclasses.dataclass
class FineTuned:
  """A training workdir's fine-tuned cascade, ready to sample."""
  workdir: str
  config: Any
  models: pipeline.Models
  identifier: text.Identifier
  params: Mapping[str, Any]   # tuned stages' params at `step`
  step: int
  learned_rows: np.ndarray | None = None  # [K, d_model] rows of learned tokens, if any

  @classmethod
  def load(cls, workdir: str, step: int | None = None) -> "FineTuned":
    config, models, identifier = load_workdir(workdir)
    params, step = train_lib.restore_params(config, models, workdir, step)
    rows = params.pop(methods.TOKENS, None)
    return cls(workdir, config, models, identifier, params, step,
               None if rows is None else np.asarray(jax.device_get(rows)))

  @property
  def method(self) -> str:
    return self.config.method

  @property
  def class_noun(self) -> str:
    return self.config.subject.class_noun

  def fill(self, prompt: str) -> str:
    """'[V]' -> the identifier. When the identifier stands for the whole subject (an
    instance template without {class_noun}, as textual inversion's "a photo of <dog*>"),
    "[V] dog" becomes just the identifier, so benchmark prompts fit every method."""
    ident = self.identifier.text
    prompt = prompt.replace("[V]", ident)
    if "{class_noun}" not in self.config.subject.instance_template:
      prompt = prompt.replace(f"{ident} {self.class_noun}", ident)
    return prompt

  def embed(self, prompts: Sequence[str], mesh=None) -> dict[str, np.ndarray]:
    """{"text", "mask"} [len(prompts), L, D] through the workdir's prompt cache; learned
    tokens are embedded with this checkpoint's rows."""
    prompts = [self.fill(p) for p in prompts]
    unique = list(dict.fromkeys(prompts))
    learned = [p for p in unique if train_lib.has_learned(self.models.tokenizer, p)]
    plain = [p for p in unique if p not in learned]
    table = {}
    if plain:
      table.update(train_lib._encode_all(self.config, self.models, plain, self.workdir, mesh))
    if learned:
      table.update(train_lib._encode_all(self.config, self.models, learned, self.workdir, mesh,
                                         rows=self.learned_rows))
    return embeddings.stack_embeddings(table, prompts)

  def generate(self, prompt: str, num: int, rng: jax.Array, *, upto: str | None = None,
               mesh=None) -> dict[str, np.ndarray]:
    """{stage: uint8 [num, H, W, 3]} for one prompt ('[V]' allowed); deterministic per rng."""
    return self.models.cascade.sample(self.embed([prompt]), rng, uncond_embeddings=self.embed([""]),
                                      params=self.params, batch_size=num, upto=upto, mesh=mesh)


def sample(workdir: str, prompts: list[str], *, num: int = 4, seed: int = 0, step: int | None = None,
           upto: str | None = None) -> list[tuple[str, dict[str, np.ndarray]]]:
  """[(prompt, {stage: uint8 [num, H, W, 3]})] from the workdir's fine-tuned cascade."""
  tuned = FineTuned.load(workdir, step)
  print(f"sampling {workdir} at step {tuned.step} (identifier {tuned.identifier.text!r})", flush=True)
  tuned.embed(list(prompts) + [""])  # one T5 load for every prompt not in the cache
  return [(tuned.fill(p), tuned.generate(p, num, jax.random.key(seed + i), upto=upto))
          for i, p in enumerate(prompts)]


def main(argv):
  del argv
  f = flags.FLAGS
  rows = sample(f.workdir, f.prompt, num=f.num, seed=f.seed, step=f.step, upto=f.stages)
  slug = re.sub(r"[^A-Za-z0-9]+", "_", rows[0][0]).strip("_")[:60] or "sample"
  out = f.out or utils.as_path(f.workdir) / "samples" / f"{slug}.png"
  metrics_writer.save_grid(out, rows)
  print(f"wrote {out}", flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "prompt"])
  app.run(lambda argv: utils.run_cli(main, argv, train_lib.USER_ERRORS))
