"""The IF-style UNet against diffusers' UNet2DConditionModel: parity, import, export, size, sharding."""

import json
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from dreambooth_jax import sharding, weights
from dreambooth_jax.models import unet as unet_lib
from dreambooth_jax.weights import safetensors_io
from unet_configs import TEXT_DIM, TEXT_LEN, TINY_IF_I, TINY_IF_II

GOLDEN = pathlib.Path(__file__).parent / "golden" / "if_i_xl_partition_specs.json"


def _torch_unet(cfg, seed=0):
  torch.manual_seed(seed)
  model = UNet2DConditionModel(**cfg).eval()
  # diffusers zero-initialises some layers; random values everywhere make
  # every tensor count in the comparison.
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
  return model


@pytest.fixture(scope="module", params=["I", "II"])
def stage(request, tmp_path_factory):
  cfg = TINY_IF_I if request.param == "I" else TINY_IF_II
  model = _torch_unet(cfg)
  folder = tmp_path_factory.mktemp(f"if_{request.param}")
  model.save_pretrained(folder)
  rng = np.random.RandomState(0)
  b, s = 2, cfg["sample_size"]
  mask = np.ones((b, TEXT_LEN), np.int64)
  mask[1, 3:] = 0  # second prompt padded: the mask must matter
  inputs = dict(
      x=rng.randn(b, cfg["in_channels"], s, s).astype(np.float32),
      t=np.array([3.0, 777.0], np.float32),
      text=rng.randn(b, TEXT_LEN, TEXT_DIM).astype(np.float32),
      mask=mask,
      class_labels=(np.array([0.01, 250.0], np.float32)
                    if cfg.get("class_embed_type") else None))
  return request.param, model, str(folder), inputs


def _run_torch(model, i):
  with torch.no_grad():
    out = model(torch.tensor(i["x"]), torch.tensor(i["t"]), torch.tensor(i["text"]),
                encoder_attention_mask=torch.tensor(i["mask"]),
                class_labels=None if i["class_labels"] is None else torch.tensor(i["class_labels"]))
  return out.sample.numpy()


# One jitted call per (structure, dtype): eager op-by-op dispatch of a UNet
# spends far longer compiling each op than the whole jitted graph does.
_apply = unet_lib.nnx.jit(lambda model, *a, **k: model(*a, **k))


def _run_ours(model, i, dtype=jnp.float32):
  cl = i["class_labels"]
  out = _apply(model, jnp.asarray(i["x"].transpose(0, 2, 3, 1), dtype), jnp.asarray(i["t"]),
              jnp.asarray(i["text"], dtype), attention_mask=jnp.asarray(i["mask"]),
              class_labels=None if cl is None else jnp.asarray(cl))
  return np.asarray(out, np.float32).transpose(0, 3, 1, 2)


def test_parity_fp32(stage):
  name, model, folder, inputs = stage
  ours = weights.load_unet(folder, jnp.float32)
  ref, got = _run_torch(model, inputs), _run_ours(ours, inputs)
  err = np.abs(ref - got).max()
  print(f"\nIF-{name} tiny UNet fp32 max abs error vs diffusers: {err:.3e} (output max {np.abs(ref).max():.2f})")
  assert err < 1e-4


def test_attention_mask_and_class_labels_matter(stage):
  name, _, folder, inputs = stage
  ours = weights.load_unet(folder)
  base = _run_ours(ours, inputs)
  unmasked = _run_ours(ours, dict(inputs, mask=np.ones_like(inputs["mask"])))
  assert np.abs(base[1] - unmasked[1]).max() > 1e-4  # padded prompt changes
  np.testing.assert_allclose(base[0], unmasked[0], atol=1e-6)  # full prompt does not
  if inputs["class_labels"] is not None:
    # SR augmentation levels are continuous: 1e-5 and 1e-3 (x1000) must differ.
    lo = _run_ours(ours, dict(inputs, class_labels=np.array([0.01, 0.01], np.float32)))
    hi = _run_ours(ours, dict(inputs, class_labels=np.array([1.0, 1.0], np.float32)))
    assert np.abs(lo - hi).max() > 1e-5


