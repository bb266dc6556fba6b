"""The DreamBooth protocol on the procedural world, scored by the world's own classifier.

`run(workdirs, subject)` is `python -m dreambooth_jax.evaluate --protocol=world`.
For a world subject (`dreambooth_jax.world.subjects`, e.g. zigzag_ball) each
fine-tuned workdir generates, with the benchmark's resumable machinery
(`protocol.generate_jobs`: PNGs, a manifest, common random numbers):

- one prompt per held-out context, the contexts the subject's photos never
  show: "a [V] ball on the beach", "... in the snow", "... at night",
  "... with a city in the background" (`subjects.HELD_OUT_CONTEXTS`);
- the class prompt "a ball" (what prior preservation protects).

The world evaluator (`dreambooth_jax.world.evaluator`, a classifier trained on
the world) scores the last stage's images (`stage=`: another stage's). The
benchmark's metrics have these analogues, each a mean over prompts (± the std over prompts):

  Subject ↑     P(this subject): subject fidelity, as DINO / CLIP-I.
  Attributes ↑  mean P(the subject's class, colour, colour2, pattern): the same,
                attribute by attribute (also reported one by one).
  Context ↑     P(the prompt's context): prompt fidelity, as CLIP-T.
  PRES ↓        P(this subject) on the class-prompt images (± std over those
                images): "a ball" turned into the subject is language drift.
  DIV ↑         mean cosine distance (1 - cos) of the evaluator's features over
                distinct pairs of one prompt's images, as LPIPS-DIV.

PRES says whether "a ball" became the subject, not whether it stayed every ball:
a run can keep PRES at 0 and still draw one kind of ball for the class prompt. So
each row also reads its class-prompt images (`class_variety`): their DIV, and the
evaluator's reading of their colours and contexts, as counts and as entropy in bits
(0 when all agree; log2 k when k values are equally common). The real row's
ordinary objects of the class are the reference.

The "Real (world renders)" row needs no generator: the subject drawn by the
world in each held-out context (`photo_scene(i, context=...)` at 64 px) is the
upper bound of Subject, Attributes, Context and DIV; its PRES is the
evaluator's P(this subject) on ordinary objects of the class drawn from the
pretraining distribution, the floor a model without drift reaches. The real
row is always reported: it costs a second of rendering.

The metric arithmetic (`score_images`, `summarize`) takes probabilities and
features, so it is checked on hand-made numbers.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from dreambooth_jax import grids, sharding, utils
from dreambooth_jax.evaluation import metrics
from dreambooth_jax.evaluation.protocol import (CLASS_KEY, CLASS_RNG_INDEX, EvalError, Job,
                                                check_counts, check_stage, check_workdirs,
                                                default_out, format_score,
                                                generate_row, table as protocol_table)
from dreambooth_jax.world import evaluator as evaluator_lib
from dreambooth_jax.world import scene as scene_lib
from dreambooth_jax.world import subjects as subjects_lib
from dreambooth_jax.world import vocab

METRICS = ("Subject", "Attributes", "Context", "PRES", "DIV")
ARROWS = {"Subject": "↑", "Attributes": "↑", "Context": "↑", "PRES": "↓", "DIV": "↑"}
ATTRIBUTES = ("class", "colour", "colour2", "pattern")
VARIETY_LABELS = ("colour", "context")  # what the class prompt's images are read for
REAL_LABEL = "Real (world renders)"
REAL_CLASS_SEED = 0  # the pretraining distribution's seed 0: ordinary objects of the class
RENDER_SIZE = 64     # the world cascade's last stage


def prompt_set(subject: subjects_lib.Subject, *, num_images: int,
               num_class_images: int) -> tuple[list[Job], Job]:
  """(a prompt per held-out context, keyed by the context; the class prompt "a ball")."""
  jobs = [Job(context, subject.prompt("[V]", context),
              vocab.with_article(f"{subject.cls} {vocab.CONTEXTS[context]}"), num_images, i)
          for i, context in enumerate(subjects_lib.HELD_OUT_CONTEXTS)]
  cls = vocab.with_article(subject.cls)
  return jobs, Job(CLASS_KEY, cls, cls, num_class_images, CLASS_RNG_INDEX)


# ----------------------------------------------------------------------------
# Arithmetic on the evaluator's outputs.
# ----------------------------------------------------------------------------


def expected_ids(evaluator, subject: subjects_lib.Subject) -> dict[str, int]:
  """The subject's ids in the evaluator's heads: subject and ATTRIBUTES."""
  names = {"subject": subject.name, "class": subject.cls, "colour": subject.colour,
           "colour2": subject.colour2, "pattern": subject.pattern}
  return {k: evaluator.index(k, v) for k, v in names.items()}


def cosine_distance(a, b) -> np.ndarray:
  """1 - cos of row pairs a[i], b[i]: the DIV distance on evaluator features."""
  return 1.0 - metrics.paired_cosine(a, b)


def diversity(features) -> float | None:
  """DIV of one set of images: mean cosine distance over distinct pairs of their evaluator
  features (None for fewer than 2 images)."""
  if len(features) < 2:
    return None
  return metrics.mean_pairwise_distance(cosine_distance, np.asarray(features))[0]


def score_images(probs: Mapping[str, np.ndarray], features: np.ndarray,
                 expected: Mapping[str, int], context: int | None) -> dict[str, Any]:
  """Scores of one prompt's images: Subject, each attribute, Attributes (their mean),
  Context (None when `context` is None) and DIV (None for fewer than 2 images)."""
  take = lambda label, i: float(np.mean(np.asarray(probs[label])[:, i]))
  attributes = {a: take(a, expected[a]) for a in ATTRIBUTES}
  return {"Subject": take("subject", expected["subject"]),
          "Attributes": float(np.mean(list(attributes.values()))),
          "attributes": attributes,
          "Context": None if context is None else take("context", context),
          "DIV": diversity(features)}


def pres(class_probs: Mapping[str, np.ndarray], expected: Mapping[str, int]) -> dict[str, float]:
  """PRES: {mean, std} of P(this subject) over the class-prompt images."""
  p = np.asarray(class_probs["subject"])[:, expected["subject"]]
  return {"mean": float(p.mean()), "std": float(p.std())}


def entropy_bits(counts: Sequence[int]) -> float:
  """Shannon entropy in bits of a distribution given as counts."""
  q = np.asarray(counts, np.float64) / np.sum(counts)
  return float((q * np.log2(1.0 / q)).sum())


def class_variety(probs: Mapping[str, np.ndarray], features: np.ndarray,
                  label_values: Mapping[str, Sequence[str]]) -> dict[str, Any]:
  """What the class-prompt images still vary in: DIV over them (None for fewer than 2),
  and per label in VARIETY_LABELS the evaluator's most likely value of each image, as
  counts (most common first) and as entropy in bits."""
  out: dict[str, Any] = {"DIV": diversity(features)}
  for label in VARIETY_LABELS:
    counts = collections.Counter(label_values[label][i]
                                 for i in np.asarray(probs[label]).argmax(axis=1))
    out[label] = {"entropy": entropy_bits(list(counts.values())),
                  "counts": dict(counts.most_common())}
  return out


def spread(values: Sequence[float]) -> dict[str, float]:
  """{mean, std} (population std) of per-prompt values."""
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std())}


def summarize(per_prompt: Sequence[Mapping[str, Any]],
              class_pres: Mapping[str, float] | None) -> tuple[dict, dict]:
  """(row metrics {metric: {mean, std} or None}, attribute agreement {attribute: {mean, std}})
  over the prompts' scores (`score_images`) and PRES."""
  row = {m: spread([p[m] for p in per_prompt]) for m in ("Subject", "Attributes", "Context", "DIV")}
  row["PRES"] = dict(class_pres) if class_pres is not None else None
  attributes = {a: spread([p["attributes"][a] for p in per_prompt]) for a in ATTRIBUTES}
  return {m: row[m] for m in METRICS}, attributes


