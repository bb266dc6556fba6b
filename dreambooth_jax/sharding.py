"""Meshes, logical axis rules and the shardings they give a parameter pytree.

Every parameter carries logical axis names (`nnx.Param(..., axes=...)`, see
`models.layers`). A rule table maps each logical name to mesh axes, in order of
preference. A dimension is only sharded when the mesh axis divides it and has
not been used by an earlier dimension of the same tensor, so one table serves
every model size and mesh shape; when the first choice does not fit, the next
candidate for that name is tried. MaxText and maxdiffusion do the same with
flax.linen's logical partitioning; we keep it explicit and small.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> candidate mesh axes (tried in order; None = replicate).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),   # activations: batch over every data-parallel axis
    ("embed", "fsdp"),             # model width (T5 d_model, UNet dense inputs)
    ("mlp", ("tensor", "fsdp")),   # feed-forward hidden / dense outputs
    ("heads", ("tensor", "fsdp")),  # attention projections
    ("kv", None),
    ("vocab", ("tensor", "fsdp")),
    ("conv_in", "fsdp"),
    ("conv_out", ("tensor", "fsdp")),
    ("norm", None),
    ("relpos_buckets", None),
    ("length", None),
    ("subjects", "data"),          # per-subject LoRA adapters: subjects over the data axis
)


def make_mesh(shape: Mapping[str, int] | Sequence[int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh. `shape` entries of -1 take the remaining devices.

  The default puts every device on `fsdp`: fine-tuning multi-billion UNets is
  memory-bound long before it is compute-bound.
  """
  devices = list(devices if devices is not None else jax.devices())
  if shape is None:
    shape = {"data": 1, "fsdp": -1, "tensor": 1}
  if isinstance(shape, Mapping):
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"mesh: unknown axes {sorted(unknown)}; use {MESH_AXES}")
    dims = [int(shape.get(a, 1)) for a in MESH_AXES]
  else:
    dims = [int(d) for d in shape]
  if dims.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dims}")
  known = math.prod(d for d in dims if d != -1)
  if -1 not in dims and known < len(devices):
    # An explicit smaller mesh takes the first devices (a sub-slice, or one CPU in tests).
    devices = devices[:known]
  if -1 in dims:
    if len(devices) % known:
      raise ValueError(f"mesh {dims}: {len(devices)} devices not divisible by {known}")
    dims[dims.index(-1)] = len(devices) // known
  if math.prod(dims) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, dims))} needs {math.prod(dims)} devices, "
                     f"have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(dims), MESH_AXES)


