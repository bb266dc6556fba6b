"""A small classifier of the world's attributes and contexts: what the world protocol scores with.

The benchmark scores subject fidelity with DINO and CLIP, which know nothing of
a zigzag ball and cannot be loaded on a CPU test machine anyway. The world
comes with exact labels (`scene.labels`), so a classifier trained on it can say
what a generated image shows: which class, colours, pattern, size, context, and
whether it is one of the subjects. `WorldEvaluator` is that classifier, trained
by experiments/train_world_evaluator.py and shipped in
`assets/world_evaluator.safetensors` (`WorldEvaluator.load()` with no path).

Architecture (440k parameters, 1.8 MB): a stride-2 3x3 conv stem and three
blocks that each halve the resolution (64 -> 32 -> 16 -> 8 -> 4 px), every conv
followed by GroupNorm and GELU; mean and max pooling; one shared feature vector
(`features`, what the protocol's diversity compares) and one linear head per
label of `scene.LABEL_NAMES`. Absent attributes are a value of their own: colour2 and
subject have a final "none", subject_look is no/yes.

Input: uint8 [N, H, W, 3] with 32 <= H, W <= 256, resized to 64 x 64 inside
the jitted forward pass by `jax.image.resize(..., "linear", antialias=True)`
(bilinear up, triangle-filtered down). The base stage's 32 px samples are thus
seen bilinearly upsampled, as a super-resolution stage sees them; the
classifier was trained on exactly that view for half its batches.

The file is a safetensors file whose metadata holds one JSON document: the
architecture, the label vocabularies in head order (the evaluator's own copy,
so a changed `vocab` cannot silently reorder a trained head), the input size
and resize method, and the test accuracy measured when it was trained.

`labelled_scene(seed, index)` is the evaluator's data distribution, shared by
the training script and the tests: world pretraining scenes, the subjects in
every context and in any pose, and decoys (subject looks with one thing
changed) that teach the subject head to require the whole look.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreambooth_jax.models.layers import Conv, Dense, GroupNorm, KeyGen, random_init
from dreambooth_jax.weights.safetensors_io import SafetensorsFile, WeightsError, save_file
from dreambooth_jax.world import scene as scene_lib
from dreambooth_jax.world import subjects, vocab

DEFAULT_PATH = pathlib.Path(__file__).resolve().parents[1] / "assets" / "world_evaluator.safetensors"
METADATA_KEY = "dreambooth_jax.world_evaluator"
FORMAT_VERSION = 1
INPUT_SIZE = 64
RESIZE = "jax.image.resize linear antialias"
MIN_SIZE, MAX_SIZE = 32, 256
NONE = "none"

# Head order and each head's values, in label-id order.
LABEL_VALUES: dict[str, tuple[str, ...]] = {
    "class": vocab.CLASSES,
    "colour": vocab.COLOUR_NAMES,
    "colour2": vocab.COLOUR_NAMES + (NONE,),
    "pattern": vocab.PATTERNS,
    "size": vocab.SIZES,
    "context": vocab.CONTEXT_NAMES,
    "subject_look": ("no", "yes"),
    "subject": subjects.SUBJECT_NAMES + (NONE,),
}
assert tuple(LABEL_VALUES) == scene_lib.LABEL_NAMES


@dataclasses.dataclass(frozen=True)
class EvaluatorConfig:
  """The classifier's shape; stored in the file, so a load rebuilds what was saved."""
  stem: int = 32                       # stride-2 stem: 64 -> 32 px
  widths: tuple[int, ...] = (48, 96, 128)  # one halving block each: 32 -> 16 -> 8 -> 4 px
  features: int = 128
  groups: int = 8
  input_size: int = INPUT_SIZE


# ----------------------------------------------------------------------------
# The network.
# ----------------------------------------------------------------------------


def _gelu(x):
  return jax.nn.gelu(x, approximate=True)  # the tanh form: no erf on XLA:CPU


class ConvBlock(nnx.Module):
  """Halves the resolution: strided conv, then a conv at the new size, each GroupNorm + GELU."""

  def __init__(self, cin: int, cout: int, groups: int, rngs):
    self.down = Conv(cin, cout, 3, stride=2, rngs=rngs)
    self.norm1 = GroupNorm(groups, cout, rngs=rngs)
    self.conv = Conv(cout, cout, 3, rngs=rngs)
    self.norm2 = GroupNorm(groups, cout, rngs=rngs)

  def __call__(self, x):
    x = _gelu(self.norm1(self.down(x)))
    return x + _gelu(self.norm2(self.conv(x)))  # residual: the second conv refines the first


