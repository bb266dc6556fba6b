"""Reading and writing safetensors files and Hugging Face weight folders, no torch.

The safetensors Python package cannot hand bfloat16 tensors to numpy, and
real checkpoints (T5 v1.1 XXL, DeepFloyd IF) ship in bf16/fp16. The format is
a little-endian u64 header size, a JSON header and raw little-endian data, so
we memory-map it ourselves and view bf16 through ml_dtypes. Nothing is read
until a tensor is asked for, which keeps host memory flat when a 17 GB UNet is
streamed onto devices tensor by tensor.

A weights folder is read in every layout transformers and diffusers write or
wrote (`open_folder`): single file, sharded with an index, and either of those
as a variant (`fp16`), including diffusers' legacy sharded-variant names.
Pickle checkpoints (`*.bin`, `*.pt`) are refused on purpose: unpickling runs
arbitrary code.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import uuid
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np
from etils import epath

from dreambooth_jax import utils

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class WeightsError(utils.UserError):
  """A weights folder or file that cannot be used as it is; the message says how to fix it."""


class SafetensorsFile(Mapping[str, np.ndarray]):
  """Lazy, read-only mapping name -> numpy array over one .safetensors file."""

  def __init__(self, path: str, *, data: bytes | None = None):
    """`path`: a local file, memory-mapped. `data`: the file's bytes, already read (small
    files on remote storage, e.g. a gs:// workdir's caches); `path` then only names it."""
    self.path = str(path)
    try:
      if data is not None:
        head = memoryview(data)
        (n,) = struct.unpack("<Q", bytes(head[:8]))
        if n > len(data) - 8:
          raise ValueError(f"header length {n} exceeds the file size")
        header = json.loads(bytes(head[8:8 + n]))
      else:
        with open(path, "rb") as f:
          (n,) = struct.unpack("<Q", f.read(8))
          if n > os.fstat(f.fileno()).st_size - 8:  # garbage length: do not try to read it
            raise ValueError(f"header length {n} exceeds the file size")
          header = json.loads(f.read(n))
      if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
      raise WeightsError(f"{path}: not a readable safetensors file ({e}). Re-download it.") from e
    self.metadata = header.pop("__metadata__", None) or {}
    self._header = header
    self._offset = 8 + n
    self._mmap = None if data is None else np.frombuffer(data, np.uint8)

  def _data(self) -> np.memmap:
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    return self._mmap

  def __getitem__(self, name: str) -> np.ndarray:
    info = self._header[name]
    if info["dtype"] not in _DTYPES:
      raise WeightsError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    raw = self._data()[self._offset + start:self._offset + end]
    if raw.size != end - start:
      raise WeightsError(f"{self.path}: tensor {name!r} is truncated; the file is incomplete, "
                         "re-download it.")
    return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._header[name]["shape"])

  def check(self) -> "SafetensorsFile":
    """Checks every header entry against the file size, reading no tensor data.

    Catches what a partial download or a hand-edited header leaves behind:
    tensors past the end of the file, sizes that disagree with shape and dtype.
    """
    size = os.path.getsize(self.path) - self._offset
    for name, info in self._header.items():
      try:
        start, end = (int(x) for x in info["data_offsets"])
        shape = [int(x) for x in info["shape"]]
        dtype = str(info["dtype"])
        if start > end:
          raise ValueError(f"data_offsets {start} > {end}")
      except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{self.path}: header entry of tensor {name!r} is malformed ({e!r}); "
                           "the file is corrupt, re-download it.") from e
      if dtype not in _DTYPES:
        raise WeightsError(f"{self.path}: tensor {name!r} has dtype {dtype}, which this library "
                           f"does not read (supported: {', '.join(_DTYPES)}); convert the file.")
      if end > size:
        raise WeightsError(f"{self.path}: tensor {name!r} ends at byte {end} of the data, but the "
                           f"file holds only {size} data bytes; the file is truncated (an "
                           "interrupted download?), re-download it.")
      if end - start != math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize:
        raise WeightsError(f"{self.path}: tensor {name!r} ({dtype}, shape {shape}) spans "
                           f"{end - start} bytes, which does not match its shape; the file is "
                           "corrupt, re-download it.")
    return self

  def __contains__(self, name) -> bool:  # Mapping's default would fetch the tensor
    return name in self._header

  def __iter__(self) -> Iterator[str]:
    return iter(self._header)

  def __len__(self) -> int:
    return len(self._header)


