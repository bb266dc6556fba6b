"""The DreamBooth evaluation metrics: DINO, CLIP-I, CLIP-T, PRES and DIV.

The arithmetic (numpy, float64, on embeddings already computed) is kept apart
from the encoders so it can be checked on hand-made vectors:

- DINO / CLIP-I: mean cosine over every (generated, real) pair of DINO ViT-S/16
  CLS embeddings / CLIP ViT-B/32 image embeddings (`mean_pairwise_cosine`).
- the real-images row: the same over real vs real, distinct pairs only; a
  photo compared with itself would add cosines of 1 and inflate the bound
  (`mean_distinct_pair_cosine`).
- CLIP-T: cosine of each image with the CLIP text embedding of *its* prompt
  (`paired_cosine`); which text the prompt is (we drop the identifier) is the
  caller's choice, see `dreambooth_jax.evaluation.protocol`.
- PRES: `mean_pairwise_cosine` of DINO embeddings of "a [class noun]"
  generations vs the real subject photos (lower: less prior collapse).
- DIV: mean LPIPS over distinct pairs of images of the same prompt, then the
  mean over prompts (`diversity`).

`Encoders` holds the three networks (DINO, CLIP with its tokenizer, LPIPS) and
turns uint8 images and prompt strings into those embeddings and distances.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreambooth_jax.evaluation import preprocess
from dreambooth_jax.weights import WeightsError

# The upstream folders the protocol uses; named in the errors that say what to download.
DINO_REPO = "facebook/dino-vits16"
CLIP_REPO = "openai/clip-vit-base-patch32"

# ----------------------------------------------------------------------------
# Arithmetic on embeddings.
# ----------------------------------------------------------------------------


def l2_normalize(x) -> np.ndarray:
  """Rows of `x` [N, D] scaled to unit length (float64)."""
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f"expected embeddings [N, D], got shape {x.shape}")
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  if np.any(norm == 0):
    raise ValueError("an embedding has zero norm; its cosine is undefined")
  return x / norm


def cosine_matrix(a, b) -> np.ndarray:
  """[A, B] cosines between the rows of `a` [A, D] and `b` [B, D]."""
  return l2_normalize(a) @ l2_normalize(b).T


def distinct_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
  """Index arrays (i, j), i < j: the n (n - 1) / 2 unordered pairs of n items."""
  return np.triu_indices(n, k=1)


def mean_pairwise_cosine(generated, real) -> float:
  """DINO / CLIP-I / PRES: mean cosine over all len(generated) x len(real) pairs."""
  return float(cosine_matrix(generated, real).mean())


def mean_distinct_pair_cosine(x) -> float:
  """The real-images row: mean cosine over distinct pairs of `x` (no image with itself)."""
  n = len(x)
  if n < 2:
    raise ValueError(f"real vs real needs at least 2 images, got {n}")
  i, j = distinct_pairs(n)
  return float(cosine_matrix(x, x)[i, j].mean())


def paired_cosine(a, b) -> np.ndarray:
  """Row-wise cosines [N] of `a` [N, D] and `b` [N, D] (CLIP-T: image i vs its prompt)."""
  a, b = l2_normalize(a), l2_normalize(b)
  if a.shape != b.shape:
    raise ValueError(f"paired cosine needs equal shapes, got {a.shape} and {b.shape}")
  return np.sum(a * b, axis=-1)


def clip_t(image_emb, text_emb, prompt_of_image: Sequence[int]) -> np.ndarray:
  """Per-image CLIP-T [N]: image i against `text_emb[prompt_of_image[i]]`."""
  return paired_cosine(image_emb, np.asarray(text_emb)[np.asarray(prompt_of_image)])


def mean_pairwise_distance(distance: Callable[[np.ndarray, np.ndarray], np.ndarray],
                           items: np.ndarray) -> tuple[float, int]:
  """(mean of `distance(items[i], items[j])` over i < j, number of pairs)."""
  n = len(items)
  if n < 2:
    raise ValueError(f"a pairwise distance needs at least 2 images, got {n}")
  i, j = distinct_pairs(n)
  d = np.asarray(distance(items[i], items[j]), np.float64).reshape(-1)
  if d.shape[0] != len(i):
    raise ValueError(f"distance returned {d.shape[0]} values for {len(i)} pairs")
  return float(d.mean()), len(i)


def diversity(distance: Callable[[np.ndarray, np.ndarray], np.ndarray],
              groups: Sequence[np.ndarray]) -> tuple[float, list[float], int]:
  """DIV: (mean over groups of the within-group mean pair distance, per-group means, pairs).

  Each group is the images of one subject and prompt; images are never paired
  across prompts, which would measure prompt variety rather than sample diversity.
  """
  per_group, pairs = [], 0
  for g in groups:
    mean, n = mean_pairwise_distance(distance, g)
    per_group.append(mean)
    pairs += n
  if not per_group:
    raise ValueError("DIV needs at least one group of images")
  return float(np.mean(per_group)), per_group, pairs


# ----------------------------------------------------------------------------
# The encoders.
# ----------------------------------------------------------------------------


def _has_safetensors(folder: str) -> bool:
  return any(os.path.isfile(os.path.join(folder, n))
             for n in ("model.safetensors", "model.safetensors.index.json"))


def check_encoder_paths(dino: str | None, clip: str | None, lpips: str | None, *,
                        need_lpips: bool = True) -> None:
  """Fails before any generation when an encoder folder or the LPIPS file is missing
  (an unset `lpips` passes when not `need_lpips`: DIV is then not scored).

  Every problem is listed in one WeightsError naming the flag, the path and what to put there.
  """
  problems = []
  for flag, folder, repo in (("dino", dino, DINO_REPO), ("clip", clip, CLIP_REPO)):
    if not folder:
      problems.append(f"--{flag} is not set: pass the folder of a local {repo} download")
    elif not (os.path.isfile(os.path.join(str(folder), "config.json"))
              and _has_safetensors(str(folder))):
      problems.append(f"--{flag}={folder} has no config.json + model.safetensors: download "
                      f"{repo} there (huggingface-cli download {repo} config.json "
                      f"model.safetensors{' vocab.json merges.txt' if flag == 'clip' else ''} "
                      f"--local-dir {folder})")
  if clip and os.path.isdir(str(clip)):
    lacking = [n for n in ("vocab.json", "merges.txt") if not os.path.isfile(os.path.join(clip, n))]
    if lacking:
      problems.append(f"--clip={clip} lacks the tokenizer files {' + '.join(lacking)} that "
                      f"CLIP-T needs: download them from {CLIP_REPO} into that folder")
  convert = ("python experiments/convert_lpips.py --net=alex --out=FILE, once, where torch and "
             "the lpips package are installed")
  if not lpips and need_lpips:
    problems.append(f"--lpips is not set: pass the LPIPS safetensors file ({convert})")
  elif lpips and not os.path.isfile(str(lpips)):
    problems.append(f"--lpips={lpips} is not a file: create it with "
                    f"{convert.replace('FILE', str(lpips))}")
  if problems:
    raise WeightsError("evaluation encoders missing:\n  - " + "\n  - ".join(problems))


def _padded_batches(x: np.ndarray, batch: int):
  """(chunk padded to `batch` rows, number of real rows): one compiled shape for any N."""
  for start in range(0, len(x), batch):
    chunk = x[start:start + batch]
    n = len(chunk)
    if n < batch:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
    yield chunk, n


def _pure(model: nnx.Module, method: str):
  """A jitted pure function of `model.method`: split once, no graph walks per call."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, *a: getattr(nnx.merge(graphdef, s), method)(*a).astype(jnp.float32))
  return lambda *a: fn(state, *a)


