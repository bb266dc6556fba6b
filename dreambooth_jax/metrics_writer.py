"""A run's scalars: one JSON line per logged step in metrics.jsonl, and TensorBoard events.

The progress bar lives in `utils` (`StepProgress`), the PNG sample grids in
`grids`: this module only records numbers.
"""

from __future__ import annotations

import json
import os
import time
from typing import Mapping

import numpy as np

from dreambooth_jax import utils


class MetricsWriter:
  """Appends `{"step": k, ...}` lines to workdir/metrics.jsonl and TensorBoard scalars."""

  def __init__(self, workdir, *, tensorboard: bool = True, enabled: bool = True):
    self.enabled = enabled
    self.path = utils.as_path(workdir) / "metrics.jsonl"
    self._remote = utils.is_remote(self.path)
    # Object stores cannot append: remote runs rewrite the whole (small) file each time.
    self._rows = ([line for line in self.path.read_text().splitlines() if line]
                  if self._remote and enabled and self.path.exists() else [])
    self._tb = None
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter  # imported lazily: pulls in protobuf
      self._tb = SummaryWriter(os.fspath(utils.as_path(workdir) / "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]):
    if not self.enabled:
      return
    row = {"step": int(step), "time": time.time(),
           **{k: float(np.asarray(v)) for k, v in metrics.items()}}
    if self._remote:
      self._rows.append(json.dumps(row))
      utils.write_text(self.path, "\n".join(self._rows) + "\n")
    else:
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k not in ("step", "time"):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
