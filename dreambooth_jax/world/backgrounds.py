"""Procedural backgrounds, one painter per context, on a supersampled canvas.

Each painter draws the whole canvas (S x S, S = 4x the output size) from the
scene's horizon and a numpy Generator seeded by the scene, so a scene always
gets the same clouds, trees or buildings. Gradients and grain are numpy arrays;
hard-edged shapes (clouds, buildings, the moon) are PIL drawing on the same
canvas, anti-aliased later by the 4x downsampling.

Positions are fractions of the image (0 = top/left, 1 = bottom/right) and the
number of drawn elements does not grow with S: the same scene at 64 px and at
256 px is the same picture, only sharper, which is what a super-resolution stage
must learn.

The contexts are told apart by large areas of colour before any detail: blue
sky over blue sea over sand (beach), sky over green (grass), grey-white over
white (snow), dark blue over near-black with a moon (night), grey buildings over
asphalt (city), a plain wall over brown wood (table).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw


@dataclasses.dataclass(frozen=True)
class Lighting:
  """How a context lights the object: colour multiplier and shadow depth."""
  tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
  shadow: float = 0.45
  specular: float = 0.35


# Range of the horizon (fraction of height from the top) per context, and how far
# below it the object's ground contact must stay (the beach needs room for the sea).
HORIZON = {
    "beach": (0.32, 0.45), "grass": (0.32, 0.52), "snow": (0.32, 0.52),
    "night": (0.38, 0.55), "city": (0.45, 0.58), "table": (0.38, 0.55),
}
GROUND_GAP = {"beach": 0.24, "grass": 0.14, "snow": 0.14, "night": 0.12, "city": 0.12,
              "table": 0.14}

_NIGHT = Lighting(tint=(0.8, 0.82, 0.95), shadow=0.25, specular=0.25)
_LIGHTING = {"night": _NIGHT, "table": Lighting(tint=(1.02, 0.98, 0.92), shadow=0.4),
             "snow": Lighting(tint=(0.98, 1.0, 1.04), shadow=0.35)}


def _jitter(rng: np.random.Generator, rgb, amount: float = 12.0) -> np.ndarray:
  return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def _fill_rows(canvas: np.ndarray, y0: int, y1: int, top, bottom):
  """A vertical gradient from colour `top` to `bottom` over rows y0..y1."""
  if y1 <= y0:
    return
  t = np.linspace(0.0, 1.0, y1 - y0, dtype=np.float32)[:, None, None]
  canvas[y0:y1] = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t


def _grain(rng: np.random.Generator, canvas: np.ndarray, y0: int, amount: float, cells: int = 0):
  """Adds per-pixel grain and, with `cells`, soft blotches (coarse noise) below row y0."""
  h, s = canvas.shape[0] - y0, canvas.shape[1]
  if h <= 0:
    return
  noise = (rng.random((h, s), dtype=np.float32) - 0.5) * (2 * amount)
  if cells:
    coarse = rng.random((cells, cells), dtype=np.float32)
    coarse = Image.fromarray(coarse).resize((s, h), Image.Resampling.BILINEAR)
    noise += (np.asarray(coarse) - 0.5) * (4 * amount)
  canvas[y0:] += noise[:, :, None]


def _clouds(draw: ImageDraw.ImageDraw, rng: np.random.Generator, s: int, horizon: float,
            colour=(255, 255, 255), alpha=215, max_n: int = 3):
  for _ in range(rng.integers(0, max_n + 1)):
    cx, cy = rng.uniform(0, 1), rng.uniform(0.06, max(0.08, horizon - 0.12))
    w = rng.uniform(0.12, 0.25)
    for _ in range(4):  # a cloud is a few overlapping puffs
      px, py = cx + rng.uniform(-w / 2, w / 2), cy + rng.uniform(-0.02, 0.02)
      rx, ry = rng.uniform(0.04, 0.08), rng.uniform(0.025, 0.045)
      draw.ellipse([(px - rx) * s, (py - ry) * s, (px + rx) * s, (py + ry) * s],
                   fill=(*colour, alpha))


def _beach(c: np.ndarray, s: int, horizon: float, rng: np.random.Generator):
  h = int(horizon * s)
  shore = int((horizon + rng.uniform(0.08, 0.13)) * s)
  _fill_rows(c, 0, h, _jitter(rng, (70, 140, 225)), _jitter(rng, (185, 215, 242), 8))
  _fill_rows(c, h, shore, _jitter(rng, (22, 88, 160)), _jitter(rng, (52, 140, 192)))
  _fill_rows(c, shore, s, _jitter(rng, (206, 178, 128), 8), _jitter(rng, (234, 210, 162), 8))
  _grain(rng, c, shore, 7.0, cells=6)
  image = Image.fromarray(np.clip(c, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(image, "RGBA")
  _clouds(draw, rng, s, horizon)
  for _ in range(6):  # wave crests on the sea
    y = rng.uniform(horizon + 0.01, shore / s - 0.01)
    x = rng.uniform(0, 1)
    draw.line([(x - 0.08) * s, y * s, (x + 0.08) * s, y * s], fill=(200, 230, 245, 150),
              width=max(1, s // 200))
  # The foam line where the sea meets the sand, gently wavy.
  xs = np.linspace(0, 1, 17)
  phase = rng.uniform(0, 2 * np.pi)
  ys = shore / s + 0.008 * np.sin(xs * 9 + phase)
  draw.line([(x * s, y * s) for x, y in zip(xs, ys)], fill=(250, 250, 245, 230),
            width=max(2, s // 64))
  return image


def _grass(c: np.ndarray, s: int, horizon: float, rng: np.random.Generator):
  h = int(horizon * s)
  _fill_rows(c, 0, h, _jitter(rng, (80, 150, 228)), _jitter(rng, (190, 220, 240), 8))
  _fill_rows(c, h, s, _jitter(rng, (112, 168, 62)), _jitter(rng, (52, 118, 36)))
  _grain(rng, c, h, 10.0, cells=8)
  image = Image.fromarray(np.clip(c, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(image, "RGBA")
  _clouds(draw, rng, s, horizon)
  # A line of bushes and trees on the horizon: dark green bumps.
  tree = tuple(int(v) for v in _jitter(rng, (40, 90, 40), 10))
  x = rng.uniform(-0.05, 0.05)
  while x < 1.05:
    r = rng.uniform(0.025, 0.06)
    draw.ellipse([(x - r) * s, (horizon - r) * s, (x + r) * s, (horizon + r * 0.4) * s],
                 fill=tree)
    x += r * rng.uniform(1.0, 2.5)
  # Grass blades, longer nearer the camera.
  for _ in range(90):
    bx, by = rng.uniform(0, 1), rng.uniform(horizon + 0.03, 1.0)
    length = 0.01 + 0.05 * (by - horizon)
    shade = rng.uniform(-35, 35)
    draw.line([bx * s, by * s, (bx + rng.uniform(-0.01, 0.01)) * s, (by - length) * s],
              fill=(int(70 + shade), int(140 + shade), int(45 + shade / 2), 200),
              width=max(1, s // 160))
  return image


def _snow(c: np.ndarray, s: int, horizon: float, rng: np.random.Generator):
  h = int(horizon * s)
  _fill_rows(c, 0, h, _jitter(rng, (176, 190, 212), 8), _jitter(rng, (222, 228, 238), 6))
  _fill_rows(c, h, s, _jitter(rng, (236, 241, 250), 4), _jitter(rng, (250, 251, 255), 3))
  _grain(rng, c, h, 3.0, cells=5)
  c[h:, :, 0] -= 6.0  # snow in shade is bluish
  image = Image.fromarray(np.clip(c, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(image, "RGBA")
  # Mountains on the horizon: grey-blue with white peaks.
  x = rng.uniform(-0.2, 0.0)
  while x < 1.0:
    w, top = rng.uniform(0.25, 0.45), horizon - rng.uniform(0.08, 0.2)
    peak = x + w / 2
    draw.polygon([(x * s, horizon * s), (peak * s, top * s), ((x + w) * s, horizon * s)],
                 fill=(132, 144, 172))
    k = 0.35  # the top 35% is snow-capped
    draw.polygon([((peak - k * w / 2) * s, (top + k * (horizon - top)) * s), (peak * s, top * s),
                  ((peak + k * w / 2) * s, (top + k * (horizon - top)) * s)],
                 fill=(244, 246, 252))
    x += w * rng.uniform(0.5, 0.9)
  # Falling snow.
  for _ in range(rng.integers(0, 40)):
    fx, fy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.003, 0.007)
    draw.ellipse([(fx - r) * s, (fy - r) * s, (fx + r) * s, (fy + r) * s],
                 fill=(255, 255, 255, 200))
  return image


def _night(c: np.ndarray, s: int, horizon: float, rng: np.random.Generator):
  h = int(horizon * s)
  top, low = _jitter(rng, (6, 10, 32), 5), _jitter(rng, (30, 42, 82), 8)
  _fill_rows(c, 0, h, top, low)
  _fill_rows(c, h, s, _jitter(rng, (26, 32, 46), 5), _jitter(rng, (10, 12, 20), 4))
  _grain(rng, c, h, 4.0, cells=6)
  image = Image.fromarray(np.clip(c, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(image, "RGBA")
  for _ in range(rng.integers(25, 60)):
    sx, sy, r = rng.uniform(0, 1), rng.uniform(0, horizon - 0.02), rng.uniform(0.002, 0.005)
    b = int(rng.uniform(170, 255))
    draw.ellipse([(sx - r) * s, (sy - r) * s, (sx + r) * s, (sy + r) * s], fill=(b, b, 220))
  mx, my = rng.uniform(0.15, 0.85), rng.uniform(0.1, max(0.12, horizon - 0.15))
  r = rng.uniform(0.055, 0.08)
  glow = 2.2 * r
  draw.ellipse([(mx - glow) * s, (my - glow) * s, (mx + glow) * s, (my + glow) * s],
               fill=(120, 130, 170, 40))
  draw.ellipse([(mx - r) * s, (my - r) * s, (mx + r) * s, (my + r) * s], fill=(246, 242, 206))
  if rng.random() < 0.5:  # a crescent: the sky's colour bites into the disc
    t = my / max(horizon, 1e-3)
    sky = tuple(int(v) for v in top * (1 - t) + low * t)
    off = r * rng.choice([-0.55, 0.55])
    draw.ellipse([(mx + off - r) * s, (my - r * 1.05) * s, (mx + off + r) * s,
                  (my + r * 0.95) * s], fill=sky)
  return image


def _city(c: np.ndarray, s: int, horizon: float, rng: np.random.Generator):
  h = int(horizon * s)
  _fill_rows(c, 0, h, _jitter(rng, (135, 170, 212)), _jitter(rng, (205, 214, 228), 6))
  _fill_rows(c, h, s, _jitter(rng, (120, 120, 126), 6), _jitter(rng, (88, 88, 94), 6))
  _grain(rng, c, h, 6.0, cells=6)
  image = Image.fromarray(np.clip(c, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(image, "RGBA")
  x = rng.uniform(-0.08, 0.0)
  while x < 1.0:
    w, top = rng.uniform(0.1, 0.22), horizon - rng.uniform(0.12, 0.36)
    g = rng.uniform(95, 175)
    wall = (int(g), int(g), int(g + rng.uniform(0, 14)))
    draw.rectangle([x * s, top * s, (x + w) * s, horizon * s], fill=wall)
    win = tuple(int(v) for v in np.clip(np.asarray(wall) * rng.choice([0.6, 1.3]), 0, 255))
    ww, wh = w / 7, 0.022
    for wy in np.arange(top + 0.02, horizon - 0.03, 2.0 * wh):
      for wx in np.arange(x + ww, x + w - ww * 0.9, 2.0 * ww):
        draw.rectangle([wx * s, wy * s, (wx + ww) * s, (wy + wh) * s], fill=win)
    x += w + rng.uniform(0.0, 0.02)
  # The kerb: a light strip of pavement in front of the buildings.
  draw.rectangle([0, horizon * s, s, (horizon + 0.035) * s], fill=(176, 176, 172))
  for dx in np.arange(rng.uniform(0, 0.2), 1.0, 0.25):  # road markings
    y = horizon + 0.2
    draw.rectangle([dx * s, y * s, (dx + 0.1) * s, (y + 0.012) * s], fill=(225, 225, 215, 200))
  return image


def _table(c: np.ndarray, s: int, horizon: float, rng: np.random.Generator):
  h = int(horizon * s)
  wall = [(232, 222, 196), (196, 212, 224), (226, 202, 190), (210, 222, 198)][rng.integers(4)]
  _fill_rows(c, 0, h, _jitter(rng, wall, 6) * 0.88, _jitter(rng, wall, 6))
  wood = [(150, 96, 54), (182, 128, 76), (118, 74, 44)][rng.integers(3)]
  _fill_rows(c, h, s, _jitter(rng, wood, 10) * 0.92, _jitter(rng, wood, 10) * 1.05)
  # Wood grain: streaks along the planks, denser near the far edge (perspective).
  rows = np.arange(s - h, dtype=np.float32)[:, None] / s
  cols = np.arange(s, dtype=np.float32)[None, :] / s
  depth = np.sqrt(rows + 0.02)
  grain = np.sin(2 * np.pi * (depth * rng.uniform(18, 26) + 0.25 * np.sin(cols * 7 + depth * 5)))
  c[h:] *= (1.0 + 0.07 * grain)[:, :, None]
  _grain(rng, c, h, 4.0)
  image = Image.fromarray(np.clip(c, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(image, "RGBA")
  if rng.random() < 0.6:  # a picture frame or window on the wall
    fx, fw = rng.uniform(0.05, 0.6), rng.uniform(0.18, 0.32)
    fy1 = horizon - rng.uniform(0.06, 0.12)
    fy0 = max(0.02, fy1 - fw * rng.uniform(0.6, 1.0))
    draw.rectangle([fx * s, fy0 * s, (fx + fw) * s, fy1 * s], fill=(90, 70, 50))
    inner = (int(rng.uniform(120, 220)), int(rng.uniform(150, 220)), int(rng.uniform(170, 240)))
    m = 0.015
    draw.rectangle([(fx + m) * s, (fy0 + m) * s, (fx + fw - m) * s, (fy1 - m) * s], fill=inner)
  for y in np.sqrt(np.arange(1, 8) / 8.0) * (1 - horizon) + horizon:  # plank seams
    draw.line([0, y * s, s, y * s], fill=(60, 36, 20, 70), width=max(1, s // 256))
  draw.line([0, horizon * s, s, horizon * s], fill=(240, 220, 190, 160), width=max(1, s // 128))
  return image


_PAINTERS = {"beach": _beach, "grass": _grass, "snow": _snow, "night": _night, "city": _city,
             "table": _table}


def paint(context: str, horizon: float, size: int,
          rng: np.random.Generator) -> tuple[np.ndarray, Lighting]:
  """The background of `context` as float32 [size, size, 3] in 0..255, and its lighting."""
  canvas = np.empty((size, size, 3), np.float32)
  image = _PAINTERS[context](canvas, size, horizon, rng)
  return np.array(image, dtype=np.float32), _LIGHTING.get(context, Lighting())