class Encoders:
  """DINO, CLIP (+ tokenizer) and LPIPS: uint8 images and prompts -> the metrics' inputs.
  `lpips` may be None (`has_lpips` False): then DIV cannot be scored."""

  def __init__(self, dino: nnx.Module, clip: nnx.Module, tokenizer, lpips, *, batch: int = 32):
    self.batch = batch
    self.tokenizer = tokenizer
    self._dino = _pure(dino, "encode_image")
    self._clip_image = _pure(clip, "encode_image")
    self._clip_text = _pure(clip, "encode_text")
    self._text_len = min(77, clip.cfg.text.max_position_embeddings)
    # An nnx module (what load_lpips returns) is jitted like the encoders; a plain
    # callable (a test stand-in, or an already-jitted function) is used as it is.
    self._lpips = _pure(lpips, "__call__") if isinstance(lpips, nnx.Module) else lpips

  @property
  def has_lpips(self) -> bool:
    return self._lpips is not None

  @classmethod
  def load(cls, dino: str, clip: str, lpips: str | None, *, batch: int = 32,
           need_lpips: bool = True) -> "Encoders":
    check_encoder_paths(dino, clip, lpips, need_lpips=need_lpips)
    from dreambooth_jax.weights.encoders import load_clip, load_dino
    from dreambooth_jax.weights.lpips import load_lpips
    return cls(load_dino(dino), load_clip(clip), load_clip_tokenizer(clip),
               load_lpips(lpips) if lpips else None, batch=batch)

  def _embed(self, fn, pixels: np.ndarray) -> np.ndarray:
    out = [np.asarray(fn(chunk))[:n] for chunk, n in _padded_batches(pixels, self.batch)]
    return np.concatenate(out).astype(np.float64)

  def dino(self, images) -> np.ndarray:
    """DINO CLS embeddings [N, D] of uint8 images (any size: resized 256, cropped 224)."""
    return self._embed(self._dino, preprocess.preprocess_dino(images))

  def clip_image(self, images) -> np.ndarray:
    """CLIP image embeddings [N, P] of uint8 images."""
    return self._embed(self._clip_image, preprocess.preprocess_clip(images))

  def clip_text(self, prompts: Sequence[str]) -> np.ndarray:
    """CLIP text embeddings [N, P] of prompt strings (truncated to CLIP's 77 tokens)."""
    tok = self.tokenizer(list(prompts), padding="max_length", max_length=self._text_len,
                         truncation=True, return_tensors="np")
    ids = np.asarray(tok["input_ids"], np.int32)
    mask = np.asarray(tok["attention_mask"], np.int32)
    out = []
    for (i, n), (m, _) in zip(_padded_batches(ids, self.batch), _padded_batches(mask, self.batch)):
      out.append(np.asarray(self._clip_text(i, m))[:n])
    return np.concatenate(out).astype(np.float64)

  def lpips(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """LPIPS distances [N] of uint8 image pairs x[i], y[i] (same size), in fixed-size batches."""
    to_float = lambda a: np.asarray(a, np.float32) / 127.5 - 1.0  # LPIPS takes [-1, 1]
    out = []
    for (a, n), (b, _) in zip(_padded_batches(x, self.batch), _padded_batches(y, self.batch)):
      out.append(np.asarray(self._lpips(to_float(a), to_float(b)), np.float64).reshape(-1)[:n])
    return np.concatenate(out)


def load_clip_tokenizer(folder: str):
  """transformers' CLIPTokenizer from a local folder (vocab.json + merges.txt).

  Imported here, not at module level: transformers is only needed for CLIP-T,
  and its tokenizers run without torch.
  """
  try:
    from transformers import CLIPTokenizer
  except ImportError as e:
    raise WeightsError(f"CLIP-T needs the transformers package for CLIP's tokenizer ({e}); "
                       "pip install transformers") from None
  try:
    return CLIPTokenizer.from_pretrained(folder)
  except (OSError, ValueError) as e:
    raise WeightsError(f"--clip={folder}: cannot load CLIP's tokenizer from vocab.json + "
                       f"merges.txt ({e}); re-download them from {CLIP_REPO}") from None