class WorldClassifier(nnx.Module):
  """64 px RGB in [-1, 1] -> (features [N, D], {label: logits [N, K]})."""

  def __init__(self, cfg: EvaluatorConfig, label_values: Mapping[str, tuple[str, ...]],
               rngs=None):
    self.cfg = cfg
    # A stride-2 stem (a 3x3 conv sees 27 values and keeps 32 channels, so nothing is lost
    # at 64 px) costs a quarter of a full-resolution one; measured 1.0 -> ~0.2 s per step.
    self.stem = Conv(3, cfg.stem, 3, stride=2, rngs=rngs)
    self.stem_norm = GroupNorm(cfg.groups, cfg.stem, rngs=rngs)
    w = (cfg.stem,) + tuple(cfg.widths)
    self.blocks = nnx.List([ConvBlock(a, b, cfg.groups, rngs) for a, b in zip(w, w[1:])])
    self.project = Dense(2 * w[-1], cfg.features, axes=("embed", "mlp"), rngs=rngs)
    self.heads = nnx.Dict({name: Dense(cfg.features, len(values), axes=("mlp", "vocab"),
                                       rngs=rngs)
                           for name, values in label_values.items()})

  def __call__(self, x):
    x = _gelu(self.stem_norm(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    # Mean and max pooling: a small object is a few cells of the 4x4 map, which a mean
    # alone dilutes with background (class accuracy after 600 steps: 0.69 mean, 0.81 both).
    feats = _gelu(self.project(jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], -1)))
    return feats, {name: head(feats) for name, head in self.heads.items()}


def preprocess(images, size: int = INPUT_SIZE) -> jax.Array:
  """uint8 [N, H, W, 3] -> float32 [N, size, size, 3] in [-1, 1] (the fixed resize; jit-able)."""
  x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, 3), "linear", antialias=True)
  return x


def check_images(images) -> np.ndarray:
  """`images` as uint8 [N, H, W, 3] (one [H, W, 3] image becomes N = 1), sizes checked."""
  x = np.asarray(images)
  if x.ndim == 3:
    x = x[None]
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"expected uint8 images [N, H, W, 3], got shape {x.shape}")
  if x.dtype != np.uint8:
    raise ValueError(f"expected uint8 images, got {x.dtype}")
  if not (MIN_SIZE <= x.shape[1] <= MAX_SIZE and MIN_SIZE <= x.shape[2] <= MAX_SIZE):
    raise ValueError(f"images of {x.shape[1]}x{x.shape[2]} px: the world evaluator takes "
                     f"{MIN_SIZE} to {MAX_SIZE} px")
  return x


# ----------------------------------------------------------------------------
# The evaluator: a classifier with its vocabularies, saved and loaded as one file.
# ----------------------------------------------------------------------------


