"""Many subjects in one job (dreambooth_jax.train_many): each subject's adapters equal its lone
training, the job runs end to end with its in-loop evaluation, resumes bitwise and exports
per subject the step its rule chose, and bad subject folders are named before anything is
built. The selection rule and the report are pure python, tested on hand-made numbers.

Compile time dominates on CPU: the job runs once on the tiny base stage (plus a resume that
hits the persistent compilation cache), its evaluation draws at the base stage only (one
sampling program), and the equivalence test compiles only the lone step it compares the
job with and the job's step looping over chunks of subjects (`train.subject_chunk`).
"""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import world
from dreambooth_jax import checkpoint, config_lib, data, embeddings, lora, methods, pipeline
from dreambooth_jax import priors, sharding
from dreambooth_jax import state as state_lib
from dreambooth_jax import subjects as subjects_lib
from dreambooth_jax import train_many
from dreambooth_jax.evaluation import in_loop, job_report, selection
from conftest import REPO, run_cli
from train_helpers import set_path

# The job's tests share one trained workdir: one xdist worker trains it.
pytestmark = pytest.mark.xdist_group("train_many")

TWO = "star_ball+zigzag_ball"  # both "ball": one class-prior cache serves both


def _job_config(arg: str = f"tiny,runlocal,subjects={TWO}", **overrides):
  config = config_lib.from_file(f"{REPO / 'configs' / 'dreambooth_benchmark.py'}:{arg}")
  config.stages = "base"
  # The subject axis split over data: 2 subjects and 2 padding slots.
  config.mesh.update(data=4, fsdp=1, tensor=1)
  config.checkpoint.update(every=2, keep=10, async_save=False)
  config.log.tensorboard = False
  for key, value in overrides.items():
    set_path(config, key, value)
  return config


RULE = "max subject if context >= first"


@pytest.fixture(scope="session")
def job(tmp_path_factory):
  """The job on two world subjects, tiny random cascade, base stage, 4 steps, a checkpoint
  every 2; a learning rate that moves the adapters and a clip every step bites (each
  subject by its own norm); Adam's eps above the float noise of the few gradient entries
  near zero (see the equivalence test); the world protocol's evaluation at steps 2 and 4
  (one context x 2 images per subject, at the base stage: the cheapest draw that scores
  every metric but PRES): (config, workdir, final joint state)."""
  config = _job_config(**{"train.lr": 1e-2, "train.grad_clip": 0.05, "train.eps": 1e-6,
                          "eval.every": 2, "eval.stage": "base", "eval.select": RULE})
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


def _chunked_job(config, workdir, models, names, steps):
  """The job's step with `train.subject_chunk=1` on a data=2 mesh, over the
  subjects `names` (a subject may fill several slots), from the job's start on each
  slot's lone batches: (final joint state, [step metrics], the compiled step's HLO).
  Four slots on two devices: the step loops twice, each iteration taking one slot of
  each device's share."""
  c = config.copy_and_resolve_references()
  c.train.subject_chunk = 1
  c.mesh.data = 2
  mesh = sharding.make_mesh(dict(c.mesh))
  rules = pipeline.rules_of(c)
  (phase,) = methods.phases(c)
  stage = models.cascade.by_name["base"]
  ps = train_many.joint_setup(c, {"base": stage}, len(names), phase, mesh, rules,
                              token_width=models.t5_width)
  frozen_sh = {"base": sharding.param_shardings(stage.params, mesh, rules)}
  step = train_many.jit_step(c, ps, [f"{n}_{i}" for i, n in enumerate(names)], frozen_sh)
  state = state_lib.initial_state(ps.stages, ps.tx, phase, ps.shardings, step=0,
                                  rng=jax.random.key(c.seed))
  frozen = jax.device_put({"base": stage.params}, frozen_sh)
  t = c.train
  _, layout = subjects_lib.batch_layout(mesh, {"base": c.cascade.base.resolution},
                                        num_subjects=len(names), batch_size=t.batch_size,
                                        prior_batch_size=t.prior_batch_size, grad_accum=1,
                                        text_width=models.t5_width)
  lone = {n: list(_lone_batches(c, workdir, n, models, steps)) for n in dict.fromkeys(names)}
  metrics, compiled = [], None
  for k in range(steps):
    batch = jax.tree.map(lambda *xs: np.stack(xs, axis=1), *[lone[n][k] for n in names])
    batch = jax.device_put(batch, layout)
    with jax.set_mesh(mesh):
      compiled = compiled or step.lower(state, batch, frozen).compile()
      state, m = compiled(state, batch, frozen)
    metrics.append(jax.device_get(m))
  return state, metrics, compiled.as_text()


