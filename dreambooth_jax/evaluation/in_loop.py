"""In-loop evaluation of a many-subject job (`train_many`, `config.eval`): learning curves,
the per-subject checkpoint choice, the final report.

Every `config.eval.every` steps and at the job's last step (and at step 0 with
`eval.at_start`), each subject's current adapters draw its prompt subset and the
job's protocol scores the images of the cascade's last stage (or of `eval.stage`: a
job tuning the base stage alone may follow it at the base's resolution, cheaper):

  dreambooth  the benchmark's prompts (the dataset's live or object list, by the
              subject's class), the first `eval.num_prompts` x `eval.num_images`;
              DINO, CLIP-I, CLIP-T against the subject's own photos, DIV with
              `eval.lpips`, PRES with `eval.num_class_images` > 0.
  world       a world subject in its held-out contexts, scored by the world
              evaluator: Subject, Attributes, Context, DIV, and PRES as above.

Prompt sets, CLIP-T's text and the scoring are the evaluate CLI's
(`protocol.prompt_set` / `score_generated`, `world_protocol.prompt_set` /
`score_row`), so an in-loop number means what the CLI's means. Generation is
not the CLI's: it samples the job's adapters in memory rather than a workdir, from
prompts T5 embedded with the job's own before training, with `eval.sampler`
(DPM-Solver++(2M) by default, the fastest sampler here) for `eval.num_steps` at
every IF stage, in batches of `eval.batch_size`. Image k of every subject's list gets
the k-th draw at every evaluation (common random numbers): a curve moves with the
model, not with the noise.

Written under the workdir: eval/step_<N>/scores.json (every subject's row and
per-prompt scores; read back on resume) and eval/step_<N>/<subject>.png (a grid);
the metrics writer gets `eval/<subject>/<METRIC>` and `eval_mean/<METRIC>`. The
checkpoint kept per subject follows `eval.select` (`selection`); `write_report` writes
report.md / report.json (`job_report`).

The training side of the library never imports this package; `train_many` does, and
only when `config.eval.every` > 0.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from dreambooth_jax import config_lib, data, embeddings, grids, utils
from dreambooth_jax.evaluation import benchmark as benchmark_lib
from dreambooth_jax.evaluation import job_report, metrics, protocol, selection
from dreambooth_jax.evaluation import world_protocol

PROTOCOLS = ("dreambooth", "world")
EVAL_DIR = "eval"


class _Benchmark:
  """The DreamBooth protocol's prompts and scores for the job's subjects."""
  metrics, arrows, paper = protocol.METRICS, protocol.ARROWS, protocol.PAPER

  def __init__(self, e, subjects):
    if not e.dataset:
      raise config_lib.ConfigError("config.eval.protocol='dreambooth' reads the benchmark's "
                                   "prompts: set config.eval.dataset to the DreamBooth dataset")
    metrics.check_encoder_paths(e.dino, e.clip, e.lpips, need_lpips=False)
    bench = benchmark_lib.load_benchmark(e.dataset)
    listed = {s.name: s for s in bench.subjects}
    self.e, self.folders, self.jobs = e, {s.name: s.dir for s in subjects}, {}
    for s in subjects:  # a subject outside the dataset is live or not by its class noun
      live = (listed[s.name].live if s.name in listed
              else s.class_noun.lower() in benchmark_lib.LIVE_CLASSES)
      subj = benchmark_lib.Subject(s.name, s.class_noun, live, ())
      jobs, class_job = protocol.prompt_set(bench, subj, protocol="benchmark",
                                            num_images=e.num_images, num_prompts=e.num_prompts,
                                            num_class_images=max(1, e.num_class_images))
      self.jobs[s.name] = (jobs, class_job if e.num_class_images else None)

  def load(self, last_resolution: int) -> None:
    del last_resolution  # DINO and CLIP resize any size
    self.enc = metrics.Encoders.load(self.e.dino, self.e.clip, self.e.lpips or None,
                                     need_lpips=False)
    self.real = {}
    for name, folder in self.folders.items():
      real = data.load_subject_images(folder, min_size=0).images
      self.real[name] = (self.enc.dino(real), self.enc.clip_image(real))

  def score(self, name: str, images: Mapping[str, np.ndarray]):
    jobs, class_job = self.jobs[name]
    return protocol.score_generated(self.enc, jobs, images,
                                    images[class_job.key] if class_job else None, *self.real[name])


class _World:
  """The world protocol's prompts and scores (the world evaluator) for world subjects."""
  metrics, arrows, paper = world_protocol.METRICS, world_protocol.ARROWS, {}

  def __init__(self, e, subjects):
    from dreambooth_jax.world import subjects as world_subjects
    unknown = [s.name for s in subjects if s.name not in world_subjects.SUBJECT_NAMES]
    if unknown:
      raise config_lib.ConfigError(f"config.eval.protocol='world' scores world subjects; "
                                   f"{unknown} are not ({', '.join(world_subjects.SUBJECT_NAMES)})"
                                   "; use protocol 'dreambooth' for them")
    self.e, self.subjects, self.jobs = e, {}, {}
    for s in subjects:
      ws = world_subjects.get(s.name)
      jobs, class_job = world_protocol.prompt_set(ws, num_images=e.num_images,
                                                  num_class_images=max(1, e.num_class_images))
      if not 1 <= e.num_prompts <= len(jobs):
        raise config_lib.ConfigError(f"config.eval.num_prompts={e.num_prompts}: the world "
                                     f"protocol has {len(jobs)} held-out contexts; use "
                                     f"1..{len(jobs)}")
      self.subjects[s.name] = ws
      self.jobs[s.name] = (jobs[:e.num_prompts], class_job if e.num_class_images else None)

  def load(self, last_resolution: int) -> None:
    from dreambooth_jax.world import evaluator as evaluator_lib
    if not evaluator_lib.MIN_SIZE <= last_resolution <= evaluator_lib.MAX_SIZE:
      raise config_lib.ConfigError(
          f"the cascade's last stage draws {last_resolution} px images; the world evaluator "
          f"takes {evaluator_lib.MIN_SIZE} to {evaluator_lib.MAX_SIZE} px")
    # Batches as large as one prompt's images (or the class prompt's): no padded rows.
    self.judge = evaluator_lib.WorldEvaluator.load(
        self.e.evaluator or None, batch=max(self.e.num_images, self.e.num_class_images))

  def score(self, name: str, images: Mapping[str, np.ndarray]):
    jobs, class_job = self.jobs[name]
    r = world_protocol.score_row(self.judge, self.subjects[name], jobs, images,
                                 images[class_job.key] if class_job else None)
    # A row of means for the curves and the rule; the spread over prompts stays per prompt.
    return {m: None if v is None else v["mean"] for m, v in r["metrics"].items()}, r["per_prompt"]