def test_parity_bf16(stage):
  name, model, folder, inputs = stage
  ours = weights.load_unet(folder, jnp.bfloat16)
  assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(jax.tree.map(lambda p: p, ours)))
  ref, got = _run_torch(model, inputs), _run_ours(ours, inputs, jnp.bfloat16)
  rel = np.abs(ref - got).max() / np.abs(ref).max()
  print(f"\nIF-{name} tiny UNet bf16 max error relative to output scale: {rel:.3e}")
  assert rel < 5e-2


def test_export_round_trip(stage, tmp_path):
  name, model, folder, inputs = stage
  ours = weights.load_unet(folder)
  out_dir = weights.save_unet_diffusers(ours, str(tmp_path / "export"))
  reloaded = UNet2DConditionModel.from_pretrained(out_dir).eval()
  ref, got = _run_torch(model, inputs), _run_torch(reloaded, inputs)
  err = np.abs(ref - got).max()
  print(f"\nIF-{name} export round trip max abs error: {err:.3e}")
  assert err == 0.0  # the same float32 numbers, byte for byte
  # And our own loader reads our export back.
  np.testing.assert_array_equal(_run_ours(weights.load_unet(out_dir), inputs), _run_ours(ours, inputs))


def test_sharded_and_fp16_checkpoints(tmp_path):
  model = _torch_unet(TINY_IF_I)
  model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
  assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
  model.half().save_pretrained(tmp_path / "fp16", variant="fp16")
  full = weights.load_unet(str(tmp_path / "sharded"))
  half = weights.load_unet(str(tmp_path / "fp16"), jnp.float16)
  for a, b in zip(jax.tree.leaves(unet_lib.nnx.state(full)), jax.tree.leaves(unet_lib.nnx.state(half))):
    np.testing.assert_array_equal(np.asarray(a).astype(np.float16), np.asarray(b))


# -- bad folders: one clear message naming the key and what to do ---------------------------


