"""Train-state checkpoints (orbax) and the final diffusers export.

The train state is a plain pytree, e.g.

  {"params": {stage: nnx.State}, "opt_state": <optax state>,
   "step": int32[], "rng": typed key, "extra": {...}}

Orbax 0.12 saves nnx.State, optax namedtuples and empty nodes as they are, so
the tree goes to `ocp.args.StandardSave` untouched except for typed PRNG keys:
those are stored as their raw `jax.random.key_data` (uint32) and the key's
impl name goes into the step's JSON record. The files then hold plain arrays
that any tool reads, independent of orbax's changing key support, and the
impl is checked against the caller's abstract key on restore.

Layout, under `workdir/checkpoints/<step>/`:
  state/     the pytree (OCDBT, one tensorstore per checkpoint)
  metadata/  JSON: what the caller passed (identifier, config hash, ...) plus
             the step (the data position: batches are a pure function of the
             step, so resuming needs nothing else) and the typed-key impls.

Safety:
* `save` refuses (NonFiniteStateError) a state with any NaN/inf floating leaf:
  with keep-N pruning, saving a diverged run would delete good checkpoints.
  The check is one jitted all-reduce, run only when the step will be saved.
* Atomicity is orbax's: a step is written into `<step>.orbax-checkpoint-tmp-*`
  and renamed into place when complete, so a save interrupted at any point
  leaves the earlier checkpoints, and `latest_step`, unchanged. A Checkpointer
  removes leftover tmp directories in the background when it opens the
  workdir; its first save waits for that, so redoing the step cannot collide.
* Async saves copy device arrays to host memory before `save` returns, so the
  caller may donate or delete the state right after; `wait()` blocks until the
  files are committed (call it before exiting or reading the checkpoint).

Multi-host: every process calls `save`/`restore` with its global arrays;
orbax writes each shard from its owner and the JSON from the primary host.
`export_final` is single-writer: gather the params and call it on one process.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from orbax.checkpoint import checkpoint_managers as policies

from dreambooth_jax import utils
from dreambooth_jax.weights.safetensors_io import SafetensorsFile, WeightsError, save_file
from dreambooth_jax.weights.unet import save_unet_diffusers

_STATE, _METADATA = "state", "metadata"
_KEYS_FIELD = "_typed_keys"  # JSON field: {keystr(path): impl name}
EXPORT_INFO = "dreambooth.json"
TOKENS_FILE = "learned_tokens.safetensors"  # textual inversion's rows, one per token


class NonFiniteStateError(ValueError):
  """The state has NaN or inf values; it was not saved."""


def _is_key(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _is_float(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and not _is_key(x) and jnp.issubdtype(dtype, jnp.inexact)


@functools.lru_cache(maxsize=None)
def _finite_flags_fn(out_sharding):
  # One program for the whole tree returning one flag per leaf: a per-leaf
  # check would be a dispatch and a host sync per parameter (thousands for a
  # full UNet), and the flags name the culprits without a second pass.
  return jax.jit(lambda leaves: jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]),
                 out_shardings=out_sharding)


def _finite_flags(leaves) -> np.ndarray:
  # Replicated output, so every host of a multi-host mesh can read it.
  mesh = next((x.sharding.mesh for x in leaves
               if isinstance(getattr(x, "sharding", None), NamedSharding)), None)
  out = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
  return np.asarray(jax.device_get(_finite_flags_fn(out)(leaves)))


def _keys_to_data(state):
  """Typed keys -> uint32 key data, and {keystr(path): impl name} to restore them."""
  impls = {}

  def one(path, x):
    if _is_key(x):
      impls[jax.tree_util.keystr(path)] = str(jax.random.key_impl(x))
      return jax.random.key_data(x)
    return x
  return jax.tree_util.tree_map_with_path(one, state), impls


def _abstract_keys_to_data(abstract):
  """The abstract tree as orbax must see it: typed-key leaves become their uint32 data."""
  def one(x):
    if not _is_key(x):
      return x
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    # The key's sharding covers its leading dims; the trailing data dim stays whole.
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree.map(one, abstract)


def _data_to_keys(restored, abstract, impls: Mapping[str, str]):
  def one(path, x, a):
    if not _is_key(a):
      return x
    name = jax.tree_util.keystr(path)
    key = jax.random.wrap_key_data(x, impl=impls.get(name) or jax.config.jax_default_prng_impl)
    if key.dtype != a.dtype:
      raise ValueError(f"checkpoint key {name} is {key.dtype}, the restore target wants {a.dtype}")
    return key
  return jax.tree_util.tree_map_with_path(one, restored, abstract)


def _as_abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))


class Checkpointer:
  """Orbax CheckpointManager at `workdir/checkpoints` for the train-state pytree.

  keep: newest checkpoints kept (None = all). keep_every: additionally keep
  every step that is a multiple of it forever (milestones such as the 200-step
  snapshots of Zeng et al.). save_interval_steps: `save` only writes steps that
  are multiples of it (unless force=True); the trainer usually decides itself
  and leaves it at 1.
  """

  def __init__(self, workdir: str, *, keep: int | None = 3, keep_every: int | None = None,
               async_save: bool = True, save_interval_steps: int = 1):
    # epath, as orbax: a gs:// workdir stays gs:// (os.path.abspath would make it local).
    self.directory = utils.absolute(workdir) / "checkpoints"
    preserve = [policies.LatestN(n=keep)]
    if keep_every:
      preserve.append(policies.EveryNSteps(interval_steps=keep_every))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps,
        preservation_policy=policies.AnyPreservationPolicy(preserve),
        enable_async_checkpointing=async_save,
        # A save killed mid-write leaves `<step>.orbax-checkpoint-tmp-*`; it was
        # never visible as a step, and removing it at start frees the disk.
        cleanup_tmp_directories=True,
        create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  # -- queries -------------------------------------------------------------------
  def latest_step(self) -> int | None:
    """Newest committed step (in-flight async saves do not count until committed)."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  # -- save ------------------------------------------------------------------------
  def save(self, step: int, state: Any, metadata: Mapping[str, Any] | None = None, *,
           force: bool = False) -> bool:
    """Starts writing `state` as `step` (async unless async_save=False); True if it will.

    Raises NonFiniteStateError, before touching the disk, when a floating leaf
    is NaN/inf. `metadata` must be JSON-able; `step` is added to it. Returns
    False when save_interval_steps skips this step.
    """
    step = int(step)
    if not force and not self._manager.should_save(step):
      return False
    floats = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0] if _is_float(x)]
    flags = _finite_flags([x for _, x in floats]) if floats else []
    bad = [jax.tree_util.keystr(p) for (p, _), ok in zip(floats, flags) if not ok]
    if bad:
      raise NonFiniteStateError(
          f"refusing to save step {step}: {len(bad)} leaves hold NaN/inf "
          f"(first: {', '.join(bad[:5])}); the checkpoints in {self.directory} are kept "
          f"(latest: step {self.latest_step()})")
    stored, impls = _keys_to_data(state)
    record = dict(metadata or {}, step=step)
    if impls:
      record[_KEYS_FIELD] = impls
    return self._manager.save(
        step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(stored),
                                         _METADATA: ocp.args.JsonSave(record)}),
        force=force)

  def delete(self, step: int) -> None:
    """Removes checkpoint `step` (e.g. one a resumed job is about to write again)."""
    self._manager.delete(int(step))

  def wait(self) -> None:
    """Blocks until every started save is committed; re-raises a failed async save."""
    self._manager.wait_until_finished()

  # -- restore -----------------------------------------------------------------------
  def restore(self, step: int | None = None, abstract_state: Any = None) -> Any:
    """The state of `step` (default: latest), placed as `abstract_state` says.

    `abstract_state` is the target pytree (same structure as the saved state):
    leaves are jax.ShapeDtypeStruct with `.sharding` (or arrays, whose
    sharding is used), and every shard is read straight into its devices, so
    an fsdp-sharded state never exists whole on one host. Typed-key leaves come
    back as typed keys. Without it, the tree comes back as stored (numpy-like
    arrays; keys as raw uint32 key data).
    """
    step = self._resolve(step)
    if abstract_state is None:
      out = self._manager.restore(step, args=ocp.args.Composite(
          **{_STATE: ocp.args.StandardRestore()}))
      return out[_STATE]
    abstract_state = jax.tree.map(_as_abstract, abstract_state)
    impls = self.restore_metadata(step).get(_KEYS_FIELD, {})
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          **{_STATE: ocp.args.StandardRestore(_abstract_keys_to_data(abstract_state))}))
    except ValueError as e:  # orbax names the path; say what usually causes it
      raise ValueError(f"checkpoint step {step} in {self.directory} does not match the restore "
                       f"target (did the tuned stages, model config or optimiser change since "
                       f"it was written?): {e}") from e
    return _data_to_keys(out[_STATE], abstract_state, impls)

  def restore_metadata(self, step: int | None = None) -> dict[str, Any]:
    """The JSON record saved with `step` (default: latest); cheap, reads no arrays."""
    step = self._resolve(step)
    out = self._manager.restore(step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()}))
    return dict(out[_METADATA])

  def _resolve(self, step):
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return int(step)

  # -- lifetime ------------------------------------------------------------------------
  def close(self) -> None:
    """Waits for pending saves and releases orbax's threads."""
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# == Export: diffusers folders the PyTorch world loads ==========================


