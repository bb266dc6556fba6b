"""configs/world.py: its arguments, the packaged pretrained world cascade it loads, and the
clear error it gives for a cascade folder that is not there (experiments/pretrain_world.py
makes one)."""

import json
import time

import pytest

from conftest import REPO
from dreambooth_jax.world import instances

WORLD_CONFIG = REPO / "configs" / "world.py"


def world_config(arg: str = ""):
  from dreambooth_jax import config_lib
  return config_lib.from_file(f"{WORLD_CONFIG}:{arg}")


def test_unknown_subject_is_named_with_the_choices():
  from dreambooth_jax import config_lib
  with pytest.raises(config_lib.ConfigError, match="subject 'dog'.*zigzag_ball.*wavy_cone"):
    world_config("subject=dog")


def test_every_subject_has_its_packaged_photos():
  from dreambooth_jax import data
  from dreambooth_jax.world import subjects
  for name in subjects.SUBJECT_NAMES:
    folder = REPO / "dreambooth_jax" / "assets" / "world_subjects" / name
    photos = data.load_subject_images(folder, min_size=64)
    assert len(photos.images) == 5 and photos.images[0].size == (64, 64), name


def test_missing_world_cascade_says_how_to_make_it(tmp_path):
  from dreambooth_jax import config_lib
  with pytest.raises(config_lib.ConfigError, match="pretrain_world.py .*--export="):
    world_config(f"cascade={tmp_path / 'nope'}")


def test_the_packaged_cascade_loads_as_if_does():
  """The default cascade ships in assets/world_cascade in IF's layout: the config points the
  IF loaders at it, they find every file (fp16 variant weights), and the UNets and T5 load
  with the shapes of their configs."""
  import jax
  from dreambooth_jax import pipeline
  config = world_config()
  assert config.pretrained.stage_1.endswith("assets/world_cascade/IF-I")
  pipeline.check_pretrained_folders(config)
  models = pipeline.build(config)
  base, sr = models.cascade.stages
  assert (base.settings.resolution, sr.settings.resolution) == (32, 64)
  assert (base.settings.sampler, base.settings.num_steps) == ("ddpm", 25)
  counts = [sum(x.size for x in jax.tree.leaves(s.params)) for s in (base, sr)]
  print(f"world cascade parameters: base {counts[0]:,}, SR {counts[1]:,}")
  assert counts[0] > counts[1] > 100_000
  from dreambooth_jax import embeddings
  text, mask = embeddings.encode_prompts(models.load_t5(), models.tokenizer, ["a ball", ""])
  assert text.shape == (2, 77, 64) and mask[0].sum() > mask[1].sum() > 0


def test_a_stages_loss_weighting_comes_from_its_config():
  from dreambooth_jax import pipeline
  config = world_config()
  assert pipeline.stage_settings(config, "base").weighting == "uniform"  # IF's epsilon MSE
  config.cascade.base.update(weighting="v", min_snr_gamma=10.0)
  settings = pipeline.stage_settings(config, "base")
  assert (settings.weighting, settings.min_snr_gamma) == ("v", 10.0)


def test_the_world_sr_stage_keeps_its_inputs_colours_and_its_priors_say_so():
  from configs import imagen_dog
  from dreambooth_jax import pipeline, priors
  config = world_config()
  assert pipeline.stage_settings(config, "sr256").colour_fix
  assert not pipeline.stage_settings(config, "base").colour_fix
  assert not pipeline.stage_settings(imagen_dog.get_config("if"), "sr256").colour_fix  # IF's way
  on = priors.StageSampling.from_mapping("sr256", dict(config.cascade.sr256), is_base=False)
  off = priors.StageSampling.from_mapping("sr256", dict(config.cascade.sr256, colour_fix=False),
                                          is_base=False)
  # Priors drawn with the fix are another cache than without it; caches written before the
  # setting existed (all without it) read back as "off".
  assert on.colour_fix and not off.colour_fix and on != off
  assert priors._sampling_dict(on)["colour_fix"] is True and "colour_fix" not in priors._sampling_dict(off)
  assert priors.StageSampling.from_mapping("sr256", priors._sampling_dict(off), is_base=False) == off


