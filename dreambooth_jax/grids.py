"""PNG image grids: the pictures a run leaves behind for a person to look at.

Training writes one every `log.sample_every` steps, `sample` writes one per
call, the evaluation one per report row, the notebooks show them. A module of
its own (not part of `metrics_writer`) because drawing a picture has nothing
to do with logging scalars: the evaluation and the sampling CLI write grids
without pulling in TensorBoard, and the metrics writer stays about numbers.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from dreambooth_jax import utils


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


def save_last_stage(path, rows: Sequence[tuple[str, Mapping[str, np.ndarray]]]) -> tuple[str, int]:
  """Every row's last-stage images at full size beside the grid at `path`, as
  `<stem>_<row>_<image>_<stage>.png` (1024 px from the x4 upscaler are lost in a 128 px
  tile); returns (that stage, its side in px)."""
  path = utils.as_path(path)
  for i, (_, images) in enumerate(rows):
    stage, last = list(images.items())[-1]
    for k, image in enumerate(last):
      utils.write_png(path.parent / f"{path.stem}_{i}_{k}_{stage}.png", image)
  return stage, int(last.shape[1])


def square_thumbnail(image: Image.Image, size: int = 128) -> np.ndarray:
  """Center crop to a square and resize (bicubic): real photos differ in size, a grid row
  must not."""
  w, h = image.size
  s = min(w, h)
  box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
  return np.asarray(image.convert("RGB").crop(box).resize((size, size), Image.BICUBIC))