def score_row(evaluator, subject, jobs: Sequence[Job], images: Mapping[str, np.ndarray],
              class_images: np.ndarray | None) -> dict[str, Any]:
  """{metrics, attributes, per_prompt} of one row's images ({job key: uint8 [N, H, W, 3]})."""
  expected = expected_ids(evaluator, subject)
  per_prompt = []
  for j in jobs:
    probs, feats = evaluator.predict_and_features(images[j.key])
    score = score_images(probs, feats, expected, evaluator.index("context", j.key))
    per_prompt.append({"key": j.key, "prompt": j.template, **score})
  class_pres = variety = None
  if class_images is not None:
    probs, feats = evaluator.predict_and_features(class_images)
    class_pres = pres(probs, expected)
    variety = class_variety(probs, feats, evaluator.label_values)
  row, attributes = summarize(per_prompt, class_pres)
  return dict(metrics=row, attributes=attributes, class_prompt=variety, per_prompt=per_prompt)


# ----------------------------------------------------------------------------
# The real row: the world's own renders.
# ----------------------------------------------------------------------------


def real_images(subject: subjects_lib.Subject, jobs: Sequence[Job], num_class_images: int
                ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """({context: the subject in it, [num, 64, 64, 3]}, ordinary objects of its class)."""
  images = {j.key: np.stack([scene_lib.render(subject.photo_scene(i, context=j.key), RENDER_SIZE)
                             for i in range(j.num)]) for j in jobs}
  ordinary, i = [], 0
  while len(ordinary) < num_class_images:
    s, _ = scene_lib.scene_at(REAL_CLASS_SEED, i)
    if s.cls == subject.cls:
      ordinary.append(scene_lib.render(s, RENDER_SIZE))
    i += 1
  return images, np.stack(ordinary)


# ----------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------


def run(workdirs: Sequence[str], subject: str, *, evaluator: str | None = None,
        num_images: int | None = None, num_class_images: int = 16, out: str | None = None,
        seed: int = 0, batch_size: int = 8, stage: str | None = None) -> dict[str, Any]:
  """Generates, scores and writes report.md + report.json under `out`; returns the report.

  `num_images` (per held-out context) defaults to 8; `out` to <first workdir>/eval_world
  (eval_world_<stage> with `stage`, the stage scored; default each workdir's last);
  `evaluator` to the packaged classifier.
  """
  # == Checks that need no model ====================================================
  workdirs = [str(w) for w in workdirs]
  num_images = num_images or 8
  if not subject:
    raise EvalError(f"pass --subject=NAME, a world subject: {', '.join(subjects_lib.SUBJECT_NAMES)}")
  if subject not in subjects_lib.SUBJECT_NAMES:
    raise EvalError(f"--subject={subject} is not a world subject; choose one of: "
                    f"{', '.join(subjects_lib.SUBJECT_NAMES)}")
  check_counts(num_images, num_class_images, batch_size)
  check_workdirs(workdirs)
  check_stage(workdirs, stage)
  if out is None:
    if not workdirs:
      raise EvalError("--out is needed without --workdir (there is no workdir to write into)")
    out = default_out(workdirs, "eval_world", stage)
  out = utils.as_path(out)
  out.mkdir(parents=True, exist_ok=True)
  subj = subjects_lib.get(subject)
  judge = evaluator_lib.WorldEvaluator.load(evaluator)
  jobs, class_job = prompt_set(subj, num_images=num_images, num_class_images=num_class_images)

  settings = dict(subject=subj.name, class_noun=subj.cls, description=subj.description,
                  protocol="world", contexts=list(subjects_lib.HELD_OUT_CONTEXTS),
                  num_prompts=len(jobs), num_images=num_images,
                  num_class_images=num_class_images, seed=seed, batch_size=batch_size,
                  evaluator=str(evaluator or evaluator_lib.DEFAULT_PATH),
                  evaluator_test_accuracy=judge.info.get("test_accuracy"),
                  spread="std over prompts (PRES: over the class-prompt images)",
                  div="mean 1 - cos of evaluator features over distinct pairs within a prompt",
                  real_row="the world's renders of the subject in each held-out context; "
                           "PRES: ordinary objects of the class (pretraining distribution)")

  # == The real row: the world's renders, no generator ==============================
  real, ordinary = real_images(subj, jobs, num_class_images)
  grids.save_grid(out / "real" / "grid.png",
                  [(f"{subj.name} {vocab.CONTEXTS[j.key]}", {"real": real[j.key][:8]}) for j in jobs]
                  + [(f"{class_job.template} (ordinary)", {"real": ordinary[:8]})])
  rows = [dict(label=REAL_LABEL, method="real", workdir=None, step=None, identifier=None,
               stage=None, resolution=RENDER_SIZE, generated=0, grid="real/grid.png",
               **score_row(judge, subj, jobs, real, ordinary))]

  # == One row per workdir: generate (resumable), score ============================
  mesh = sharding.make_mesh() if workdirs else None
  used = set()
  def check(tuned, stage):
    resolution = tuned.models.cascade.by_name[stage].settings.resolution
    if not evaluator_lib.MIN_SIZE <= resolution <= evaluator_lib.MAX_SIZE:
      raise EvalError(f"--workdir={tuned.workdir}: its stage {stage} draws {resolution} px images; "
                      f"the world evaluator takes {evaluator_lib.MIN_SIZE} to "
                      f"{evaluator_lib.MAX_SIZE} px")

  for w in workdirs:
    row, images = generate_row(w, out, jobs, class_job, subj.name, subj.cls, used, shown=jobs,
                               seed=seed, batch_size=batch_size, mesh=mesh, check=check,
                               stage=stage)
    rows.append(dict(row, **score_row(judge, subj, jobs, images, images[CLASS_KEY])))

  # == Report =======================================================================
  report = dict(settings=settings, prompts=[dataclasses.asdict(j) for j in jobs + [class_job]],
                rows=rows)
  utils.write_json(out / "report.json", report)
  utils.write_text(out / "report.md", markdown(report))
  return report


# ----------------------------------------------------------------------------
# The report.
# ----------------------------------------------------------------------------


def format_spread(v: Mapping[str, float] | None) -> str:
  """{mean, std} as "0.812 ± 0.034", or N/A."""
  return format_score(v)


def table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """Markdown lines of the benchmark's table layout with the world's metrics, a row per row."""
  return protocol_table([(r["label"], r["metrics"]) for r in rows], METRICS, ARROWS)


def format_row(row: Mapping[str, Any]) -> str:
  """One line per row for a terminal: "label: Subject 0.812 ± 0.034  ..."."""
  line = f"{row['label']}: " + "  ".join(f"{m} {format_spread(row['metrics'][m])}"
                                         for m in METRICS)
  v = row.get("class_prompt")
  if v:
    line += (f"  | class prompt: DIV {format_score(v['DIV'])}, " + ", ".join(
        f"{label}s {v[label]['entropy']:.2f} bits" for label in VARIETY_LABELS))
  return line


def format_variety(v: Mapping[str, Any] | None, label: str, top: int = 4) -> str:
  """"2.25 (yellow 4, green 4, purple 4, ...)": a label's entropy and its commonest values."""
  if v is None:
    return "N/A"
  counts = list(v[label]["counts"].items())
  shown = ", ".join(f"{k} {n}" for k, n in counts[:top]) + (", ..." if len(counts) > top else "")
  return f"{v[label]['entropy']:.2f} ({shown})"


def markdown(report: Mapping[str, Any]) -> str:
  """report.md: the table, attribute agreement, run details, grids, per-prompt scores."""
  s = report["settings"]
  rows = report["rows"]
  lines = [f"# World evaluation: {s['subject']} ({s['class_noun']})", "",
           f"{s['description']}. Protocol `world`: {s['num_prompts']} held-out contexts "
           f"({', '.join(s['contexts'])}) x {s['num_images']} images, {s['num_class_images']} "
           f"images of \"a {s['class_noun']}\" for PRES, seed {s['seed']}. Scored by the world "
           f"evaluator `{s['evaluator']}`; mean ± {s['spread']}.", ""]
  lines += table(rows)
  lines += ["", "Attribute agreement (mean P of the subject's value, ± std over prompts):", "",
            "| Method | " + " | ".join(ATTRIBUTES) + " |", "|---|" + "---:|" * len(ATTRIBUTES)]
  lines += [f"| {r['label']} | " + " | ".join(format_spread(r["attributes"][a])
                                              for a in ATTRIBUTES) + " |" for r in rows]
  lines += ["", f"The class prompt \"a {s['class_noun']}\", what prior preservation keeps: DIV "
            "over its images, and the evaluator's reading of their colours and contexts "
            "(entropy in bits: 0 when all agree, log2 k when k values are equally common; "
            "the commonest values with their counts):", "",
            "| Method | PRES ↓ | DIV ↑ | colours ↑ | contexts ↑ |", "|---|---:|---:|---|---|"]
  for r in rows:
    v = r.get("class_prompt")
    lines.append(f"| {r['label']} | {format_spread(r['metrics']['PRES'])} | "
                 f"{format_score(v and v['DIV'])} | " + " | ".join(
                     format_variety(v, label) for label in VARIETY_LABELS) + " |")
  runs = [r for r in rows if r["workdir"]]
  if runs:
    lines += ["", "| Row | Workdir | Step | Identifier | Stage | Generated now |",
              "|---|---|---:|---|---|---:|"]
    lines += [f"| {r['label']} | `{r['workdir']}` | {r['step']} | `{r['identifier']}` | "
              f"{r['stage']} ({r['resolution']} px) | {r['generated']} |" for r in runs]
  lines += ["", "## Samples", ""]
  lines += [f"**{r['label']}**\n\n![{r['label']}]({r['grid']})\n" for r in rows]
  for r in rows:
    lines += [f"## Per prompt: {r['label']}", "",
              "| Context | Prompt | Subject | Attributes | Context | DIV |",
              "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {p['key']} | {p['prompt']} | "
              + " | ".join(format_score(p[m]) for m in ("Subject", "Attributes", "Context", "DIV"))
              + " |" for p in r["per_prompt"]]
    lines.append("")
  return "\n".join(lines) + "\n"
