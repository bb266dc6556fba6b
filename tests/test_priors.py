"""Class-prior cache: generation, resume after a crash, invalidation, repair, sharding.

One tiny random cascade (16 px base, 16 -> 32 px SR, 2 sampling steps) serves
every test; batches of 2 keep each compiled sampling loop reused, so the whole
file runs in seconds after the first compilation.
"""

import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dreambooth_jax import cascade, priors, sharding
from dreambooth_jax.models.unet import UNetConfig, init_unet
from unet_configs import TEXT_DIM, TEXT_LEN, TINY_IF_I, TINY_IF_II

N, B, STEPS = 6, 2, 2
FINGERPRINT = "tiny-random-cascade-v1"


class CountingCascade:
  """The cascade, counting `sample` calls: resume and repair must not resample."""

  def __init__(self, inner):
    self.inner, self.calls = inner, 0
    self.stages, self.by_name = inner.stages, inner.by_name

  def sample(self, *args, **kwargs):
    self.calls += 1
    return self.inner.sample(*args, **kwargs)


def random_unet(diffusers_config, seed):
  """init_unet's structure with N(0, 0.1) params drawn in numpy: eager init takes ~10 s."""
  abstract = nnx.eval_shape(lambda: init_unet(UNetConfig.from_diffusers(diffusers_config)))
  graphdef, state = nnx.split(abstract)
  rs = np.random.RandomState(seed)
  state = jax.tree.map(lambda a: jnp.asarray(rs.randn(*a.shape).astype(a.dtype) * 0.1), state)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def tiny():
  base = cascade.Stage(
      "base", random_unet(TINY_IF_I, seed=1),
      cascade.StageSettings(resolution=16, guidance_scale=7.0, num_steps=STEPS),
      scheduler_config=cascade.IF_STAGE_I_SCHEDULER)
  sr = cascade.Stage(
      "sr", random_unet(dict(TINY_IF_II, sample_size=32), seed=2),
      cascade.StageSettings(resolution=32, guidance_scale=4.0, num_steps=STEPS),
      scheduler_config=cascade.IF_STAGE_II_SCHEDULER, lowres_resolution=16)
  rs = np.random.RandomState(0)
  mask = np.ones((1, TEXT_LEN), np.int32)
  mask[0, 4:] = 0
  cond = {"text": rs.randn(1, TEXT_LEN, TEXT_DIM).astype(np.float32), "mask": mask}
  uncond = {"text": np.zeros_like(cond["text"]), "mask": np.ones_like(mask)}
  return cascade.Cascade([base, sr]), cond, uncond


def make_spec(casc, **overrides):
  kw = dict(prompt="a dog", num_images=N, upto="sr", fingerprint=FINGERPRINT, seed=3, batch_size=B)
  kw.update(overrides)
  return priors.PriorSpec.from_cascade(casc, **kw)


def generate(tiny, out_dir, spec=None, **kw):
  casc, cond, uncond = tiny
  counting = CountingCascade(casc)
  report = priors.generate_priors(counting, spec or make_spec(casc), cond, uncond, str(out_dir),
                                  progress=kw.pop("progress", False), **kw)
  assert counting.calls == len(report.generated_batches)
  return report


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
  """An uninterrupted generation: (folder, report, loaded images)."""
  out = tmp_path_factory.mktemp("priors") / "reference"
  report = generate(tiny, out)
  return out, report, priors.load_priors(str(out), make_spec(tiny[0]))


def copy_of(reference, tmp_path):
  dst = tmp_path / "priors"
  shutil.copytree(reference[0], dst)
  return dst


