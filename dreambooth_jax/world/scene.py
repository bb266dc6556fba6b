"""Scenes of the world: what one image shows, how it is sampled, captioned and drawn.

A `Scene` is a complete, hashable description of one image: the object (class,
colour, pattern, size), its pose, the context, the horizon, the light and a
seed for the background's details. `render(scene, size)` is a pure function of
it, so a scene is also the ground truth an evaluator scores a generated image
against (`labels`).

The pretraining distribution (`sample_scene`, `pretraining_examples`) draws one
plain or `PRETRAIN_PATTERNS` object of one colour; two-tone looks and
`SUBJECT_PATTERNS` are reserved for the subjects (subjects.py). Example i of
seed s is drawn from its own Generator seeded by (s, i), so any example can be
regenerated alone (`example_at`): the TFDS builder and several data-loading
processes produce exactly what the plain iterator does.

Images are drawn at 4x and box-downsampled, so edges are anti-aliased as in a
photograph; sizes below 64 px are downsampled from the 64 px drawing, so the
32 px image of a scene is exactly the 64 px one reduced, as a cascade's base
and super-resolution stages expect.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator

import numpy as np
from PIL import Image

from dreambooth_jax.world import backgrounds, instances, objects, vocab

SUPERSAMPLE = 4
MIN_DRAW_SIZE = 64
_SCALE = {"small": (0.22, 0.3), "large": (0.4, 0.52)}


@dataclasses.dataclass(frozen=True)
class Pose:
  """Where the object stands and how it is turned; fractions of the image, angles in degrees."""
  x: float        # horizontal centre (0 = left edge)
  ground: float   # height of the ground contact (0 = top edge)
  scale: float    # object height
  yaw: float      # turn about the vertical axis (box faces, ring width, cup handle)
  tilt: float     # camera elevation: how much of the object's top is seen
  spin: float     # turn of the surface pattern (ball, cone, ring)


@dataclasses.dataclass(frozen=True)
class Scene:
  """One image of the world. `colour2`, `split`, `ink` and `subject` are for subjects only;
  `name` is a named instance's (instances.py), which captions may call it by."""
  cls: str
  colour: str
  pattern: str
  size: str
  context: str
  pose: Pose
  horizon: float
  light: float        # -1 = lit from the left, 1 = from the right
  bg_seed: int
  colour2: str | None = None
  split: str | None = None
  ink: str | None = None
  subject: str | None = None
  name: str | None = None

  @property
  def caption(self) -> str:
    return caption(self)

  @property
  def is_subject_look(self) -> bool:
    """True when the object looks like nothing the pretraining sampler draws."""
    return self.colour2 is not None or self.pattern in vocab.SUBJECT_PATTERNS


# ----------------------------------------------------------------------------
# Sampling.
# ----------------------------------------------------------------------------


def place(rng: np.random.Generator, cls: str, context: str, scale: float,
          horizon: float) -> tuple[float, float]:
  """A ground contact (x, ground) that keeps the object in frame and below the horizon."""
  half = objects.WIDTH[cls] * scale / 2
  x = rng.uniform(half + 0.04, 1 - half - 0.04)
  low = max(horizon + backgrounds.GROUND_GAP[context], scale + 0.06)
  ground = rng.uniform(min(low, 0.9), 0.92)
  return float(x), float(ground)


def random_pose(rng: np.random.Generator, cls: str, context: str, size: str,
                horizon: float, *, scale_range: tuple[float, float] | None = None,
                yaw_range: tuple[float, float] = (0.0, 360.0)) -> Pose:
  """A pose for a `size` object of `cls` in `context`; ranges narrow it (subject photos)."""
  scale = float(rng.uniform(*(scale_range or _SCALE[size])))
  x, ground = place(rng, cls, context, scale, horizon)
  return Pose(x=x, ground=ground, scale=scale, yaw=float(rng.uniform(*yaw_range)),
              tilt=float(rng.uniform(12.0, 34.0)), spin=float(rng.uniform(-35.0, 35.0)))


def sample_scene(rng: np.random.Generator) -> Scene:
  """A scene of the pretraining distribution: one colour, a pretraining pattern, no subject."""
  cls = vocab.CLASSES[rng.integers(len(vocab.CLASSES))]
  colour = vocab.COLOUR_NAMES[rng.integers(len(vocab.COLOUR_NAMES))]
  pattern = vocab.PRETRAIN_PATTERNS[rng.integers(len(vocab.PRETRAIN_PATTERNS))]
  size = vocab.SIZES[rng.integers(len(vocab.SIZES))]
  context = vocab.CONTEXT_NAMES[rng.integers(len(vocab.CONTEXT_NAMES))]
  horizon = float(rng.uniform(*backgrounds.HORIZON[context]))
  pose = random_pose(rng, cls, context, size, horizon)
  return Scene(cls=cls, colour=colour, pattern=pattern, size=size, context=context, pose=pose,
               horizon=horizon, light=float(rng.uniform(-1, 1)),
               bg_seed=int(rng.integers(2**31)))


def example_rng(seed: int, index: int) -> np.random.Generator:
  """The Generator of pretraining example `index` of `seed`."""
  return np.random.default_rng([seed, index])


def _choose(rng: np.random.Generator, shares: dict[str, float]) -> str:
  names = tuple(shares)
  return names[rng.choice(len(names), p=np.asarray(tuple(shares.values())))]


def named_scene(rng: np.random.Generator, inst: instances.Instance, context: str) -> Scene:
  """A scene of the named instance `inst` in `context`, posed afresh."""
  horizon = float(rng.uniform(*backgrounds.HORIZON[context]))
  pose = random_pose(rng, inst.cls, context, inst.size, horizon)
  return Scene(cls=inst.cls, colour=inst.colour, pattern=inst.pattern, size=inst.size,
               context=context, pose=pose, horizon=horizon, light=float(rng.uniform(-1, 1)),
               bg_seed=int(rng.integers(2**31)), name=inst.name)


