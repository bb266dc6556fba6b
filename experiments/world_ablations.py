r"""The papers' ablations in miniature, on a subject of the world, each row one training run.

  python experiments/world_ablations.py --ablation=prior        # DreamBooth with / without prior preservation
  python experiments/world_ablations.py --ablation=methods      # DreamBooth vs textual inversion vs two-stage
  python experiments/world_ablations.py --ablation=identifier   # rare token vs a common word
  python experiments/world_ablations.py --ablation=sr_aug       # SR tuned at aug 1e-5 / 1e-3 / not tuned

Every row trains configs/world.py (the pretrained world cascade) on the same
subject with the same seed, changing only what the ablation names, then
scores it with the world protocol (`python -m dreambooth_jax.evaluate
--protocol=world`). The table is the benchmark's layout with the world's
metrics: Subject and Attributes (subject fidelity), Context (prompt fidelity),
PRES (language drift: "a ball" turned into the subject) and DIV (diversity).
Runs resume: a workdir that finished is evaluated, not retrained.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

from dreambooth_jax.evaluation import world_protocol

ROOT = pathlib.Path(__file__).resolve().parents[1]

# ablation -> [(row name, config argument, --config.x=y overrides)]
ABLATIONS = {
    "prior": [("with prior preservation", "", []),
              ("without prior preservation", "", ["--config.prior.enabled=False"])],
    "methods": [("DreamBooth", "method=dreambooth", []),
                ("textual inversion", "method=textual_inversion", []),
                ("two-stage (Zeng et al.)", "method=ti_then_finetune", [])],
    "identifier": [("rare token", "", []),
                   ("common word 'red'", "", ["--config.subject.identifier=red"])],
    "sr_aug": [("SR tuned, aug 1e-5", "", ["--config.cascade.sr256.train_aug_level=1e-5"]),
               ("SR tuned, aug 1e-3", "", ["--config.cascade.sr256.train_aug_level=1e-3"]),
               ("SR not tuned", "stages=base", [])],
}


def train(workdir: pathlib.Path, subject: str, arg: str, overrides: list[str]) -> None:
  if (workdir / "export" / "dreambooth.json").is_file():
    return  # finished earlier
  config = f"configs/world.py:subject={subject}" + (f",{arg}" if arg else "")
  cmd = [sys.executable, "-m", "dreambooth_jax.train", f"--config={config}",
         f"--workdir={workdir}", *overrides]
  print("$", " ".join(cmd[1:]), flush=True)
  subprocess.run(cmd, cwd=ROOT, check=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--ablation", choices=sorted(ABLATIONS), default="prior")
  p.add_argument("--subject", default="zigzag_ball")
  p.add_argument("--root", default="workdirs/world_ablations", help="workdirs go under here")
  p.add_argument("--num_images", type=int, default=8)
  p.add_argument("--num_class_images", type=int, default=16)
  args = p.parse_args(argv)
  root = pathlib.Path(args.root) / args.subject / args.ablation
  rows = ABLATIONS[args.ablation]
  workdirs = []
  for i, (name, arg, overrides) in enumerate(rows):
    w = root / f"{i}_{name.split()[0].lower().strip('(')}"
    train(w, args.subject, arg, overrides)
    workdirs.append(str(w))
  report = world_protocol.run(workdirs, args.subject, num_images=args.num_images,
                              num_class_images=args.num_class_images, out=str(root / "eval"))
  names = {str(pathlib.Path(w).resolve()): name for w, (name, _, _) in zip(workdirs, rows)}
  for r in report["rows"]:
    r["label"] = names.get(r["workdir"], r["label"])
  print()
  print("\n".join(world_protocol.table(report["rows"])))
  print(f"\nreport: {root / 'eval' / 'report.md'}")


if __name__ == "__main__":
  main()