def test_each_subject_equals_its_lone_run(job):
  """Each subject's adapters after the joint job equal what the lone run's step
  (`methods.make_train_step`, the lone optimiser with its global-norm clip) reaches from the
  same start on that subject's batches; so do they when the step loops over chunks of
  subjects (`train.subject_chunk`)."""
  config, workdir, state = job
  rows = [r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if "loss" in r]
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  models = pipeline.build(config, mesh)
  stage = models.cascade.by_name["base"]
  alone = lora.LoRAStage(stage, lora.settings(config))
  (phase,) = methods.phases(config)
  names = [s.name for s in subjects_lib.from_config(config)]
  # Two slots per subject, so that the chunked step loops: slot j trains names[j % 2].
  chunked, chunked_rows, hlo = _chunked_job(config, workdir, models, names * 2,
                                            config.train.steps)
  # A subject's 1+1 images divide the 2-way data axis, but the subject axis holds it: the
  # UNet's batch pins go on the subjects (`sharding.batch_split_outside`), and no
  # activation is gathered (pinning both all-gathered every subject's activations).
  assert not re.search(r"all-gather|all-to-all", hlo), re.findall(r"\S+ all-gather\S*", hlo)[:3]
  err = moved = chunked_err = 0.0
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
      for got in (rows[k][f"subject/{s.name}/loss"],
                  *(chunked_rows[k][f"subject/{s.name}_{j}/loss"] for j in (i, i + 2))):
        np.testing.assert_allclose(got, float(metrics["loss"]), rtol=1e-5)
    for a, a2, b, b0 in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(chunked["params"]),
                            jax.tree.leaves(own["params"]), jax.tree.leaves(alone.params)):
      err = max(err, float(np.abs(np.asarray(a)[i] - np.asarray(b)).max()))
      chunked_err = max(chunked_err, *(float(np.abs(np.asarray(a2)[j] - np.asarray(b)).max())
                                       for j in (i, i + 2)))
      moved = max(moved, float(np.abs(np.asarray(b) - np.asarray(b0)).max()))
  print(f"\njoint job vs lone steps, adapters after {config.train.steps} steps: max abs err "
        f"{err:.2e}, chunked {chunked_err:.2e} (moved {moved:.2e}, lr {config.train.lr})")
  # Float32 reassociation (a vmapped or looped, sharded program against a plain one) changes
  # gradients by ~1e-7 relative; Adam divides by |g| + eps, so where a gradient is a
  # near-cancelling sum the update moves by a larger fraction of lr. With eps 1e-8 one
  # entry of a zero-initialised B, its gradient 7e-9, moved 1.8% of lr between the looped
  # and the plain program; with eps 1e-6 (the fixture's) 1% of one step's update bounds it.
  assert moved > 1e-2 and max(err, chunked_err) < 1e-2 * config.train.lr