def scene_at(seed: int, index: int, named: float = 0.0) -> tuple[Scene, str]:
  """Pretraining example `index` of `seed`: its scene and its caption style.

  With probability `named` the example is a named instance (instances.py) in the
  drawn scene's context, captioned by its name. That draw has a Generator of its
  own, so `named=0` gives every example exactly as before names existed.
  """
  rng = example_rng(seed, index)
  scene = sample_scene(rng)
  style = _choose(rng, vocab.CAPTION_STYLES)
  if named > 0:
    own = np.random.default_rng([seed, index, 1])
    if own.random() < named:
      inst = instances.INSTANCES[own.integers(len(instances.INSTANCES))]
      return named_scene(own, inst, scene.context), _choose(own, instances.NAMED_STYLES)
  return scene, style


def example_at(seed: int, index: int, size: int = 64,
               named: float = 0.0) -> tuple[np.ndarray, str, Scene]:
  """(image, caption, scene) of pretraining example `index` of `seed` (`named`: scene_at's)."""
  scene, style = scene_at(seed, index, named)
  return render(scene, size), caption(scene, style), scene


def pretraining_examples(seed: int, size: int = 64, start: int = 0,
                         named: float = 0.0) -> Iterator[tuple[np.ndarray, str, Scene]]:
  """Endless (image uint8 [size, size, 3], caption, scene), deterministic per seed.

  `start` resumes at an example index; example i is `example_at(seed, i, size, named)`.
  """
  for index in itertools.count(start):
    yield example_at(seed, index, size, named)


# ----------------------------------------------------------------------------
# Captions and labels.
# ----------------------------------------------------------------------------


def colour_words(scene: Scene) -> str:
  return scene.colour if scene.colour2 is None else f"{scene.colour} and {scene.colour2}"


def caption(scene: Scene, style: str = "full") -> str:
  """The scene's caption in `style` (see `vocab.CAPTION_STYLES`), e.g. 'a small red ball'."""
  noun = scene.cls
  where = vocab.CONTEXTS[scene.context]
  adjectives = " ".join(w for w in (scene.size, colour_words(scene),
                                    vocab.PATTERN_WORDS[scene.pattern]) if w)
  if style == "full":
    return vocab.with_article(f"{adjectives} {noun} {where}")
  if style == "attributes":
    return vocab.with_article(f"{adjectives} {noun}")
  if style == "context":
    return vocab.with_article(f"{noun} {where}")
  if style == "colour":
    return vocab.with_article(f"{colour_words(scene)} {noun}")
  if style == "class":
    return vocab.with_article(noun)
  if style == "photo":
    return f"a photo of {vocab.with_article(noun)}"
  if style.startswith("name"):
    if scene.name is None:
      raise ValueError(f"caption style {style!r} needs a named instance; this scene has no name")
    named = f"a {scene.name} {noun}"  # always 'a', as DreamBooth's 'a [V] [class noun]'
    return {"name_context": f"{named} {where}", "name": named,
            "name_photo": f"a photo of {named}"}[style]
  raise ValueError(f"unknown caption style {style!r}; known: "
                   f"{sorted(vocab.CAPTION_STYLES) + sorted(instances.NAMED_STYLES)}")


LABEL_NAMES = ("class", "colour", "colour2", "pattern", "size", "context", "subject_look",
               "subject")


def labels(scene: Scene) -> dict[str, int]:
  """Integer ground truth per attribute, ids in the orders of `vocab`.

  colour2 and subject are -1 when absent; subject is the index in
  `subjects.SUBJECT_NAMES`.
  """
  from dreambooth_jax.world import subjects  # subjects builds on this module
  return {
      "class": vocab.CLASSES.index(scene.cls),
      "colour": vocab.COLOUR_NAMES.index(scene.colour),
      "colour2": vocab.COLOUR_NAMES.index(scene.colour2) if scene.colour2 else -1,
      "pattern": vocab.PATTERNS.index(scene.pattern),
      "size": vocab.SIZES.index(scene.size),
      "context": vocab.CONTEXT_NAMES.index(scene.context),
      "subject_look": int(scene.is_subject_look),
      "subject": subjects.SUBJECT_NAMES.index(scene.subject) if scene.subject else -1,
  }


# ----------------------------------------------------------------------------
# Rendering.
# ----------------------------------------------------------------------------


def render_image(scene: Scene, size: int = 64, *, supersample: int = SUPERSAMPLE) -> Image.Image:
  """The scene as a `size` x `size` RGB PIL image (see `render`).

  `supersample=1` draws without anti-aliasing: hard, stair-stepped edges, only
  for comparison (the tests show anti-aliasing by it).
  """
  if size < MIN_DRAW_SIZE:
    return render_image(scene, MIN_DRAW_SIZE, supersample=supersample).resize(
        (size, size), Image.Resampling.BOX)
  s = supersample * size
  canvas, lighting = backgrounds.paint(scene.context, scene.horizon, s,
                                       np.random.default_rng(scene.bg_seed))
  objects.draw(canvas, scene, lighting)
  image = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))
  return image.reduce(supersample) if supersample > 1 else image


def render(scene: Scene, size: int = 64) -> np.ndarray:
  """The scene as uint8 [size, size, 3], anti-aliased (drawn at 4x, box-downsampled)."""
  if size < 1:
    raise ValueError(f"size must be positive, got {size}")
  return np.asarray(render_image(scene, size))
