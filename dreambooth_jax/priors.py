"""Class-prior preservation images: sampled once from the frozen cascade, cached on disk.

DreamBooth's prior-preservation term (eq. 2) trains on ~1000 images of the
class prompt ("a dog") that the *frozen* model generated with its ancestral
sampler. For an Imagen-style cascade the images are needed at every tuned
stage's resolution and must be one generation: the 256 px SR target of image i
is the upscaling of the 64 px base image i. So the cascade runs up to the
highest tuned stage and every stage's output is stored (with stage III, the x4
upscaler, tuned: up to 1024 px, the class prompt's text handed to its CLIP):

    out_dir/manifest.json
    out_dir/base/00000.png  out_dir/base/00001.png ...
    out_dir/sr256/00000.png ...

Generation is deterministic and resumable. Images are made in batches of
`spec.batch_size`; batch k is `cascade.sample(rng=fold_in(key(seed), k))`, and
image i is slot i % B of batch i // B. After each batch its PNGs are written
(temporary name, then `os.replace`) and then the manifest, atomically the same
way, so a run killed at any point leaves a consistent cache and a restart
regenerates exactly the missing batches, which come out as an uninterrupted run
would have made them.

What a cache is valid for: everything in `PriorSpec` except `num_images` (the
prompt, the caller's weights fingerprint, the stages, each stage's sampler
settings, the seed and the batch size; the batch size is part of it because
the noise of a batch is drawn for the whole batch, so another size gives other
images). A manifest whose spec differs in any of these, or that cannot be read,
makes `generate_priors` move the whole folder aside to `<out_dir>.stale-<time>`
(logged as a warning; delete it once sure) and start over: moved, not deleted,
because a wrong fingerprint function must not silently cost hours of sampling.
`num_images` may change freely: image i does not depend on N, so asking for
more keeps what exists and adds the rest, asking for fewer uses a prefix.

Every stored PNG's sha256 is in the manifest. A missing, truncated or edited
file (or a manifest entry without a file) is found by hashing on every start
and only the batches holding such images are generated again.

Multi-host: every process must call `generate_priors` with the same arguments,
because sampling a batch sharded over the mesh is a collective. Process 0
decides which batches are missing (broadcast to the others), and only process 0
writes; `ensure_priors` waits at a barrier and then every process reads the
files, so `out_dir` must be on storage all hosts see (like the checkpoint
workdir, which orbax needs shared anyway).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import time
import uuid
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image
from tqdm import tqdm

from dreambooth_jax import utils
from dreambooth_jax.cascade import Cascade, StageSettings
from dreambooth_jax.samplers import SAMPLERS

__all__ = ["PriorSpec", "StageSampling", "GenerationReport", "PriorsError", "generate_priors",
           "load_priors", "ensure_priors", "MANIFEST"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "dreambooth_jax.class_priors.v1"
RNG_RULE = ("batch k: jax.random.fold_in(jax.random.key(seed), k), passed to Cascade.sample "
            "(stage i then uses fold_in(batch key, i)); image index = k * batch_size + slot")

# Keys of a per-stage settings mapping that only matter for training: accepted (a
# config's whole stage section can be passed) and dropped from the spec, so
# changing them does not invalidate the cache.
_IGNORED_KEYS = frozenset(f.name for f in dataclasses.fields(StageSettings)) - {
    "resolution", "guidance_scale", "num_steps", "sampler", "eta", "sample_aug_level",
    "colour_fix"}


class PriorsError(ValueError):
  """A prior cache that cannot serve the request (incomplete, corrupt, other spec)."""


@dataclasses.dataclass(frozen=True)
class StageSampling:
  """How one stage sampled its class images.

  aug_level: the noise-conditioning augmentation of an SR stage's low-res input
    (fraction of the 0..1000 scale, IF: 0.25); None for the base stage.
  resolution: optional; when given it is checked against the cascade.
  colour_fix: an SR stage kept its input's colours (`cascade.keep_lowres_colours`).
  """
  num_steps: int
  guidance_scale: float
  sampler: str = "ddpm"
  eta: float = 0.0
  aug_level: float | None = None
  resolution: int | None = None
  colour_fix: bool = False

  @classmethod
  def from_mapping(cls, name: str, m: Mapping[str, Any], *, is_base: bool) -> "StageSampling":
    """From our field names or a `StageSettings`-style dict (`sample_aug_level`, training keys)."""
    m = dict(m)
    unknown = set(m) - {f.name for f in dataclasses.fields(cls)} - {"sample_aug_level"} - _IGNORED_KEYS
    if unknown:
      raise ValueError(f"prior sampler settings of stage {name!r}: unknown keys {sorted(unknown)}")
    for key in ("num_steps", "guidance_scale"):
      if m.get(key) is None:
        raise ValueError(f"prior sampler settings of stage {name!r} need {key!r}")
    aug = m.get("aug_level", m.get("sample_aug_level"))
    if is_base:
      aug = None  # the base stage has no low-res input; a config may still carry the key
    elif aug is None:
      raise ValueError(f"prior sampler settings of SR stage {name!r} need 'aug_level' "
                       "(or 'sample_aug_level')")
    res = m.get("resolution")
    out = cls(num_steps=int(m["num_steps"]), guidance_scale=float(m["guidance_scale"]),
              sampler=str(m.get("sampler") or "ddpm"), eta=float(m.get("eta") or 0.0),
              aug_level=None if aug is None else float(aug),
              resolution=None if res is None else int(res),
              colour_fix=bool(m.get("colour_fix", False)) and not is_base)
    if out.sampler not in SAMPLERS:
      raise ValueError(f"stage {name!r}: sampler {out.sampler!r}; use 'ddpm' (ancestral), 'ddim' "
                       "or 'dpmpp_2m' (DPM-Solver++(2M))")
    if out.num_steps <= 0:
      raise ValueError(f"stage {name!r}: num_steps must be positive, got {out.num_steps}")
    return out


def _sampling_dict(s: StageSampling) -> dict:
  """What a manifest stores of a stage's sampling: `colour_fix` only when on, so the caches
  written before it existed (all off) keep matching."""
  d = dataclasses.asdict(s)
  if not d["colour_fix"]:
    del d["colour_fix"]
  return d


@dataclasses.dataclass(frozen=True)
class PriorSpec:
  """Everything that determines the class-prior images.

  prompt: the class prompt, e.g. "a dog" (its embeddings are passed separately).
  num_images: N.
  stages: names of the cascade's first stages, base first, up to the highest
    tuned one; each one's output is stored.
  sampler: stage name -> sampler settings (`StageSampling`, or a mapping of its
    fields; a config's stage section with `sample_aug_level` also works).
    Entries for stages not in `stages` are ignored.
  seed, batch_size: batch k samples with fold_in(key(seed), k), B images at once.
  fingerprint: the caller's name for the frozen cascade weights + text encoder.
  """
  prompt: str
  num_images: int
  stages: tuple[str, ...]
  sampler: Any
  fingerprint: str
  seed: int = 0
  batch_size: int = 8

  def __post_init__(self):
    stages = (self.stages,) if isinstance(self.stages, str) else tuple(self.stages)
    if not stages or len(set(stages)) != len(stages):
      raise ValueError(f"PriorSpec.stages must name distinct stages, got {self.stages!r}")
    missing = [s for s in stages if s not in self.sampler]
    if missing:
      raise ValueError(f"PriorSpec.sampler has no settings for stages {missing}")
    sampling = tuple(
        (s, v if isinstance(v, StageSampling) else StageSampling.from_mapping(s, v, is_base=i == 0))
        for i, s in enumerate(stages) for v in [self.sampler[s]])
    if self.num_images <= 0 or self.batch_size <= 0 or self.seed < 0:
      raise ValueError(f"PriorSpec needs num_images > 0, batch_size > 0, seed >= 0; got "
                       f"{self.num_images}, {self.batch_size}, {self.seed}")
    if not isinstance(self.fingerprint, str) or not self.fingerprint:
      raise ValueError("PriorSpec.fingerprint must be a non-empty string naming the frozen weights")
    # Canonical, hashable forms; the frozen dataclass needs object.__setattr__ to store them.
    object.__setattr__(self, "stages", stages)
    object.__setattr__(self, "sampler", sampling)
    object.__setattr__(self, "num_images", int(self.num_images))
    object.__setattr__(self, "batch_size", int(self.batch_size))
    object.__setattr__(self, "seed", int(self.seed))

  @classmethod
  def from_cascade(cls, cascade: Cascade, prompt: str, num_images: int, *, upto: str,
                   fingerprint: str, seed: int = 0, batch_size: int = 8,
                   **overrides: Mapping[str, Any]) -> "PriorSpec":
    """The spec of `cascade` run up to stage `upto` with each stage's own settings.

    overrides: per-stage dicts by setting, e.g. num_steps={"base": 50}.
    """
    names = [s.name for s in cascade.stages]
    if upto not in names:
      raise ValueError(f"upto={upto!r} is not a stage of the cascade {names}")
    sampler = {}
    for stage in cascade.stages[:names.index(upto) + 1]:
      s = stage.settings
      d = dict(num_steps=s.num_steps, guidance_scale=s.guidance_scale, sampler=s.sampler, eta=s.eta,
               aug_level=s.sample_aug_level if stage.is_sr else None, resolution=s.resolution,
               colour_fix=s.colour_fix and stage.is_sr)
      for key, per_stage in overrides.items():
        if stage.name in per_stage:
          d[key] = per_stage[stage.name]
      sampler[stage.name] = d
    return cls(prompt=prompt, num_images=num_images, stages=tuple(sampler), sampler=sampler,
               fingerprint=fingerprint, seed=seed, batch_size=batch_size)

  @property
  def num_batches(self) -> int:
    return -(-self.num_images // self.batch_size)

  def stage_sampling(self, name: str) -> StageSampling:
    return dict(self.sampler)[name]

  def to_dict(self) -> dict:
    """JSON-able: what the manifest stores."""
    return dict(prompt=self.prompt, num_images=self.num_images, stages=list(self.stages),
                sampler={n: _sampling_dict(s) for n, s in self.sampler},
                fingerprint=self.fingerprint, seed=self.seed, batch_size=self.batch_size)

  def cache_key(self) -> dict:
    """The part a cache must match: all but num_images (image i does not depend on N)."""
    d = json.loads(json.dumps(self.to_dict()))  # the form a manifest reads back as
    del d["num_images"]
    return d


@dataclasses.dataclass(frozen=True)
class GenerationReport:
  """What `generate_priors` did: the batches it sampled, images it kept, a folder moved aside."""
  generated_batches: tuple[int, ...]
  reused_images: int
  moved_aside: str | None = None


# ---------------------------------------------------------------------------------------------
# Manifest and file checks
# ---------------------------------------------------------------------------------------------


def _name(index: int) -> str:
  return f"{index:05d}"


def _read_manifest(out_dir) -> dict | None:
  """The manifest, None when absent; raises PriorsError when present but unreadable."""
  path = out_dir / MANIFEST
  if not path.exists():
    return None
  try:
    manifest = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise PriorsError(f"{path} cannot be read ({type(e).__name__}: {e})") from e
  if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT
      or not isinstance(manifest.get("images"), dict) or not isinstance(manifest.get("spec"), dict)):
    raise PriorsError(f"{path} is not a {FORMAT} manifest")
  return manifest


def _write_manifest(out_dir, manifest: dict):
  utils.write_json(out_dir / MANIFEST, manifest, indent=1, sort_keys=True, ensure_ascii=False)


def _changed_keys(manifest: dict, spec: PriorSpec) -> list[str]:
  """Names of the spec fields (but num_images) that differ from the manifest's."""
  old = {k: v for k, v in manifest["spec"].items() if k != "num_images"}
  new = spec.cache_key()
  return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _file_ok(out_dir, entry: Any, stage: str, index: int) -> bool:
  """The stored PNG exists and its bytes hash to the manifest's sha256."""
  try:
    record = entry["files"][stage]
    raw = (out_dir / stage / (_name(index) + ".png")).read_bytes()
    return hashlib.sha256(raw).hexdigest() == record["sha256"]
  except (OSError, KeyError, TypeError):
    return False


def _valid_indices(out_dir, manifest: dict, spec: PriorSpec) -> set[int]:
  """Indices < N whose every stage file matches the manifest (hashes checked)."""
  ok = set()
  for index in range(spec.num_images):
    entry = manifest["images"].get(_name(index))
    if (isinstance(entry, dict) and entry.get("batch") == index // spec.batch_size
        and all(_file_ok(out_dir, entry, s, index) for s in spec.stages)):
      ok.add(index)
  return ok


def _digest(tree: Mapping[str, Any] | None) -> str | None:
  """sha256 of a conditioning pytree's values (recorded, to tell runs apart in a manifest)."""
  if tree is None:
    return None
  h = hashlib.sha256()
  for key in sorted(tree):
    a = np.asarray(tree[key])
    h.update(f"\0{key}\0{a.shape}\0{a.dtype}\0".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def _encode_png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image, "RGB").save(buf, format="PNG")
  return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def _check_against_cascade(cascade: Cascade, spec: PriorSpec) -> dict[str, int]:
  """Stage name -> resolution; raises when the spec cannot be sampled with this cascade."""
  names = [s.name for s in cascade.stages]
  if list(spec.stages) != names[:len(spec.stages)]:
    raise ValueError(f"PriorSpec.stages {list(spec.stages)} must be the cascade's first stages, "
                     f"in order ({names}): each SR stage upsamples the previous one's output")
  resolutions = {}
  for name, want in spec.sampler:
    stage = cascade.by_name[name]
    s = stage.settings
    # Cascade.sample can override steps, guidance and aug level, not the sampler itself.
    if (want.sampler, want.eta) != (s.sampler, s.eta):
      raise ValueError(f"stage {name!r}: the spec asks for sampler {want.sampler!r} (eta {want.eta}) "
                       f"but the stage is built with {s.sampler!r} (eta {s.eta}); build the stage "
                       f"with the sampler the priors should use")
    if want.resolution is not None and want.resolution != s.resolution:
      raise ValueError(f"stage {name!r}: the spec says {want.resolution} px, the stage makes "
                       f"{s.resolution} px")
    if stage.is_sr and want.aug_level is None:
      raise ValueError(f"SR stage {name!r} needs an aug_level in the spec")
    resolutions[name] = s.resolution
  return resolutions


def _move_aside(out_dir, why: str) -> str:
  stale = out_dir.parent / f"{out_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
  out_dir.rename(stale)
  log.warning("class priors in %s %s: moved the folder aside to %s and regenerating (delete it "
              "once you are sure it is not needed)", out_dir, why, stale)
  return str(stale)


def _single_row(tree: Mapping[str, Any] | None, what: str) -> dict | None:
  """One prompt's {"text": [1, L, D], "mask": [1, L]} (host numpy, as recorded)."""
  if tree is None:
    return None
  out = {k: np.asarray(v) for k, v in tree.items()}
  if out["text"].ndim == 2:
    out = {k: v[None] for k, v in out.items()}
  if out["text"].shape[0] != 1:
    raise ValueError(f"{what}: pass one prompt's embeddings ([1, L, D]); got {out['text'].shape}")
  return out


def generate_priors(cascade: Cascade, spec: PriorSpec, cond: Mapping[str, Any],
                    uncond: Mapping[str, Any] | None, out_dir: str, *, mesh=None,
                    progress: bool = True, process_index: int | None = None,
                    process_count: int | None = None,
                    max_batches: int | None = None) -> GenerationReport:
  """Samples whatever of `spec`'s images `out_dir` lacks; see the module docstring.

  cond / uncond: {"text": [1, L, D], "mask": [1, L]} of the class prompt and of
    "" (classifier-free guidance; None samples unguided, only with guidance 1).
  mesh: the batch is sharded over its data axes (`Cascade.sample(mesh=...)`).
  process_index / process_count: default to jax's; only process 0 writes.
  max_batches: stop after sampling this many batches (tests simulate a crash).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  lead = process_index == 0
  resolutions = _check_against_cascade(cascade, spec)
  cond, uncond = _single_row(cond, "cond"), _single_row(uncond, "uncond")
  if uncond is None and any(s.guidance_scale != 1.0 for _, s in spec.sampler):
    raise ValueError("guidance_scale != 1 needs the unconditional (\"\") embeddings as uncond")
  out_dir = utils.absolute(out_dir)  # local or remote (a gs:// workdir)
  conditioning = {"cond": _digest(cond), "uncond": _digest(uncond)}

  # -- process 0 decides what exists; the others follow (sampling is a collective) ---------
  moved, manifest, valid = None, None, set()
  if lead:
    try:
      manifest = _read_manifest(out_dir)
      changed = _changed_keys(manifest, spec) if manifest is not None else []
      why = f"were made for another spec (changed: {', '.join(changed)})" if changed else None
    except PriorsError as e:
      why, manifest = f"have an unusable manifest ({e})", None
    if why is not None:
      moved, manifest = _move_aside(out_dir, why), None
    elif manifest is not None:
      if manifest.get("conditioning") != conditioning:
        log.warning("class priors in %s: the prompt embeddings differ from those recorded; the "
                    "fingerprint is trusted and the images are kept", out_dir)
      valid = _valid_indices(out_dir, manifest, spec)
    for stage in spec.stages:
      (out_dir / stage).mkdir(parents=True, exist_ok=True)
  todo = np.zeros(spec.num_batches, np.int32)
  for k in range(spec.num_batches):
    todo[k] = any(i not in valid for i in range(k * spec.batch_size,
                                                 min((k + 1) * spec.batch_size, spec.num_images)))
  if process_count > 1 and jax.process_count() > 1:
    todo = np.asarray(multihost_utils.broadcast_one_to_all(todo))
  batches = [int(k) for k in np.flatnonzero(todo)]
  if lead:
    manifest = manifest or {"images": {}}
    manifest.update(format=FORMAT, spec=spec.to_dict(), rng=RNG_RULE, resolutions=resolutions,
                    conditioning=conditioning)
    if valid:
      log.info("class priors in %s: %d of %d images cached, %d batches to sample", out_dir,
               len(valid), spec.num_images, len(batches))

  # -- sample the missing batches, writing each before the next ------------------------------
  if max_batches is not None:
    batches = batches[:max_batches]
  batch_len = lambda k: min((k + 1) * spec.batch_size, spec.num_images) - k * spec.batch_size
  done = spec.num_images - sum(batch_len(k) for k in np.flatnonzero(todo))
  bar = tqdm(total=spec.num_images, initial=done, unit="img", dynamic_ncols=True,
             desc=f"class priors {spec.prompt!r}", disable=not (progress and lead))
  num_steps = {n: s.num_steps for n, s in spec.sampler}
  guidance = {n: s.guidance_scale for n, s in spec.sampler}
  aug = {n: s.aug_level for n, s in spec.sampler if s.aug_level is not None}
  colour_fix = {n: s.colour_fix for n, s in spec.sampler}  # False for the base stage
  key = jax.random.key(spec.seed)
  # A stage with a text encoder of its own (the x4 upscaler as stage III, its CLIP) reads the
  # class prompt as text; IF's stages keep the T5 embeddings given.
  own = any(getattr(cascade.by_name[s], "own_text_encoder", False) for s in spec.stages)
  texts = {"prompts": spec.prompt} if own else {}
  try:
    for k in batches:
      images = cascade.sample(cond, jax.random.fold_in(key, k), uncond_embeddings=uncond,
                              batch_size=spec.batch_size, upto=spec.stages[-1],
                              guidance_scale=guidance, num_steps=num_steps, aug_level=aug, mesh=mesh,
                              colour_fix=colour_fix, **texts)
      first, last = k * spec.batch_size, min((k + 1) * spec.batch_size, spec.num_images)
      if lead:
        for i in range(first, last):
          files = {}
          for stage in spec.stages:
            png = _encode_png(np.asarray(images[stage][i - first]))
            utils.write_bytes(out_dir / stage / (_name(i) + ".png"), png)
            files[stage] = {"path": f"{stage}/{_name(i)}.png",
                            "sha256": hashlib.sha256(png).hexdigest()}
          manifest["images"][_name(i)] = {"seed": spec.seed, "batch": k, "slot": i - first,
                                          "files": files}
        _write_manifest(out_dir, manifest)  # after the PNGs: it only ever lists written files
      bar.update(last - first)
  finally:
    bar.close()
  if lead and not batches:
    _write_manifest(out_dir, manifest)  # records the current num_images and conditioning
  return GenerationReport(tuple(batches), len(valid), moved)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_priors(out_dir: str, spec: PriorSpec) -> dict[str, np.ndarray]:
  """Stage name -> uint8 [N, r, r, 3], every file checked against the manifest.

  Raises PriorsError naming the problems when the cache is for another spec,
  incomplete or corrupt; `generate_priors` / `ensure_priors` repair it.
  """
  out_dir = utils.absolute(out_dir)
  fix = "run priors.ensure_priors (or generate_priors) with this spec to complete or repair it"
  manifest = _read_manifest(out_dir)
  if manifest is None:
    raise PriorsError(f"no class priors in {out_dir} ({MANIFEST} missing); {fix}")
  changed = _changed_keys(manifest, spec)
  if changed:
    raise PriorsError(f"the class priors in {out_dir} were made for another spec (changed: "
                      f"{', '.join(changed)}); {fix}")
  resolutions = manifest.get("resolutions") or {}
  out, problems = {}, []
  for stage in spec.stages:
    r = resolutions.get(stage)
    if not isinstance(r, int):
      raise PriorsError(f"{out_dir}/{MANIFEST} has no resolution for stage {stage!r}; {fix}")
    out[stage] = np.empty((spec.num_images, r, r, 3), np.uint8)
  for index in range(spec.num_images):
    entry = manifest["images"].get(_name(index))
    for stage in spec.stages:
      rel = f"{stage}/{_name(index)}.png"
      try:
        raw = (out_dir / rel).read_bytes()
        if hashlib.sha256(raw).hexdigest() != entry["files"][stage]["sha256"]:
          problems.append(f"{rel}: sha256 differs from the manifest")
          continue
        with Image.open(io.BytesIO(raw)) as image:
          a = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
      except (TypeError, KeyError):
        problems.append(f"{rel}: not in the manifest")
        continue
      except OSError as e:  # missing or undecodable (PIL raises OSError subclasses)
        problems.append(f"{rel}: {type(e).__name__}: {e}")
        continue
      if a.shape != out[stage].shape[1:]:
        problems.append(f"{rel}: {a.shape}, expected {out[stage].shape[1:]}")
        continue
      out[stage][index] = a
  if problems:
    shown = "\n".join(f"  - {p}" for p in problems[:10])
    more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    raise PriorsError(f"class priors in {out_dir}: {len(problems)} of "
                      f"{spec.num_images * len(spec.stages)} files missing or corrupt; {fix}:\n"
                      f"{shown}{more}")
  return out


def ensure_priors(cascade: Cascade, spec: PriorSpec, cond: Mapping[str, Any],
                  uncond: Mapping[str, Any] | None, out_dir: str, **kwargs) -> dict[str, np.ndarray]:
  """Generates what is missing (`generate_priors`, same kwargs), then `load_priors`.

  On several hosts every process gets all N images (read from the shared out_dir
  after a barrier, so no process reads before process 0 has written).
  """
  if kwargs.get("max_batches") is not None:
    raise ValueError("ensure_priors generates everything; use generate_priors for max_batches")
  generate_priors(cascade, spec, cond, uncond, out_dir, **kwargs)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"dreambooth_jax.priors:{utils.absolute(out_dir)}")
  return load_priors(out_dir, spec)
