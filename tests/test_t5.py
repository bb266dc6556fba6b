"""T5 v1.1 encoder: parity with transformers' T5EncoderModel, loading, errors, full-size shapes.

The PyTorch reference is a tiny random model saved with `save_pretrained`;
our loader reads the folder back without torch. Norm weights are perturbed
away from 1 so that a wrongly mapped RMSNorm cannot hide.
"""

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel as HFT5EncoderModel
from transformers import T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention

from dreambooth_jax import sharding
from dreambooth_jax.models.t5 import T5Config, T5EncoderModel, count_params, relative_position_buckets
from dreambooth_jax.weights.safetensors_io import WeightsError, open_folder, save_file
from dreambooth_jax.weights.t5 import abstract_t5_encoder, load_t5_encoder, t5_config_from_dict
from dreambooth_jax.weights.torch_layout import to_torch, torch_key

TINY = dict(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
            # Smaller than the 77-token IF context, so the clipped far buckets are exercised.
            relative_attention_max_distance=64)
LENGTH = 77
XXL_ENCODER_PARAMS = 4_762_310_656


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=g))
  return model.eval()


def _inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(3, TINY["vocab_size"], size=(3, LENGTH)).astype(np.int32)
  mask = np.zeros((3, LENGTH), np.int32)
  for row, n in enumerate((LENGTH, 13, 1)):  # full, padded, only </s>
    mask[row, :n] = 1
    ids[row, n - 1] = 1
    ids[row, n:] = 0
  return ids, mask


# One jitted apply for every comparison: eager and jitted XLA differ in the last bits.
_apply = nnx.jit(lambda model, ids, mask: model(ids, mask))


