"""What a run shows and leaves behind: a progress bar, metrics.jsonl, TensorBoard events, PNG grids."""

from __future__ import annotations

import json
import os
import time
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

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


class progress:  # noqa: N801 - used like a function, as tqdm is
  """tqdm bar over optimiser steps showing loss, steps/s and ETA (tqdm computes both)."""

  def __init__(self, start: int, total: int, *, disable: bool = False):
    from tqdm import tqdm
    self._bar = tqdm(total=total, initial=start, disable=disable, unit="step", dynamic_ncols=True,
                     desc="train")

  def update(self, metrics: Mapping[str, float]):
    self._bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", refresh=False)
    self._bar.update(1)

  def close(self):
    self._bar.close()


def save_grid(path, rows: Sequence[tuple[str, Mapping[str, np.ndarray]]], *, cell: int = 128):
  """One PNG: a row per prompt (caption on the left), every stage's images side by side.

  rows: [(prompt, {stage: uint8 [N, H, W, 3]})]. Images are shown at `cell`
  px (nearest) so stages of different resolutions line up.
  """
  utils.as_path(path).parent.mkdir(parents=True, exist_ok=True)
  label_w = 220
  ncols = max(sum(len(v) for v in imgs.values()) for _, imgs in rows)
  grid = Image.new("RGB", (label_w + ncols * cell, len(rows) * (cell + 14)), "white")
  draw = ImageDraw.Draw(grid)
  for r, (prompt, imgs) in enumerate(rows):
    y = r * (cell + 14)
    draw.text((4, y + cell // 2), prompt[:34], fill="black")
    c = 0
    for stage, arr in imgs.items():
      for img in np.asarray(arr):
        tile = Image.fromarray(img).resize((cell, cell), Image.NEAREST)
        grid.paste(tile, (label_w + c * cell, y))
        draw.text((label_w + c * cell + 2, y + cell), f"{stage} {img.shape[0]}px", fill="gray")
        c += 1
  utils.write_png(path, grid)
