"""The objects: analytic surfaces, surface patterns and shading, drawn into a canvas.

Each class is a small orthographic 3-D model (sphere, cube, cone, upright torus,
cylinder with a handle) seen from a camera `tilt` degrees above the ground. For
every canvas pixel of its bounding box a class gives a `Piece`: whether the
pixel is on the surface, the surface coordinates (u, v) there and the surface
normal. Patterns are functions of (u, v), so stripes wrap round a ball and
checks foreshorten on a box face the way a painted object's would, and the
normal gives Lambert shading plus a highlight. That is what makes a 16 px ball
read as a ball and not as a disc.

Surface coordinates are in units of about the object's height: v runs 0..1
from bottom to top (round the tube of a ring), u is 0 at the front and grows to
the right. Patterns repeat an integer number of times round closed surfaces so
they have no seam. Emblems (a subject's star or heart) sit at (0, 0.5), with a
copy at the back of a ball so a turned ball still shows one.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from dreambooth_jax.world import vocab


@dataclasses.dataclass
class Piece:
  """One part of an object (a face, a body, a handle) over the crop's pixels."""
  mask: np.ndarray                    # bool [h, w]: the pixel shows this piece
  normal: tuple[np.ndarray, ...]      # view-space unit normal (x right, y up, z to camera)
  u: np.ndarray | None = None         # surface coordinates; None = unpatterned
  v: np.ndarray | None = None
  stripe: np.ndarray | None = None    # the coordinate stripes alternate along
  interior: bool = False              # the dark inside of a cup
  edge: np.ndarray | None = None      # extra darkening (box edges)
  gloss: float = 1.0


@dataclasses.dataclass(frozen=True)
class Look:
  """The colours and pattern of an object's surface, as RGB floats."""
  colour: np.ndarray
  pattern: str
  ink: np.ndarray
  colour2: np.ndarray | None = None
  split: str | None = None


def pattern_ink(colour: str) -> tuple[int, int, int]:
  """The colour pretraining patterns are drawn in: a shade of the object's own colour.

  A single hue keeps "a red striped ball" red; light colours get dark stripes,
  dark colours light ones.
  """
  r, g, b = vocab.COLOURS[colour]
  if 0.3 * r + 0.59 * g + 0.11 * b > 140:
    return (int(r * 0.52), int(g * 0.52), int(b * 0.52))
  return tuple(int(c * 0.3 + 255 * 0.7) for c in (r, g, b))


def look_of(scene) -> Look:
  """The surface look of a scene's object (see `scene.Scene`)."""
  colour = np.asarray(vocab.COLOURS[scene.colour], np.float32)
  ink = vocab.INKS[scene.ink] if scene.ink else pattern_ink(scene.colour)
  colour2 = np.asarray(vocab.COLOURS[scene.colour2], np.float32) if scene.colour2 else None
  return Look(colour, scene.pattern, np.asarray(ink, np.float32), colour2, scene.split)


# ----------------------------------------------------------------------------
# Patterns: (u, v, stripe) -> bool mask of the ink.
# ----------------------------------------------------------------------------


def _cells(x: np.ndarray, k: float) -> np.ndarray:
  """Position within a cell of a grid of period 1/k, -0.5..0.5."""
  return np.mod(x * k, 1.0) - 0.5


def _around_integers(x: np.ndarray) -> np.ndarray:
  """Signed distance to the nearest integer: emblems sit at u = 0 (and 1, -1 behind)."""
  return np.mod(x + 0.5, 1.0) - 0.5


def _star(u, v, radius=0.25):
  x, y = _around_integers(u), v - 0.5  # a copy every unit of u: front and back of a ball
  r = np.hypot(x, y)
  sector = 2 * math.pi / 5
  a = np.abs(np.mod(np.arctan2(x, y) + sector / 2, sector) - sector / 2)  # 0 at a point
  # The boundary between an outer point (radius, angle 0) and an inner corner.
  inner = radius * 0.42
  p2x, p2y = inner * math.cos(sector / 2), inner * math.sin(sector / 2)
  ex, ey = p2x - radius, p2y
  limit = (radius * ey) / (np.cos(a) * ey - np.sin(a) * ex)
  return r < limit


def _heart(u, v, size=0.17):
  x, y = _around_integers(u) / size, (v - 0.47) / size
  q = x * x + y * y - 1
  return q * q * q - x * x * y * y * y <= 0


def _zigzag(u, v, stripe):
  tri = np.abs(np.mod(u * 5, 1.0) - 0.5) * 4 - 1  # -1..1 triangle wave
  return np.abs(v - 0.5 - 0.09 * tri) < 0.075


def _wavy(u, v, stripe):
  wave = 0.05 * np.sin(2 * math.pi * 3 * u)
  return (np.abs(v - 0.36 - wave) < 0.05) | (np.abs(v - 0.64 - wave) < 0.05)


