"""Small helpers every part of the library shares, in the spirit of big_vision's utils.py.

* Paths. A workdir may be local or remote (`gs://bucket/run` on a TPU VM, whose
  own disk cannot hold 30 GB checkpoints). Every workdir path goes through
  etils' `epath` (the path layer orbax uses too), never `os.path`: `abspath`
  would turn `gs://bucket/run` into a local folder `gs:/bucket/run`.
  `workdir()` checks at once that the scheme's filesystem backend is installed
  (gcsfs, s3fs, or TensorFlow's gfile for gs://) and can list the path, so a
  missing backend is a one-paragraph error before any expensive work.
* Atomic writes. A reader (a resumed run, another host, a user) never sees half
  a file: locally the bytes go to a unique temporary name that is then renamed
  over the target; object stores commit an object only when its upload
  completes, so there the target is written directly.
* The CLI wrapper: user errors end as one paragraph on stderr and exit code 2.
* The training progress bar (`StepProgress`), shared by every loop over steps.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import uuid
from typing import Any, Callable, Mapping

from etils import epath

PathLike = str | os.PathLike


class UserError(ValueError):
  """Base of the errors a user fixes (bad images, config keys, weights folders, paths...):
  the CLIs print their message as one paragraph and exit with code 2, no traceback."""


class PathError(UserError):
  """A path that cannot be used as given; the message says why and how to fix it."""


def is_remote(path: PathLike) -> bool:
  """True for URIs such as gs://bucket/run or s3://bucket/run."""
  return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
  """`path` as an epath.Path; an unknown URI scheme is a PathError, not a KeyError."""
  if isinstance(path, epath.Path):
    return path
  try:
    return epath.Path(path)
  except KeyError:
    scheme = os.fspath(path).split("://", 1)[0]
    raise PathError(f"{os.fspath(path)!r}: the scheme {scheme}:// is not known to etils.epath "
                    "(it knows gs://, s3://, az://, hf:// and local paths)") from None


def absolute(path: PathLike) -> epath.Path:
  """A local path made absolute; a remote URI as it is (`resolve` would make a local
  path of it)."""
  p = as_path(path)
  return p if is_remote(p) else as_path(os.path.abspath(os.fspath(p)))


def workdir(path: PathLike, *, create: bool = True) -> epath.Path:
  """A run's workdir, checked (and created) before anything expensive.

  Remote schemes need their filesystem backend installed; without it epath fails at
  the first file operation, possibly after minutes of model loading. Checking here
  turns that into an immediate, explained error.
  """
  p = as_path(path)
  try:
    exists = p.exists()
    if create and not exists:
      p.mkdir(parents=True, exist_ok=True)
  except (ImportError, ModuleNotFoundError) as e:
    scheme = os.fspath(path).split("://", 1)[0]
    package = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}.get(scheme, "fsspec")
    raise PathError(
        f"--workdir={os.fspath(path)}: writing to {scheme}:// needs its filesystem backend, which "
        f"is not installed ({e}). Install it (`pip install {package}`; for gs:// TensorFlow's gfile "
        "also works) or use a local --workdir.") from e
  except OSError as e:
    raise PathError(f"--workdir={os.fspath(path)}: cannot use it ({e}); check the path and its "
                    "permissions or credentials.") from e
  return absolute(p)


def fingerprint(obj: Any) -> str:
  """Short stable hash of a JSON-able object (a config dict, cache keys), for metadata."""
  blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` atomically (see the module docstring)."""
  p = as_path(path)
  if is_remote(p):
    p.write_bytes(data)
    return
  p.parent.mkdir(parents=True, exist_ok=True)  # as on object stores, where there are no folders
  tmp = f"{os.fspath(p)}.{os.getpid()}.{uuid.uuid4().hex}.tmp"  # unique: hosts may race
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, os.fspath(p))


def write_text(path: PathLike, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any, **kw) -> None:
  kw.setdefault("indent", 2)
  write_text(path, json.dumps(obj, **kw))


def read_json(path: PathLike) -> Any:
  return json.loads(as_path(path).read_text())


def write_png(path: PathLike, image) -> None:
  """An HxWx3 uint8 array (or a PIL image) as a PNG, atomically."""
  from PIL import Image  # deferred: only image writers need PIL
  img = image if isinstance(image, Image.Image) else Image.fromarray(image)
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  write_bytes(path, buf.getvalue())


class StepProgress:
  """tqdm bar over optimiser steps showing loss, steps/s and ETA (tqdm computes both)."""

  def __init__(self, start: int, total: int, *, disable: bool = False):
    from tqdm import tqdm  # deferred: only loops over steps need it
    self._bar = tqdm(total=total, initial=start, disable=disable, unit="step", dynamic_ncols=True,
                     desc="train")

  def update(self, metrics: Mapping[str, float]):
    self._bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", refresh=False)
    self._bar.update(1)

  def close(self):
    self._bar.close()


def default_cache_dir() -> str:
  """Where compiled programs are kept between runs: $XDG_CACHE_HOME (or ~/.cache) /
  dreambooth_jax/jax."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "dreambooth_jax", "jax")


def compilation_cache(setting: str = "") -> str | None:
  """Turns on JAX's persistent compilation cache; returns its folder (None when off).

  A second run of the same job then loads its programs instead of compiling them
  (XLA compilation dominates short runs). `setting`: "" keeps a folder already set
  (JAX_COMPILATION_CACHE_DIR, or earlier in this process), else the user's cache
  folder (`default_cache_dir`); "off" switches the cache off; anything else is the
  folder (local or remote, e.g. gs://bucket/jax_cache shared by a pod's hosts).
  """
  import jax  # deferred: utils is imported by modules that need no jax
  if setting == "off":
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  folder = setting or jax.config.jax_compilation_cache_dir or default_cache_dir()
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", folder)
  return folder


def run_cli(main: Callable[[list[str]], Any], argv: list[str]) -> None:
  """Runs a CLI's `main`; a user error is one paragraph on stderr and exit code 2.

  Orbax logs every save and restore at INFO; unless -v/--verbosity is given, only
  warnings reach the console.
  """
  from absl import flags, logging  # deferred: the library itself does not need absl
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    main(argv)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
