"""LoRA: adapters on the frozen UNets, their math, their training run, checkpoint and export.

The diffusers round trip (`load_lora_weights` into IFPipeline and IFSuperResolutionPipeline)
is in test_if_pipelines.py, on the IF repositories.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dreambooth_jax import checkpoint, config_lib, lora, methods, pipeline, sharding
from dreambooth_jax import train as train_lib
from train_helpers import tiny_config

# The tests of the shared LoRA run are one xdist group: it is trained once, on one worker,
# beside (not after) the other shared workdirs.
LORA_RUN = pytest.mark.xdist_group("lora")


def _stage_and_inputs(targets="attention+resnets", rank=3, remat=False, **lora_kw):
  config = tiny_config(f"tiny,runlocal,lora={rank}", **{"lora.targets": targets, "model.remat": remat,
                                                        **{f"lora.{k}": v for k, v in lora_kw.items()}})
  # One device: these check math, not sharding (eager ops over 8 fake devices are slow).
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  stage = pipeline.build(config, mesh).cascade.by_name["sr256"]  # convs, attention, aug embedding
  ls = lora.LoRAStage(stage, lora.settings(config))
  rng = np.random.default_rng(0)
  r = stage.settings.resolution
  x = jnp.asarray(rng.standard_normal((2, r, r, 3)), jnp.float32)
  cond = {"text": jnp.asarray(rng.standard_normal((2, 77, 64)), jnp.float32),
          "lowres": jnp.asarray(rng.standard_normal((2, r, r, 3)), jnp.float32),
          "aug": jnp.asarray([100, 250])}
  return ls, x, jnp.asarray([10, 500]), cond


def _random_adapters(ls, seed=1, scale=0.3):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * scale, a.dtype),
                      ls.abstract_params)


def test_adapters_start_as_the_frozen_model_and_equal_merged_weights():
  ls, x, t, cond = _stage_and_inputs()
  base = ls.base_params
  apply = jax.jit(ls.stage.apply)
  frozen = apply(base, x, t, cond)
  start = apply(ls.bind(base, ls.params), x, t, cond)
  np.testing.assert_array_equal(np.asarray(start), np.asarray(frozen))  # B = 0: exactly the base
  assert any("conv1" in p for p in ls.targets) and any(p.endswith("to_out/0") for p in ls.targets)

  adapters = _random_adapters(ls)
  adapted = apply(ls.bind(base, adapters), x, t, cond)
  merged = apply(lora.merged_params(ls, base, adapters), x, t, cond)
  err = float(jnp.abs(adapted - merged).max())
  moved = float(jnp.abs(adapted - frozen).max())
  print(f"\nforward-form LoRA vs merged weights: max abs err {err:.2e} (update moved outputs {moved:.3f})")
  assert moved > 0.05 and err < 1e-4


def test_gradients_reach_only_the_adapters_and_dropout_needs_a_key():
  # With remat, as the `if` config trains: nnx.remat must accept the frozen base, which
  # comes from outside the traced loss (as the step's `frozen` argument does).
  ls, x, t, cond = _stage_and_inputs(targets="attention", dropout=0.5, remat=True)
  base, adapters = ls.base_params, _random_adapters(ls)

  def loss(adapters, rng):
    return jnp.mean(ls.stage.apply(ls.bind(base, adapters, rng), x, t, cond) ** 2)

  loss = jax.jit(loss)
  grads = jax.jit(jax.grad(loss))(adapters, jax.random.key(0))
  norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)]
  assert all(n > 0 for n in norms), "every adapter gets a gradient"
  # Dropout only while a key is bound (training); sampling is deterministic.
  a = loss(adapters, jax.random.key(1))
  b = loss(adapters, jax.random.key(2))
  c, d = loss(adapters, None), loss(adapters, None)
  assert float(a) != float(b) and float(c) == float(d)


def test_each_subject_exports_as_its_lone_run_would():
  """Adapters with a leading subject axis (train_many's): subject i's diffusers LoRA file is
  the one a run of that subject alone writes. (That joint training gives each subject its
  lone run's adapters is tests/test_train_many.py's equivalence test.)"""
  ls, *_ = _stage_and_inputs(targets="attention+resnets", rank=2)
  joint = lora.LoRAStage(ls.stage, ls.lora, subjects=2)
  alone = [_random_adapters(ls, seed=s) for s in (1, 2)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *alone)
  files = [lora.diffusers_lora_tensors(joint, stacked, subject=i) for i in (0, 1)]
  for one, i in zip(files, (0, 1)):
    own = lora.diffusers_lora_tensors(ls, alone[i])
    assert one.keys() == own.keys() and all(np.array_equal(one[k], own[k]) for k in one)
  assert any(not np.array_equal(files[0][k], files[1][k]) for k in files[0])
  with pytest.raises(ValueError, match="subject="):
    lora.diffusers_lora_tensors(joint, stacked)


def test_diffusers_tensor_layout_matches_the_math():
  """The exported peft tensors, applied as peft does (x A^T B^T with scale 1), give our update."""
  ls, *_ = _stage_and_inputs(targets="attention+resnets", rank=2, alpha=6.0)
  adapters = _random_adapters(ls)
  tensors = lora.diffusers_lora_tensors(ls, adapters)
  assert len(tensors) == 2 * len(ls.targets)
  deltas = lora.deltas(ls, adapters)
  for target in ls.targets:
    a = tensors[f"unet.{target.replace('/', '.')}.lora_A.weight"]
    b = tensors[f"unet.{target.replace('/', '.')}.lora_B.weight"]
    if a.ndim == 4:  # torch conv [out, in, kh, kw] of B∘A = B[:, :, 0, 0] @ A over the rank
      torch_w = np.einsum("or,rihw->oihw", b[:, :, 0, 0], a)
      ours = deltas[f"{target}/kernel"].transpose(3, 2, 0, 1)
    else:
      torch_w, ours = b @ a, deltas[f"{target}/kernel"].T
    np.testing.assert_allclose(torch_w, ours, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key,value,match", [
    ("lora.targets", "no_such_layer$", "matches no Dense or Conv"),
    ("lora.targets", "(unclosed", "valid regex"),
    ("lora.dropout", 1.0, "lora.dropout"),
    ("lora.base_dtype", "int8", "lora.base_dtype"),
])
def test_bad_lora_settings_are_named(key, value, match):
  config = tiny_config("tiny,runlocal,lora=2", **{key: value})
  with pytest.raises(config_lib.ConfigError, match=match):
    lora.wrap(config, {s.name: s for s in pipeline.build(config).cascade.stages})


def _lora_run_config():
  # The two-stage method on the base stage: its fine-tune phase trains the adapters (UNet and
  # T5) with the learned row fixed, through T5 in the step. DreamBooth with priors on base and SR together through adapters is
  # the IF-pipeline round trip (test_if_pipelines.py).
  return tiny_config("tiny,runlocal,method=ti_then_finetune,stages=base,lora=4", **{
      "lora.targets": "attention+resnets", "lora.dropout": 0.1, "lora.merged_export": True,
      "lora.text_encoder": True, "train.lr": 1e-2, "checkpoint.every": 1, "checkpoint.keep": 10,
      "checkpoint.async_save": False, "log.sample_every": 0})


# Session scope: a module fixture is rebuilt when xdist interleaves other modules' tests.
@pytest.fixture(scope="session")
def lora_run(tmp_path_factory):
  """Tiny two-stage run (2 textual-inversion steps, then 2 steps of rank-4 adapters on the
  base, convs too, and on T5's attention, dropout on), a checkpoint every step:
  (workdir, final state)."""
  workdir = str(tmp_path_factory.mktemp("lora"))
  return workdir, train_lib.run(_lora_run_config(), workdir)


@LORA_RUN
def test_lora_run_learns_adapters_only(lora_run):
  workdir, state = lora_run
  assert set(state["params"]) == {"base", lora.TEXT}
  assert methods.TOKENS in state["fixed"]  # the row stage 1 learned, kept fixed
  t5_paths = [lora.module_path(p) for p, _ in nnx.to_flat_state(state["params"][lora.TEXT])]
  assert len(t5_paths) == 2 * 4 * 2  # a, b of q, k, v, o in each of the tiny T5's 2 blocks
  assert all("/SelfAttention/" in p for p in t5_paths)
  assert os.path.isfile(os.path.join(workdir, "export", checkpoint.TOKENS_FILE))
  for name, params in state["params"].items():
    paths = [p for p, _ in nnx.to_flat_state(params)]
    assert paths and all(p[-2] == "lora" and p[-1] in ("a", "b") for p in paths), name
    b = [v.get_value() for p, v in nnx.to_flat_state(params) if p[-1] == "b"]
    assert max(float(jnp.abs(x).max()) for x in b) > 0  # B left zero: nothing learned
  # The checkpoint holds the adapters and their moments: a small fraction of the UNets.
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  stored = ckpt.restore(4)
  n_adapter = sum(x.size for x in jax.tree.leaves(stored["params"]))
  n_unet = sum(x.size for x in jax.tree.leaves(
      pipeline.build(tiny_config()).cascade.by_name["base"].abstract_params))
  print(f"\nLoRA checkpoint: {n_adapter} adapter params vs {n_unet} UNet params")
  assert n_adapter < 0.25 * n_unet
  info = json.load(open(os.path.join(workdir, "export", "dreambooth.json")))
  assert info["lora"]["base"]["rank"] == 4 and info["folders"] == {"base": "base"}
  assert info["text_encoder_lora"]["folder"] == "base" and info["text_encoder_lora"]["modules"] == 8
  for name in ("base",):
    assert os.path.isfile(os.path.join(workdir, "export", name, lora.WEIGHTS_NAME))
    assert os.path.isfile(os.path.join(workdir, "export", f"{name}_merged", "config.json"))
  assert os.path.isfile(os.path.join(workdir, "export", "text_encoder_merged", "config.json"))
  from safetensors import safe_open
  with safe_open(os.path.join(workdir, "export", "base", lora.WEIGHTS_NAME), "np") as f:
    keys, meta = list(f.keys()), json.loads(f.metadata()[lora.METADATA_KEY])
  assert sum(k.startswith("text_encoder.encoder.block.") for k in keys) == 16
  assert meta["text_encoder.r"] == meta["unet.r"] == 4


@LORA_RUN
def test_lora_resume_is_bitwise(lora_run, tmp_path):
  """From the checkpoint at the phase boundary (step 2) into the adapters' phase."""
  workdir, state = lora_run
  copy = tmp_path / "resumed"
  shutil.copytree(workdir, copy)
  for step in ("3", "4"):
    shutil.rmtree(copy / "checkpoints" / step)
  resumed = train_lib.run(_lora_run_config(), str(copy))
  for key in ("params", "fixed"):
    for a, b in zip(jax.tree.leaves(resumed[key]), jax.tree.leaves(state[key])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@LORA_RUN
def test_sample_reads_a_lora_workdir(lora_run):
  """What the sample CLI, evaluate and the notebooks open (`FineTuned.load`): the adapters
  bound to the frozen base, which sample differently from the base alone."""
  from dreambooth_jax import finetuned
  workdir, _ = lora_run
  tuned = finetuned.FineTuned.load(workdir)
  assert isinstance(tuned.params["base"], lora.Adapted)
  assert isinstance(tuned.text_encoder, lora.Adapted)  # prompts go through T5's adapters
  rng = jax.random.key(0)
  ours = tuned.generate("a [V] dog on the beach", 2, rng, upto="base")["base"]
  base = tuned.models.cascade.sample(tuned.embed(["a [V] dog on the beach"]), rng,
                                     uncond_embeddings=tuned.embed([""]), batch_size=2,
                                     upto="base")["base"]
  assert ours.shape == (2, 32, 32, 3) and np.abs(ours.astype(int) - base.astype(int)).max() > 0