def _diamonds(u, v, stripe):
  return np.abs(_cells(u, 3.0)) * 2 + np.abs(v - 0.5) / 0.12 < 0.8


_PATTERNS = {
    "plain": lambda u, v, s: np.zeros(u.shape, bool),
    "striped": lambda u, v, s: np.mod(s * 3.0, 1.0) < 0.5,
    "dotted": lambda u, v, s: _cells(u, 4.0) ** 2 + _cells(v, 4.0) ** 2 < 0.3 ** 2,
    "checkered": lambda u, v, s: (np.floor(u * 4.0) + np.floor(v * 4.0)).astype(np.int32) % 2 == 0,
    "zigzag": _zigzag,
    "star": lambda u, v, s: _star(u, v),
    "heart": lambda u, v, s: _heart(u, v),
    "diamonds": _diamonds,
    "wavy": _wavy,
}
assert set(_PATTERNS) == set(vocab.PATTERNS)

_SPLITS = {
    "top": lambda u, v: v > 0.5,
    "diagonal": lambda u, v: u + v - 0.5 > 0,
    "segments": lambda u, v: np.floor(u * 2.0).astype(np.int32) % 2 == 0,
}
assert set(_SPLITS) == set(vocab.SPLITS)


# ----------------------------------------------------------------------------
# Geometry: one function per class -> (x0, y0, pieces over the crop at x0, y0).
# ----------------------------------------------------------------------------


def _grid(s: int, x0: float, y0: float, x1: float, y1: float):
  """Pixel-centre coordinates (row vector xs, column vector ys) of a clipped box."""
  x0, y0 = max(0, int(math.floor(x0))), max(0, int(math.floor(y0)))
  x1, y1 = min(s, int(math.ceil(x1)) + 1), min(s, int(math.ceil(y1)) + 1)
  xs = np.arange(x0, max(x1, x0 + 1), dtype=np.float32)[None, :] + 0.5
  ys = np.arange(y0, max(y1, y0 + 1), dtype=np.float32)[:, None] + 0.5
  return x0, y0, xs, ys


def _ball(s, cx, gy, h, pose):
  r = h / 2
  cy = gy - r
  x0, y0, xs, ys = _grid(s, cx - r, cy - r, cx + r, cy + r)
  nx, ny = (xs - cx) / r, (cy - ys) / r
  d2 = nx * nx + ny * ny
  nz = np.sqrt(np.maximum(1 - d2, 0))
  # View -> object frame: undo the in-plane spin, then the camera's tilt.
  sp, ph = math.radians(pose.spin), math.radians(pose.tilt)
  ax = nx * math.cos(sp) - ny * math.sin(sp)
  ay = nx * math.sin(sp) + ny * math.cos(sp)
  oy = ay * math.cos(ph) + nz * math.sin(ph)
  oz = -ay * math.sin(ph) + nz * math.cos(ph)
  lon = np.arctan2(ax, oz) + math.radians(pose.yaw)
  u = np.mod(lon / math.pi + 1, 2) - 1  # front hemisphere is -0.5..0.5
  v = np.arcsin(np.clip(oy, -1, 1)) / math.pi + 0.5
  return x0, y0, [Piece(d2 < 1, (nx, ny, nz), u, v, v)]


def _box(s, cx, gy, h, pose):
  e = 0.7 * h
  th, ph = math.radians(pose.yaw), math.radians(pose.tilt)
  sph, cph = math.sin(ph), math.cos(ph)

  def screen(x, y, z):  # a 3-D direction (already turned by yaw) -> screen offset (y down)
    return np.array([x, -(y * cph - z * sph)], np.float32)

  corners = [screen(a * e / 2 * math.cos(th) + b * e / 2 * math.sin(th), y,
                    -a * e / 2 * math.sin(th) + b * e / 2 * math.cos(th))
             for a in (-1, 1) for b in (-1, 1) for y in (0, e)]
  lo, hi = np.min(corners, axis=0), np.max(corners, axis=0)
  x0, y0, xs, ys = _grid(s, cx + lo[0], gy + lo[1], cx + hi[0], gy + hi[1])
  faces = []
  for k in range(4):
    al = th + k * math.pi / 2
    if math.cos(al) <= 1e-3:
      continue  # faces the other way
    d = (math.sin(al), 0.0, math.cos(al))
    t = (math.cos(al), 0.0, -math.sin(al))
    origin = np.array([cx, gy], np.float32) + screen(*d) * (e / 2)
    normal = (math.sin(al), -math.cos(al) * sph, math.cos(al) * cph)
    faces.append((origin, screen(*t) * e, screen(0, 1, 0) * e, normal))
  t1 = (math.cos(th), 0.0, -math.sin(th))
  t2 = (math.sin(th), 0.0, math.cos(th))
  top_origin = np.array([cx, gy], np.float32) + screen(0, e, 0) - screen(*t2) * (e / 2)
  faces.append((top_origin, screen(*t1) * e, screen(*t2) * e, (0.0, cph, sph)))
  pieces = []
  for origin, a, b, normal in faces:  # origin: the middle of the face's first edge
    px, py = xs - origin[0], ys - origin[1]
    det = a[0] * b[1] - a[1] * b[0]
    u = (px * b[1] - py * b[0]) / det  # -0.5..0.5 across the face
    v = (a[0] * py - a[1] * px) / det  # 0..1 up the face
    eps = 0.004  # faces overlap by a hair: no background crack along shared edges
    mask = (np.abs(u) <= 0.5 + eps) & (v >= -eps) & (v <= 1 + eps)
    border = np.minimum(0.5 - np.abs(u), np.minimum(v, 1 - v))
    edge = np.where(border < 0.035, 0.72, 1.0).astype(np.float32)
    n = tuple(np.full(mask.shape, c, np.float32) for c in normal)
    pieces.append(Piece(mask, n, u, v, v, edge=edge, gloss=0.3))
  return x0, y0, pieces


