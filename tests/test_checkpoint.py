"""Checkpointer (orbax) round trips, sharded restore, pruning, safety, and the diffusers export."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dreambooth_jax import checkpoint, sharding, utils
from dreambooth_jax.weights import torch_layout
from dreambooth_jax.models.unet import UNetConfig, abstract_unet
from unet_configs import TINY_IF_I


CFG = UNetConfig.from_diffusers(TINY_IF_I)


def _random_like(abstract, seed=0):
  """Random values of the abstract tree's shapes: numpy, no XLA compile.

  jit-compiling the UNet's own initialiser takes ~15 s on CPU even for the
  tiny config (one threefry per tensor); the tests need values, not that init.
  """
  rng = np.random.default_rng(seed)
  def one(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
      return (rng.standard_normal(x.shape) * 0.1).astype(x.dtype)
    return np.zeros(x.shape, x.dtype)
  return jax.device_put(jax.tree.map(one, abstract))


@jax.jit
def _with_optimizer(params):
  """A train state shaped like train.py's: params per stage, adamw, step, typed key, extras."""
  tx = optax.adamw(1e-4)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.01), params)
  _, opt_state = tx.update(grads, tx.init(params), params)  # non-trivial mu / nu / count
  return dict(params={"base": params}, opt_state=opt_state, step=jnp.int32(3),
              rng=jax.random.key(7), extra={"tokens": jnp.arange(3, dtype=jnp.int32)})


@pytest.fixture(scope="module")
def built():
  graphdef, abstract = nnx.split(abstract_unet(CFG))
  return graphdef, _with_optimizer(_random_like(abstract))


def _small_state(step):
  """A few leaves of each kind, for the tests of the manager's bookkeeping."""
  return dict(params={"w": jnp.full((4, 8), float(step)), "b": jnp.arange(8, dtype=jnp.bfloat16)},
              step=jnp.int32(step), rng=jax.random.key(step))


_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def _state(built, step=3):
  """A fresh copy (tests delete buffers) with the given step."""
  return dict(_copy(built[1]), step=jnp.int32(step))


def _abstract(state, shardings=None):
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def _assert_bitwise_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert x.dtype == y.dtype
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))


def test_round_trip_bitwise_with_metadata(tmp_path, built):
  state = _state(built)
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  assert ckpt.latest_step() is None
  meta = dict(identifier="sks", config_hash=utils.fingerprint({"lr": 1e-5}))
  assert ckpt.save(3, state, meta)
  ckpt.wait()
  assert ckpt.latest_step() == 3
  # A fresh manager (a resumed process) sees the same thing.
  again = checkpoint.Checkpointer(str(tmp_path))
  restored = again.restore(None, _abstract(state))
  _assert_bitwise_equal(state, restored)
  assert isinstance(restored["params"]["base"], nnx.State)
  assert restored["rng"].dtype == state["rng"].dtype
  # The restored key draws the same numbers as the original.
  np.testing.assert_array_equal(jax.random.normal(restored["rng"], (4,)),
                                jax.random.normal(state["rng"], (4,)))
  got = again.restore_metadata()
  assert got["step"] == 3 and got["identifier"] == "sks" and got["config_hash"] == meta["config_hash"]
  again.close()


def test_restore_sharded_into_data_fsdp_mesh(tmp_path, built):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  state = _state(built)
  replicated = NamedSharding(mesh, P())
  param_sh = sharding.param_shardings(state["params"]["base"], mesh)
  # Optimiser moments are laid out like their params; the count is replicated.
  opt_sh = jax.tree.map(lambda x: replicated, state["opt_state"])
  adam = state["opt_state"][0]
  opt_sh = (opt_sh[0]._replace(mu=param_sh, nu=param_sh),) + tuple(opt_sh[1:])
  assert type(adam).__name__ == "ScaleByAdamState"
  shardings = dict(params={"base": param_sh}, opt_state=opt_sh, step=replicated, rng=replicated,
                   extra={"tokens": replicated})

  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(3, state, {})
  restored = ckpt.restore(3, _abstract(state, shardings))
  _assert_bitwise_equal(state, restored)
  want, got = jax.tree.leaves(shardings), jax.tree.leaves(restored)
  assert len(want) == len(got)
  n_sharded = 0
  for s, x in zip(want, got):
    assert x.sharding == s, (x.sharding, s)
    n_sharded += any(a is not None for a in s.spec)
  assert n_sharded > 10  # the fsdp rules really split most kernels
  k = restored["params"]["base"]["conv_in"]["kernel"].get_value()
  assert "fsdp" in str(k.sharding.spec)
  assert len(k.addressable_shards) == 8 and k.addressable_shards[0].data.size < k.size
  ckpt.close()


def test_keep_n_prunes_and_keep_every_preserves(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, keep_every=4, async_save=True)
  for step in range(1, 8):
    ckpt.save(step, _small_state(step), {})
  ckpt.wait()
  assert ckpt.all_steps() == [4, 6, 7]
  assert sorted(int(d) for d in os.listdir(ckpt.directory) if d.isdigit()) == [4, 6, 7]
  _assert_bitwise_equal(_small_state(4), ckpt.restore(4, _abstract(_small_state(0))))
  ckpt.close()


def test_save_interval_and_force(tmp_path):
  state = _small_state(1)
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_interval_steps=5, async_save=False)
  assert ckpt.save(5, state, {})
  assert not ckpt.save(7, state, {})
  assert ckpt.save(8, state, {}, force=True)
  assert ckpt.all_steps() == [5, 8]
  ckpt.close()


