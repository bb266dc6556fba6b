"""Many subjects in one job (dreambooth_jax.train_many): each subject's adapters equal its lone
training, the job runs end to end, resumes bitwise and exports per subject, and bad subject
folders are named before anything is built.

Compile time dominates on CPU: the job runs once on the tiny base stage (plus a resume that
hits the persistent compilation cache), and the equivalence test compiles only the lone step
it compares the job with.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import world
from dreambooth_jax import checkpoint, config_lib, data, embeddings, lora, methods, pipeline
from dreambooth_jax import priors, sharding
from dreambooth_jax import subjects as subjects_lib
from dreambooth_jax import train_many
from conftest import REPO, run_cli
from train_helpers import set_path

# The job's tests share one trained workdir: one xdist worker trains it.
pytestmark = pytest.mark.xdist_group("train_many")

TWO = "star_ball+zigzag_ball"  # both "ball": one class-prior cache serves both


def _job_config(arg: str = f"tiny,runlocal,subjects={TWO}", **overrides):
  config = config_lib.from_file(f"{REPO / 'configs' / 'dreambooth_benchmark.py'}:{arg}")
  config.stages = "base"
  config.mesh.update(data=2, fsdp=1, tensor=1)  # the subject axis split over data
  config.checkpoint.update(every=2, keep=10, async_save=False)
  config.log.tensorboard = False
  for key, value in overrides.items():
    set_path(config, key, value)
  return config


@pytest.fixture(scope="session")
def job(tmp_path_factory):
  """The job on two world subjects, tiny random cascade, base stage, 4 steps, a checkpoint
  every 2; a learning rate that moves the adapters and a clip every step bites (each
  subject by its own norm): (config, workdir, final joint state)."""
  config = _job_config(**{"train.lr": 1e-2, "train.grad_clip": 0.05})
  workdir = str(tmp_path_factory.mktemp("many"))
  return config, workdir, train_many.run(config, workdir)


def _lone_batches(config, workdir, name, models, steps):
  """Subject `name`'s batches as its lone `train.run` draws them (train.py's make_batch on one
  host), from the job's photos, prior cache and prompt cache."""
  info = json.load(open(os.path.join(workdir, "export", name, checkpoint.EXPORT_INFO)))
  t, r = config.train, config.cascade.base.resolution
  photos = data.SubjectData.from_folder(config.subjects[name].dir, {"base": r}, min_size=r)
  prompts = [info["instance_prompt"], info["class_prompt"]]
  table = models.encode(prompts, os.path.join(workdir, "prompt_embeddings"))
  p = config.prior
  spec = priors.PriorSpec.from_cascade(models.cascade, info["class_prompt"], p.num_images,
                                       upto="base", fingerprint=models.weights_fingerprint,
                                       seed=p.seed, batch_size=p.batch_size)
  prior = data.to_model_range(priors.load_priors(os.path.join(workdir, "class_priors", "a_ball"),
                                                 spec)["base"])
  text = {k: jax.tree.map(lambda x: x[None], embeddings.stack_embeddings(table, [p]))
          for k, p in zip(("instance", "class"), prompts)}
  for step in range(steps):
    idx = data.batch_indices(p.seed, step, t.prior_batch_size, p.num_images)[0]
    yield {"base": {"instance": photos.batch(config.seed, step, t.batch_size)["base"][None],
                    "prior": prior[idx][None]}, "text": text}


def test_each_subject_equals_its_lone_run(job):
  """Each subject's adapters after the joint job equal what the lone run's step
  (`methods.make_train_step`, the lone optimiser with its global-norm clip) reaches from the
  same start on that subject's batches."""
  config, workdir, state = job
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  models = pipeline.build(config, mesh)
  stage = models.cascade.by_name["base"]
  alone = lora.LoRAStage(stage, lora.settings(config))
  (phase,) = methods.phases(config)
  err = moved = 0.0
  step = None
  for i, s in enumerate(subjects_lib.from_config(config)):
    c = subjects_lib.lone_config(config, s)
    tx = methods.optimizer(c, {"base": alone.abstract_params}, phase)
    step = step or jax.jit(methods.make_train_step({"base": alone}, tx, c.prior.weight))
    params = {"base": alone.params}
    own = dict(params=params, opt_state=tx.init(params), step=jnp.int32(0),
               rng=jax.random.key(c.seed))
    for k, batch in enumerate(_lone_batches(config, workdir, s.name, models, c.train.steps)):
      own, metrics = step(own, batch, {"base": stage.params})
      assert metrics["l2_grads"] > c.train.grad_clip  # the clip bites
      # Same images, prompts and noise: the subject's loss in the job is the lone loss.
      np.testing.assert_allclose(rows[k][f"subject/{s.name}/loss"], float(metrics["loss"]),
                                 rtol=1e-5)
    for a, b, b0 in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(own["params"]),
                        jax.tree.leaves(alone.params)):
      err = max(err, float(np.abs(np.asarray(a)[i] - np.asarray(b)).max()))
      moved = max(moved, float(np.abs(np.asarray(b) - np.asarray(b0)).max()))
  print(f"\njoint job vs lone steps, adapters after {config.train.steps} steps: max abs err "
        f"{err:.2e} (moved {moved:.2e}, lr {config.train.lr})")
  # Float32 reassociation (a vmapped, sharded program against a plain one) changes gradients
  # by ~1e-7 relative; Adam divides by |g|, so where a gradient is a near-cancelling sum
  # the update moves by a larger fraction of lr. 1% of one step's update bounds it.
  assert moved > 1e-2 and err < 1e-2 * config.train.lr