def _cone(s, cx, gy, h, pose):
  radius, height = 0.36 * h, h
  ph = math.radians(pose.tilt)
  sph, cph = math.sin(ph), math.cos(ph)
  x0, y0, xs, ys = _grid(s, cx - radius, gy - height * cph, cx + radius, gy + radius * sph)
  dx = xs - cx
  depth = ys - gy + height * cph  # = s * (height * cph + radius * sph * cos(az)), s = 1 - t
  frac = np.maximum(depth / (height * cph + radius * sph), 1e-4)
  for _ in range(4):  # fixed point for s: the front surface's ellipse term depends on it
    ca = np.sqrt(np.maximum(1 - (dx / (radius * frac)) ** 2, 0))
    frac = np.maximum(depth / (height * cph + radius * sph * ca), 1e-4)
  sa = dx / (radius * frac)
  mask = (depth > 0) & (frac <= 1) & (np.abs(sa) <= 1)
  az = np.arcsin(np.clip(sa, -1, 1))
  ca = np.cos(az)
  slant = math.atan2(radius, height)
  n = (np.sin(az) * math.cos(slant), math.sin(slant) * cph - ca * math.cos(slant) * sph,
       ca * math.cos(slant) * cph + math.sin(slant) * sph)
  u = (az + math.radians(pose.spin)) * frac * radius / height
  v = 1 - frac
  return x0, y0, [Piece(mask, n, u, v, v, gloss=0.6)]


def _ring(s, cx, gy, h, pose):
  outer = h / 2
  tube = 0.13 * h
  centre = outer - tube
  # Turned at most part-way: a ring seen edge-on is a bar, no longer a ring.
  squash = 0.5 + 0.5 * abs(math.cos(math.radians(pose.yaw)))
  cy = gy - outer
  x0, y0, xs, ys = _grid(s, cx - outer * squash, cy - outer, cx + outer * squash, cy + outer)
  px, py = (xs - cx) / squash, cy - ys
  rho = np.maximum(np.hypot(px, py), 1e-3)
  q = (rho - centre) / tube
  mask = np.abs(q) < 1
  theta = np.arctan2(px, py) + math.radians(pose.spin)
  laps = max(1, round(2 * math.pi * centre / h))  # integer pattern repeats: no seam
  u = np.mod(theta / (2 * math.pi) + 0.5, 1.0) * laps
  v = 0.5 + 0.12 * q
  qc = np.clip(q, -1, 1)
  nx, ny, nz = qc * px / rho * squash, qc * py / rho, np.sqrt(1 - qc * qc)
  norm = np.sqrt(nx * nx + ny * ny + nz * nz) + 1e-6
  return x0, y0, [Piece(mask, (nx / norm, ny / norm, nz / norm), u, v, u)]