def test_full_generation_writes_pngs_and_manifest(reference, tiny):
  out, report, images = reference
  assert report.generated_batches == (0, 1, 2) and report.reused_images == 0
  assert sorted(os.listdir(out / "base")) == [f"{i:05d}.png" for i in range(N)]
  assert sorted(os.listdir(out / "sr")) == [f"{i:05d}.png" for i in range(N)]
  assert images["base"].shape == (N, 16, 16, 3) and images["sr"].shape == (N, 32, 32, 3)
  assert images["base"].dtype == images["sr"].dtype == np.uint8
  # Every batch has its own rng, and each slot its own noise.
  assert len({images["base"][i].tobytes() for i in range(N)}) == N

  manifest = json.loads((out / priors.MANIFEST).read_text())
  spec = manifest["spec"]
  assert spec["prompt"] == "a dog" and spec["fingerprint"] == FINGERPRINT
  assert spec["num_images"] == N and spec["seed"] == 3 and spec["batch_size"] == B
  assert spec["stages"] == ["base", "sr"]
  assert spec["sampler"]["base"] == dict(num_steps=STEPS, guidance_scale=7.0, sampler="ddpm",
                                         eta=0.0, aug_level=None, resolution=16)
  assert spec["sampler"]["sr"]["aug_level"] == 0.25 and spec["sampler"]["sr"]["guidance_scale"] == 4.0
  assert manifest["resolutions"] == {"base": 16, "sr": 32}
  for i in range(N):
    entry = manifest["images"][f"{i:05d}"]
    assert (entry["seed"], entry["batch"], entry["slot"]) == (3, i // B, i % B)
    for stage in ("base", "sr"):
      raw = (out / entry["files"][stage]["path"]).read_bytes()
      assert hashlib.sha256(raw).hexdigest() == entry["files"][stage]["sha256"]


def test_batch_k_is_cascade_sample_with_fold_in_seed_k(reference, tiny):
  casc, cond, uncond = tiny
  want = casc.sample(cond, jax.random.fold_in(jax.random.key(3), 1), uncond_embeddings=uncond,
                     batch_size=B)
  for stage in ("base", "sr"):
    np.testing.assert_array_equal(reference[2][stage][2:4], want[stage])


def test_second_call_reuses_everything(reference, tiny, tmp_path):
  report = generate(tiny, copy_of(reference, tmp_path))
  assert report.generated_batches == () and report.reused_images == N


def test_interrupted_then_resumed_matches_uninterrupted(reference, tiny, tmp_path, capsys):
  out = tmp_path / "priors"
  first = generate(tiny, out, max_batches=1)
  assert first.generated_batches == (0,)
  assert sorted(os.listdir(out / "sr")) == ["00000.png", "00001.png"]
  assert sorted(json.loads((out / priors.MANIFEST).read_text())["images"]) == ["00000", "00001"]
  with pytest.raises(priors.PriorsError, match="missing or corrupt"):
    priors.load_priors(str(out), make_spec(tiny[0]))

  second = generate(tiny, out, progress=True)
  assert second.generated_batches == (1, 2) and second.reused_images == 2
  bar = capsys.readouterr().err  # tqdm: starts at the 2 cached images, ends at N
  assert "2/6" in bar and "6/6" in bar
  got = priors.load_priors(str(out), make_spec(tiny[0]))
  for stage in ("base", "sr"):
    np.testing.assert_array_equal(got[stage], reference[2][stage])
  ref_manifest = json.loads((reference[0] / priors.MANIFEST).read_text())
  assert json.loads((out / priors.MANIFEST).read_text())["images"] == ref_manifest["images"]


@pytest.mark.parametrize("change", ["prompt", "fingerprint", "seed", "manifest"])
def test_other_spec_or_bad_manifest_moves_folder_aside_and_regenerates(reference, tiny, tmp_path,
                                                                         change, caplog):
  out = copy_of(reference, tmp_path)
  overrides = {"prompt": dict(prompt="a cat"), "fingerprint": dict(fingerprint="other-weights"),
               "seed": dict(seed=4), "manifest": {}}[change]
  if change == "manifest":
    (out / priors.MANIFEST).write_text("{not json")
  spec = make_spec(tiny[0], **overrides)
  report = generate(tiny, out, spec)
  assert report.generated_batches == (0, 1, 2) and report.reused_images == 0
  stale = report.moved_aside
  assert stale and os.path.basename(stale).startswith("priors.stale-")
  assert f"moved the folder aside to {stale}" in caplog.text
  assert (change if change != "manifest" else "unusable manifest") in caplog.text
  assert sorted(os.listdir(os.path.join(stale, "base"))) == sorted(os.listdir(out / "base"))
  assert json.loads((out / priors.MANIFEST).read_text())["spec"] == spec.to_dict()
  got = priors.load_priors(str(out), spec)
  same_rng = change != "seed"  # the prompt string and fingerprint are labels: same images
  assert np.array_equal(got["sr"], reference[2]["sr"]) == same_rng
  with pytest.raises(priors.PriorsError, match="another spec"):
    priors.load_priors(str(out), make_spec(tiny[0]) if change != "manifest" else
                       make_spec(tiny[0], fingerprint="x"))


def test_changing_num_images_keeps_existing_images(reference, tiny, tmp_path):
  out = copy_of(reference, tmp_path)
  fewer = generate(tiny, out, make_spec(tiny[0], num_images=3))
  assert fewer.generated_batches == () and fewer.moved_aside is None
  got = priors.load_priors(str(out), make_spec(tiny[0], num_images=3))
  np.testing.assert_array_equal(got["sr"], reference[2]["sr"][:3])
  more = generate(tiny, out, make_spec(tiny[0], num_images=N + 1))
  assert more.generated_batches == (N // B,) and more.reused_images == N
  got = priors.load_priors(str(out), make_spec(tiny[0], num_images=N + 1))
  np.testing.assert_array_equal(got["base"][:N], reference[2]["base"])
  assert sorted(os.listdir(out / "base"))[-1] == f"{N:05d}.png"  # no file past N


def test_deleted_corrupt_and_wrong_size_pngs_regenerate_only_their_batches(reference, tiny,
                                                                           tmp_path):
  out = copy_of(reference, tmp_path)
  os.remove(out / "base" / "00001.png")                                  # batch 0: missing
  from PIL import Image
  Image.new("RGB", (8, 8)).save(out / "sr" / "00000.png")               # batch 0: wrong size
  raw = (out / "sr" / "00004.png").read_bytes()
  (out / "sr" / "00004.png").write_bytes(raw[:len(raw) // 2])            # batch 2: truncated
  with pytest.raises(priors.PriorsError, match="3 of 12 files") as e:
    priors.load_priors(str(out), make_spec(tiny[0]))
  assert "base/00001.png" in str(e.value) and "sr/00004.png" in str(e.value)

  report = generate(tiny, out)
  assert report.generated_batches == (0, 2) and report.reused_images == 3
  assert report.moved_aside is None
  got = priors.load_priors(str(out), make_spec(tiny[0]))
  for stage in ("base", "sr"):
    np.testing.assert_array_equal(got[stage], reference[2][stage])


def test_ensure_priors_generates_then_loads(reference, tiny, tmp_path):
  casc, cond, uncond = tiny
  got = priors.ensure_priors(casc, make_spec(casc), cond, uncond, str(tmp_path / "p"),
                             progress=False)
  assert {k: v.shape for k, v in got.items()} == {"base": (N, 16, 16, 3), "sr": (N, 32, 32, 3)}
  np.testing.assert_array_equal(got["sr"], reference[2]["sr"])


def test_non_lead_process_samples_but_writes_nothing(tiny, tmp_path):
  report = generate(tiny, tmp_path / "p", max_batches=1, process_index=1, process_count=2)
  assert report.generated_batches == (0,)
  assert not (tmp_path / "p").exists()


def test_sharded_over_2x4_mesh_matches_unsharded(tiny, tmp_path):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4}, jax.devices()[:8])
  spec = make_spec(tiny[0], num_images=8, batch_size=8)
  generate(tiny, tmp_path / "plain", spec)
  generate(tiny, tmp_path / "sharded", spec, mesh=mesh)
  plain = priors.load_priors(str(tmp_path / "plain"), spec)
  sharded = priors.load_priors(str(tmp_path / "sharded"), spec)
  # Same noise and maths, but XLA fuses a 1-image shard differently from an 8-image batch:
  # float32 rounding may move a rare pixel across a uint8 rounding boundary.
  for stage in ("base", "sr"):
    diff = np.abs(sharded[stage].astype(int) - plain[stage].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (stage, diff.max(), (diff > 0).mean())


# -- the spec ------------------------------------------------------------------------------------


def test_spec_accepts_config_stage_sections(tiny):
  casc = tiny[0]
  section = lambda res, g: dict(resolution=res, guidance_scale=g, num_steps=STEPS, sampler="ddpm",
                                sample_aug_level=0.25, train_aug_level=1e-5)
  spec = priors.PriorSpec(prompt="a dog", num_images=N, stages=("base", "sr"),
                          sampler={"base": section(16, 7.0), "sr": section(32, 4.0),
                                   "sr1024": section(64, 4.0)},
                          fingerprint=FINGERPRINT, seed=3, batch_size=B)
  assert spec == make_spec(casc)  # train-only keys dropped, base has no aug level
  assert spec.stage_sampling("base").aug_level is None and spec.num_batches == 3
  hash(spec)
  with pytest.raises(ValueError, match="aug_level"):
    priors.PriorSpec("a dog", N, ("base", "sr"), {"base": section(16, 7.0), "sr": dict(
        num_steps=2, guidance_scale=4.0)}, FINGERPRINT)
  with pytest.raises(ValueError, match="unknown keys"):
    priors.PriorSpec("a dog", N, ("base",), {"base": dict(section(16, 7.0), stpes=3)}, FINGERPRINT)
  with pytest.raises(ValueError, match="no settings"):
    priors.PriorSpec("a dog", N, ("base", "sr"), {"base": section(16, 7.0)}, FINGERPRINT)


def test_spec_must_fit_the_cascade(tiny, tmp_path):
  casc, cond, uncond = tiny
  gen = lambda spec: priors.generate_priors(casc, spec, cond, uncond, str(tmp_path), progress=False)
  with pytest.raises(ValueError, match="first stages"):
    gen(priors.PriorSpec("a dog", N, ("sr",), {"sr": make_spec(casc).stage_sampling("sr")},
                         FINGERPRINT))
  with pytest.raises(ValueError, match="sampler 'ddim'"):
    gen(make_spec(casc, sampler={"base": "ddim"}))
  with pytest.raises(ValueError, match="px"):
    gen(make_spec(casc, resolution={"sr": 64}))
  with pytest.raises(ValueError, match="uncond"):
    priors.generate_priors(casc, make_spec(casc), cond, None, str(tmp_path), progress=False)
  assert not os.listdir(tmp_path)  # checked before anything is written
