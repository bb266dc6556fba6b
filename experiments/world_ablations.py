r"""The DreamBooth papers' ablations in miniature, on a subject of the procedural world.

  python experiments/world_ablations.py --study=prior --seeds=0,1,2 --out=workdirs/ablations
  python experiments/world_ablations.py --study=all --subject=star_box --cascade=FOLDER
  python experiments/world_ablations.py --study=prior --stages=base --steps=1000 --seeds=0,1

Each study is a set of variants of configs/world.py's DreamBooth run; every
variant is trained once per seed (`python -m dreambooth_jax.train`, resumable:
a finished run is not retrained) and scored by the world protocol
(`dreambooth_jax.evaluate --protocol=world`: the subject in the four contexts its
photos never show, "a [class]" for PRES, the same noise for every run). The
table gives each metric's mean over seeds with its spread (std over seeds), and
the class prompt's colour entropy in bits (how varied "a [class]" still is).

  prior       DreamBooth with and without class-prior preservation: language
              drift (PRES) and diversity (DIV), the paper's Table 3.
  sr_aug      the SR stage fine-tuned at noise augmentation 1e-5 (the paper's),
              at 1e-3, and not fine-tuned: the paper's Figure 20.
  identifier  a rare token (the paper's) against a common word of the world's
              captions, which already means something to the model.
  methods     DreamBooth, textual inversion, and the two-stage method of Zeng et
              al. (a learned token row, then the UNets).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dreambooth_jax.evaluation import world_protocol  # noqa: E402

# A word the pretraining captions use with a meaning of its own (a colour the subjects
# are not), so the run must overwrite it: the paper's argument against common words.
COMMON_WORD = "red"

# variant: (config arguments after ':', config flag overrides)
VARIANTS = {
    "dreambooth": ("", ()),
    "no_prior": ("", ("--config.prior.enabled=False",)),
    "sr_aug_1e-3": ("", ("--config.cascade.sr256.train_aug_level=0.001",)),
    "sr_not_tuned": ("stages=base", ()),
    "common_word": ("", (f"--config.subject.identifier={COMMON_WORD}",)),
    "textual_inversion": ("method=textual_inversion", ()),
    "two_stage": ("method=ti_then_finetune", ()),
}
STUDIES = {
    "prior": ("dreambooth", "no_prior"),
    "sr_aug": ("dreambooth", "sr_aug_1e-3", "sr_not_tuned"),
    "identifier": ("dreambooth", "common_word"),
    "methods": ("dreambooth", "textual_inversion", "two_stage"),
}
METRICS = world_protocol.METRICS
# PRES is 0 for a run whose class prompt draws one kind of ball; its colours' entropy
# (world_protocol.class_variety) says whether "a ball" still varies.
CLASS_COLOURS = "class colours"
COLUMNS = (*METRICS, CLASS_COLOURS)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--study", default="prior", choices=(*STUDIES, "all"))
  p.add_argument("--seeds", default="0,1,2", help="comma-separated config seeds")
  p.add_argument("--subject", default="zigzag_ball")
  p.add_argument("--out", default="workdirs/ablations")
  p.add_argument("--cascade", default="", help="a pretraining export (default: the packaged one)")
  p.add_argument("--steps", type=int, default=-1, help="training steps (default: the config's)")
  p.add_argument("--stages", default="", help="the stages tuned, e.g. base (default: the "
                 "config's, base+sr256); every run is scored at the last one. A variant that "
                 "names its own stages (sr_not_tuned) keeps them")
  p.add_argument("--num_images", type=int, default=8, help="images per held-out context")
  return p.parse_args(argv)


def config_arg(args, variant: str) -> str:
  extra, _ = VARIANTS[variant]
  parts = [f"subject={args.subject}", f"steps={args.steps}"]
  parts += [f"cascade={args.cascade}"] if args.cascade else []
  parts += [f"stages={args.stages}"] if args.stages and "stages=" not in extra else []
  parts += [extra] if extra else []
  return "configs/world.py:" + ",".join(parts)


def train(args, variant: str, seed: int, workdir: pathlib.Path) -> None:
  """Runs (or finishes) one training run; a run with its export written is left alone."""
  if (workdir / "export" / "dreambooth.json").is_file():
    return
  cmd = [sys.executable, "-m", "dreambooth_jax.train", f"--config={config_arg(args, variant)}",
         f"--workdir={workdir}", f"--config.seed={seed}", *VARIANTS[variant][1]]
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=ROOT)


def spread(values) -> dict[str, float]:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def study_table(args, study: str, seeds, runs: pathlib.Path) -> list[dict]:
  """Trains every (variant, seed) of `study` under `runs` (a variant that several studies
  share, the DreamBooth default, is trained once), scores them in one world-protocol
  report, and returns one row per variant with each metric's spread over seeds."""
  variants = STUDIES[study]
  workdirs = {(v, s): runs / f"{v}_s{s}" for v in variants for s in seeds}
  for (v, s), w in workdirs.items():
    train(args, v, s, w)
  stage = args.stages.split("+")[-1] if args.stages else None
  report = world_protocol.run([str(w) for w in workdirs.values()], args.subject,
                              num_images=args.num_images, out=str(runs / f"eval_{study}"),
                              stage=stage)
  figure(report, workdirs, seeds[0], runs / f"eval_{study}", runs / f"{study}.png")
  return variant_rows(report, workdirs)


