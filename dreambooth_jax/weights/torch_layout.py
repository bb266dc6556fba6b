"""Mapping between our parameter pytrees and PyTorch state-dict names and layouts.

Our modules are named like their PyTorch references, so one rule covers most
tensors: join the nnx path with dots and call the last element `weight`
(`kernel`, `scale` and `embedding` are all `weight` in PyTorch). A model adds
a short list of regex renames for the rest. Layouts differ only for kernels:
Linear is [out, in] in PyTorch and [in, out] here; Conv2d is [out, in, kh, kw]
there and [kh, kw, in, out] (HWIO, for NHWC activations) here.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreambooth_jax.weights.safetensors_io import WeightsError

Renames = Sequence[tuple[str, str]]


def torch_key(path: tuple, renames: Renames = ()) -> str:
  *head, leaf = (str(p) for p in path)
  key = ".".join(head + ["weight" if leaf in ("kernel", "scale", "embedding") else leaf])
  for pattern, repl in renames:
    key = re.sub(pattern, repl, key)
  return key


def to_ours(leaf: str, array: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and array.ndim == 2:
    return array.T
  if leaf == "kernel" and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  return array


def to_torch(leaf: str, array: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and array.ndim == 2:
    return array.T
  if leaf == "kernel" and array.ndim == 4:
    return array.transpose(3, 2, 0, 1)
  return array


def _flat_params(state) -> list[tuple[tuple, nnx.Variable]]:
  return [(tuple(p), v) for p, v in nnx.to_flat_state(state)]


def _shape_of(tensors, key: str) -> tuple[int, ...]:
  return tuple(getattr(tensors, "shape", lambda k: tensors[k].shape)(key))


def match_params(model: nnx.Module, tensors: Mapping[str, np.ndarray], *, renames: Renames = (),
                 ignore: Callable[[str], bool] = lambda k: False):
  """Pairs every Param of `model` (abstract is enough) with its tensor, reading shapes only.

  Returns `(plan, problems)`: plan lists `(path, variable, key)` of every
  matched Param, problems one line per missing, unexpected (not `ignore`d) and
  mis-shaped tensor with expected and found shapes. No tensor data is read, so
  this is the whole check a preflight needs.
  """
  return _match(_flat_params(nnx.split(model)[1]), tensors, renames, ignore)


def _match(flat, tensors, renames, ignore):
  plan, problems, used = [], [], set()
  for path, var in flat:
    key = torch_key(path, renames)
    if key not in tensors:
      problems.append(f"missing tensor {key!r} (for {'/'.join(map(str, path))}, "
                      f"expected shape {tuple(var.get_value().shape)})")
      continue
    used.add(key)
    shape = _shape_of(tensors, key)
    expected = to_torch(str(path[-1]), np.empty(var.get_value().shape, dtype=np.bool_)).shape
    if shape != tuple(expected):
      problems.append(f"tensor {key!r} has shape {shape}, expected {tuple(expected)}")
      continue
    plan.append((path, var, key))
  problems += [f"unexpected tensor {k!r} with shape {_shape_of(tensors, k)}"
               for k in sorted(k for k in tensors if k not in used and not ignore(k))]
  return plan, problems


def mismatch_error(source: str, problems: Sequence[str]) -> WeightsError:
  """One WeightsError listing (the first 20 of) `problems` of `match_params`."""
  shown = list(problems[:20]) + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
  return WeightsError(
      f"{source}: the weights do not match the model built from its config "
      f"({len(problems)} problem(s)):\n  " + "\n  ".join(shown) +
      "\nCheck that config.json belongs to these weights (same model and revision).")


def check_params(model: nnx.Module, tensors: Mapping[str, np.ndarray], *, renames: Renames = (),
                 source: str = "checkpoint", ignore: Callable[[str], bool] = lambda k: False) -> int:
  """Raises `mismatch_error` unless `tensors` fill `model` exactly; returns the tensor count."""
  plan, problems = match_params(model, tensors, renames=renames, ignore=ignore)
  if problems:
    raise mismatch_error(source, problems)
  return len(plan)


def load_params(model: nnx.Module, tensors: Mapping[str, np.ndarray], *, renames: Renames = (),
                dtype=None, source: str = "checkpoint", ignore: Callable[[str], bool] = lambda k: False,
                place: Callable[[tuple, np.ndarray], jax.Array] | None = None) -> nnx.Module:
  """Fills every Param of `model` (abstract or concrete) from `tensors`, in place.

  Checks the whole mapping before copying anything (`match_params`), and raises
  one WeightsError listing every missing, unexpected and mis-shaped tensor with
  expected and found shapes. `place(path, array)` may put each array on devices
  (sharded loading); by default it becomes a jnp array of `dtype` (or the
  file's dtype).
  """
  graphdef, state = nnx.split(model)
  plan, problems = _match(_flat_params(state), tensors, renames, ignore)
  if problems:
    raise mismatch_error(source, problems)
  for path, var, key in plan:
    array = to_ours(str(path[-1]), tensors[key])
    if place is not None:
      var.set_value(place(path, array))
    else:
      var.set_value(jnp.asarray(array, dtype=dtype or array.dtype))
  return nnx.merge(graphdef, state)


def export_params(model_or_state, *, renames: Renames = (), dtype=None) -> dict[str, np.ndarray]:
  """Our params as a PyTorch-named, PyTorch-laid-out dict of numpy arrays."""
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
  out = {}
  for path, var in _flat_params(state):
    array = np.asarray(jax.device_get(var.get_value()))
    if dtype is not None:
      array = array.astype(dtype)
    out[torch_key(path, renames)] = np.ascontiguousarray(to_torch(str(path[-1]), array))
  return out
