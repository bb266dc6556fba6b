"""Reading and writing safetensors files and Hugging Face weight folders, no torch.

The safetensors Python package cannot hand bfloat16 tensors to numpy, and
real checkpoints (T5 v1.1 XXL, DeepFloyd IF) ship in bf16/fp16. The format is
a little-endian u64 header size, a JSON header and raw little-endian data, so
we memory-map it ourselves and view bf16 through ml_dtypes. Nothing is read
until a tensor is asked for, which keeps host memory flat when a 17 GB UNet is
streamed onto devices tensor by tensor.

Pickle checkpoints (`*.bin`, `*.pt`) are refused on purpose: unpickling runs
arbitrary code.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class WeightsError(ValueError):
  """A weights folder or file that cannot be used as it is; the message says how to fix it."""


class SafetensorsFile(Mapping[str, np.ndarray]):
  """Lazy, read-only mapping name -> numpy array over one .safetensors file."""

  def __init__(self, path: str):
    self.path = path
    try:
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
    self._mmap = None

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

  def __iter__(self) -> Iterator[str]:
    return iter(self._header)

  def __len__(self) -> int:
    return len(self._header)


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None):
  """Writes a .safetensors file (bf16 included), atomically via a temp file."""
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
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for a in arrays:
      f.write(a.tobytes())
  os.replace(tmp, path)


class TensorFolder(Mapping[str, np.ndarray]):
  """All tensors of a Hugging Face weights folder, single-file or sharded."""

  def __init__(self, files: Mapping[str, SafetensorsFile], where: dict[str, str], source: str):
    self._files, self._where, self.source = files, where, source

  def __getitem__(self, name):
    return self._files[self._where[name]][name]

  def shape(self, name):
    return self._files[self._where[name]].shape(name)

  def __iter__(self):
    return iter(self._where)

  def __len__(self):
    return len(self._where)


def open_folder(folder: str, stems: tuple[str, ...], variant: str | None = None) -> TensorFolder:
  """Opens `<stem>[.<variant>].safetensors` or its sharded `.index.json` in `folder`.

  With `variant=None` the full-precision file is preferred and `fp16` is the
  fallback, as diffusers does for DeepFloyd IF's `.fp16` uploads.
  """
  _check_folder(folder)
  variants = [variant] if variant else [None, "fp16"]
  tried = []
  for stem in stems:
    for v in variants:
      base = f"{stem}.{v}" if v else stem
      single = os.path.join(folder, base + ".safetensors")
      index = single + ".index.json"
      tried += [os.path.basename(single), os.path.basename(index)]
      if os.path.isfile(single):
        f = SafetensorsFile(single)
        return TensorFolder({single: f}, {k: single for k in f}, single)
      if os.path.isfile(index):
        return _open_index(folder, index)
  pickles = sorted(n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".ckpt", ".pth")))
  hint = (f" Found pickle checkpoints {pickles}: they are not loaded because unpickling runs "
          "arbitrary code; convert them with `safetensors` or download the .safetensors files."
          if pickles else "")
  raise WeightsError(f"no weights in {folder!r}: looked for {', '.join(tried)}.{hint}")


def _open_index(folder: str, index: str) -> TensorFolder:
  try:
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
  except (OSError, KeyError, json.JSONDecodeError) as e:
    raise WeightsError(f"{index}: not a valid safetensors index ({e}).") from e
  files, where = {}, {}
  for name, shard in weight_map.items():
    path = os.path.join(folder, shard)
    if path not in files:
      if not os.path.isfile(path):
        raise WeightsError(f"{index} lists shard {shard!r} (for tensor {name!r}) but it is "
                           f"missing from {folder!r}; download every shard.")
      files[path] = SafetensorsFile(path)
    if name not in files[path]:
      raise WeightsError(f"{index} says tensor {name!r} is in {shard!r}, but it is not there.")
    where[name] = path
  return TensorFolder(files, where, index)


def _check_folder(folder: str):
  if not os.path.isdir(folder):
    raise WeightsError(f"weights folder {folder!r} does not exist. Download the model there "
                       "(e.g. `huggingface-cli download <repo> --local-dir DIR`) and pass DIR.")


def read_config(folder: str) -> dict:
  _check_folder(folder)
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise WeightsError(f"{folder!r} has no config.json; point at the model folder that holds "
                       "config.json next to the .safetensors weights.")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise WeightsError(f"{path}: invalid JSON ({e}).") from e