def generate(cascade, params, table, texts: Sequence[str], *, seed: int, batch_size: int,
             sampler: Mapping[str, str], num_steps: Mapping[str, int], upto: str | None = None,
             mesh=None) -> np.ndarray:
  """uint8 [len(texts), H, W, 3] of the cascade's last stage (or `upto`), one image per
  text (texts in `table`, "" too), in batches of `batch_size` (the last padded: one
  program for all); batch k draws from fold_in(key(seed), k), whoever's params these are."""
  uncond = embeddings.stack_embeddings(table, [""])
  shard = mesh if mesh is not None and batch_size % mesh.devices.size == 0 else None
  out = []
  for k, begin in enumerate(range(0, len(texts), batch_size)):
    chunk = list(texts[begin:begin + batch_size])
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
    images = cascade.sample(embeddings.stack_embeddings(table, padded),
                            jax.random.fold_in(jax.random.key(seed), k), uncond_embeddings=uncond,
                            params=params, batch_size=batch_size, mesh=shard, prompts=padded,
                            sampler=sampler, num_steps=num_steps, upto=upto)
    out.append(images[list(images)[-1]][:len(chunk)])
  return np.concatenate(out)


class JobEvaluation:
  """The job's in-loop evaluation: built (and checked) before any model, then `prompts`
  (to embed with the job's), `load` (encoders), `evaluate` every so often, `choose`."""

  def __init__(self, config, subjects, workdir):
    e = self.e = config.eval
    if e.protocol not in PROTOCOLS:
      raise config_lib.ConfigError(f"config.eval.protocol={e.protocol!r}: use one of "
                                   f"{', '.join(PROTOCOLS)}")
    if e.num_images < 2 or e.num_prompts < 1 or e.batch_size < 1 or e.num_class_images < 0:
      raise config_lib.ConfigError(
          f"config.eval: num_images={e.num_images} (at least 2: DIV pairs images of a prompt), "
          f"num_prompts={e.num_prompts}, batch_size={e.batch_size} (at least 1), "
          f"num_class_images={e.num_class_images} (0 = no PRES)")
    from dreambooth_jax import samplers
    if e.sampler not in samplers.SAMPLERS:
      raise config_lib.ConfigError(f"config.eval.sampler={e.sampler!r}: use one of "
                                   f"{', '.join(samplers.SAMPLERS)}")
    self.protocol = (_Benchmark if e.protocol == "dreambooth" else _World)(e, subjects)
    self.rule = selection.parse(e.select, self.protocol.metrics)
    self.names = [s.name for s in subjects]
    self.class_nouns = {s.name: s.class_noun for s in subjects}
    self.dir = utils.as_path(workdir) / EVAL_DIR
    self.history: dict[int, dict[str, Any]] = {}  # step -> {subject: {metrics, per_prompt}}
    self.texts: dict[str, list[str]] = {}  # per subject, one prompt per image drawn
    self.filled: dict[str, dict[str, str]] = {}  # per subject, {job key: its prompt}

  # -- before training ---------------------------------------------------------------
  def prompts(self, fill: Mapping[str, Callable[[str], str]]) -> list[str]:
    """Every prompt the evaluations draw, with each subject's identifier (`fill[name]`),
    for the job's one T5 pass."""
    for name in self.names:
      every = self._all(*self.protocol.jobs[name])
      self.filled[name] = {j.key: fill[name](j.template) for j in every}
      self.texts[name] = [self.filled[name][j.key] for j in every for _ in range(j.num)]
    return [t for ts in self.texts.values() for t in dict.fromkeys(ts)]

  def load(self, cascade) -> None:
    """Encoders (or the world evaluator) and the real photos' embeddings, before step 1."""
    self.cascade = cascade
    self.stage = self.e.get("stage") or cascade.stages[-1].name  # whose images are scored
    if self.stage not in cascade.by_name:
      raise config_lib.ConfigError(f"config.eval.stage={self.stage!r} is not a stage of the "
                                   f"cascade ({', '.join(cascade.by_name)}); '' = the last")
    self.protocol.load(cascade.by_name[self.stage].settings.resolution)
    pixel = [s.name for s in cascade.stages if not getattr(s, "own_text_encoder", False)]
    self.sampler = {n: self.e.sampler for n in pixel}
    self.num_steps = {n: self.e.num_steps for n in pixel}

  def resume(self, upto: int) -> None:
    """The evaluations of steps <= `upto` already in the workdir (a resumed job's)."""
    if not self.dir.exists():
      return
    for folder in self.dir.iterdir():
      m = re.fullmatch(r"step_(\d+)", folder.name)
      if m and int(m.group(1)) <= upto and (folder / "scores.json").exists():
        self.history[int(m.group(1))] = utils.read_json(folder / "scores.json")["subjects"]

  # -- in the loop -------------------------------------------------------------------
  def due(self, step: int, end: int) -> bool:
    return step % self.e.every == 0 or step == end

  def evaluate(self, step: int, params_of: Callable[[int], Any], table, *, mesh=None,
               lead: bool = True) -> dict[str, float]:
    """Draws and scores every subject at `step` (`params_of(i)`: subject i's sampling
    params), writes eval/step_<step>/ (lead process), returns the scalars to log."""
    folder = self.dir / f"step_{step:06d}"
    rows = {}
    for i, name in enumerate(self.names):
      flat = generate(self.cascade, params_of(i), table, self.texts[name], seed=self.e.seed,
                      batch_size=self.e.batch_size, sampler=self.sampler,
                      num_steps=self.num_steps, upto=self.stage, mesh=mesh)
      jobs, class_job = self.protocol.jobs[name]
      images, at = {}, 0
      for j in self._all(jobs, class_job):
        images[j.key], at = flat[at:at + j.num], at + j.num
      row, per_prompt = self.protocol.score(name, images)
      rows[name] = dict(metrics=row, per_prompt=per_prompt, grid=f"{folder.name}/{name}.png")
      if lead:
        shown = jobs[:protocol.GRID_PROMPTS] + ([class_job] if class_job else [])
        grids.save_grid(folder / f"{name}.png", [(self.filled[name][j.key],
                                                  {self.stage: images[j.key][:8]}) for j in shown])
    self.history[step] = rows
    if lead:
      utils.write_json(folder / "scores.json", dict(step=step, subjects=rows))
    return scalars(rows, self.protocol.metrics)

  def choose(self, name: str, upto: int) -> dict[str, Any]:
    """`eval.select`'s choice for subject `name` over the evaluations of steps <= upto."""
    rows = [(step, at[name]["metrics"]) for step, at in sorted(self.history.items())
            if step <= upto and name in at]
    return selection.select(self.rule, selection.keyed(rows))

  # -- at the end --------------------------------------------------------------------
  def write_report(self, workdir, choices: Mapping[str, Mapping[str, Any]], *, title: str,
                   settings: Mapping[str, Any]) -> dict[str, Any]:
    """report.json + report.md in the workdir: the paper's table over subjects, rows, grids."""
    e = self.e
    settings = dict(settings, protocol=e.protocol, num_prompts=e.num_prompts,
                    num_images=e.num_images, num_class_images=e.num_class_images,
                    stage=self.stage, sampler=e.sampler, num_steps=e.num_steps, seed=e.seed,
                    every=e.every, select=self.rule.text())
    report = job_report.build(title, settings, self.protocol.metrics, self.protocol.arrows,
                              self.history, choices, self.class_nouns, paper=self.protocol.paper,
                              eval_dir=EVAL_DIR)
    root = utils.as_path(workdir)
    utils.write_json(root / "report.json", report)
    utils.write_text(root / "report.md", job_report.markdown(report))
    return report

  # -- helpers -----------------------------------------------------------------------
  @staticmethod
  def _all(jobs, class_job):
    return list(jobs) + ([class_job] if class_job else [])


def scalars(rows: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> dict[str, float]:
  """{eval/<subject>/<METRIC>, eval_mean/<METRIC>} of one evaluation's rows (None skipped)."""
  out = {}
  for name, row in rows.items():
    out.update({f"eval/{name}/{m}": v for m, v in row["metrics"].items() if v is not None})
  for m in names:
    values = [row["metrics"].get(m) for row in rows.values()]
    values = [v for v in values if v is not None]
    if values:
      out[f"eval_mean/{m}"] = float(np.mean(values))
  return out