def _replace_dir(tmp, final) -> None:
  """Moves a finished `tmp` folder onto `final`; a local reader never sees half a folder.

  (On an object store a folder rename copies object by object: a reader may then see
  a partial folder for a moment, but never a partial file.)
  """
  old = final.parent / (final.name + ".old")
  if old.exists():
    old.rmtree()
  if final.exists():
    final.rename(old)
  tmp.rename(final)
  if old.exists():
    old.rmtree()


def export_stage(unet_graphdef, params, out_dir: str, dtype=None) -> str:
  """Writes one UNet (graphdef + params: nnx.State or pure dict) as a diffusers folder.

  Params may live on devices or on host (e.g. after `jax.device_get`); `dtype`
  (e.g. np.float16) converts on the way out.
  """
  unet = nnx.merge(unet_graphdef, params)
  out_dir = utils.absolute(out_dir)
  tmp = out_dir.parent / f"{out_dir.name}.tmp-{os.getpid()}"
  if tmp.exists():
    tmp.rmtree()
  save_unet_diffusers(unet, tmp, dtype=dtype)
  _replace_dir(tmp, out_dir)
  return str(out_dir)


def export_final(workdir: str, stages: Mapping[str, tuple[Any, Any]], info: Mapping[str, Any],
                 dtype=None) -> str:
  """Exports every stage to `workdir/export/<stage>/` and writes `export/dreambooth.json`.

  stages: name -> (unet graphdef, params). info: whatever describes the run
  (identifier, class noun, prompts, steps, method, config, ...); it is written
  as given, plus `stages` (the exported names, if absent) and `folders` (name
  -> folder relative to export/). Returns the export directory.
  """
  export = utils.absolute(workdir) / "export"
  export.mkdir(parents=True, exist_ok=True)
  for name, (graphdef, params) in stages.items():
    export_stage(graphdef, params, export / name, dtype=dtype)
  record = dict(info)
  record.setdefault("stages", list(stages))
  record["folders"] = {**record.get("folders", {}), **{name: name for name in stages}}
  utils.write_json(export / EXPORT_INFO, record, indent=2, default=str)
  return str(export)


