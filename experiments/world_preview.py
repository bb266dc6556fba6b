r"""A preview grid of the procedural world: pretraining samples with captions, and the subjects.

    python experiments/world_preview.py                       # experiments/figures/world_preview.png
    python experiments/world_preview.py --n=48 --seed=3 --out=/tmp/world.png

Images are drawn at `--size` (64 px, the base stage's size) and enlarged
`--zoom` times with nearest-neighbour, so the grid shows what a model is
trained on, pixel for pixel, not a smoothed version of it. Prints how fast
the world renders.
"""

from __future__ import annotations

import argparse
import pathlib
import textwrap
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dreambooth_jax.world import scene, subjects

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "figures" / "world_preview.png"
_BG, _TEXT = (250, 250, 248), (30, 30, 30)


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)  # scalable when PIL has FreeType
  except TypeError:  # pragma: no cover - old PIL: the fixed bitmap font
    return ImageFont.load_default()


def _tile(image: np.ndarray, zoom: int, label: str, width_chars: int, lines: int,
          font, line_h: int) -> Image.Image:
  """An enlarged image with `label` wrapped under it in a fixed number of lines."""
  big = Image.fromarray(image).resize((image.shape[1] * zoom, image.shape[0] * zoom),
                                      Image.Resampling.NEAREST)
  tile = Image.new("RGB", (big.width, big.height + lines * line_h + 4), _BG)
  tile.paste(big, (0, 0))
  draw = ImageDraw.Draw(tile)
  for k, line in enumerate(textwrap.wrap(label, width_chars)[:lines]):
    draw.text((2, big.height + 2 + k * line_h), line, fill=_TEXT, font=font)
  return tile


def _grid(tiles: list[Image.Image], cols: int, pad: int) -> Image.Image:
  rows = (len(tiles) + cols - 1) // cols
  w, h = tiles[0].size
  out = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), _BG)
  for i, t in enumerate(tiles):
    out.paste(t, (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
  return out


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=str(DEFAULT_OUT))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--n", type=int, default=24, help="pretraining samples shown")
  p.add_argument("--cols", type=int, default=8)
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--zoom", type=int, default=2)
  p.add_argument("--photos", type=int, default=5, help="photos per subject")
  p.add_argument("--subjects", type=int, default=len(subjects.SUBJECT_NAMES),
                 help="how many subjects to show (the first ones)")
  args = p.parse_args(argv)

  font_px = 10 * args.zoom // 2 + 1
  font, line_h = _font(font_px), font_px + 2
  chars = max(8, args.size * args.zoom // (font_px * 55 // 100))

  start = time.perf_counter()
  examples = [scene.example_at(args.seed, i, args.size) for i in range(args.n)]
  render_s = time.perf_counter() - start
  tiles = [_tile(im, args.zoom, cap, chars, 3, font, line_h) for im, cap, _ in examples]
  top = _grid(tiles, args.cols, pad=6)

  blocks = []  # per subject: its name and look over a row of its photos
  for subject in subjects.subjects()[:args.subjects]:
    photos = subjects.subject_photos(subject.name, args.size, args.photos)
    row = _grid([_tile(im, args.zoom, "", chars, 0, font, line_h) for im in photos],
                len(photos), pad=6)
    block = Image.new("RGB", (row.width, row.height + 2 * line_h + 4), _BG)
    draw = ImageDraw.Draw(block)
    text = f"{subject.name} ({subject.cls}): {subject.description}"
    for k, line in enumerate(textwrap.wrap(text, row.width // (font_px * 55 // 100))[:2]):
      draw.text((6, 2 + k * line_h), line, fill=_TEXT, font=font)
    block.paste(row, (0, 2 * line_h + 4))
    blocks.append(block)
  rows = [_grid(blocks, 2, pad=0)] if blocks else []

  width = max([top.width] + [r.width for r in rows])
  heading = Image.new("RGB", (width, 2 * line_h), _BG)
  ImageDraw.Draw(heading).text((6, 4), f"pretraining samples (seed {args.seed}, {args.size} px)"
                               f" and the subjects' photos", fill=_TEXT, font=font)
  parts = [heading, top] + rows
  sheet = Image.new("RGB", (width, sum(p.height for p in parts)), _BG)
  y = 0
  for part in parts:
    sheet.paste(part, (0, y))
    y += part.height
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  sheet.save(out)

  rate = args.n / max(render_s, 1e-9)
  print("| what | value |\n| --- | --- |")
  print(f"| pretraining samples | {args.n} at {args.size} px |")
  print(f"| render speed | {rate:.0f} images/s ({rate * 60:.0f}/min, one process) |")
  print(f"| subjects shown | {min(args.subjects, len(subjects.SUBJECT_NAMES))} x {args.photos}"
        f" photos |")
  print(f"| written | {out} ({sheet.width}x{sheet.height}) |")
  return {"out": out, "images_per_s": rate, "size": sheet.size}


if __name__ == "__main__":
  main()
