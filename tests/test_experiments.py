"""The benchmark scripts run in their reduced modes, so they cannot rot (numbers are not checked)."""

import math

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