def test_async_save_survives_donation(tmp_path, built):
  state = _state(built)
  expected = jax.tree.map(lambda x: x, jax.device_get(state))
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=True)
  assert ckpt.save(10, state, {"identifier": "sks"})
  # train.py donates the state to the next step right after save(): the
  # device buffers die while the write may still be running.
  for x in jax.tree.leaves(state):
    x.delete()
  ckpt.wait()
  assert ckpt.latest_step() == 10
  restored = ckpt.restore(10, _abstract(expected))
  _assert_bitwise_equal(expected, restored)
  ckpt.close()


def test_non_finite_state_is_refused_and_previous_kept(tmp_path, built):
  good = _state(built, step=2)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, async_save=True)
  ckpt.save(2, good, {"identifier": "sks"})
  ckpt.wait()
  poison = lambda path, x: (x.at[(0,) * x.ndim].set(jnp.nan)
                            if "conv_in" in jax.tree_util.keystr(path) and x.ndim == 4 else x)
  bad = dict(good, params=jax.tree_util.tree_map_with_path(poison, good["params"]), step=jnp.int32(4))
  with pytest.raises(checkpoint.NonFiniteStateError, match="conv_in"):
    ckpt.save(4, bad, {})
  ckpt.wait()
  assert ckpt.all_steps() == [2]  # keep=1 would have pruned it had the save gone through
  _assert_bitwise_equal(good, ckpt.restore(None, _abstract(good)))
  ckpt.close()


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
  """A save that dies before its commit (rename of the tmp dir) is invisible."""
  from orbax.checkpoint._src.path import atomicity

  state = _small_state(1)
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, state, {})

  def crash(*args, **kwargs):
    raise RuntimeError("simulated preemption during commit")

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", crash)
  with pytest.raises(RuntimeError, match="simulated"):
    ckpt.save(2, _small_state(2), {})
    ckpt.wait()
  monkeypatch.undo()
  leftovers = [d for d in os.listdir(ckpt.directory) if "tmp" in d]
  assert leftovers, "the simulated crash should leave an uncommitted tmp dir"

  resumed = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  assert resumed.latest_step() == 1 and resumed.all_steps() == [1]
  _assert_bitwise_equal(state, resumed.restore(None, _abstract(state)))
  # The resumed run redoes step 2; orbax's cleanup of the stale tmp dir (started
  # at open, awaited by the first save) keeps it from colliding.
  assert resumed.save(2, _small_state(2), {})
  assert resumed.all_steps() == [1, 2]
  assert not [d for d in os.listdir(resumed.directory) if "tmp" in d]
  _assert_bitwise_equal(_small_state(2), resumed.restore(2, _abstract(state)))
  resumed.close()


def test_restore_without_checkpoint_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoint.Checkpointer(str(tmp_path)).restore()


def test_export_final_loads_in_diffusers(tmp_path, built):
  pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  graphdef, params = built[0], built[1]["params"]["base"]
  info = dict(identifier="sks", class_noun="dog", instance_prompt="a sks dog",
              class_prompt="a dog", steps=7, method="dreambooth", config={"lr": 1e-5})
  # Host params (as train.py passes after device_get) and a pure dict both work.
  export = checkpoint.export_final(str(tmp_path), {"base": (graphdef, jax.device_get(params)),
                                                   "copy": (graphdef, nnx.to_pure_dict(params))}, info)
  assert export == os.path.join(str(tmp_path), "export")
  with open(os.path.join(export, checkpoint.EXPORT_INFO)) as f:
    record = json.load(f)
  assert record == dict(info, stages=["base", "copy"], folders={"base": "base", "copy": "copy"})

  # Every tensor arrives: diffusers only warns about missing weights, so compare
  # the loaded state dict with ours (forward parity is test_unet's job).
  ours = torch_layout.export_params(params)
  for name in ("base", "copy"):
    model = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(export, name))
    loaded = {k: v.numpy() for k, v in model.state_dict().items()}
    assert sorted(loaded) == sorted(ours)
    for k, v in ours.items():
      np.testing.assert_array_equal(loaded[k], v, err_msg=k)
  # Re-export replaces the folder in place and rewrites the record.
  checkpoint.export_final(str(tmp_path), {"base": (graphdef, params)}, dict(info, steps=8))
  assert sorted(os.listdir(export)) == ["base", "copy", checkpoint.EXPORT_INFO]
  with open(os.path.join(export, checkpoint.EXPORT_INFO)) as f:
    assert json.load(f)["steps"] == 8


def test_restore_mismatch_and_raw_restore(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, _small_state(1), {})
  target = _abstract(_small_state(1))
  target["params"]["sr256"] = target["params"]["w"]  # a stage the run did not save
  with pytest.raises(ValueError, match="does not match the restore target"):
    ckpt.restore(1, target)
  # Without a target the tree comes back as stored: typed keys as raw key data.
  raw = ckpt.restore(1)
  np.testing.assert_array_equal(raw["params"]["w"], np.ones((4, 8)))
  np.testing.assert_array_equal(raw["rng"], jax.random.key_data(jax.random.key(1)))
  assert ckpt.restore_metadata(1)["_typed_keys"] == {"['rng']": "threefry2x32"}
  ckpt.close()