def _candidates(rule) -> tuple:
  if rule is None:
    return ()
  return (rule,) if isinstance(rule, str) else tuple(rule)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Iterable[tuple[str, Any]] = DEFAULT_RULES) -> P:
  """PartitionSpec for one tensor: first fitting, unused mesh axis per dimension."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(axes, shape):
    chosen = None
    if name is not None:
      if name not in table:
        raise KeyError(f"logical axis {name!r} has no sharding rule; add it to the rules "
                       f"(known: {sorted(table)})")
      for axis in _candidates(table[name]):
        n = mesh.shape[axis]
        if axis not in used and n > 1 and size % n == 0:
          chosen = axis
          break
    if chosen is not None:
      used.add(chosen)
    spec.append(chosen)
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def replicated(rules=DEFAULT_RULES) -> tuple[tuple[str, Any], ...]:
  """`rules` with every logical axis replicated: for a small model whose activations, not
  its weights, are the memory (the x4 upscaler's VAE: 0.2 GiB of weights, 1024 px images)."""
  return tuple((name, None) for name, _ in rules)


def param_specs(state: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """Maps an nnx State (concrete or abstract) to a pytree of PartitionSpecs.

  Leaves without `axes` metadata (rng counters, optimizer scalars) replicate.
  """
  def one(v):
    if isinstance(v, nnx.Variable):
      axes = v.get_metadata().get("axes")
      value = v.get_value()
      if axes is None:
        return v.replace(P())
      return v.replace(logical_to_spec(axes, value.shape, mesh, rules))
    return P()
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(state: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """Like `param_specs` but NamedShardings, ready for jit's in/out_shardings."""
  specs = param_specs(state, mesh, rules)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def put(x, sharding: NamedSharding, dtype=None) -> jax.Array:
  """A host array (numpy, or a memory-mapped safetensors view) as a global jax.Array laid
  out as `sharding`, each device's shard read, cast and copied on its own.

  No device ever holds more than its shard and the host never a cast copy of the
  whole tensor (a `jnp.asarray` first would put all of it on device 0). Every
  process reads just the shards of its own devices, so this is also the multi-host
  load; replicated shardings read the whole tensor once per local device.
  """
  dtype = None if dtype is None else np.dtype(dtype)

  def shard(index):
    part = np.asarray(x[index])
    return part if dtype is None or part.dtype == dtype else part.astype(dtype)
  return jax.make_array_from_callback(tuple(x.shape), sharding, shard)


def placer(abstract_state: Any, mesh: Mesh, rules=DEFAULT_RULES, dtype=None):
  """`place(path, array)` for the weight loaders: puts each parameter of an abstract
  nnx State straight into the sharding its logical axes give on `mesh` (see `put`)."""
  specs = param_shardings(abstract_state, mesh, rules)
  table = {tuple(path): var.get_value() for path, var in nnx.to_flat_state(specs)}

  def place(path, array):
    return put(array, table[tuple(path)], dtype)
  return place


def place_state(state: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """An nnx State (host or device arrays) moved into the shardings the rules give it."""
  return jax.device_put(state, param_shardings(state, mesh, rules))


# -- the one rule for batches -------------------------------------------------------------------
# A batch axis is split over every data-parallel mesh axis (data, fsdp) when their
# product divides it, else replicated: a small batch (a 1-image sample grid, a
# replicated 1+1 training batch) then runs everywhere instead of failing to split.


def data_axes(mesh) -> tuple[str, ...]:
  """The data-parallel axes of `mesh` (a Mesh or an abstract mesh) that have size > 1."""
  return tuple(a for a in ("data", "fsdp") if dict(mesh.shape).get(a, 1) > 1)


def data_parallelism(mesh) -> int:
  """How many ways a batch splits on `mesh` (the product of its data axes)."""
  return math.prod(dict(mesh.shape)[a] for a in data_axes(mesh))


def batch_spec(mesh, shape: Sequence[int], axis: int = 0) -> P:
  """PartitionSpec of an array whose `axis` is a batch: split over the data axes when they
  divide it, else replicated; every other axis is replicated."""
  axes = data_axes(mesh)
  spec = [None] * len(shape)
  if axes and shape[axis] % data_parallelism(mesh) == 0:
    spec[axis] = axes
  return P(*spec)


def batch_sharding(mesh: Mesh, shape: Sequence[int], axis: int = 0) -> NamedSharding:
  """`batch_spec` as a NamedSharding on `mesh`."""
  return NamedSharding(mesh, batch_spec(mesh, shape, axis))


_outer = threading.local()  # trace-time state of `batch_split_outside`


@contextlib.contextmanager
def batch_split_outside():
  """While tracing inside, the data axes split an outer, vmapped axis (train_many's
  subjects, vmapped with `spmd_axis_name` = the data axes), so `constrain_batch` must not
  split the inner batch over them again: it pins the activation unsplit, and the vmap
  adds the data axes on the outer axis. Splitting both asked XLA for one mesh axis on two
  dimensions; on a 2-way data axis (a subject's 1+1 images divide it) it all-gathered
  the activations of every subject at each block."""
  before = getattr(_outer, "active", False)
  _outer.active = True
  try:
    yield
  finally:
    _outer.active = before


def constrain_batch(x: jax.Array) -> jax.Array:
  """Pins an activation's leading (batch) axis by `batch_spec` on the mesh set by
  `jax.set_mesh`; a no-op without one or when the batch does not divide.

  Fully sharded weights leave XLA's sharding propagation a choice: gather the weights,
  or follow their sharding into the activations. Left alone it took the second on
  fsdp meshes and all-reduced every attention score matrix; pinning the batch at
  block boundaries makes it gather weights (FSDP as intended). Inside
  `batch_split_outside` the pin is on the outer (vmapped) axis instead.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  if getattr(_outer, "active", False):
    return jax.lax.with_sharding_constraint(x, P(*([None] * x.ndim)))
  spec = batch_spec(mesh, x.shape)
  if spec[0] is None:
    return x
  return jax.lax.with_sharding_constraint(x, spec)