def save_file(tensors: Mapping[str, np.ndarray], path, metadata: Mapping[str, str] | None = None):
  """Writes a .safetensors file (bf16 included), atomically: via a uniquely named
  temporary file locally; straight to the object on remote storage (gs://...), which
  becomes visible only once the upload completes. Tensors are streamed one by one."""
  header, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    a = np.ascontiguousarray(np.asarray(tensors[name]))
    if a.dtype not in _NAMES:
      raise WeightsError(f"cannot save tensor {name!r} of dtype {a.dtype} to safetensors")
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  if metadata:
    header["__metadata__"] = dict(metadata)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the spec recommends
  path = os.fspath(path)
  remote = "://" in path
  tmp = path if remote else f"{path}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
  with (epath.Path(path).open("wb") if remote else open(tmp, "wb")) as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for a in arrays:
      f.write(a.reshape(-1).view(np.uint8).data)  # no copy (ml_dtypes' bf16 has no buffer format)
  if not remote:
    os.replace(tmp, path)


class TensorFolder(Mapping[str, np.ndarray]):
  """All tensors of a Hugging Face weights folder, single-file or sharded.

  `source` is the file or index the tensors come from (for messages), `variant`
  the variant it was found under (None: full precision), `files` the open shards.
  """

  def __init__(self, files: Mapping[str, SafetensorsFile], where: dict[str, str], source: str,
               variant: str | None = None):
    self._files, self._where, self.source, self.variant = files, where, source, variant

  @property
  def files(self) -> list[SafetensorsFile]:
    return list(self._files.values())

  def __getitem__(self, name):
    return self._files[self._where[name]][name]

  def shape(self, name):
    return self._files[self._where[name]].shape(name)

  def __contains__(self, name) -> bool:
    return name in self._where

  def __iter__(self):
    return iter(self._where)

  def __len__(self):
    return len(self._where)


# Every name under which transformers and diffusers have written `<stem>` weights.
# Both libraries insert the variant before the last dot (`_add_variant`), so the
# index of a sharded variant is `<stem>.safetensors.index.fp16.json` and its shards
# `<stem>.fp16-00001-of-00002.safetensors`. diffusers before its switch to the
# transformers format wrote `<stem>.safetensors.fp16.index.json` over shards
# `<stem>-00001-of-00002.fp16.safetensors`, which diffusers 0.42 still loads with a
# deprecation warning. Shard names come from the index, so only index names matter.
def weight_names(stem: str, variant: str | None) -> tuple[str, tuple[str, ...]]:
  """(single-file name, index names newest first) of `stem` in `variant` (None: no variant)."""
  if variant is None:
    return f"{stem}.safetensors", (f"{stem}.safetensors.index.json",)
  return (f"{stem}.{variant}.safetensors",
          (f"{stem}.safetensors.index.{variant}.json", f"{stem}.safetensors.{variant}.index.json"))


_SHARD = r"-\d{5}-of-\d{5}"


def _variants_present(names: list[str], stem: str) -> list[str]:
  """Variants of `stem` present in `names`, in any naming either library used."""
  s = re.escape(stem)
  patterns = (rf"{s}\.([\w]+)\.safetensors", rf"{s}\.([\w]+){_SHARD}\.safetensors",
              rf"{s}{_SHARD}\.([\w]+)\.safetensors", rf"{s}\.safetensors\.index\.([\w]+)\.json",
              rf"{s}\.safetensors\.([\w]+)\.index\.json")
  found = {m.group(1) for n in names for p in patterns for m in [re.fullmatch(p, n)] if m}
  return sorted(found - {"index"})


def open_folder(folder: str, stems: tuple[str, ...], variant: str | None = None) -> TensorFolder:
  """Opens the `stem` weights of `folder` in any layout transformers or diffusers write.

  Single file (`model.safetensors`), sharded (`model.safetensors.index.json`),
  variant (`model.fp16.safetensors`), sharded variant
  (`model.safetensors.index.fp16.json`) and diffusers' legacy sharded variant
  (`model.safetensors.fp16.index.json`). With `variant=None` full precision is
  preferred and `fp16` is the fallback, as for DeepFloyd IF's `.fp16` uploads.
  Reads headers only, and checks that every shard holds the bytes its header
  promises, so a partial download fails here instead of halfway through loading.
  """
  _check_folder(folder)
  variants = [variant] if variant else [None, "fp16"]
  names = sorted(os.listdir(folder))
  tried = []
  for stem in stems:
    for v in variants:
      single, indexes = weight_names(stem, v)
      tried += [single, *indexes]
      if single in names and os.path.isfile(os.path.join(folder, single)):
        path = os.path.join(folder, single)
        f = SafetensorsFile(path)
        f.check()
        return TensorFolder({path: f}, {k: path for k in f}, path, v)
      for index in indexes:
        if index in names:
          return _open_index(folder, os.path.join(folder, index), v)
  raise WeightsError(_no_weights_message(folder, names, stems, variant, tried))


