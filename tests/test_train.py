"""End to end: train.run on the tiny default, sharded, resumed, exported; CLI error paths."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dreambooth_jax import methods, pipeline, sharding
from dreambooth_jax import state as state_lib
from dreambooth_jax import train as train_lib

from conftest import run_cli
from train_helpers import tiny_config




def test_run_leaves_checkpoint_export_metrics_and_samples(full_run):
  workdir, state = full_run
  names = set(os.listdir(workdir))
  assert {"checkpoints", "export", "metrics.jsonl", "samples", "identifier.json", "config.json",
          "class_priors", "prompt_embeddings"} <= names, names
  assert int(state["step"]) == 4
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert rows[-1]["step"] == 4 and all(np.isfinite(r["loss"]) for r in rows)
  assert {"base/prior_loss", "sr256/instance_loss", "l2_grads"} <= set(rows[-1])
  info = json.load(open(os.path.join(workdir, "export", "dreambooth.json")))
  assert info["identifier"] and info["class_noun"] == "dog"
  for stage in ("base", "sr256"):
    assert os.path.isfile(os.path.join(workdir, "export", stage, "config.json"))
  assert any(n.endswith(".png") for n in os.listdir(os.path.join(workdir, "samples")))


def test_each_program_compiles_once(full_run):
  """The run's programs compile once each: the sample grids (steps 2 and 4) reuse the
  sampling loops the class priors compiled (same batch, same mesh), and the step compiles
  once for all four steps."""
  import collections
  workdir, _ = full_run
  names = json.load(open(os.path.join(workdir, "compiled.json")))
  counts = collections.Counter(names)
  print(f"\n{len(names)} compilations; most: {counts.most_common(6)}")
  assert len(sorted(os.listdir(os.path.join(workdir, "samples")))) == 2  # two grids were drawn
  assert counts["jit(train_step)"] == 1
  assert counts["jit(_loop)"] == 2, counts  # one sampling loop per stage, priors and grids
  # Loading tiny models compiles nothing per parameter (values are cast on the host and
  # placed shard by shard); orbax's first save slices replicated arrays (one small
  # program per shape), and a few eager ops prepare the sampler's inputs.
  eager = {n: k for n, k in counts.items() if n not in ("jit(slice)", "jit(_loop)", "jit(train_step)")}
  assert sum(eager.values()) < 40, eager


def test_params_sharded_as_the_rules_say(full_run):
  _, state = full_run
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  for stage, params in state["params"].items():
    want = sharding.param_specs(params, mesh)
    for (path, var), (_, spec) in zip(nnx.to_flat_state(params), nnx.to_flat_state(want)):
      got = var.get_value().sharding.spec
      assert tuple(got) == tuple(spec.get_value()), (stage, path, got, spec.get_value())
  big = [v.get_value() for _, v in nnx.to_flat_state(state["params"]["base"])
         if v.get_value().size >= 4096]
  assert any("fsdp" in jax.tree.leaves(tuple(a.sharding.spec)) for a in big)
  # Adam's moments are sharded exactly like the params they mirror (not replicated).
  adam = [s for s in jax.tree.leaves(state["opt_state"], is_leaf=lambda x: hasattr(x, "mu"))
          if hasattr(s, "mu")]
  assert adam
  for moment in (adam[0].mu, adam[0].nu):
    for p, m in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(moment)):
      assert p.sharding.spec == m.sharding.spec, (p.shape, p.sharding.spec, m.sharding.spec)


def test_resume_reaches_the_same_params_bitwise(full_run, tmp_path):
  """Resumed from the full run's own step-2 checkpoint (its later one removed), steps 3-4
  reproduce its final params bitwise; the caches are read, not recomputed."""
  workdir, state = full_run
  shutil.copytree(workdir, tmp_path, dirs_exist_ok=True,
                  ignore=shutil.ignore_patterns("export", "samples", "tensorboard"))
  shutil.rmtree(tmp_path / "checkpoints" / "4")
  config = tiny_config()
  config.log.sample_every = 0
  resumed = train_lib.run(config, str(tmp_path))
  for a, b in zip(jax.tree.leaves(resumed["params"]), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # A non-finite loss stops the run; the update is not applied, nothing is saved. The loss
  # goes non-finite through the data, cached prompt embeddings at float32's largest value
  # (finite, so the cache keeps them): the config, and so the compiled step, is unchanged.
  from safetensors.numpy import load_file, save_file
  from safetensors import safe_open
  for f in (tmp_path / "prompt_embeddings").glob("*.safetensors"):
    with safe_open(str(f), "np") as opened:
      meta = opened.metadata()
    tensors = load_file(str(f))
    tensors["embeddings"] = np.full_like(tensors["embeddings"], np.finfo(np.float32).max)
    save_file(tensors, str(f), metadata=meta)
  config.train.steps = 6
  with pytest.raises(train_lib.TrainError, match="non-finite loss"):
    train_lib.run(config, str(tmp_path))
  from dreambooth_jax import checkpoint
  assert checkpoint.Checkpointer(str(tmp_path)).latest_step() == 4


def test_prior_term_enters_the_gradient():
  # The base stage: the prior term is added by the method, whatever the stage's inputs
  # (the SR step's every input is compared with diffusers' by bench_train_step's test).
  config = tiny_config(stages="base")
  models = pipeline.build(config)
  stages = {n: models.cascade.by_name[n] for n in models.tuned}
  params = {n: s.params for n, s in stages.items()}
  rs = np.random.RandomState(0)
  batch = {n: {"instance": jnp.asarray(rs.uniform(-1, 1, (1, r, r, 3)), jnp.float32),
               "prior": jnp.asarray(rs.uniform(-1, 1, (1, r, r, 3)), jnp.float32)}
           for n, r in ((n, s.settings.resolution) for n, s in stages.items())}
  emb = {"text": jnp.asarray(rs.randn(1, 77, 64), jnp.float32), "mask": jnp.ones((1, 77), jnp.int32)}
  batch["text"] = {"instance": emb, "class": jax.tree.map(lambda x: x * 0.5, emb)}
  grad = jax.jit(jax.grad(lambda p, w: methods.dreambooth_loss(stages, p, batch, jax.random.key(0), w)[0]))
  g0, g1 = grad(params, 0.0), grad(params, 1.0)
  diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
  print(f"\nmax |grad(lambda=1) - grad(lambda=0)| = {diff:.3e}")
  assert diff > 1e-6


# -- the CLI on bad input: one paragraph, exit code 2, the workdir untouched ---------------------


def _cli(*args):
  return run_cli("dreambooth_jax.train", *args, timeout=300)


def test_cli_empty_subject_folder(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "wd").mkdir()
  (tmp_path / "wd" / "keep.txt").write_text("precious")
  r = _cli("--config=configs/imagen_dog.py:runlocal", f"--workdir={tmp_path / 'wd'}",
           f"--config.subject.dir={tmp_path / 'empty'}")
  print(r.stderr[-2000:])
  assert r.returncode == 2
  assert "empty" in r.stderr and "Traceback" not in r.stderr
  assert sorted(os.listdir(tmp_path / "wd")) == ["keep.txt"]


def _bad_folder(tmp_path, case):
  from PIL import Image
  folder = tmp_path / case
  folder.mkdir()
  good = Image.new("RGB", (300, 300), (200, 120, 40))
  good.save(folder / "ok.jpg")
  if case == "truncated":
    good.save(folder / "cut.jpg")
    data = (folder / "cut.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[:len(data) // 2])
    return folder, "cut.jpg"
  if case == "not_an_image":
    (folder / "notes.jpg").write_text("these are my notes, not a photo")
    return folder, "notes.jpg"
  Image.new("RGB", (40, 30)).save(folder / "tiny.png")
  return folder, "tiny.png"


@pytest.mark.parametrize("case", ["truncated", "not_an_image", "too_small"])
def test_cli_bad_subject_file_is_named(tmp_path, case):
  folder, bad = _bad_folder(tmp_path, case)
  r = _cli("--config=configs/imagen_dog.py:runlocal", f"--workdir={tmp_path / 'wd'}",
           f"--config.subject.dir={folder}")
  print(r.stderr[-1500:])
  assert r.returncode == 2 and bad in r.stderr and "Traceback" not in r.stderr
  assert not (tmp_path / "wd" / "checkpoints").exists()


def test_cli_unknown_config_key(tmp_path):
  r = _cli("--config=configs/imagen_dog.py:runlocal", f"--workdir={tmp_path}", "--config.trian.lr=1")
  print(r.stderr[-2000:])
  assert r.returncode != 0 and "trian" in r.stderr and "Traceback" not in r.stderr


def test_cli_missing_weights_folder(tmp_path):
  r = _cli("--config=configs/imagen_dog.py:if,runlocal", f"--workdir={tmp_path}",
           f"--config.pretrained.stage_1={tmp_path / 'nope'}", f"--config.pretrained.stage_2={tmp_path / 'nope'}",
           f"--config.pretrained.t5={tmp_path / 'nope'}", f"--config.pretrained.tokenizer={tmp_path / 'nope'}")
  print(r.stderr[-2000:])
  assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr


def test_sample_fills_the_identifier_and_is_seeded(full_run):
  """finetuned.sample: [V] becomes the workdir's identifier, every stage's images come back,
  and the same seed gives the same images."""
  workdir, _ = full_run
  from dreambooth_jax import finetuned
  rows = finetuned.sample(workdir, ["a [V] dog on the beach"], num=2, seed=0)
  (prompt, images), = rows
  ident = json.load(open(os.path.join(workdir, "identifier.json")))["text"]
  assert prompt == f"a {ident} dog on the beach"
  assert images["base"].shape == (2, 32, 32, 3) and images["sr256"].shape == (2, 64, 64, 3)
  again = finetuned.sample(workdir, ["a [V] dog on the beach"], num=2, seed=0)
  np.testing.assert_array_equal(again[0][1]["sr256"], images["sr256"])


def test_sample_cli_writes_a_grid(full_run, tmp_path):
  workdir, _ = full_run
  run_cli("dreambooth_jax.sample", f"--workdir={workdir}", "--prompt=a [V] dog on the beach",
          "--num=1", f"--out={tmp_path / 'grid.png'}", timeout=300, ok=True)
  assert (tmp_path / "grid.png").stat().st_size > 0


def test_previews_hand_the_prompt_texts_to_the_cascade(tmp_path):
  """train's preview batches (`sample_previews`, no model): every batch full, the last
  padded with its last prompt and the padding dropped, and the prompt texts handed over
  with their embeddings, so a stage III that encodes them itself runs (1024 px previews,
  written at full size beside the grid as the sample CLI writes them)."""
  from dreambooth_jax import embeddings, grids

  class FakeCascade:  # what Cascade.sample returns: every stage it ran, its own text stage too
    calls = []

    def sample(self, cond, rng, *, uncond_embeddings, params, batch_size, mesh, prompts):
      self.calls.append((list(prompts), cond["text"][:, 0, 0].tolist()))
      assert len(prompts) == cond["text"].shape[0] == batch_size
      tag = np.array([ord(p[-1]) for p in prompts], np.uint8)[:, None, None, None]
      return {"base": np.broadcast_to(tag, (batch_size, 2, 2, 3)),
              "sr1024": np.broadcast_to(tag, (batch_size, 8, 8, 3))}

  table = {p: embeddings.PromptEmbedding(np.full((3, 4), i, np.float32), np.ones(3, np.int32))
           for i, p in enumerate(["a", "b", "c", ""])}
  cascade = FakeCascade()
  out = train_lib.sample_previews(cascade, table, embeddings.stack_embeddings(table, [""]),
                                  ["a", "a", "b", "b", "c"], batch=2, params={}, mesh=None)
  assert cascade.calls == [(["a", "a"], [0, 0]), (["b", "b"], [1, 1]), (["c", "c"], [2, 2])]
  assert {k: v.shape for k, v in out.items()} == {"base": (5, 2, 2, 3), "sr1024": (5, 8, 8, 3)}
  assert out["sr1024"][:, 0, 0, 0].tolist() == [ord(c) for c in "aabbc"]
  rows = [(p, {k: v[2 * i:2 * i + 2] for k, v in out.items()}) for i, p in enumerate("ab")]
  assert grids.save_last_stage(tmp_path / "step_000004.png", rows) == ("sr1024", 8)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      f"step_000004_{i}_{k}_sr1024.png" for i in range(2) for k in range(2)]


@pytest.mark.parametrize("name", ["adafactor", "adamw_bf16_mu", "per_stage"])
def test_memory_saving_optimizers_place_and_learn(name):
  """Adafactor, AdamW with a bfloat16 first moment, and one optimizer per stage (the `if`
  default): state placed validly on the 2x4 mesh (moments like their params, factored
  statistics replicated), less of it than AdamW's, and each minimises a quadratic."""
  kw = {"adafactor": {"train.optimizer": "adafactor"},
        "adamw_bf16_mu": {"train.mu_dtype": "bfloat16"},
        "per_stage": {"train.optimizer": "base=adafactor,sr256=adamw"}}[name]
  config, adamw = tiny_config(**kw), tiny_config()
  models = pipeline.build(config)
  mesh, rules = sharding.make_mesh(dict(config.mesh)), pipeline.rules_of(config)
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  stages = {n: models.cascade.by_name[n] for n in models.tuned}
  setup = lambda c: state_lib.setup(c, stages, methods.phases(c)[0], mesh, rules, num_tokens=0,
                                    token_width=models.t5_width)
  ps, ps_adamw = setup(config), setup(adamw)
  abstract, shardings, abstract_adamw = ps.abstract, ps.shardings, ps_adamw.abstract
  for x, sh in zip(jax.tree.leaves(abstract["opt_state"]), jax.tree.leaves(shardings["opt_state"])):
    sh.shard_shape(x.shape)  # raises if the sharding does not divide the leaf
  opt, opt_adamw = nbytes(abstract["opt_state"]), nbytes(abstract_adamw["opt_state"])
  print(f"\n{name}: optimiser state {opt / 2**20:.2f} MiB vs AdamW {opt_adamw / 2**20:.2f} MiB")
  # No first moment, and second moments factored where both dims are >= 128 (few
  # in the tiny UNets; at full size nearly all): under half of AdamW's two moments.
  assert opt < {"adafactor": 0.5, "adamw_bf16_mu": 0.8, "per_stage": 0.8}[name] * opt_adamw
  mus = [(jax.tree_util.keystr(p), x) for p, x in
         jax.tree_util.tree_flatten_with_path(abstract["opt_state"])[0]
         if ".mu" in jax.tree_util.keystr(p) and x.ndim]
  if name == "adamw_bf16_mu":
    assert mus and all(x.dtype == jnp.bfloat16 for _, x in mus)
  if name == "per_stage":  # Adam moments for sr256 only, sharded like the params
    assert mus and all("'sr256'" in p for p, _ in mus)
    flat_sh = dict((jax.tree_util.keystr(p), s) for p, s in
                   jax.tree_util.tree_flatten_with_path(shardings["opt_state"])[0])
    assert any(flat_sh[p].spec != jax.sharding.PartitionSpec() for p, _ in mus)

  config.train.lr = 0.05
  target = jnp.linspace(-1.0, 1.0, 256 * 256).reshape(256, 256)  # factored: 256 >= 128
  params = {"base": {"w": jnp.zeros((256, 256))}, "sr256": {"w": jnp.zeros((256, 256))}}
  tx = methods.optimizer(config, params, methods.phases(config)[0])
  state = tx.init(params)
  loss = lambda p: sum(jnp.mean(jnp.square(p[s]["w"] - target)) for s in p)
  start = float(loss(params))
  for _ in range(30):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  print(f"quadratic: {start:.4f} -> {float(loss(params)):.4f} in 30 steps")
  assert float(loss(params)) < 0.5 * start


def test_unknown_optimizer_is_named():
  from dreambooth_jax.config_lib import ConfigError
  for spec in ("adam", "base=adam", "bsae=adamw"):
    config = tiny_config(**{"train.optimizer": spec})
    with pytest.raises(ConfigError, match="config.train.optimizer"):
      methods.optimizer(config, {"base": {"w": jnp.zeros(2)}}, methods.phases(config)[0])