def test_subject_chunks_give_the_vmaps_losses_and_gradients():
  """The loop over chunks of subjects on a toy loss (compiles in a second): 6 subjects split
  over 2 devices, 2 a device per iteration, so each share of 3 is one iteration and a last
  call of 1 (the equivalence test above runs the real step, 4 slots, a loop of 2)."""
  def one(a, b, shared):
    w, key = shared
    value = jnp.sum(jnp.tanh(a["x"] @ w) * (b + jax.random.normal(key, b.shape))) + a["y"].sum()
    return value, {"mean": jnp.mean(b)}

  keys = jax.random.split(jax.random.key(0), 4)
  a = {"x": jax.random.normal(keys[0], (6, 3, 4)), "y": jax.random.normal(keys[1], (6, 2))}
  b, w = jax.random.normal(keys[2], (6, 3, 4)), jax.random.normal(keys[3], (4, 4))

  def total(a, chunk):
    ways, axes, chunk = subjects_lib.subject_loop(6, chunk)
    run = (subjects_lib._in_chunks(one, chunk, ways, axes) if chunk else
           jax.vmap(one, in_axes=(0, 0, None)))
    losses, metrics = run(a, b, (w, jax.random.key(1)))
    return jnp.sum(losses), (losses, metrics)

  with jax.set_mesh(sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 1})):
    assert subjects_lib.subject_loop(6, 2) == (2, "data", 2)
    want, got = (jax.jit(jax.value_and_grad(total, has_aux=True), static_argnums=1)(a, c)
                 for c in (0, 2))
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_clip_per_subject_clips_each_subject_by_its_own_norm():
  clip = subjects_lib.clip_per_subject(1.0)
  g = {"x": jnp.asarray([[3.0, 4.0], [0.3, 0.4]]), "y": jnp.zeros((2, 1, 1))}
  out, _ = clip.update(g, clip.init(g))
  np.testing.assert_allclose(np.asarray(out["x"]), [[0.6, 0.8], [0.3, 0.4]], rtol=1e-6)


def _eval_rows(workdir):
  """{step: metrics.jsonl's eval row} (a resumed job's rows come last and win)."""
  rows = map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
  return {r["step"]: {k: v for k, v in r.items() if k != "time"} for r in rows
          if any(k.startswith("eval/") for k in r)}