def _no_weights_message(folder, names, stems, variant, tried) -> str:
  msg = f"no weights in {folder!r}: looked for {', '.join(tried)}."
  shards = [n for n in names if re.search(_SHARD, n) and n.endswith(".safetensors")]
  if shards:
    msg += (f" Found shard files ({', '.join(shards[:3])}{', ...' if len(shards) > 3 else ''}) "
            "but no index naming them: download the *.index*.json file of the same variant too.")
  others = [v for stem in stems for v in _variants_present(names, stem) if v != variant]
  if variant and any(n in names for stem in stems for n in (weight_names(stem, None)[0],
                                                            *weight_names(stem, None)[1])):
    others = [None] + others
  if others:
    shown = ", ".join("no variant (full precision)" if v is None else repr(v) for v in others)
    msg += f" The folder holds weights of variant {shown}: pass that variant instead."
  pickles = [n for n in names if n.endswith((".bin", ".pt", ".ckpt", ".pth"))]
  if pickles:
    msg += (f" Found pickle checkpoints {pickles}: they are not loaded because unpickling runs "
            "arbitrary code; convert them with `safetensors` or download the .safetensors files.")
  elif not shards and not others:
    msg += (" Download the model's .safetensors files (with `huggingface-cli download <repo> "
            "--local-dir DIR`) next to its config.json.")
  return msg


def _open_index(folder: str, index: str, variant: str | None) -> TensorFolder:
  try:
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError("'weight_map' is empty or not an object")
  except (OSError, KeyError, TypeError, ValueError) as e:
    raise WeightsError(f"{index}: not a valid safetensors index ({e}). Re-download it with the "
                       "shards it lists.") from e
  files, where = {}, {}
  for name, shard in weight_map.items():
    path = os.path.join(folder, shard)
    if path not in files:
      if not os.path.isfile(path):
        raise WeightsError(f"{index} lists shard {shard!r} (for tensor {name!r}) but it is "
                           f"missing from {folder!r}; download every shard.")
      files[path] = SafetensorsFile(path)
      files[path].check()
    if name not in files[path]:
      raise WeightsError(f"{index} says tensor {name!r} is in {shard!r}, but it is not there; "
                         "the index and its shards come from different saves, re-download both.")
    where[name] = path
  return TensorFolder(files, where, index, variant)


def _check_folder(folder: str):
  if not os.path.isdir(folder):
    raise WeightsError(f"weights folder {folder!r} does not exist. Download the model there "
                       "(e.g. `huggingface-cli download <repo> --local-dir DIR`) and pass DIR.")


def resolve_component(folder: str, component: str, what: str, hint: str = "") -> str:
  """`folder/<component>` when `folder` is a whole diffusers pipeline, else `folder`.

  A Hub download of DeepFloyd IF is a pipeline folder (`model_index.json` with
  `unet/`, `text_encoder/`, `tokenizer/`...); pointing at it instead of at the
  component is the common case, so it is resolved rather than refused. A
  pipeline without the component (one saved with `text_encoder=None` lists it
  as null) raises WeightsError saying so; `hint` says where the component can be found.
  """
  _check_folder(folder)
  sub = os.path.join(folder, component)
  if os.path.isfile(os.path.join(folder, "config.json")):
    return folder
  if os.path.isdir(sub):
    return sub
  index = os.path.join(folder, "model_index.json")
  if not os.path.isfile(index):
    return folder  # not a pipeline: the component's own checks name what is missing
  try:
    with open(index) as f:
      model_index = json.load(f)
    cls, entry = model_index.get("_class_name", "diffusers"), model_index.get(component)
  except (OSError, ValueError, AttributeError):
    cls, entry = "diffusers", None
  listed = ("lists no " + component if entry is None or entry == [None, None] else
            f"lists {component} as {entry} but the {component}/ folder is missing")
  raise WeightsError(f"{folder!r} is a diffusers pipeline folder ({cls}, model_index.json) "
                     f"without a {what}: its model_index.json {listed}. "
                     f"{hint or f'Point at the folder that holds the {what}.'}")


_NOT_A_MODEL = {"scheduler_config.json": "a noise scheduler", "spiece.model": "a tokenizer",
                "tokenizer_config.json": "a tokenizer", "preprocessor_config.json":
                "an image processor", "model_index.json": "a pipeline"}


def read_config(folder: str) -> dict:
  """The config.json dict of a model folder; WeightsError naming what the folder is otherwise."""
  _check_folder(folder)
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    found = [f"{name} ({what})" for name, what in _NOT_A_MODEL.items()
             if os.path.isfile(os.path.join(folder, name))]
    holds = f" It holds {', '.join(found)}." if found else ""
    raise WeightsError(f"{folder!r} has no config.json, so it is not a model folder.{holds} Point "
                       "at the model folder that holds config.json next to the .safetensors "
                       "weights.")
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise WeightsError(f"{path}: invalid JSON ({e}); re-download it.") from e
  if not isinstance(config, dict):
    raise WeightsError(f"{path}: holds a JSON {type(config).__name__}, not an object; re-download it.")
  return config