class WorldEvaluator:
  """A trained `WorldClassifier` plus what its heads mean; `predict` and `features` on images."""

  def __init__(self, model: WorldClassifier, label_values: Mapping[str, tuple[str, ...]],
               info: Mapping | None = None, *, batch: int = 64):
    self.model = model
    self.label_values = {k: tuple(v) for k, v in label_values.items()}
    self.info = dict(info or {})
    self.batch = batch
    graphdef, state = nnx.split(model)
    self._state = state
    size = model.cfg.input_size
    self._forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(preprocess(x, size)))

  @classmethod
  def create(cls, seed: int = 0, cfg: EvaluatorConfig = EvaluatorConfig()) -> "WorldEvaluator":
    """A randomly initialised evaluator over the current `vocab` (for training)."""
    abstract = nnx.eval_shape(lambda: WorldClassifier(cfg, LABEL_VALUES, KeyGen(seed)))
    return cls(random_init(abstract, seed), LABEL_VALUES)

  def index(self, label: str, value: str) -> int:
    """The id of `value` in head `label` (e.g. index("subject", "zigzag_ball"))."""
    return self.label_values[label].index(value)

  def targets(self, s: scene_lib.Scene) -> dict[str, int]:
    """A scene's ground truth as ids of this evaluator's heads."""
    names = {"class": s.cls, "colour": s.colour, "colour2": s.colour2 or NONE,
             "pattern": s.pattern, "size": s.size, "context": s.context,
             "subject_look": "yes" if s.is_subject_look else "no", "subject": s.subject or NONE}
    return {k: self.index(k, names[k]) for k in self.label_values}

  def _run(self, images) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    x = check_images(images)
    feats, logits = [], {k: [] for k in self.label_values}
    for start in range(0, len(x), self.batch):
      chunk = x[start:start + self.batch]
      n = len(chunk)
      if n < self.batch:  # one compiled shape per image size, whatever N is
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - n, axis=0)])
      f, out = self._forward(self._state, chunk)
      feats.append(np.asarray(f)[:n])
      for k in logits:
        logits[k].append(np.asarray(out[k])[:n])
    return np.concatenate(feats), {k: np.concatenate(v) for k, v in logits.items()}

  def predict(self, images) -> dict[str, np.ndarray]:
    """{label: probabilities [N, K]} in `label_values` order, of uint8 images (32-256 px)."""
    return self.predict_and_features(images)[0]

  def features(self, images) -> np.ndarray:
    """The shared feature vectors [N, D] (float64) that every head reads."""
    return self.predict_and_features(images)[1]

  def predict_and_features(self, images) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(predict(images), features(images)) from one forward pass."""
    feats, logits = self._run(images)
    probs = {k: np.asarray(jax.nn.softmax(v.astype(np.float64), axis=-1)) for k, v in logits.items()}
    return probs, feats.astype(np.float64)

  # -- the file ---------------------------------------------------------------------------

  def save(self, path=DEFAULT_PATH) -> None:
    """Writes the weights (float32) and the JSON metadata into one safetensors file."""
    tensors = {".".join(map(str, p)): np.asarray(v.get_value(), np.float32)
               for p, v in nnx.to_flat_state(nnx.state(self.model, nnx.Param))}
    meta = dict(format_version=FORMAT_VERSION, config=dataclasses.asdict(self.model.cfg),
                label_values=self.label_values, input_size=self.model.cfg.input_size,
                resize=RESIZE, input_sizes=[MIN_SIZE, MAX_SIZE], **self.info)
    save_file(tensors, path, metadata={METADATA_KEY: json.dumps(meta)})

  @classmethod
  def load(cls, path=None, *, batch: int = 64) -> "WorldEvaluator":
    """The evaluator in `path` (default: the packaged `DEFAULT_PATH`)."""
    path = pathlib.Path(path or DEFAULT_PATH)
    if not path.is_file():
      raise WeightsError(f"no world evaluator at {path}: train one with "
                         f"python experiments/train_world_evaluator.py --out={path}")
    f = SafetensorsFile(str(path)).check()
    if METADATA_KEY not in f.metadata:
      raise WeightsError(f"{path} is a safetensors file but not a world evaluator (no "
                         f"{METADATA_KEY!r} metadata)")
    meta = json.loads(f.metadata[METADATA_KEY])
    if meta.get("format_version") != FORMAT_VERSION:
      raise WeightsError(f"{path}: world evaluator format {meta.get('format_version')}, this "
                         f"library reads {FORMAT_VERSION}; retrain it")
    c = meta["config"]
    cfg = EvaluatorConfig(stem=c["stem"], widths=tuple(c["widths"]), features=c["features"],
                          groups=c["groups"], input_size=c["input_size"])
    label_values = {k: tuple(v) for k, v in meta["label_values"].items()}
    model = nnx.eval_shape(lambda: WorldClassifier(cfg, label_values))
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    names = {".".join(map(str, p)) for p, _ in flat}
    if names != set(f):
      raise WeightsError(f"{path}: tensors do not match the stored architecture (missing "
                         f"{sorted(names - set(f))[:3]}, unexpected {sorted(set(f) - names)[:3]})")
    for p, var in flat:
      value = np.asarray(f[".".join(map(str, p))])
      if value.shape != var.get_value().shape:
        raise WeightsError(f"{path}: tensor {'.'.join(map(str, p))} has shape {value.shape}, "
                           f"expected {var.get_value().shape}")
      var.set_value(jnp.asarray(value))
    info = {k: v for k, v in meta.items()
            if k not in ("format_version", "config", "label_values", "input_size", "resize",
                         "input_sizes")}
    return cls(nnx.merge(graphdef, state), label_values, info, batch=batch)


# ----------------------------------------------------------------------------
# The data it learns from and is tested on.
# ----------------------------------------------------------------------------

# Shares of the mixture: world pretraining scenes (no subject), subjects, decoys.
MIX = {"pretraining": 0.5, "subject": 0.35, "decoy": 0.15}
# Subject photo indices used by labelled_scene(seed, i): seed * SEED_STRIDE + i. The subjects'
# own photos (and the protocol's real row) use small indices, seed 0's range: never use seed 0.
SEED_STRIDE = 10_000_000


def subject_scene(name: str, index: int, context: str, rng: np.random.Generator,
                  any_pose: bool) -> scene_lib.Scene:
  """The subject in `context`: photo `index`'s close-up pose, or (`any_pose`) a pose as
  pretraining draws them, small or large, turned any way, so it is recognised anywhere."""
  s = subjects.get(name).photo_scene(index, context=context)
  if not any_pose:
    return s
  size = vocab.SIZES[rng.integers(len(vocab.SIZES))]
  pose = scene_lib.random_pose(rng, s.cls, context, size, s.horizon)
  return dataclasses.replace(s, pose=pose, size=size)


def _pick(rng: np.random.Generator, options, exclude=()) -> str:
  options = [o for o in options if o not in exclude]
  return str(options[rng.integers(len(options))])


def decoy(rng: np.random.Generator, s: scene_lib.Scene) -> scene_lib.Scene:
  """A subject's scene with one thing of its look changed: another class, colour, split,
  pattern or ink, or the two colours swapped. Not the subject (unless the change happens to
  make another subject's exact look)."""
  change = int(rng.integers(6))
  if change == 0:
    cls = _pick(rng, vocab.CLASSES, (s.cls,))  # a new pose: the old one fitted the old width
    s = dataclasses.replace(s, cls=cls, pose=scene_lib.random_pose(rng, cls, s.context, s.size,
                                                                   s.horizon))
  elif change == 1:
    which = "colour" if rng.integers(2) else "colour2"
    s = dataclasses.replace(s, **{which: _pick(rng, vocab.COLOUR_NAMES, (s.colour, s.colour2))})
  elif change == 2:
    s = dataclasses.replace(s, colour=s.colour2, colour2=s.colour)
  elif change == 3:
    s = dataclasses.replace(s, split=_pick(rng, vocab.SPLITS, (s.split,)))
  elif change == 4:
    s = dataclasses.replace(s, pattern=_pick(rng, vocab.PATTERNS, (s.pattern,)))
  else:  # an ink that still shows on both colours, so the pattern label stays true
    s = dataclasses.replace(s, ink=_pick(rng, vocab.INKS, (s.ink, s.colour, s.colour2)))
  look = (s.cls, s.colour, s.colour2, s.split, s.pattern, s.ink)
  match = [x.name for x in subjects.subjects()
           if (x.cls, x.colour, x.colour2, x.split, x.pattern, x.ink) == look]
  return dataclasses.replace(s, subject=match[0] if match else None)


def labelled_scene(seed: int, index: int) -> tuple[scene_lib.Scene, str]:
  """(scene, kind) of example `index` of `seed` in the evaluator's distribution (`MIX`).

  pretraining: `scene.scene_at(seed, index)`. subject: a uniformly drawn subject in a
  uniformly drawn context (all six, the photos' two included), its photo pose or any pose.
  decoy: a subject scene with one attribute changed (`decoy`).
  """
  if seed == 0:
    raise ValueError("seed 0 would reuse the subjects' own photo indices; use seed >= 1")
  rng = np.random.default_rng([seed, index, 7])
  kind = rng.choice(tuple(MIX), p=tuple(MIX.values()))
  if kind == "pretraining":
    return scene_lib.scene_at(seed, index)[0], str(kind)
  name = subjects.SUBJECT_NAMES[rng.integers(len(subjects.SUBJECT_NAMES))]
  context = vocab.CONTEXT_NAMES[rng.integers(len(vocab.CONTEXT_NAMES))]
  s = subject_scene(name, seed * SEED_STRIDE + index, context, rng, any_pose=rng.random() < 0.35)
  return (decoy(rng, s), "decoy") if kind == "decoy" else (s, "subject")


def render_both(s: scene_lib.Scene) -> tuple[np.ndarray, np.ndarray]:
  """(64 px, 32 px) uint8 images of a scene; the 32 px one is the 64 px one box-reduced,
  exactly `scene.render(s, 32)`, at the cost of one drawing."""
  from PIL import Image
  image = scene_lib.render_image(s, 64)
  return np.asarray(image), np.asarray(image.resize((32, 32), Image.Resampling.BOX))


def accuracy(evaluator: WorldEvaluator, images: np.ndarray,
             targets: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Top-1 accuracy per head of `evaluator` on `images` against integer `targets`."""
  probs = evaluator.predict(images)
  return {k: float(np.mean(probs[k].argmax(-1) == np.asarray(targets[k]))) for k in probs}
