"""Subject images for DreamBooth training: loading, validation, preparation, batching.

DreamBooth trains on 3-5 photos of one subject, so every photo matters and a
silently dropped or mangled one is a failed run an hour later. This module is
therefore strict: it validates the whole folder up front and reports every bad
file in one `DataError`, so a user fixes everything in one go.

Folder rules of `load_subject_images` (only the folder itself is read, not its
subfolders):

- Skipped silently: hidden names (starting with ".": `.DS_Store`, macOS
  `._IMG_1.jpg` resource forks, `.ipynb_checkpoints`), subfolders, OS clutter
  (`Thumbs.db`, `desktop.ini`), and documentation sidecars whose name before
  the first dot is README, LICENSE/LICENCE, COPYING, NOTICE, ATTRIBUTION,
  CREDITS or AUTHORS with no extension or .md/.txt/.rst (datasets, ours
  included, keep credits next to the photos).
- Decoded: files whose extension is in `exts` (case-insensitive; jpg, jpeg,
  png, webp by default). Each is fully decoded, so a corrupt, truncated or
  renamed non-image file is an error, not a crash mid-training.
- Everything else is an error (`notes.txt`, `captions.json`, `IMG_1.HEIC`):
  skipping it would hide a photo the user believes is in the training set,
  while moving a stray file away costs a second.

Every image is turned to 8-bit RGB: EXIF orientation applied (phones store
portrait photos sideways plus a flag), alpha composited onto white (product
photos with transparent backgrounds are meant to be seen on white; on black a
dark subject vanishes), 16-bit greyscale scaled by 255/65535 (PIL's own
conversion clips at 255, turning most of a 16-bit image white). ICC profiles
are ignored, as in the reference DreamBooth pipelines.

`prepare` crops and resizes once per stage resolution on the host;
`SubjectData.batches` then serves deterministic, resumable, per-host sharded
batches of numpy arrays (no jax here: the trainer places them on devices).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from dreambooth_jax import utils

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
# Below 256 px on the shorter side the SR 64->256 stage (the one the paper calls
# essential) would learn from upscaled, blurred photos.
DEFAULT_MIN_SIZE = 256
_SIDECAR_STEMS = frozenset(
    {"readme", "license", "licence", "copying", "notice", "attribution", "credits", "authors"})
_SIDECAR_EXTS = frozenset({"", ".md", ".txt", ".rst"})
_OS_CLUTTER = frozenset({"thumbs.db", "desktop.ini"})
# Formats PIL may read but we do not accept by default: a targeted hint beats a generic one.
_CONVERT_HINT_EXTS = frozenset(
    {".heic", ".heif", ".avif", ".gif", ".bmp", ".tif", ".tiff", ".jxl", ".raw", ".dng", ".cr2"})
_RESERVED_KEYS = frozenset({"index", "flip"})


class DataError(utils.UserError):
  """A problem with the user's data, with a message that names each file and the fix.

  `problems` holds (path or None, message) pairs, one per bad file.
  """

  def __init__(self, message: str, problems: Sequence[tuple[Path | None, str]] = ()):
    super().__init__(message)
    self.problems = list(problems)


class SubjectImages(NamedTuple):
  """RGB images of a subject and the files they came from, in file-name order."""
  images: list[Image.Image]
  paths: list[Path]


def default_subject_dir() -> Path:
  """The packaged default subject: 5 photos of `dog` from the DreamBooth dataset (256 px).

  See assets/dog/ATTRIBUTION.md for credits and licence.
  """
  return Path(__file__).resolve().parent / "assets" / "dog"


# ----------------------------------------------------------------------------
# Decoding and colour conversion.
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def _strict_truncation():
  """Forces PIL to raise on truncated files while we decode.

  `ImageFile.LOAD_TRUNCATED_IMAGES` is process-global and some libraries set it
  to True, which makes PIL pad a cut-off photo with grey and carry on: the model
  would then learn a grey band as part of the subject.
  """
  previous = ImageFile.LOAD_TRUNCATED_IMAGES
  ImageFile.LOAD_TRUNCATED_IMAGES = False
  try:
    yield
  finally:
    ImageFile.LOAD_TRUNCATED_IMAGES = previous


def to_rgb(image: Image.Image) -> Image.Image:
  """An 8-bit RGB copy of `image` in any PIL mode (see the module docstring for the rules)."""
  mode = image.mode
  if mode == "RGB":
    return image
  if mode in ("I", "F") or mode.startswith("I;16"):
    # 16-bit greyscale (PNG decodes to I;16, older Pillow to I). PIL's convert
    # would clip values above 255; scale the 0..65535 range instead. F is taken
    # to be on PIL's 0..255 scale, the range its L -> F conversion produces.
    a = np.asarray(image).astype(np.float64)
    if mode != "F":
      a = a / 257.0  # 65535 / 255 == 257 exactly
    a8 = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return Image.fromarray(a8).convert("RGB")
  if image.has_transparency_data:  # RGBA, LA, PA, RGBa, P or L with a tRNS colour
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGBX, ...


def _decode(path: Path) -> Image.Image:
  """Fully decodes one file into an upright RGB image; raises on any problem."""
  with Image.open(path) as image:
    image.load()  # decodes every byte: truncation and corrupt data surface here
    image = ImageOps.exif_transpose(image)  # a copy, detached from the file
  return to_rgb(image)


def classify_file(path: Path, exts: Sequence[str] = IMAGE_EXTS) -> str:
  """'skip', 'image' or 'bad' for one folder entry, by the folder rules above.

  `exts` are lower-case with the dot. Shared with `evaluation.benchmark`, so a
  benchmark subject folder follows the same rules as a training folder.
  """
  name = path.name
  if name.startswith(".") or name.lower() in _OS_CLUTTER:
    return "skip"
  if path.is_dir():
    return "skip"
  if path.suffix.lower() in exts:
    return "image"
  stem, dot, rest = name.partition(".")
  if stem.lower() in _SIDECAR_STEMS and (("." + rest.lower()) if dot else "") in _SIDECAR_EXTS:
    return "skip"
  return "bad"


def _not_an_image_message(path: Path, exts: tuple[str, ...]) -> str:
  suffix = path.suffix.lower()
  accepted = ", ".join(exts)
  if suffix in _CONVERT_HINT_EXTS:
    return (f"{suffix} files are not accepted (accepted: {accepted}). Export it as JPEG or PNG "
            f"(your photo app's export, or PIL: Image.open(f).convert('RGB').save('x.png'); "
            f"HEIC needs the pillow-heif plugin), then remove the original, or pass exts= "
            f"including {suffix} if your PIL reads it.")
  return (f"is not an image file (accepted extensions: {accepted}). Move it out of the "
          f"subject folder; only README/LICENSE/ATTRIBUTION/CREDITS-style notes may stay.")


def _decode_error_message(e: Exception) -> str:
  if isinstance(e, UnidentifiedImageError):
    return ("is not an image PIL can read, despite its extension (a web page saved as .jpg? a "
            "format without its PIL plugin?). Replace it with a real JPEG/PNG/WebP, or remove it.")
  if "truncated" in str(e).lower():
    return (f"is truncated (PIL: {e}): the download or copy was probably cut short. Download or "
            f"copy it again, or remove it.")
  return (f"could not be decoded ({type(e).__name__}: {e}). Re-export it from an image editor "
          f"(open it in an image viewer to check), or remove it.")


def load_subject_images(folder: str | os.PathLike, *, min_size: int = DEFAULT_MIN_SIZE,
                        exts: Sequence[str] = IMAGE_EXTS) -> SubjectImages:
  """Reads, validates and converts every image of a subject folder.

  Args:
    folder: the folder holding the subject photos (not searched recursively).
    min_size: smallest accepted shorter side in pixels; 0 accepts any size.
    exts: accepted extensions, compared case-insensitively.

  Returns:
    `SubjectImages(images, paths)`: upright 8-bit RGB PIL images, sorted by name.

  Raises:
    DataError: the folder is missing or has no images, or any file is bad
      (unreadable, corrupt, truncated, not an image, too small). All bad files
      are listed in one message.
  """
  folder = Path(folder).expanduser()
  exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in exts)
  if not folder.is_dir():
    what = "is a file, not a folder" if folder.exists() else "does not exist"
    raise DataError(
        f"Subject folder '{folder}' {what}. Pass the folder that holds the 3-5 photos of your "
        f"subject ({', '.join(exts)} files), or use data.default_subject_dir() for the packaged "
        f"example dog.", [(folder, what)])

  problems: list[tuple[Path | None, str]] = []
  images, paths = [], []
  for path in sorted(folder.iterdir(), key=lambda p: p.name):
    kind = classify_file(path, exts)
    if kind == "skip":
      continue
    if not path.exists():
      problems.append((path, "is a broken link. Point it at an existing image or delete it."))
      continue
    if kind == "bad":
      problems.append((path, _not_an_image_message(path, exts)))
      continue
    try:
      with _strict_truncation():
        image = _decode(path)
    except Exception as e:  # noqa: BLE001 - PIL raises many types; all mean "bad file"
      problems.append((path, _decode_error_message(e)))
      continue
    if min(image.size) < min_size:
      problems.append((path, f"is {image.size[0]}x{image.size[1]} px; its shorter side is below "
                             f"min_size={min_size}. Use a larger original (upscaled photos teach "
                             f"the model blur), or pass a smaller min_size if you know better."))
      continue
    images.append(image)
    paths.append(path)

  if problems:
    lines = [f"  - {p.name if p is not None else folder}: {msg}" for p, msg in problems]
    raise DataError(
        f"Subject folder '{folder}' has {len(problems)} bad file(s); fix them all and run "
        f"again:\n" + "\n".join(lines), problems)
  if not images:
    subdirs = [p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    hint = (f" Subfolders are not searched; found: {', '.join(sorted(subdirs))}." if subdirs
            else "")
    raise DataError(
        f"Subject folder '{folder}' contains no images ({', '.join(exts)}). Put 3-5 photos of "
        f"your subject in it, in varied poses and backgrounds.{hint}", [(folder, "no images")])
  return SubjectImages(images, paths)


# ----------------------------------------------------------------------------
# Preparation: crop, resize, value ranges.
# ----------------------------------------------------------------------------


def prepare(images: Sequence[Image.Image], resolution: int, *,
            center_crop: bool = True) -> np.ndarray:
  """Squares and resizes images to uint8 [N, resolution, resolution, 3].

  center_crop=True crops the largest centred square (integer offsets, floor)
  and keeps proportions; False squashes the whole image to a square, which
  distorts non-square photos and is only sensible when nothing may be cut off.

  The resize is PIL's LANCZOS, which widens its kernel when downscaling
  (antialiasing). The 64 px base stage sees a 10x reduction of a phone photo;
  an unfiltered resize (e.g. jax.image.resize without antialias, or nearest)
  aliases fur and fabric into moire that the model then learns as texture.
  """
  if resolution <= 0:
    raise ValueError(f"resolution must be positive, got {resolution}")
  out = np.empty((len(images), resolution, resolution, 3), np.uint8)
  for i, image in enumerate(images):
    image = to_rgb(image)
    w, h = image.size
    if center_crop:
      # Crop first: resize(box=...) would let the filter read pixels outside the
      # square, so the crop's edges would differ from the documented semantics.
      s = min(w, h)
      left, top = (w - s) // 2, (h - s) // 2
      image = image.crop((left, top, left + s, top + s))
    out[i] = np.asarray(image.resize((resolution, resolution), Image.LANCZOS))
  return out


def to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 0..255 -> float32 -1..1, the pixel range of IF / Imagen."""
  return np.asarray(images, np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(images) -> np.ndarray:
  """float -1..1 -> uint8 0..255, rounded and clipped (samples overshoot slightly)."""
  a = (np.asarray(images, np.float32) + 1.0) * 127.5
  return np.clip(np.rint(a), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------
# Deterministic, resumable, per-host batching.
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _epoch_order(seed: int, epoch: int, n: int, flip_prob: float) -> tuple[np.ndarray, np.ndarray]:
  """The shuffled order and flip decisions of one epoch; a pure function of its args."""
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(n)
  flips = rng.random(n) < flip_prob
  order.flags.writeable = flips.flags.writeable = False  # cached: must not be mutated
  return order, flips


def batch_indices(seed: int, step: int, batch_size: int, num_examples: int,
                  flip_prob: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
  """Example indices and flip flags of the global batch at `step`.

  Training walks an endless stream of epochs, each a fresh permutation drawn
  from (seed, epoch); step k takes stream positions [k*B, (k+1)*B). So every
  example is seen equally often, and the batch at step k depends only on
  (seed, k, B): a run resumed at step k sees exactly the data an uninterrupted
  run would, with no iterator state to checkpoint.

  Returns (indices int64 [B], flips bool [B]).
  """
  if seed < 0 or step < 0 or batch_size <= 0 or num_examples <= 0:
    raise ValueError(f"need seed >= 0, step >= 0, batch_size > 0, num_examples > 0; got "
                     f"{seed}, {step}, {batch_size}, {num_examples}")
  positions = step * batch_size + np.arange(batch_size, dtype=np.int64)
  epochs, offsets = np.divmod(positions, num_examples)
  indices = np.empty(batch_size, np.int64)
  flips = np.empty(batch_size, bool)
  for epoch in np.unique(epochs):
    order, epoch_flips = _epoch_order(seed, int(epoch), num_examples, float(flip_prob))
    sel = epochs == epoch
    indices[sel] = order[offsets[sel]]
    flips[sel] = epoch_flips[offsets[sel]]
  return indices, flips


def host_slice(batch_size: int, process_index: int, process_count: int) -> slice:
  """This host's contiguous share of a global batch, in process order.

  Contiguous blocks in process order are what `jax.make_array_from_process_local_data`
  expects for a batch axis sharded over a mesh whose devices are ordered by process.
  """
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, "
                     f"{process_count}")
  if batch_size % process_count:
    raise ValueError(f"global batch size {batch_size} is not divisible by the "
                     f"{process_count} hosts; choose a multiple of {process_count}")
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


@dataclasses.dataclass(frozen=True)
class SubjectData:
  """Subject images prepared once per stage resolution, and batches of them.

  `images[stage]` is uint8 [N, r, r, 3] in host memory. A batch holds the same
  examples, flipped the same way, at every stage: a super-resolution stage's
  low-res conditioning must be the downscaled version of its own target.
  """
  images: Mapping[str, np.ndarray]
  paths: tuple[Path, ...] = ()

  @classmethod
  def from_images(cls, images: Sequence[Image.Image], resolutions: Mapping[str, int], *,
                  paths: Sequence[Path] = (), center_crop: bool = True) -> "SubjectData":
    """Prepares `images` at each stage resolution, e.g. {"base": 64, "sr256": 256}."""
    if not images:
      raise DataError("no subject images given", [(None, "no images")])
    if not resolutions:
      raise ValueError("resolutions is empty: name at least one stage, e.g. {'base': 64}")
    if paths and len(paths) != len(images):
      raise ValueError(f"got {len(paths)} paths for {len(images)} images")
    reserved = _RESERVED_KEYS & set(resolutions)
    if reserved:
      raise ValueError(f"stage names {sorted(reserved)} are reserved for batch metadata")
    prepared = {}
    for stage, res in resolutions.items():
      prepared[stage] = prepare(images, int(res), center_crop=center_crop)
      prepared[stage].flags.writeable = False  # shared by every batch: guard against edits
    return cls(prepared, tuple(Path(p) for p in paths))

  @classmethod
  def from_folder(cls, folder: str | os.PathLike, resolutions: Mapping[str, int], *,
                  min_size: int | None = None, center_crop: bool = True) -> "SubjectData":
    """Loads and prepares a subject folder (see `load_subject_images` for the file rules).

    min_size defaults to the largest stage resolution, but at most 256: smaller
    photos would be visibly upscaled; a 1024 stage mildly upscaling ordinary
    ~800 px photos is fine (the DreamBooth dataset itself is 615-2048 px).
    """
    if min_size is None:
      min_size = min(max(resolutions.values(), default=0), DEFAULT_MIN_SIZE)
    loaded = load_subject_images(folder, min_size=min_size)
    return cls.from_images(loaded.images, resolutions, paths=loaded.paths,
                           center_crop=center_crop)

  def __len__(self) -> int:
    return len(next(iter(self.images.values())))

  @property
  def resolutions(self) -> dict[str, int]:
    return {stage: a.shape[1] for stage, a in self.images.items()}

  def batch(self, seed: int, step: int, batch_size: int, *, flip: bool = False,
            process_index: int = 0, process_count: int = 1,
            as_float: bool = True) -> dict[str, np.ndarray]:
    """The batch at `step`: this host's slice of the global batch of `batch_size`.

    Returns {stage: [b, r, r, 3], "index": int32 [b], "flip": bool [b]} with
    b = batch_size / process_count; images are float32 in -1..1 (as_float) or
    uint8. Random horizontal flips (p = 0.5) are off by default: they mirror
    text and logos on the subject (a can, a backpack), and the DreamBooth paper
    mentions no augmentation.
    """
    indices, flips = batch_indices(seed, step, batch_size, len(self), 0.5 if flip else 0.0)
    local = host_slice(batch_size, process_index, process_count)
    indices, flips = indices[local], flips[local]
    out: dict[str, np.ndarray] = {}
    for stage, array in self.images.items():
      x = array[indices]
      x[flips] = x[flips, :, ::-1]
      out[stage] = to_model_range(x) if as_float else x
    out["index"] = indices.astype(np.int32)
    out["flip"] = flips
    return out

  def batches(self, seed: int, batch_size: int, start_step: int = 0, *,
              num_steps: int | None = None, **kwargs) -> Iterator[dict[str, np.ndarray]]:
    """Batches for steps start_step, start_step + 1, ... (endless unless num_steps).

    To resume a run at step k, pass start_step=k: the batches equal those an
    uninterrupted run would have seen from step k on. On several hosts, all pass
    the same seed and batch_size and their own process_index. kwargs go to `batch`.
    """
    step = start_step
    while num_steps is None or step < start_step + num_steps:
      yield self.batch(seed, step, batch_size, **kwargs)
      step += 1