def test_clip_per_subject_clips_each_subject_by_its_own_norm():
  clip = subjects_lib.clip_per_subject(1.0)
  g = {"x": jnp.asarray([[3.0, 4.0], [0.3, 0.4]]), "y": jnp.zeros((2, 1, 1))}
  out, _ = clip.update(g, clip.init(g))
  np.testing.assert_allclose(np.asarray(out["x"]), [[0.6, 0.8], [0.3, 0.4]], rtol=1e-6)


def test_job_exports_each_subject_and_resumes_bitwise(job, tmp_path):
  config, workdir, state = job
  names = TWO.split("+")
  assert int(state["step"]) == 4
  assert os.listdir(os.path.join(workdir, "class_priors")) == ["a_ball"]  # one shared cache
  # The adapters' subject axis lies over the mesh's data axis.
  leaf = jax.tree.leaves(state["params"]["base"])[0]
  assert leaf.shape[0] == 2 and leaf.sharding.spec[0] == "data"
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert all(f"subject/{n}/loss" in rows[-1] for n in names)
  idents = set()
  for i, name in enumerate(names):
    export = os.path.join(workdir, "export", name)
    info = json.load(open(os.path.join(export, checkpoint.EXPORT_INFO)))
    assert info["class_noun"] == "ball" and info["folders"] == {"base": "base"}
    idents.add(info["identifier"])
    from safetensors.numpy import load_file
    tensors = load_file(os.path.join(export, "base", lora.WEIGHTS_NAME))
    joint_stage = lora.LoRAStage(pipeline.build(config).cascade.by_name["base"],
                                 lora.settings(config), subjects=2)
    want = lora.diffusers_lora_tensors(joint_stage, jax.device_get(state["params"]["base"]),
                                       subject=i)
    assert tensors.keys() == want.keys() and all(np.array_equal(tensors[k], want[k]) for k in want)
  assert len(idents) == 2  # distinct identifiers
  # subjects/<name>/ is a lone run's workdir: what the sample tooling loads.
  from dreambooth_jax import finetuned
  tuned = finetuned.FineTuned.load(os.path.join(workdir, "subjects", names[1]),
                                   mesh=sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}))
  assert tuned.step == 4 and tuned.class_noun == "ball"
  for a, b in zip(jax.tree.leaves(tuned.params["base"].adapters),
                  jax.tree.leaves(state["params"]["base"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[1])

  # Resume from the mid-job checkpoint (step 2): the same final state, bit for bit.
  copy = tmp_path / "resumed"
  shutil.copytree(workdir, copy)
  for gone in ("checkpoints/4", "export", *(f"subjects/{n}/checkpoints" for n in names)):
    shutil.rmtree(copy / gone)
  resumed = train_many.run(config, str(copy))
  for a, b in zip(jax.tree.leaves((resumed["params"], resumed["opt_state"])),
                  jax.tree.leaves((state["params"], state["opt_state"]))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_subject_folders_are_named_before_anything_is_built(tmp_path, monkeypatch):
  empty, corrupt = tmp_path / "empty", tmp_path / "corrupt"
  empty.mkdir()
  corrupt.mkdir()
  shutil.copy(world.SUBJECTS / "star_box" / "star_box_00.png", corrupt / "a.png")
  (corrupt / "b.png").write_bytes(b"not a png")
  config = _job_config("tiny,runlocal,subjects=star_box+heart_cup+wavy_cone", **{
      "subjects.heart_cup.dir": str(empty), "subjects.wavy_cone.dir": str(corrupt)})
  monkeypatch.setattr(pipeline, "build", lambda *a, **k: pytest.fail("models were built"))
  with pytest.raises(data.DataError) as e:
    train_many.run(config, str(tmp_path / "work"))
  msg = str(e.value)
  assert "\n" not in msg and "2 of 3 subject folders" in msg
  assert f"'heart_cup' ({empty})" in msg and f"'wavy_cone' ({corrupt})" in msg and "b.png" in msg
  assert "star_box" not in msg.split("cannot be trained")[1]
  assert not (tmp_path / "work" / "config.json").exists()
  # The CLI: one paragraph on stderr, exit code 2, a missing folder named too.
  r = run_cli("dreambooth_jax.train_many",
              f"--config=configs/dreambooth_benchmark.py:tiny,subjects={TWO}",
              f"--workdir={tmp_path / 'cli'}",
              f"--config.subjects.star_ball.dir={tmp_path / 'nope'}")
  assert r.returncode == 2, r.stderr[-2000:]
  err = r.stderr.strip().splitlines()[-1]
  assert err.startswith("error: 1 of 2 subject folders") and "'star_ball'" in err and "nope" in err


def test_benchmark_config_reads_the_dataset_subjects(dataset_dir, monkeypatch):
  monkeypatch.setenv("DREAMBOOTH_DATASET", str(dataset_dir))
  path = REPO / "configs" / "dreambooth_benchmark.py"
  c = config_lib.from_file(str(path))
  assert len(c.subjects) == 30 and c.lora.rank == 4 and c.train.optimizer == "adamw"
  assert c.subjects.dog.class_noun == "dog" and c.subjects.cat2.class_noun == "cat"
  assert os.path.isdir(c.subjects.backpack.dir)
  two = config_lib.from_file(f"{path}:subjects=dog+cat2,lora=8,steps=7")
  assert sorted(two.subjects) == ["cat2", "dog"] and two.lora.rank == 8 and two.train.steps == 7
  with pytest.raises(config_lib.ConfigError, match="not if subjects"):
    config_lib.from_file(f"{path}:subjects=dog+nope")