def figure(report: dict, workdirs: dict, seed: int, report_dir: pathlib.Path,
           out: pathlib.Path) -> None:
  """The report's sample grids of seed `seed`'s run of each variant, one above the other
  under its variant's name, at half size: the study as a picture."""
  from PIL import Image, ImageDraw
  grids = {r["workdir"]: r["grid"] for r in report["rows"] if r["workdir"]}
  panels = []
  for (variant, s), w in workdirs.items():
    if s != seed:
      continue
    grid = Image.open(report_dir / grids[str(w)]).convert("RGB")
    grid = grid.resize((grid.width // 2, grid.height // 2), Image.LANCZOS)
    panel = Image.new("RGB", (grid.width, grid.height + 18), "white")
    ImageDraw.Draw(panel).text((4, 3), f"{variant} (seed {seed})", fill="black")
    panel.paste(grid, (0, 18))
    panels.append(panel)
  sheet = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), "white")
  y = 0
  for p in panels:
    sheet.paste(p, (0, y))
    y += p.height
  sheet.save(out)


def variant_rows(report: dict, workdirs: dict) -> list[dict]:
  """The study's table from a world-protocol report over `workdirs` ({(variant, seed):
  workdir}): the real row, then per variant each metric's mean over seeds of the run's
  mean over prompts, and its class prompt's colour entropy in bits, with the spread over
  seeds."""
  values = lambda r: {**{m: r["metrics"][m]["mean"] for m in METRICS},
                      CLASS_COLOURS: r["class_prompt"]["colour"]["entropy"]}
  by_dir = {r["workdir"]: values(r) for r in report["rows"] if r["workdir"]}
  real = values(next(r for r in report["rows"] if r["workdir"] is None))
  rows = [dict(variant="real (world renders)", seeds=0,
               **{m: {"mean": real[m], "std": 0.0} for m in COLUMNS})]
  for v in dict.fromkeys(v for v, _ in workdirs):
    runs = [by_dir[str(w)] for (v2, _), w in workdirs.items() if v2 == v]
    rows.append(dict(variant=v, seeds=len(runs),
                     **{m: spread([r[m] for r in runs]) for m in COLUMNS}))
  return rows


def markdown(study: str, subject: str, rows: list[dict]) -> str:
  arrows = {**world_protocol.ARROWS, CLASS_COLOURS: "(bits) ↑"}
  lines = [f"### {study} ({subject}; mean ± std over seeds)", "",
           "| variant | seeds | " + " | ".join(f"{m} {arrows[m]}" for m in COLUMNS) + " |",
           "| --- | ---: |" + " ---: |" * len(COLUMNS)]
  for r in rows:
    cells = [f"{r[m]['mean']:.3f} ± {r[m]['std']:.3f}" for m in COLUMNS]
    lines.append(f"| {r['variant']} | {r['seeds']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  args = parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  studies = list(STUDIES) if args.study == "all" else [args.study]
  runs = pathlib.Path(args.out) / args.subject
  results = {}
  for study in studies:
    rows = study_table(args, study, seeds, runs)
    results[study] = rows
    text = markdown(study, args.subject, rows)
    print(text, flush=True)
    (runs / f"{study}.md").write_text(text)
  (runs / "ablations.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  main(sys.argv[1:])
