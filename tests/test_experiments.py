"""The benchmark scripts run in their reduced modes, so they cannot rot (numbers are not checked)."""

import math
import os

import numpy as np
import pytest


# The SR stage (its step has every input, low-res conditioning too) on all 8 devices (0).
@pytest.mark.parametrize("stage,devices", [("sr256", 0)])
def test_bench_train_step_quick(stage, devices, capsys):
  import bench_train_step
  result = bench_train_step.main(["--quick", f"--stage={stage}", f"--devices={devices}"])
  out = capsys.readouterr().out
  print(out)
  assert "ours: jax.jit sharded train_step" in out and "ratio theirs/ours" in out
  for key in ("ours_ms", "theirs_ms", "compile_s", "ratio"):
    assert math.isfinite(result[key]) and result[key] > 0, key
  # Both sides compute the same step: equal loss and gradient norm on the same draw.
  (ours_loss, ours_grad), (theirs_loss, theirs_grad) = result["parity"]["ours"], result["parity"]["theirs"]
  np.testing.assert_allclose(ours_loss, theirs_loss, rtol=1e-5)
  np.testing.assert_allclose(ours_grad, theirs_grad, rtol=1e-4)


def test_prior_quality_frechet_distance():
  # The world scripts need the pretrained world cascade to run; their arithmetic does not.
  import prior_quality
  rng = np.random.default_rng(0)
  a = rng.normal(size=(4000, 3))
  assert prior_quality.frechet(a, rng.normal(size=(4000, 3))) < 0.02
  shifted = rng.normal(size=(4000, 3)) + np.array([2.0, 0.0, 0.0])
  assert abs(prior_quality.frechet(a, shifted) - 4.0) < 0.2  # |mean shift|^2, same covariance
  balls = prior_quality.renders("ball", 3, seed=11)
  assert balls.shape == (3, 64, 64, 3) and balls.dtype == np.uint8


def test_world_ablations_change_only_what_they_name():
  import world_ablations
  variants = world_ablations.VARIANTS
  assert len({(arg, tuple(o)) for arg, o in variants.values()}) == len(variants)  # all differ
  assert variants["dreambooth"] == ("", ())  # the reference row is the config as shipped
  for arg, overrides in variants.values():
    assert all(o.startswith("--config.") for o in overrides), overrides
  for study, names in world_ablations.STUDIES.items():
    assert len(names) >= 2 and set(names) <= set(variants), study
  args = world_ablations.parse_args(["--study=methods", "--cascade=c", "--steps=7"])
  assert world_ablations.config_arg(args, "two_stage") == (
      "configs/world.py:subject=zigzag_ball,steps=7,cascade=c,method=ti_then_finetune")
  args = world_ablations.parse_args(["--study=sr_aug", "--stages=base"])
  assert world_ablations.config_arg(args, "dreambooth").endswith("steps=-1,stages=base")
  assert world_ablations.config_arg(args, "sr_not_tuned").endswith("steps=-1,stages=base")
  rows = [{"variant": "dreambooth", "seeds": 2,
           **{m: world_ablations.spread([0.25, 0.75]) for m in world_ablations.COLUMNS}}]
  text = world_ablations.markdown("methods", "x", rows)
  assert "| dreambooth | 2 | 0.500 ± 0.354 |" in text and "class colours (bits) ↑ |" in text
  # A report of two seeds' runs: each metric's mean over prompts, then its spread over seeds.
  run = lambda subject, bits: {"workdir": f"w{bits}", "metrics": {
      m: {"mean": subject if m == "Subject" else 0.0, "std": 0.1} for m in world_ablations.METRICS},
      "class_prompt": {"colour": {"entropy": bits}}}
  real = dict(run(1.0, 3.0), workdir=None)
  rows = world_ablations.variant_rows({"rows": [real, run(0.2, 1.0), run(0.4, 2.0)]},
                                      {("dreambooth", 0): "w1.0", ("dreambooth", 1): "w2.0"})
  assert rows[0]["Subject"] == {"mean": 1.0, "std": 0.0} and rows[1]["seeds"] == 2
  assert rows[1]["Subject"]["mean"] == pytest.approx(0.3)
  assert rows[1][world_ablations.CLASS_COLOURS] == pytest.approx({"mean": 1.5, "std": 0.5 ** 0.5})


def test_identifier_gain_compares_the_run_with_its_frozen_start(full_run):
  """experiments/identifier_gain.py on the shared tiny run: the frozen model's and the run's
  base UNet errors on the subject's photos and the run's class priors, with and without the
  identifier, the same noise draws for all."""
  import identifier_gain
  rows = identifier_gain.main([f"--workdir={full_run[0]}", "--timesteps=100,900", "--draws=1",
                               "--class_images=2"])
  assert [(m, w) for m, w, _ in rows] == [("frozen", "instance"), ("frozen", "class"),
                                          (os.path.basename(full_run[0]), "instance"),
                                          (os.path.basename(full_run[0]), "class")]
  errs = np.array([[e["with"], e["without"]] for _, _, e in rows])  # [row, prompt, t]
  assert np.isfinite(errs).all() and (errs > 0).all()
  assert (errs[:, 0] != errs[:, 1]).any()  # the identifier reaches the UNet
  assert (errs[0] != errs[2]).any()  # the run's weights moved from the frozen ones