def test_job_exports_each_subject_and_resumes_bitwise(job, tmp_path):
  config, workdir, state = job
  names = TWO.split("+")
  assert int(state["step"]) == 4
  assert os.listdir(os.path.join(workdir, "class_priors")) == ["a_ball"]  # one shared cache
  # The adapters' subject axis lies over the mesh's data axis (data=4): the 2 subjects and 2
  # padding slots. A slot's loss is out of the sum, so its B matrices (zero at the start)
  # get no gradient and stay zero, while the subjects' move.
  leaves = jax.tree_util.tree_leaves_with_path(state["params"]["base"])
  assert all(x.shape[0] == 4 and x.sharding.spec[0] == "data" for _, x in leaves)
  b = [np.asarray(x) for path, x in leaves if lora._key_path(path).endswith("/b")]
  assert b and all(not x[2:].any() and x[:2].any(axis=tuple(range(1, x.ndim))).all() for x in b)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert all(f"subject/{n}/loss" in [r for r in rows if "loss" in r][-1] for n in names)
  # The learning curves: every subject's world metrics at steps 2 and 4 (no PRES: no class
  # images asked), the mean over subjects, and the rule reads them as logged.
  curves = _eval_rows(workdir)
  assert sorted(curves) == [2, 4]
  for row in curves.values():
    assert {f"eval/{n}/{m}" for n in names for m in ("Subject", "Attributes", "Context", "DIV")
            } | {f"eval_mean/{m}" for m in ("Subject", "Attributes", "Context", "DIV")} | {
            "step"} == set(row)
  rule = selection.parse(RULE, in_loop.world_protocol.METRICS)
  joint_ckpt = checkpoint.Checkpointer(workdir, keep=10, async_save=False)
  joint_stage = lora.LoRAStage(pipeline.build(config).cascade.by_name["base"],
                               lora.settings(config), subjects=4)
  idents, chosen = set(), {}
  for i, name in enumerate(names):
    export = os.path.join(workdir, "export", name)
    info = json.load(open(os.path.join(export, checkpoint.EXPORT_INFO)))
    assert info["class_noun"] == "ball" and info["folders"] == {"base": "base"}
    idents.add(info["identifier"])
    # The step the rule chose from the logged curves is the exported one, and says why.
    choice = json.load(open(os.path.join(export, "selection.json")))
    history = [(s, {selection.metric_key(k.split("/")[-1]): v for k, v in row.items()
                    if k.startswith(f"eval/{name}/")}) for s, row in sorted(curves.items())]
    assert choice["step"] == selection.select(rule, history)["step"] == info["steps"]
    assert choice["rule"] == RULE and choice["reason"] and info["job_steps"] == 4
    chosen[name] = step = choice["step"]
    at_step = state if step == 4 else joint_ckpt.restore(step, state)  # the joint state then
    from safetensors.numpy import load_file
    tensors = load_file(os.path.join(export, "base", lora.WEIGHTS_NAME))
    want = lora.diffusers_lora_tensors(joint_stage, jax.device_get(at_step["params"]["base"]),
                                       subject=i)
    assert tensors.keys() == want.keys() and all(np.array_equal(tensors[k], want[k]) for k in want)
    # subjects/<name>/ is a lone run's workdir at the chosen step: what the sample tooling loads.
    if i == 1:
      from dreambooth_jax import finetuned
      tuned = finetuned.FineTuned.load(os.path.join(workdir, "subjects", name),
                                       mesh=sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}))
      assert tuned.step == step and tuned.class_noun == "ball"
      for a, b in zip(jax.tree.leaves(tuned.params["base"].adapters),
                      jax.tree.leaves(at_step["params"]["base"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[1])
  assert len(idents) == 2  # distinct identifiers
  report = json.load(open(os.path.join(workdir, "report.json")))
  assert [r["step"] for r in report["subjects"]] == [chosen[n] for n in names]
  assert report["summary"]["selected"]["Context"]["n"] == 2
  for r in report["subjects"]:
    assert os.path.isfile(os.path.join(workdir, r["grid"]))
  assert "Mean ± std over the 2 subjects" in open(os.path.join(workdir, "report.md")).read()

  # Resume from the mid-job checkpoint (step 2): the same final state, bit for bit.
  copy = tmp_path / "resumed"
  shutil.copytree(workdir, copy)
  for gone in ("checkpoints/4", "export", *(f"subjects/{n}/checkpoints" for n in names)):
    shutil.rmtree(copy / gone)
  resumed = train_many.run(config, str(copy))
  for a, b in zip(jax.tree.leaves((resumed["params"], resumed["opt_state"])),
                  jax.tree.leaves((state["params"], state["opt_state"]))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Its evaluation at step 4 scores the same images, so the same steps are chosen and exported.
  assert _eval_rows(copy)[4] == curves[4]
  for name in names:
    for f in ("selection.json", f"base/{lora.WEIGHTS_NAME}"):
      assert (copy / "export" / name / f).read_bytes() == open(
          os.path.join(workdir, "export", name, f), "rb").read()


def test_resuming_on_a_mesh_that_pads_otherwise_is_refused(job, tmp_path):
  """The job's checkpoints hold 4 subject slots (2 subjects padded for data=4); on data=2 the
  job would have 2, so resuming there says so instead of failing inside the restore."""
  config, workdir, _ = job
  copy = tmp_path / "job"
  shutil.copytree(workdir, copy)
  other = config.copy_and_resolve_references()
  other.mesh.data = 2
  with pytest.raises(train_many.TrainError, match="4 subject slots .* needs 2"):
    train_many.run(other, str(copy))


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
  # `hour`: the settings the v4-8 plan meets the hour with; nothing else differs.
  hour = config_lib.from_file(f"{path}:hour")
  assert (hour.prior.num_images, hour.train.subject_chunk, hour.eval.every) == (32, 1, 0)
  assert all((hour.cascade[n].sampler, hour.cascade[n].num_steps) == ("dpmpp_2m", 15)
             for n in ("base", "sr256"))
  for key in ("cascade", "prior", "eval", "train"):
    hour[key] = c[key]
  assert hour.to_json() == c.to_json()
  with pytest.raises(config_lib.ConfigError, match="`hour`"):
    config_lib.from_file(f"{path}:world,hour")


# -- the selection rule and the report: pure python ---------------------------------------

BENCH = ("DINO", "CLIP-I", "CLIP-T", "PRES", "DIV")


def test_selection_rule_reads_and_refuses():
  r = selection.parse("MAX  dino if clip_t >= first - 0.01 and clip_i > 0.5", BENCH)
  assert r.text() == "max dino if clip_t >= first - 0.01 and clip_i > 0.5"
  assert r.reads == ("dino", "clip_t", "clip_i")
  assert selection.parse("last", BENCH).text() == "last"
  assert (selection.parse("min pres if div>=first+0.1", BENCH).text()
          == "min pres if div >= first + 0.1")
  for bad, said in (("best dino", "cannot read it"), ("max dino if", "cannot read it"),
                    ("max subject", "'subject' is not a metric"),
                    ("max dino if clip_t => first", "cannot read the condition"),
                    ("max dino if clip_t >= 1.2.3", "is not a number")):
    with pytest.raises(config_lib.ConfigError, match=said):
      selection.parse(bad, BENCH)


def test_selection_picks_the_best_eligible_step_and_says_why():
  h = [(2, {"dino": 0.50, "clip_t": 0.30}), (4, {"dino": 0.70, "clip_t": 0.28}),
       (6, {"dino": 0.60, "clip_t": 0.30}), (8, {"dino": 0.60, "clip_t": 0.31})]
  rule = selection.parse("max dino if clip_t >= first", BENCH)
  out = selection.select(rule, h)
  # Step 4 has the best DINO but lost prompt fidelity; 6 and 8 tie: the earlier wins.
  assert out["step"] == 6 and out["metrics"] == h[2][1]
  assert [c["eligible"] for c in out["candidates"]] == [True, False, True, True]
  assert out["reason"] == ("step 6: the highest dino (0.6000) among the 3 of 4 evaluations with "
                           "clip_t >= first (first: clip_t 0.3000)")
  loose = selection.parse("max dino if clip_t >= first - 0.05", BENCH)
  assert selection.select(loose, h)["step"] == 4
  assert selection.select(selection.parse("min dino", BENCH), h)["step"] == 2
  none = selection.select(selection.parse("max dino if clip_t > 0.9", BENCH), h)
  assert none["step"] == 8 and none["reason"].startswith("no evaluation met clip_t > 0.9")
  assert selection.select(selection.parse("last", BENCH), h)["step"] == 8
  # A missing metric (PRES without class images) never qualifies.
  assert selection.select(selection.parse("max dino if pres < 1", BENCH), h)["step"] == 8


def test_selection_is_decided_online():
  """What the job relies on: after each evaluation the choice stays or moves to that step,
  so saving a subject's adapters when the current step is chosen keeps the final choice."""
  rng = np.random.default_rng(0)
  rules = [selection.parse(t, BENCH) for t in ("max dino if clip_t >= first", "min pres",
                                              "max dino if clip_t > 0.3 and div >= first - 0.1")]
  for _ in range(50):
    h = [(2 * k, {m: float(rng.uniform()) for m in ("dino", "clip_t", "pres", "div")})
         for k in range(1, 8)]
    for rule in rules:
      steps = [selection.select(rule, h[:k])["step"] for k in range(1, len(h) + 1)]
      for k in range(1, len(steps)):
        assert steps[k] in (steps[k - 1], h[k][0])


def test_job_report_tables_over_subjects():
  at = lambda step, name, dino, clip_t: {"metrics": {"DINO": dino, "CLIP-T": clip_t, "PRES": None},
                                         "grid": f"step_{step:06d}/{name}.png"}
  history = {2: {"a": at(2, "a", 0.5, 0.30), "b": at(2, "b", 0.3, 0.20)},
             4: {"a": at(4, "a", 0.7, 0.25), "b": at(4, "b", 0.5, 0.22)}}
  choices = {"a": {"step": 2, "reason": "because"}, "b": {"step": 4, "reason": "so"}}
  settings = dict(protocol="dreambooth", num_prompts=4, num_images=4, num_class_images=0,
                  stage="sr256", sampler="dpmpp_2m", num_steps=25, seed=0, every=2,
                  select="max dino")
  report = job_report.build("t", settings, BENCH, in_loop.protocol.ARROWS, history, choices,
                            {"a": "dog", "b": "cat"}, paper=in_loop.protocol.PAPER, eval_dir="eval")
  sel = report["summary"]["selected"]
  assert sel["DINO"] == {"mean": 0.5, "std": 0.0, "n": 2} and sel["PRES"] is None
  np.testing.assert_allclose([sel["CLIP-T"]["mean"], sel["CLIP-T"]["std"]], [0.26, 0.04])
  assert report["summary"]["last"]["DINO"]["mean"] == pytest.approx(0.6)
  assert [c["DINO"] for c in report["curves"]] == pytest.approx([0.4, 0.6])
  assert report["subjects"][1] == dict(subject="b", class_noun="cat", step=4,
                                       metrics=history[4]["b"]["metrics"], reason="so",
                                       grid="eval/step_000004/b.png")
  md = job_report.markdown(report)
  assert ("| at each subject's chosen step | 0.500 ± 0.000 | N/A | 0.260 ± 0.040 | N/A | N/A |"
          in md)
  assert "| b (cat, step 4) | 0.500 | N/A | 0.220 | N/A | N/A |" in md
  assert "| DreamBooth-Imagen (paper) | 0.696 | 0.812 | 0.306 | N/A | N/A |" in md
  assert "| step 2 | 0.400 |" in md and "![b](eval/step_000004/b.png)" in md


def test_in_loop_benchmark_protocol_scores_a_subject_outside_the_dataset(dataset_dir, tmp_path):
  """The DreamBooth protocol in the loop: the dataset's prompt list by class, the subject's
  own photos as the real set, no PRES without class images, no DIV without LPIPS
  (stand-in encoders: the wiring, not the networks, which test_evaluate covers)."""
  config = _job_config("tiny,runlocal,subjects=star_ball", **{
      "eval.every": 2, "eval.protocol": "dreambooth", "eval.dataset": str(dataset_dir),
      "eval.num_prompts": 2, "eval.dino": str(tmp_path), "eval.clip": str(tmp_path),
      "eval.select": "max dino if clip_t >= first"})
  with pytest.raises(Exception, match="config.json"):  # the encoder folders are checked first
    in_loop.JobEvaluation(config, subjects_lib.from_config(config), tmp_path)
  from unittest import mock
  with mock.patch.object(in_loop.metrics, "check_encoder_paths"):
    ev = in_loop.JobEvaluation(config, subjects_lib.from_config(config), tmp_path)
  jobs, class_job = ev.protocol.jobs["star_ball"]
  assert class_job is None and [j.template for j in jobs] == [
      "a [V] ball in the jungle", "a [V] ball in the snow"]  # a ball is an object
  assert ev.prompts({"star_ball": lambda t: t.replace("[V]", "sks")}) == [
      "a sks ball in the jungle", "a sks ball in the snow"]

  class Stand:  # embeddings: colour means, and a prompt's length
    has_lpips = False
    dino = clip_image = staticmethod(lambda x: np.asarray([np.asarray(i, float).mean((0, 1)) + 1
                                                            for i in x]))
    clip_text = staticmethod(lambda ps: np.asarray([[len(p), 1.0, 1.0] for p in ps]))
  ev.protocol.enc = Stand()
  ev.protocol.real = {"star_ball": (Stand.dino([np.full((4, 4, 3), 9)]),) * 2}
  images = {j.key: np.full((2, 8, 8, 3), 9, np.uint8) for j in jobs}
  row, per_prompt = ev.protocol.score("star_ball", images)
  assert row["DINO"] == pytest.approx(1.0) and row["PRES"] is None and row["DIV"] is None
  assert len(per_prompt) == 2 and per_prompt[0]["DIV"] is None