def test_pretrain_export_is_what_the_world_config_loads(tmp_path):
  """experiments/pretrain_world.py's export of a toy-width cascade set up with the UNets'
  text mask (its initial weights: compiling the pretraining step would cost CI a minute):
  the IF-layout export is a `cascade=` for configs/world.py, which follows the mask it
  was trained with, score_world_cascade.py samples and scores it, and a continuation
  starts from it."""
  import pretrain_world  # experiments/, on the path through pytest.ini
  import score_world_cascade
  from dreambooth_jax import pipeline
  out = tmp_path / "export"
  t0 = time.time()
  pretrain_world.main([f"--workdir={tmp_path / 'run'}", "--base_channels=16", "--sr_channels=8",
                       "--text_mask", "--export_only", f"--export={out}"])
  print(f"export: {time.time() - t0:.1f} s")
  config = world_config(f"cascade={out}")
  assert config.model.unet_text_mask and config.pretrained.stage_1 == str(out / "IF-I")
  stages = pipeline.build(config).cascade.stages
  assert [s.settings.text_mask for s in stages] == [True, True]
  t0 = time.time()
  rows, moved = score_world_cascade.main([f"--cascade={out}", "--num=2", "--steps=2", "--sensitivity"])
  print(f"score: {time.time() - t0:.1f} s")
  assert [r[1] for r in rows] == ["-", "64 px", "32 px", "base 32 px", "sr256 64 px",
                                 "sr256 64 px on the 32 px renders"]
  assert all(0.0 <= v <= 1.0 for r in rows for v in r[2].values())
  # The text-sensitivity probe, on the same loaded models: the caption moves an untrained
  # UNet's epsilon by about its own size (1.06 measured at t=500); a trained one learns
  # to need less (the step-7750 world cascade: 0.013).
  moved = moved[str(out)]
  print("text sensitivity: " + ", ".join(f"t={t} {v:.4f}" for t, v in moved.items()))
  assert moved.keys() == {100, 500, 900} and all(0.3 < v < 3.0 for v in moved.values())
  # A continuation starts from an export (--init_export): the UNets and T5 it writes back are
  # the ones it loaded, and an export trained with named instances says which names it used.
  again = tmp_path / "again"
  # Another --seed: a run that ignored --init_export would write other random weights.
  pretrain_world.main([f"--workdir={tmp_path / 'run2'}", "--base_channels=16", "--sr_channels=8",
                       "--seed=1", "--text_mask", f"--init_export={out}", "--named=0.3", "--export_only",
                       f"--export={again}"])
  for part in ("IF-I/unet", "IF-II/unet", "IF-I/text_encoder"):
    first, second = (sorted((d / part).glob("*.safetensors")) for d in (out, again))
    assert [f.read_bytes() for f in first] == [f.read_bytes() for f in second], part
  trained = json.loads((again / "world_cascade.json").read_text())
  assert trained["instance_names"] == list(instances.NAMES) and trained["named_fraction"] == 0.3
  assert world_config(f"cascade={again}").subject.identifier_id_range == instances.IDENTIFIER_ID_RANGE
  # --named scores the names: every instance in turn, captioned by its name alone.
  named = score_world_cascade.named_scenes(len(instances.NAMES))
  assert [s.name for s in named] == list(instances.NAMES)


def test_pretrain_trains_t5_with_text_lr(tmp_path, capsys):
  """`--text_lr` trains T5 with the base UNet (T5 encodes inside the step, so the loss
  reaches it): two steps at toy width move the exported encoder and the base UNet, leave
  the SR UNet (not trained) as it was, and a run resumed from the checkpoint ends where
  an uninterrupted one does, T5's params, EMA and optimiser state restored."""
  import numpy as np
  import pretrain_world
  from safetensors.numpy import load_file
  toy = ["--base_channels=16", "--sr_channels=8", "--batch=8", "--sample_every=0", "--warmup=1"]
  init = tmp_path / "init"
  pretrain_world.main([f"--workdir={tmp_path / 'run0'}", *toy, "--export_only", f"--export={init}"])
  run, out = tmp_path / "run", tmp_path / "out"
  t0 = time.time()
  pretrain_world.main([f"--workdir={run}", *toy, f"--init_export={init}", "--train=base",
                       "--text_lr=1e-3", "--lr=1e-3", "--steps=3", "--until=2", f"--export={out}"])
  took = time.time() - t0

  def weights(folder, part):
    return {k: v for f in sorted((folder / part).glob("*.safetensors")) for k, v in load_file(f).items()}

  for part, moved in (("IF-I/text_encoder", True), ("IF-I/unet", True), ("IF-II/unet", False)):
    before, after = weights(init, part), weights(out, part)
    assert before.keys() == after.keys(), part
    change = max(float(np.abs(after[k].astype(np.float32) - before[k].astype(np.float32)).max())
                 for k in before)
    with capsys.disabled():
      print(f"{part}: max change {change:.2e}")
    assert (change > 1e-4) if moved else (change == 0.0), part
  # The third step resumes from step 2's checkpoint, whose state holds T5's params, EMA and
  # Adam moments: a structure that did not match would fail the restore.
  capsys.readouterr()
  t0 = time.time()
  pretrain_world.main([f"--workdir={run}", *toy, f"--init_export={init}", "--train=base",
                       "--text_lr=1e-3", "--lr=1e-3", "--steps=3", f"--export={tmp_path / 'out3'}"])
  assert "resumed at step 2" in capsys.readouterr().out
  with capsys.disabled():
    print(f"two steps with T5 trained: {took:.1f} s; the resumed third: {time.time() - t0:.1f} s")
  # ... to the bit of an uninterrupted three-step run: a T5 state lost or reset on resume
  # (its Adam moments, its EMA) would change the exported encoder.
  pretrain_world.main([f"--workdir={tmp_path / 'straight'}", *toy, f"--init_export={init}",
                       "--train=base", "--text_lr=1e-3", "--lr=1e-3", "--steps=3",
                       f"--export={tmp_path / 'straight3'}"])
  resumed, straight = (weights(tmp_path / d, "IF-I/text_encoder") for d in ("out3", "straight3"))
  assert all(np.array_equal(resumed[k], straight[k]) for k in straight)