def test_missing_folder_and_file(tmp_path):
  with pytest.raises(weights.WeightsError, match="does not exist"):
    weights.load_unet(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(weights.WeightsError, match="config.json"):
    weights.load_unet(str(tmp_path / "empty"))
  (tmp_path / "empty" / "config.json").write_text(json.dumps(TINY_IF_I))
  (tmp_path / "empty" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
  with pytest.raises(weights.WeightsError, match=r"diffusion_pytorch_model\.safetensors.*pickle"):
    weights.load_unet(str(tmp_path / "empty"))


def test_wrong_shape_and_extra_key(tmp_path):
  _torch_unet(TINY_IF_I).save_pretrained(tmp_path)
  path = str(tmp_path / "diffusion_pytorch_model.safetensors")
  tensors = dict(safetensors_io.SafetensorsFile(path))
  tensors["conv_in.weight"] = np.zeros((32, 3, 5, 5), np.float32)
  tensors["some_extra.weight"] = np.zeros((2,), np.float32)
  del tensors["conv_out.bias"]
  safetensors_io.save_file(tensors, path)
  with pytest.raises(weights.WeightsError) as e:
    weights.load_unet(str(tmp_path))
  msg = str(e.value)
  print("\n" + msg)
  assert "'conv_in.weight' has shape (32, 3, 5, 5), expected (32, 3, 3, 3)" in msg
  assert "unexpected tensor 'some_extra.weight'" in msg
  assert "missing tensor 'conv_out.bias'" in msg and "expected shape (6,)" in msg
  assert "config.json" in msg  # says what to check


def test_unsupported_config_is_named(tmp_path):
  with pytest.raises(ValueError, match="CrossAttnDownBlock2D"):
    unet_lib.UNetConfig.from_diffusers(dict(TINY_IF_I, down_block_types=["CrossAttnDownBlock2D"] * 2))


# -- full size, by shape only -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["if_i_xl_unet.json", "if_ii_l_unet.json"])
def test_full_size_param_count(reference_configs_dir, name):
  raw = json.loads((reference_configs_dir / name).read_text())
  ours = unet_lib.param_count(unet_lib.abstract_unet(unet_lib.UNetConfig.from_diffusers(raw)))
  with torch.device("meta"):
    ref = UNet2DConditionModel.from_config({k: v for k, v in raw.items() if not k.startswith("_")})
  ref_count = sum(p.numel() for p in ref.parameters())
  print(f"\n{name}: ours {ours:,} diffusers {ref_count:,}")
  assert ours == ref_count == raw["_param_count"]["computed"]


def _xl_specs(reference_configs_dir):
  raw = json.loads((reference_configs_dir / "if_i_xl_unet.json").read_text())
  model = unet_lib.abstract_unet(unet_lib.UNetConfig.from_diffusers(raw))
  state = unet_lib.nnx.state(model, unet_lib.nnx.Param)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  specs = sharding.param_specs(state, mesh)
  flat = {"/".join(map(str, p)): (v.get_value(), s.get_value()) for (p, v), (_, s) in
          zip(unet_lib.nnx.to_flat_state(state), unet_lib.nnx.to_flat_state(specs))}
  return flat


def test_full_size_sharding_golden(reference_configs_dir):
  assert len(jax.devices()) == 8
  flat = _xl_specs(reference_configs_dir)
  unsplit = [(k, a.shape) for k, (a, spec) in flat.items()
             if math.prod(a.shape) * 4 >= 2 ** 20 and "fsdp" not in jax.tree.leaves(tuple(spec))]
  assert not unsplit, f"tensors >= 1 MiB not split over fsdp: {unsplit[:5]}"
  got = {k: [list(x) if isinstance(x, tuple) else x for x in spec] for k, (_, spec) in flat.items()}
  if os.environ.get("UPDATE_GOLDEN"):
    GOLDEN.parent.mkdir(exist_ok=True)
    lines = ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(got.items()))
    GOLDEN.write_text("{\n" + lines + "\n}\n")
  want = json.loads(GOLDEN.read_text())
  assert got == want, "partition specs changed; if intended, rerun with UPDATE_GOLDEN=1"


def test_query_chunked_attention_matches_plain():
  """The CPU path that chunks long query sequences gives the plain softmax attention."""
  rs = np.random.RandomState(0)
  q = rs.randn(2, 1024, 2, 8).astype(np.float32)
  k = rs.randn(2, 1031, 2, 8).astype(np.float32)
  v = rs.randn(2, 1031, 2, 8).astype(np.float32)
  bias = np.where(np.arange(1031) < 4, -10000.0, 0.0).astype(np.float32)[None].repeat(2, 0)
  assert unet_lib._query_chunk(1024, 1031) == 32  # this size takes the chunked path on CPU
  got = np.asarray(jax.jit(unet_lib.dot_attention)(q, k, v, bias))
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8) + bias[:, None, None, :]
  p = np.exp(s - s.max(-1, keepdims=True))
  want = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v).reshape(2, 1024, 16)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_chunk_switch_and_batch_pinning():
  """CHUNK_QUERIES=False plans the TPU program on CPU; constrain_batch pins only under a mesh."""
  unet_lib.CHUNK_QUERIES = False
  try:
    assert unet_lib._query_chunk(1024, 1031) is None
  finally:
    unet_lib.CHUNK_QUERIES = None
  assert unet_lib._query_chunk(1024, 1031) == 32

  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  f = jax.jit(lambda x: sharding.constrain_batch(x) * 2.0,
              in_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  x = jnp.ones((8, 3))
  assert f(x).sharding.spec == jax.sharding.PartitionSpec()  # no mesh set: untouched
  with jax.set_mesh(mesh):
    assert f(x).sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    assert f(jnp.ones((6, 3))).sharding.spec == jax.sharding.PartitionSpec()  # 6 % 8: untouched
