"""Quality floors: fine-tuning the shipped world cascade learns a subject, and prior
preservation keeps the class.

Every other test checks tensors; a wrong target, weighting, schedule or conditioning
in what training does would pass them all. These tests fine-tune the packaged,
pretrained world cascade on the world subject zigzag_ball through the README's CLI
(`configs/world.py`, one CPU device, as a user runs it), twice, 300 steps each at the
config's lr (1e-4), base stage only:

- without prior preservation: the subject is learned fast, and the class prompt drifts
  onto it (the paper's language drift);
- with it (prior weight 1, as the config): "a ball" stays the class, and stays varied
  (its images' colours and DIV, `world_protocol.class_variety`: PRES alone would pass a
  run whose "a ball" is one kind of ball).

Both are scored in one `evaluate --protocol=world` call (common random numbers) at the
base stage. The config's own run (4000 steps, both stages, about 17 minutes with its
scoring) does not fit CI: `test_the_readmes_first_command` runs it when
DREAMBOOTH_QUALITY_FULL=1 is set, and skips otherwise. The CI floors are set from
these 300-step runs, measured on 2026-11-27 (2-core
CPU) on the three-leg cascade that ships: without prior Subject 0.388, Attributes 0.811,
PRES 0.672; with it PRES 0.000, Context 0.670 (on the two-leg cascade before it: 0.431,
0.806, 0.562; 0.000, 0.800; experiments/README.md, "Quality floors"). The margins are wide because a
floor must hold on any machine's float rounding, and must still fail on a broken step:
with a wrong target or conditioning the subject is not learned at all (Subject near 0 is
what a run that learns no subject scores, as the 300-step prior run does: 0.002), and without
the prior term PRES is 0.67, not 0.00.
"""

import json
import os

import pytest

from conftest import run_cli, subprocess_env

pytestmark = pytest.mark.xdist_group("world_quality")

STEPS = 300
# One CPU device, as the README's command runs: the suite's 8 fake devices would shard
# the run's tiny arrays for nothing.
ONE_DEVICE = dict(XLA_FLAGS="")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  root = tmp_path_factory.mktemp("world_quality")
  workdirs = []
  for name, prior in (("no_prior", False), ("prior", True)):
    workdir = root / name
    run_cli("dreambooth_jax.train", f"--config=configs/world.py:stages=base,steps={STEPS}",
            f"--workdir={workdir}", f"--config.prior.enabled={prior}",
            "--config.prior.num_images=16", "--config.log.tensorboard=False",
            "--config.log.sample_every=0", timeout=900, ok=True,
            env=subprocess_env(**ONE_DEVICE))
    workdirs.append(str(workdir))
  out = root / "eval"
  r = run_cli("dreambooth_jax.evaluate", "--protocol=world", "--subject=zigzag_ball",
              f"--workdir={','.join(workdirs)}", "--stage=base", "--num_images=4",
              "--num_class_images=8", f"--out={out}", timeout=900, ok=True,
              env=subprocess_env(**ONE_DEVICE))
  print(r.stdout[-800:])  # the table, in the test log
  rows = json.loads((out / "report.json").read_text())["rows"]
  assert [row["method"] for row in rows] == ["real", "dreambooth", "dreambooth"]
  return {name: dict(row["metrics"], class_prompt=row["class_prompt"])
          for name, row in zip(("real", "no_prior", "prior"), rows)}


def mean(metrics, key):
  return metrics[key]["mean"]


def test_fine_tuning_learns_the_subject(report):
  m = report["no_prior"]
  assert mean(m, "Subject") > 0.15, m  # measured 0.388
  assert mean(m, "Attributes") > 0.55, m  # measured 0.811


def test_without_the_prior_the_class_drifts_onto_the_subject(report):
  assert mean(report["no_prior"], "PRES") > 0.25, report["no_prior"]  # measured 0.672
  # and "a ball" is one ball: all 8 read as the subject's yellow (0.00 bits of colour).
  assert report["no_prior"]["class_prompt"]["colour"]["entropy"] < 1.0, report["no_prior"]


def test_prior_preservation_keeps_the_class(report):
  m = report["prior"]
  assert mean(m, "PRES") < 0.15, m  # measured 0.000
  assert mean(m, "Context") > 0.45, m  # measured 0.670: the prompts' contexts are still drawn
  # "a ball" still varies (8 images; the world's own balls: 2.25 bits of colour, DIV 0.281).
  assert m["class_prompt"]["colour"]["entropy"] > 1.0, m  # measured 1.81 (no prior: 0.00)
  assert m["class_prompt"]["DIV"] > 0.12, m  # measured 0.202 (no prior: 0.055)


@pytest.mark.skipif(os.environ.get("DREAMBOOTH_QUALITY_FULL") != "1",
                    reason="the README's first command (4000 steps, both stages) and its scoring "
                           "take about 17 min on 2 cores, beyond CI's budget: set "
                           "DREAMBOOTH_QUALITY_FULL=1 to run it")
def test_the_readmes_first_command(tmp_path):
  """The floor and ceiling at the config's default steps: the README's first command, as
  a user runs it (one device, both stages, 4000 steps, 32 class priors), then its second
  (`evaluate --protocol=world`, the last stage: 64 px). Measured values in the comments:
  seed 0 on 2026-11-27 (experiments/README.md, "Quality floors"). Runs that learn no or
  little subject score Subject 0.000-0.006 (textual inversion, a common-word identifier)
  and 0.001-0.042 (the two-stage method) at the base over seeds 0-2 ("The studies on the
  shipped cascade")."""
  workdir = tmp_path / "zigzag_ball"
  run_cli("dreambooth_jax.train", "--config=configs/world.py", f"--workdir={workdir}",
          timeout=3600, ok=True, env=subprocess_env(**ONE_DEVICE))
  out = tmp_path / "eval"
  r = run_cli("dreambooth_jax.evaluate", "--protocol=world", "--subject=zigzag_ball",
              f"--workdir={workdir}", f"--out={out}", timeout=1800, ok=True,
              env=subprocess_env(**ONE_DEVICE))
  print(r.stdout[-800:])
  _, tuned = json.loads((out / "report.json").read_text())["rows"]
  assert tuned["stage"] == "sr256" and tuned["resolution"] == 64, tuned
  m = tuned["metrics"]
  # Seed 0 (the config's): Subject 0.378 here (0.140 on the two-leg cascade before); at the
  # base, over seeds 0-2 (each seed draws its own identifier): 0.380 / 0.487 / 0.089. A run
  # that learns no or little subject: 0.000-0.042.
  assert mean(m, "Subject") > 0.15, m
  assert mean(m, "Context") > 0.60, m  # measured 0.745; seeds 0-2 at the base 0.72-0.74
  assert mean(m, "PRES") < 0.15, m  # measured 0.000
  # "a ball" must still vary, not only stay a ball: measured 2.25 bits of colour in its 16
  # images (the world's own balls 2.73); at the base 2.25 / 2.35 / 2.48 over seeds 0-2. Twice
  # the steps kept PRES at 0.000 but narrowed seed 0's to 1.01 (green-grey balls at night;
  # 1.06 at 64 px), and without the prior every image is the subject's yellow (0.00).
  colours = tuned["class_prompt"]["colour"]
  assert colours["entropy"] > 1.5, colours
