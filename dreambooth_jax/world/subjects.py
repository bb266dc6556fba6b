"""The subjects: specific objects whose look the pretraining distribution never draws.

Each subject is one object of an ordinary class ("ball", "box", ...) painted in
two colours split across its surface, with a pattern of its own (a zigzag, a
star, a heart, ...): two things `scene.sample_scene` never produces. A model
pretrained on the world knows "ball" but has never seen `zigzag_ball`; it can
only learn it from the subject's photos, which is what DreamBooth claims to do,
so success here is measurable: `scene.labels` says whether a generated image
shows the subject's class, colours and pattern.

The photos are deterministic: photo i of a subject is the same image on every
machine. They show the subject only `on a wooden table` and `on the grass`
(as the DreamBooth dataset's photos are mostly indoors), in varied poses, so
the other contexts (beach, snow, night, city) are held out for
recontextualisation prompts: "a [V] ball in the snow" has never been seen.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
from PIL import Image

from dreambooth_jax.world import backgrounds, scene, vocab

PHOTO_CONTEXTS = ("table", "grass")
HELD_OUT_CONTEXTS = tuple(c for c in vocab.CONTEXT_NAMES if c not in PHOTO_CONTEXTS)
_SEED = 20230317  # photos of the subjects, fixed forever: changing it changes every subject folder


@dataclasses.dataclass(frozen=True)
class Subject:
  """A subject's fixed look. `colour2` covers the part of the surface `split` selects."""
  name: str
  cls: str            # the class noun, as the trainer's config.subject.class_noun
  colour: str
  colour2: str
  split: str
  pattern: str        # one of vocab.SUBJECT_PATTERNS
  ink: str            # the pattern's colour
  description: str

  @property
  def index(self) -> int:
    return SUBJECT_NAMES.index(self.name)

  def prompt(self, identifier: str, context: str | None = None) -> str:
    """'a {identifier} {class}' plus the context's phrase, the DreamBooth prompt shape."""
    where = f" {vocab.CONTEXTS[context]}" if context else ""
    return f"a {identifier} {self.cls}{where}"

  def photo_scene(self, index: int, context: str | None = None) -> scene.Scene:
    """Photo `index` of the subject; `context` overrides the photo's own (for references)."""
    rng = np.random.default_rng([_SEED, self.index, index])
    own = PHOTO_CONTEXTS[index % len(PHOTO_CONTEXTS)]
    context = context or own
    horizon = float(rng.uniform(*backgrounds.HORIZON[context]))
    # Close-ups, as in the DreamBooth photos: large, turned any way, pattern visible.
    pose = scene.random_pose(rng, self.cls, context, "large", horizon, scale_range=(0.42, 0.54),
                             yaw_range=(-70.0, 70.0))
    return scene.Scene(cls=self.cls, colour=self.colour, pattern=self.pattern, size="large",
                       context=context, pose=pose, horizon=horizon,
                       light=float(rng.uniform(-1, 1)), bg_seed=int(rng.integers(2**31)),
                       colour2=self.colour2, split=self.split, ink=self.ink, subject=self.name)


_SUBJECTS = (
    Subject("zigzag_ball", "ball", "yellow", "blue", "top", "zigzag", "white",
            "a ball, blue on top and yellow below, with a white zigzag round its middle"),
    Subject("star_ball", "ball", "green", "pink", "diagonal", "star", "white",
            "a ball split diagonally into green and pink, with a white star on each side"),
    Subject("star_box", "box", "red", "white", "diagonal", "star", "black",
            "a box whose faces are split diagonally into red and white, a black star on each"),
    Subject("heart_cup", "cup", "pink", "green", "top", "heart", "white",
            "a cup, green above and pink below, with a white heart on its front"),
    Subject("diamond_ring", "ring", "orange", "blue", "segments", "diamonds", "white",
            "a ring in alternating orange and blue quarters, with white diamonds round it"),
    Subject("wavy_cone", "cone", "orange", "purple", "top", "wavy", "white",
            "a cone, purple above and orange below, with two white wavy bands"),
)
SUBJECT_NAMES = tuple(s.name for s in _SUBJECTS)


def subjects() -> list[Subject]:
  """Every subject, in `SUBJECT_NAMES` order."""
  return list(_SUBJECTS)


def get(name: str) -> Subject:
  """The subject called `name`; a KeyError lists the known names."""
  for s in _SUBJECTS:
    if s.name == name:
      return s
  raise KeyError(f"unknown subject {name!r}; known: {', '.join(SUBJECT_NAMES)}")


def subject_scenes(name: str, n: int = 5) -> list[scene.Scene]:
  """The scenes of the subject's first `n` photos."""
  subject = get(name)
  return [subject.photo_scene(i) for i in range(n)]


def subject_photos(name: str, size: int = 256, n: int = 5) -> list[np.ndarray]:
  """The subject's first `n` photos as uint8 [size, size, 3]."""
  return [scene.render(s, size) for s in subject_scenes(name, n)]


def write_subject_folder(name: str, folder: str | os.PathLike, size: int = 256,
                         n: int = 5) -> list[Path]:
  """Writes the subject's photos as PNGs (plus a README.md) into `folder`; returns the PNGs.

  The folder is what `config.subject.dir` points at; the trainer's loader
  skips the README. 256 px is the trainer's default minimum photo size.
  """
  subject = get(name)
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for i, photo in enumerate(subject_photos(name, size, n)):
    path = folder / f"{name}_{i:02d}.png"
    Image.fromarray(photo).save(path)
    paths.append(path)
  (folder / "README.md").write_text(
      f"# {name}\n\nA subject of the dreambooth_jax world (dreambooth_jax/world/subjects.py): "
      f"{subject.description}.\n\nClass noun: `{subject.cls}`. {n} photos, {size} px, drawn "
      f"procedurally by `write_subject_folder({name!r}, folder, size={size}, n={n})`; "
      f"no rights reserved.\n", encoding="utf-8")
  return paths