def _torch_out(model, ids, mask):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
  return out.last_hidden_state.float().numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny random HF encoder saved single-file and sharded, plus its fp32 reference output."""
  torch.manual_seed(0)
  model = _perturbed(HFT5EncoderModel(HFT5Config(**TINY)), seed=1)
  root = tmp_path_factory.mktemp("t5")
  single, sharded = str(root / "single"), str(root / "sharded")
  model.save_pretrained(single, safe_serialization=True)
  model.save_pretrained(sharded, safe_serialization=True, max_shard_size="50KB")
  ids, mask = _inputs()
  ref = _torch_out(model, ids, mask)
  # transformers' own bf16 error is the yardstick for ours.
  ref_bf16 = _torch_out(model.to(torch.bfloat16), ids, mask)
  return dict(single=single, sharded=sharded, ids=ids, mask=mask, root=root, ref=ref,
              ref_bf16=ref_bf16)


@pytest.fixture(scope="module")
def ours_fp32(tiny):
  model = load_t5_encoder(tiny["single"])
  return model, np.asarray(_apply(model, tiny["ids"], tiny["mask"]))


def test_relative_position_buckets_match_transformers():
  rel = torch.arange(300)[None, :] - torch.arange(200)[:, None]
  for buckets, distance in ((32, 128), (32, 64), (16, 20), (64, 256)):
    for bidirectional in (True, False):
      ref = HFT5Attention._relative_position_bucket(rel, bidirectional=bidirectional,
                                                    num_buckets=buckets, max_distance=distance)
      ours = relative_position_buckets(200, 300, buckets, distance, bidirectional)
      np.testing.assert_array_equal(ours, ref.numpy())


def test_config_from_dict(tiny):
  with open(os.path.join(tiny["single"], "config.json")) as f:
    cfg = t5_config_from_dict(json.load(f))
  assert cfg.d_model == 64 and cfg.num_layers == 2 and cfg.relative_attention_max_distance == 64
  assert cfg.is_gated_act and cfg.dense_act_fn == "gelu_new"
  # transformers' defaults for keys a config.json leaves out: original T5, ReLU, distance 128.
  plain = T5Config.from_dict({"d_model": 8})
  assert plain.dense_act_fn == "relu" and not plain.is_gated_act
  assert plain.relative_attention_max_distance == 128
  with pytest.raises(WeightsError, match="feed_forward_proj"):
    t5_config_from_dict({"feed_forward_proj": "gated-gelu-x"})


def test_fp32_parity(tiny, ours_fp32):
  model, out = ours_fp32
  assert out.shape == (3, LENGTH, TINY["d_model"]) and out.dtype == np.float32
  err = np.abs(out - tiny["ref"]).max()
  print(f"\nT5 fp32 max abs error vs transformers: {err:.3e} (max |ref| {np.abs(tiny['ref']).max():.2f})")
  assert err < 1e-4


def test_bf16_load_vs_fp32_reference(tiny):
  model = load_t5_encoder(tiny["single"], dtype=jnp.bfloat16)
  assert model.shared.embedding[...].dtype == jnp.bfloat16
  out = np.asarray(_apply(model, tiny["ids"], tiny["mask"]))
  assert out.dtype == jnp.bfloat16
  ref, scale = tiny["ref"], np.abs(tiny["ref"]).max()
  err = np.abs(out.astype(np.float32) - ref)
  torch_err = np.abs(tiny["ref_bf16"] - ref)
  print(f"\nT5 bf16 vs fp32 transformers: max abs error {err.max():.3e} (relative to max |ref| "
        f"{err.max() / scale:.3e}, mean {err.mean():.3e}); transformers bf16 itself: max "
        f"{torch_err.max():.3e} (relative {torch_err.max() / scale:.3e}, mean {torch_err.mean():.3e})")
  assert err.max() / scale < 5e-2
  assert err.mean() < 1.5 * torch_err.mean()


def test_sharded_checkpoint_loads_identically(tiny, ours_fp32):
  assert os.path.exists(os.path.join(tiny["sharded"], "model.safetensors.index.json"))
  model = load_t5_encoder(tiny["sharded"])
  _, out_single = ours_fp32
  np.testing.assert_array_equal(np.asarray(_apply(model, tiny["ids"], tiny["mask"])), out_single)


def test_full_t5_checkpoint_loads_encoder_only(tiny, tmp_path):
  torch.manual_seed(2)
  full = _perturbed(T5ForConditionalGeneration(HFT5Config(**TINY)), seed=3)
  full.save_pretrained(str(tmp_path), safe_serialization=True)
  assert any(k.startswith("decoder.") for k in open_folder(str(tmp_path), ("model",)))
  ours = load_t5_encoder(str(tmp_path))
  ref = _torch_out(full.get_encoder(), tiny["ids"], tiny["mask"])
  assert np.abs(np.asarray(_apply(ours, tiny["ids"], tiny["mask"])) - ref).max() < 1e-4


def test_embed_tokens_alias_and_remat(tiny, ours_fp32, tmp_path):
  # A checkpoint that kept only the tied alias `encoder.embed_tokens.weight`.
  tensors = dict(open_folder(tiny["single"], ("model",)))
  tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
  save_file(tensors, str(tmp_path / "model.safetensors"))
  shutil.copy(os.path.join(tiny["single"], "config.json"), tmp_path)
  model = load_t5_encoder(str(tmp_path), remat=True)
  _, expected = ours_fp32
  ids, mask = tiny["ids"], tiny["mask"]
  # remat changes how XLA fuses the blocks, hence a tolerance instead of equality.
  np.testing.assert_allclose(np.asarray(_apply(model, ids, mask)), expected, atol=1e-5)

  # Gradients flow through the rematerialised blocks to the embedding table.
  def loss(emb_model):
    return jnp.mean(jnp.square(emb_model(ids[:1], mask[:1])))
  grads = nnx.jit(nnx.grad(loss))(model)
  g = np.asarray(grads["shared"]["embedding"][...])
  assert np.isfinite(g).all() and np.abs(g[ids[0]]).sum() > 0


def test_fresh_init_runs_and_padding_is_ignored():
  cfg = T5Config.from_dict(TINY)
  model = T5EncoderModel(cfg, rngs=nnx.Rngs(0))
  ids, mask = _inputs()
  out = np.asarray(_apply(model, ids, mask))
  assert np.isfinite(out).all()
  # Changing padded tokens must not change the outputs at real positions.
  ids2 = ids.copy()
  ids2[1, 13:] = 7
  out2 = np.asarray(_apply(model, ids2, mask))
  np.testing.assert_allclose(out2[1, :13], out[1, :13], atol=1e-6)


# ----------------------------------------------------------------------------- errors


def _broken_copy(src: str, dst, edit) -> str:
  tensors = dict(open_folder(src, ("model",)))
  edit(tensors)
  os.makedirs(dst, exist_ok=True)
  save_file(tensors, os.path.join(dst, "model.safetensors"))
  shutil.copy(os.path.join(src, "config.json"), dst)
  return str(dst)


def test_missing_folder_and_weights(tiny, tmp_path):
  with pytest.raises(WeightsError, match="does not exist|no config.json"):
    load_t5_encoder(str(tmp_path / "nope"))
  shutil.copy(os.path.join(tiny["single"], "config.json"), tmp_path)
  with pytest.raises(WeightsError, match="model.safetensors"):
    load_t5_encoder(str(tmp_path))


def test_wrong_shape_names_key_and_shapes(tiny, tmp_path):
  key = "encoder.block.1.layer.0.SelfAttention.q.weight"
  def edit(t):
    t[key] = np.zeros((64, 32), np.float32)
  folder = _broken_copy(tiny["single"], tmp_path, edit)
  with pytest.raises(WeightsError) as e:
    load_t5_encoder(folder)
  msg = str(e.value)
  assert key in msg and "(64, 32)" in msg and "(64, 64)" in msg


def test_unexpected_and_missing_keys_are_named(tiny, tmp_path):
  def edit(t):
    t["encoder.block.0.layer.0.SelfAttention.extra.weight"] = np.ones((3, 5), np.float32)
    del t["encoder.final_layer_norm.weight"]
  folder = _broken_copy(tiny["single"], tmp_path, edit)
  with pytest.raises(WeightsError) as e:
    load_t5_encoder(folder)
  msg = str(e.value)
  assert "unexpected tensor 'encoder.block.0.layer.0.SelfAttention.extra.weight'" in msg
  assert "(3, 5)" in msg
  assert "missing tensor 'encoder.final_layer_norm.weight'" in msg and "(64,)" in msg


# ----------------------------------------------------------------------------- full size


@pytest.fixture(scope="module")
def xxl(reference_configs_dir):
  path = reference_configs_dir / "t5_v1_1_xxl.json"
  return json.loads(path.read_text()), abstract_t5_encoder(str(path), dtype=jnp.bfloat16)


def test_full_size_xxl_param_count(xxl):
  raw, model = xxl
  t0 = time.perf_counter()
  hf_config = HFT5Config(**{k: v for k, v in raw.items() if not k.startswith("_")})
  with torch.device("meta"):
    reference = HFT5EncoderModel(hf_config)
  hf_count = sum(p.numel() for p in reference.parameters())
  ours = count_params(model)
  print(f"\nT5 v1.1 XXL encoder: ours {ours:,} params, transformers {hf_count:,} "
        f"({time.perf_counter() - t0:.2f}s)")
  assert ours == hf_count == XXL_ENCODER_PARAMS == raw["_param_count"]["computed_T5EncoderModel"]
  # Same tensor names and (torch-layout) shapes as the reference, decoder-free.
  state = nnx.state(model, nnx.Param)
  ours_shapes = {torch_key(p): to_torch(str(p[-1]), np.empty(v.get_value().shape, np.bool_)).shape
                 for p, v in nnx.to_flat_state(state)}
  ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()
                if k != "encoder.embed_tokens.weight"}
  assert ours_shapes == ref_shapes


def test_full_size_xxl_sharding_plan(xxl):
  _, model = xxl
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  specs = {"/".join(map(str, p)): v.get_value()
           for p, v in nnx.to_flat_state(sharding.param_specs(nnx.state(model, nnx.Param), mesh))}
  P = jax.sharding.PartitionSpec
  assert specs["shared/embedding"] == P("tensor", "fsdp")
  assert specs["encoder/block/3/layer/0/SelfAttention/q/kernel"] == P("fsdp", "tensor")
  assert specs["encoder/block/3/layer/0/SelfAttention/o/kernel"] == P("tensor", "fsdp")
  assert specs["encoder/block/3/layer/1/DenseReluDense/wo/kernel"] == P("tensor", "fsdp")
  assert specs["encoder/block/0/layer/0/SelfAttention/relative_attention_bias/embedding"] == P(None, "tensor")
  assert specs["encoder/final_layer_norm/scale"] == P()
