"""configs/world.py: its arguments, and the clear error it gives while the pretrained world
cascade is not in the checkout (experiments/pretrain_world.py makes it)."""

import time

import pytest

from conftest import REPO

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


def test_missing_world_cascade_says_how_to_make_it():
  # Not shipped yet (see the README's world section); once it is, this becomes a preflight test.
  from dreambooth_jax import config_lib
  with pytest.raises(config_lib.ConfigError, match="pretrain_world.py .*--export="):
    world_config()


def test_pretraining_trains_t5_and_its_export_is_what_the_world_config_loads(tmp_path):
  """experiments/pretrain_world.py, end to end at toy widths (the base alone: one compiled
  step). A frozen-T5 run of no steps writes its checkpoint; a run with `--text_lr` started
  `--init_from` it encodes the captions inside the step, so the loss reaches T5, and
  exports the moved encoder. That IF-layout export, trained with the UNets' text mask, is
  a `cascade=` for configs/world.py, which follows the mask, and score_world_cascade.py
  samples and scores it."""
  import numpy as np
  import pretrain_world  # experiments/, on the path through pytest.ini
  import score_world_cascade
  from safetensors.numpy import load_file
  from dreambooth_jax import pipeline
  toy = ["--base_channels=16", "--sr_channels=8", "--train=base", "--sample_every=0", "--warmup=0",
         "--text_mask"]
  frozen, trained = tmp_path / "frozen", tmp_path / "trained"
  pretrain_world.main([f"--workdir={frozen}", *toy, "--steps=0", f"--export={frozen / 'export'}"])
  t0 = time.time()
  pretrain_world.main([f"--workdir={trained}", f"--init_from={frozen}", *toy, "--text_lr=1e-2",
                       "--steps=2", f"--export={trained / 'export'}"])
  print(f"2 steps with T5 trained, and the export: {time.time() - t0:.1f} s")
  weights = lambda run: load_file(next((run / "export" / "IF-I" / "text_encoder").glob("*.safetensors")))
  before, after = weights(frozen), weights(trained)
  moved = {k: float(np.abs(after[k].astype(np.float32) - before[k].astype(np.float32)).max()) for k in before}
  print(f"T5 moved by up to {max(moved.values()):.4f}")
  assert all(v > 0 for v in moved.values()), [k for k, v in moved.items() if v == 0]

  out = trained / "export"
  config = world_config(f"cascade={out}")
  assert config.model.unet_text_mask and config.pretrained.stage_1 == str(out / "IF-I")
  stages = pipeline.build(config).cascade.stages
  assert [s.settings.text_mask for s in stages] == [True, True]
  t0 = time.time()
  rows, moved = score_world_cascade.main([f"--cascade={out}", "--num=2", "--steps=2", "--sensitivity"])
  print(f"score: {time.time() - t0:.1f} s")
  assert [r[1] for r in rows] == ["-", "64 px", "32 px", "base 32 px", "sr256 64 px"]
  assert all(0.0 <= v <= 1.0 for r in rows for v in r[2].values())
  # The text-sensitivity probe, on the same loaded models: the caption moves an untrained
  # UNet's epsilon by about its own size (1.06 measured at t=500); a trained one learns
  # to need less (the step-7750 world cascade: 0.013).
  moved = moved[str(out)]
  print("text sensitivity: " + ", ".join(f"t={t} {v:.4f}" for t, v in moved.items()))
  assert moved.keys() == {100, 500, 900} and all(0.3 < v < 3.0 for v in moved.values())