def _cup(s, cx, gy, h, pose):
  radius, body = 0.34 * h, 0.82 * h
  ph, yaw = math.radians(pose.tilt), math.radians(pose.yaw)
  sph, cph = math.sin(ph), math.cos(ph)
  reach = 0.24 * h
  x0, y0, xs, ys = _grid(s, cx - radius - reach, gy - body * cph - radius * sph,
                         cx + radius + reach, gy + radius * sph)
  dx = xs - cx
  sa = dx / radius
  ca = np.sqrt(np.maximum(1 - sa * sa, 0))
  t = (gy + radius * sph * ca - ys) / (body * cph)
  zeros = np.zeros_like(t)
  body_piece = Piece((np.abs(sa) <= 1) & (t >= 0) & (t <= 1), (sa + zeros, -ca * sph, ca * cph),
                     np.arcsin(np.clip(sa, -1, 1)) * radius / body + zeros, t, t, gloss=0.8)
  oy = gy - body * cph
  ell = (dx / radius) ** 2 + ((ys - oy) / max(radius * sph, 1e-3)) ** 2
  up = (zeros, zeros + cph, zeros + sph)
  rim = Piece((ell < 1) & (ell >= 0.8 ** 2), up, gloss=0.5)
  inside = Piece(ell < 0.8 ** 2, up, interior=True)
  # The handle: a flattened loop at angle `yaw` round the body, seen from its side.
  side = math.sin(yaw)
  hx = cx + (radius + 0.1 * h) * side
  hy = gy - 0.5 * body * cph
  a_out, b_out = 0.12 * h * abs(side) + 0.035 * h, 0.22 * h
  a_in, b_in = max(a_out - 0.065 * h, 0.0), b_out - 0.065 * h
  hdx, hdy = xs - hx, ys - hy
  outer = (hdx / a_out) ** 2 + (hdy / b_out) ** 2 < 1
  hole = (hdx / max(a_in, 1e-3)) ** 2 + (hdy / b_in) ** 2 < 1 if a_in > 0.5 else np.zeros_like(outer)
  hn = np.clip(hdx / a_out, -1, 1)
  handle = Piece(outer & ~hole, (hn * 0.8, zeros + 0.2, np.sqrt(1 - 0.64 * hn * hn)), gloss=0.8)
  behind = math.cos(yaw) < 0
  pieces = [handle, body_piece, rim, inside] if behind else [body_piece, rim, inside, handle]
  return x0, y0, pieces


_GEOMETRY = {"ball": _ball, "box": _box, "cone": _cone, "ring": _ring, "cup": _cup}
assert set(_GEOMETRY) == set(vocab.CLASSES)
# Width of each class's silhouette relative to its height, for placing it in frame.
WIDTH = {"ball": 1.0, "box": 1.05, "cone": 0.75, "ring": 1.0, "cup": 1.2}


# ----------------------------------------------------------------------------
# Drawing.
# ----------------------------------------------------------------------------


def _shadow(canvas: np.ndarray, cx: float, gy: float, width: float, light: float,
            strength: float):
  """A soft dark ellipse on the ground, pushed away from the light."""
  s = canvas.shape[0]
  rx, ry = 0.62 * width, 0.14 * width
  sx = cx - light * 0.18 * width
  x0, y0, xs, ys = _grid(s, sx - rx, gy - ry, sx + rx, gy + ry)
  d = np.sqrt(((xs - sx) / rx) ** 2 + ((ys - gy) / ry) ** 2)
  alpha = np.clip((1 - d) * 2.5, 0, 1) * strength
  crop = canvas[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]]
  crop *= (1 - alpha)[:, :, None]


def draw(canvas: np.ndarray, scene, lighting) -> None:
  """Draws `scene`'s object and its shadow into `canvas` (float32 [S, S, 3], 0..255)."""
  s = canvas.shape[0]
  pose = scene.pose
  h, cx, gy = pose.scale * s, pose.x * s, pose.ground * s
  _shadow(canvas, cx, gy, WIDTH[scene.cls] * h, scene.light, lighting.shadow)
  look = look_of(scene)
  light = np.array([scene.light * 0.9, 0.8, 0.65], np.float32)
  light /= np.linalg.norm(light)
  half = light + np.array([0, 0, 1], np.float32)
  half /= np.linalg.norm(half)
  tint = np.asarray(lighting.tint, np.float32)
  x0, y0, pieces = _GEOMETRY[scene.cls](s, cx, gy, h, pose)
  for p in pieces:
    if not p.mask.any():
      continue
    crop = canvas[y0:y0 + p.mask.shape[0], x0:x0 + p.mask.shape[1]]
    nx, ny, nz = p.normal
    diffuse = np.clip(nx * light[0] + ny * light[1] + nz * light[2], 0, 1)
    shade = 0.42 + 0.66 * diffuse
    if p.interior:
      shade = 0.22 + 0.1 * diffuse
    if p.edge is not None:
      shade = shade * p.edge
    rgb = np.broadcast_to(look.colour, p.mask.shape + (3,))
    if p.u is not None:
      if look.colour2 is not None and look.split:
        rgb = np.where(_SPLITS[look.split](p.u, p.v)[:, :, None], look.colour2, rgb)
      ink = _PATTERNS[look.pattern](p.u, p.v, p.stripe)
      rgb = np.where(ink[:, :, None], look.ink, rgb)
    out = rgb * shade[:, :, None] * tint
    if not p.interior and p.gloss > 0:
      spec = np.clip(nx * half[0] + ny * half[1] + nz * half[2], 0, 1) ** 30
      out = out + (255 * lighting.specular * p.gloss) * spec[:, :, None]
    crop[p.mask] = out[p.mask]
