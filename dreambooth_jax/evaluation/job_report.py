"""The final report of a many-subject job: report.json and report.md in its workdir.

What the paper reports for a method (Table 1: the mean over subjects of each metric,
here with the spread over subjects), then a row per subject at the step its rule
chose, why that step, the learning curves (the mean over subjects at each
evaluation) and every subject's grid at its chosen step. Tables are the evaluate
CLI's (`protocol.table`), so both reports read alike.

The scores are those of the in-loop evaluation that chose the step: the same
prompts and noise picked the step and score it, so a rule that maximises a metric
reports that metric with an optimistic bias (small for a handful of evaluations).
For an unbiased number, evaluate `subjects/<name>/` with `python -m
dreambooth_jax.evaluate` and another --seed.

Pure python over the evaluation history: tested on hand-made numbers.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from dreambooth_jax.evaluation import protocol


def spread(values: Sequence[float | None]) -> dict[str, float] | None:
  """{mean, std, n} over subjects (population std, as the world protocol's spreads);
  values that are None (a metric a subject lacks) are left out; None if all are."""
  v = np.asarray([x for x in values if x is not None], np.float64)
  if not v.size:
    return None
  return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def build(title: str, settings: Mapping[str, Any], names: Sequence[str],
          arrows: Mapping[str, str], history: Mapping[int, Mapping[str, Mapping[str, Any]]],
          choices: Mapping[str, Mapping[str, Any]], class_nouns: Mapping[str, str], *,
          paper: Mapping[str, Mapping[str, float]], eval_dir: str) -> dict[str, Any]:
  """The report dict. history: {step: {subject: {metrics: {METRIC: value}, grid}}};
  choices: {subject: `selection.select`'s result}."""
  subjects = sorted(choices)
  last = max(history)
  rows = []
  for name in subjects:
    step = choices[name]["step"]
    at = history[step][name]
    rows.append(dict(subject=name, class_noun=class_nouns[name], step=step,
                     metrics=dict(at["metrics"]), reason=choices[name]["reason"],
                     grid=f"{eval_dir}/{at['grid']}"))
  over = lambda get: {m: spread([get(r, m) for r in rows]) for m in names}
  summary = {"selected": over(lambda r, m: r["metrics"].get(m)),
             "last": over(lambda r, m: history[last][r["subject"]]["metrics"].get(m))}
  curves = []
  for step in sorted(history):
    at = history[step]
    means = {m: spread([at[n]["metrics"].get(m) for n in subjects if n in at]) for m in names}
    curves.append(dict(step=step, **{m: v["mean"] if v else None for m, v in means.items()}))
  return dict(title=title, settings=dict(settings), metrics=list(names), arrows=dict(arrows),
              last_step=last, summary=summary, subjects=rows, curves=curves, paper=dict(paper),
              choices={n: dict(choices[n]) for n in subjects})


def markdown(report: Mapping[str, Any]) -> str:
  """report.md: the paper's table over subjects, per-subject rows and reasons, learning
  curves, grids."""
  s, names, arrows = report["settings"], report["metrics"], report["arrows"]
  n = len(report["subjects"])
  table = lambda rows, first="Method": protocol.table(rows, names, arrows, first=first)
  lines = [f"# {report['title']}", "",
           f"{n} subjects, protocol `{s['protocol']}`: {s['num_prompts']} prompt(s) x "
           f"{s['num_images']} images per subject"
           + (f", {s['num_class_images']} class-prompt images for PRES" if s["num_class_images"]
              else "")
           + f", scored at stage {s['stage']}; sampler {s['sampler']} ({s['num_steps']} steps "
           f"per IF stage), seed {s['seed']}; "
           f"evaluated every {s['every']} steps. Each subject's step: `{s['select']}`.", "",
           f"## Mean ± std over the {n} subjects", ""]
  lines += table([("at each subject's chosen step", report["summary"]["selected"]),
                  (f"at the last step ({report['last_step']})", report["summary"]["last"])])
  if report["paper"]:
    lines += ["", "Paper, Table 1 (full-size models, all 30 subjects, 25 prompts x 4 images):",
              ""]
    lines += table(report["paper"].items())
  lines += ["", "The chosen step's scores come from the evaluation that chose it (same prompts, "
            "same noise): optimistic for the metric the rule maximises.", "",
            "## Per subject, at its chosen step", ""]
  lines += table([(f"{r['subject']} ({r['class_noun']}, step {r['step']})", r["metrics"])
                  for r in report["subjects"]], first="Subject")
  lines += ["", "## Why each step", "", "| Subject | Step | Reason |", "|---|---:|---|"]
  lines += [f"| {r['subject']} | {r['step']} | {r['reason']} |" for r in report["subjects"]]
  lines += ["", "## Learning curves (mean over subjects)", ""]
  lines += table([(f"step {c['step']}", c) for c in report["curves"]], first="Step")
  lines += ["", "## Grids (each subject at its chosen step)", ""]
  lines += [f"**{r['subject']}** (step {r['step']})\n\n![{r['subject']}]({r['grid']})\n"
            for r in report["subjects"]]
  return "\n".join(lines) + "\n"