def export_token_rows(export_dir: str, tokens, rows: np.ndarray) -> str:
  """Writes learned token rows [K, d_model] as `export/learned_tokens.safetensors`.

  One tensor per token, named by the token string (as diffusers' textual
  inversion files are), so other code can add them to a T5 vocabulary.
  """
  tokens = list(tokens)
  if len(tokens) != rows.shape[0]:
    raise ValueError(f"{len(tokens)} tokens but {rows.shape[0]} rows")
  path = utils.as_path(export_dir) / TOKENS_FILE
  save_file({t: np.asarray(r, np.float32) for t, r in zip(tokens, rows)}, path,
            metadata={"tokens": json.dumps(tokens)})
  return str(path)


def load_token_rows(path: str) -> tuple[list[str], np.ndarray]:
  """(tokens, rows [K, d_model]) of an `export_token_rows` file."""
  path = utils.as_path(path)
  if not path.exists():
    raise WeightsError(f"no learned token file at {str(path)!r} (written by a textual_inversion or "
                       "ti_then_finetune run into its export/ folder)")
  f = SafetensorsFile(str(path), data=path.read_bytes())
  tokens = json.loads(f.metadata.get("tokens", "[]")) or sorted(f)
  return tokens, np.stack([np.asarray(f[t], np.float32) for t in tokens])
