"""Prompt embeddings: T5 run once per distinct prompt, stored on disk, T5 then dropped.

DreamBooth trains on a handful of fixed prompts ("a sks dog", "a dog", and
"" for classifier-free guidance), and T5 v1.1 XXL is 4.8B parameters that the
UNet never needs on the accelerators at the same time. So the text side of a
run is:

    fingerprint = encoder_fingerprint(t5_folder, tokenizer, dtype="bfloat16")
    cache = PromptEmbeddingCache(os.path.join(workdir, "prompt_embeddings"))
    table = cache.get_or_compute(prompts, encode_fn, fingerprint)
    cond = stack_embeddings(table, ["a sks dog"])  # {"text": [1, 77, D], "mask": [1, 77]}

with `encode_fn = lambda ps: encode_prompts(load_t5(), tokenizer, ps, mesh=mesh)`:
the encoder is only loaded when some prompt is missing, and nothing here keeps
a reference to it or to its parameters once `get_or_compute` returns, so its
device memory is released before the UNet is placed.

On disk, one safetensors file per (prompt, fingerprint), named by
sha256(fingerprint, prompt), holding `embeddings` [L, D] (the encoder's output
dtype, bf16 included) and `attention_mask` [L], with the prompt and the
fingerprint in its metadata; `index.json` lists them for people, lookups never
read it. Files are written to a unique temporary name and `os.replace`d, so a
crash or a second process writing the same prompt never leaves a torn file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dreambooth_jax import sharding, utils
from dreambooth_jax.tokenizer import Tokenizer
from dreambooth_jax.weights.safetensors_io import SafetensorsFile, WeightsError, save_file

__all__ = ["PromptEmbedding", "PromptEmbeddingCache", "encoder_fingerprint", "encode_prompts",
           "hash_weights_folder", "stack_embeddings"]

# ---------------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------------

_SAMPLE_BYTES = 1 << 16  # bytes hashed at each of a weights file's start, middle and end
_SAMPLE_ELEMENTS = 4096  # elements hashed at each end of an in-memory parameter, plus a stride
_HOST_SAMPLE_LIMIT = 1 << 22  # elements: below it a tensor is sampled on the host


def hash_weights_folder(h, folder: str):
  """Feed the hashlib object `h` a weights folder's identity: config.json, then per
  safetensors file its name, size, full header and three data samples.

  The header names every tensor with dtype, shape and offsets, so a different
  model, revision, precision or variant changes it; the sampled bytes catch
  re-saved weights of the same layout. Hashing 10-20 GB of XXL weights in full
  would cost minutes on network storage on every start, which is what we avoid.
  """
  names = sorted(os.listdir(folder))
  files = [n for n in names if n.endswith((".safetensors", ".safetensors.index.json"))]
  if "config.json" not in names or not files:
    raise WeightsError(f"{folder!r} is not a weights folder (needs config.json and .safetensors)")
  with open(os.path.join(folder, "config.json"), "rb") as f:
    h.update(json.dumps(json.load(f), sort_keys=True).encode())
  for name in files:
    path = os.path.join(folder, name)
    size = os.path.getsize(path)
    h.update(f"\0{name}\0{size}\0".encode())
    with open(path, "rb") as f:
      if name.endswith(".json"):
        h.update(f.read())
        continue
      header_len = int.from_bytes(f.read(8), "little")
      h.update(f.read(min(header_len, size)))
      data_start = 8 + header_len
      for offset in (data_start, (data_start + size) // 2, size - _SAMPLE_BYTES):
        f.seek(max(data_start, offset))
        h.update(f.read(_SAMPLE_BYTES))


def _hash_module(h, module: nnx.Module):
  """The model's config, then per parameter: path, shape, dtype and sampled values.

  Both ends and a strided sample of every flattened parameter are fetched (all
  of a small one, e.g. a random-init test encoder), a few KB per tensor even
  when the model is sharded over a mesh.
  """
  h.update(repr(getattr(module, "config", type(module).__name__)).encode())
  for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    value = var.get_value()
    h.update(f"\0{'/'.join(map(str, path))}\0{tuple(value.shape)}\0{value.dtype}\0".encode())
    n = int(np.prod(value.shape))
    # Small tensors are fetched whole and sampled on the host: slicing on the device
    # compiles a program per shape (dozens per tiny model, seconds of compile time).
    flat = (np.asarray(jax.device_get(value)) if n <= _HOST_SAMPLE_LIMIT else value).reshape(-1)
    if n > 3 * _SAMPLE_ELEMENTS:
      stride = n // _SAMPLE_ELEMENTS
      cat = np.concatenate if isinstance(flat, np.ndarray) else jax.numpy.concatenate
      flat = cat([flat[:_SAMPLE_ELEMENTS], flat[::stride], flat[-_SAMPLE_ELEMENTS:]])
    h.update(np.asarray(jax.device_get(flat)).tobytes())


def encoder_fingerprint(encoder: str | nnx.Module, tokenizer: Tokenizer | str, *,
                        dtype: str | None = None, extra: Mapping | None = None) -> str:
  """A stable hex string naming what determines a prompt's embedding.

  Covers: the encoder (a Hugging Face folder: config, safetensors headers and
  sampled bytes, see `hash_weights_folder`; or a model in memory: config,
  parameter shapes, dtypes and sampled values), the tokenizer (all of
  spiece.model's bytes, max_length, sentinel count, prompt preprocessing
  mode), the compute `dtype` the encoder runs in, and anything in `extra`
  (JSON-able, e.g. a random-init seed or a learned token's version). Not
  covered: a deliberate edit of weight bytes between the sampled ones; delete
  the cache folder after such surgery.
  """
  h = hashlib.sha256(b"dreambooth_jax.embeddings.v1")
  if isinstance(encoder, str):
    hash_weights_folder(h, encoder)
  elif isinstance(encoder, nnx.Module):
    _hash_module(h, encoder)
  else:
    raise TypeError(f"encoder must be a weights folder or an nnx.Module, got {type(encoder).__name__}")
  tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_pretrained(tokenizer)
  with open(tok.path, "rb") as f:
    h.update(hashlib.sha256(f.read()).digest())
  h.update(f"\0{tok.max_length}\0{tok.extra_ids}\0{tok.preprocess}\0{dtype}\0".encode())
  h.update(json.dumps(dict(extra or {}), sort_keys=True, default=str).encode())
  return h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def encode_with_learned(t5: nnx.Module, learned_rows: jax.Array | None, input_ids: jax.Array,
                        attention_mask: jax.Array) -> jax.Array:
  """T5 on token ids where id -1-k stands for learned row k ([K, d_model]); differentiable.

  The learned rows replace T5's table lookups and then go through the frozen
  encoder like any token, so gradients reach the rows (textual inversion).
  """
  input_ids = jnp.asarray(input_ids)
  if learned_rows is None:
    return t5(input_ids, attention_mask)
  table = t5.shared(jnp.maximum(input_ids, 0))
  k = jnp.clip(-1 - input_ids, 0, learned_rows.shape[0] - 1)
  x = jnp.where((input_ids < 0)[..., None], learned_rows[k].astype(table.dtype), table)
  return t5.from_embeddings(x, attention_mask)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"))
def encode_batch(params, learned_rows, input_ids, attention_mask, *, graphdef, mesh):
  """One padded batch through T5 (`graphdef` + `params`), outputs replicated on `mesh`.

  Module-level and keyed on the (array-free) graphdef: one compilation per model
  structure, batch shape and sharding, and jit's cache never holds the parameters.
  """
  out = encode_with_learned(nnx.merge(graphdef, params), learned_rows, input_ids, attention_mask)
  if mesh is not None:
    out = jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P()))
  return out


def encode_prompts(t5: nnx.Module, tokenizer: Tokenizer, prompts: Sequence[str], *,
                   batch_size: int = 8, mesh: jax.sharding.Mesh | None = None,
                   rules=sharding.DEFAULT_RULES,
                   learned_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Runs the T5 encoder over `prompts`: numpy (embeddings [N, L, D], attention_mask [N, L]).

  Jitted for a fixed [batch_size, L] shape (the last batch is padded with
  empty prompts and cut), so any number of prompts compiles once. With a
  `mesh`, parameters are placed by the logical rules (replicated where a rule
  does not fit; a no-op when they already are) and the batch is split over the
  data axes; `batch_size` is rounded up to a multiple of those. On several
  hosts every host must pass the same prompts; outputs are replicated, so
  every host gets all of them. The returned arrays are host copies: the
  caller may drop `t5` right after and its device memory is freed.

  `learned_rows` [K, d_model] embed the tokenizer's learned tokens (ids < 0);
  prompts with learned tokens and no rows are an error, not a silent lookup.
  """
  prompts = list(prompts)
  if not prompts:
    raise ValueError("encode_prompts needs at least one prompt")
  graphdef, params = nnx.split(t5)
  put = lambda x: x
  if mesh is None:  # an encoder loaded onto a mesh (pipeline.build) encodes on that mesh
    mesh = next((x.sharding.mesh for x in jax.tree.leaves(params)
                 if isinstance(getattr(x, "sharding", None), NamedSharding)), None)
  if mesh is not None:
    shards = sharding.data_parallelism(mesh)
    batch_size = -(-batch_size // shards) * shards  # a multiple: the batch always splits
    params = jax.device_put(params, sharding.param_shardings(params, mesh, rules))
    batch_sh = sharding.batch_sharding(mesh, (batch_size, 1))
    put = lambda x: jax.device_put(x, batch_sh)
  embeddings, masks = [], []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    tokens = tokenizer(chunk + [""] * (batch_size - len(chunk)))
    if learned_rows is None and (tokens["input_ids"] < 0).any():
      raise ValueError(f"prompts {chunk} hold learned tokens {tokenizer.learned_tokens}; pass "
                       "their embedding rows (learned_rows=)")
    out = encode_batch(params, learned_rows, put(tokens["input_ids"]), put(tokens["attention_mask"]),
                  graphdef=graphdef, mesh=mesh)
    # addressable_data(0) is the whole array (replicated or single-device), also on multi-host.
    embeddings.append(np.array(out.addressable_data(0))[:len(chunk)])
    masks.append(tokens["attention_mask"][:len(chunk)])
  return np.concatenate(embeddings), np.concatenate(masks)


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


class PromptEmbedding(NamedTuple):
  """One prompt's encoder output: `embeddings` [L, D] and `mask` [L] (int32, 1 = real token)."""
  embeddings: np.ndarray
  mask: np.ndarray


EncodeFn = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]


def stack_embeddings(table: Mapping[str, PromptEmbedding], prompts: Iterable[str]) -> dict:
  """{"text": [B, L, D], "mask": [B, L]} for `prompts`, the conditioning format of `cascade`."""
  rows = [table[p] for p in prompts]
  return {"text": np.stack([r.embeddings for r in rows]), "mask": np.stack([r.mask for r in rows])}


class PromptEmbeddingCache:
  """Prompt embeddings on disk under `directory`, keyed by (prompt, encoder fingerprint).

  `get_or_compute` returns every prompt's `PromptEmbedding`, reading what is
  stored and calling `encode_fn` once, in one batch, for the rest. A file that
  cannot be read, has the wrong tensors, shapes, values or metadata counts as
  missing and is rewritten. `hits` and `misses` count prompts, for logs.
  """

  INDEX = "index.json"

  def __init__(self, directory):
    self.directory = utils.as_path(directory)  # local or remote (a gs:// workdir)
    self.directory.mkdir(parents=True, exist_ok=True)
    self.hits = 0
    self.misses = 0

  def path(self, prompt: str, fingerprint: str):
    key = hashlib.sha256(f"{fingerprint}\0{prompt}".encode("utf-8")).hexdigest()
    return self.directory / (key + ".safetensors")

  def load(self, prompt: str, fingerprint: str) -> PromptEmbedding | None:
    """The stored embedding, or None when absent or not trustworthy."""
    path = self.path(prompt, fingerprint)
    try:
      if not path.exists():
        return None
      # Read whole (a few MB at most), so remote files work too; the parser checks the
      # header length against the size before trusting it.
      f = SafetensorsFile(os.fspath(path), data=path.read_bytes())
      if (f.metadata.get("prompt") != prompt or f.metadata.get("fingerprint") != fingerprint
          or set(f) != {"embeddings", "attention_mask"}):
        return None
      # Copies: the buffer must not outlive this call.
      emb, mask = np.array(f["embeddings"]), np.array(f["attention_mask"])
    except (WeightsError, ValueError, OSError, KeyError, TypeError, OverflowError, MemoryError):
      return None
    if not _valid(emb, mask):
      return None
    return PromptEmbedding(emb, mask)

  def get_or_compute(self, prompts: Iterable[str], encode_fn: EncodeFn,
                     fingerprint: str) -> dict[str, PromptEmbedding]:
    """prompt -> PromptEmbedding for every distinct prompt ("" is the unconditional one)."""
    prompts = list(dict.fromkeys(prompts))  # distinct, first-seen order
    if not all(isinstance(p, str) for p in prompts):
      raise TypeError("prompts must be strings")
    out = {p: self.load(p, fingerprint) for p in prompts}
    missing = [p for p, e in out.items() if e is None]
    self.hits += len(prompts) - len(missing)
    self.misses += len(missing)
    if missing:
      embeddings, masks = encode_fn(missing)
      embeddings, masks = np.asarray(embeddings), np.asarray(masks).astype(np.int32)
      if embeddings.ndim != 3 or embeddings.shape[0] != len(missing) or masks.shape != embeddings.shape[:2]:
        raise ValueError(f"encode_fn returned embeddings {embeddings.shape} and mask {masks.shape} "
                         f"for {len(missing)} prompts; expected [N, L, D] and [N, L]")
      for i, prompt in enumerate(missing):
        entry = PromptEmbedding(np.ascontiguousarray(embeddings[i]), np.ascontiguousarray(masks[i]))
        if not _valid(*entry):
          raise ValueError(f"encode_fn returned non-finite embeddings or a bad mask for {prompt!r}")
        self._write(prompt, fingerprint, entry)
        out[prompt] = entry
      self._update_index(missing, fingerprint)
    return out

  def _write(self, prompt: str, fingerprint: str, entry: PromptEmbedding):
    # save_file writes atomically under a unique temporary name (processes may race).
    save_file({"embeddings": entry.embeddings, "attention_mask": entry.mask},
              self.path(prompt, fingerprint), metadata={"prompt": prompt, "fingerprint": fingerprint})

  def _update_index(self, prompts: Sequence[str], fingerprint: str):
    """Adds entries to index.json (for people: lookups go by file name, never through it)."""
    index_path = self.directory / self.INDEX
    try:
      index = json.loads(index_path.read_text(encoding="utf-8"))
      if not isinstance(index, dict):
        index = {}
    except (OSError, ValueError):
      index = {}
    for prompt in prompts:
      index[self.path(prompt, fingerprint).name] = {"prompt": prompt, "fingerprint": fingerprint}
    utils.write_json(index_path, index, ensure_ascii=False, indent=1, sort_keys=True)


def _valid(emb: np.ndarray, mask: np.ndarray) -> bool:
  """[L, D] finite embeddings with a [L] 0/1 mask that keeps at least the first token (</s>)."""
  return (emb.ndim == 2 and emb.shape[0] > 0 and emb.shape[1] > 0 and mask.shape == emb.shape[:1]
          and np.isin(mask, (0, 1)).all() and mask[0] == 1
          and bool(np.isfinite(emb.astype(np.float32)).all()))
