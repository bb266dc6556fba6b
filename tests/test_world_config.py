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


def test_pretrain_export_is_what_the_world_config_loads(tmp_path):
  """experiments/pretrain_world.py's export of a toy-width cascade set up with the UNets'
  text mask (its initial weights: compiling the pretraining step would cost CI a minute):
  the IF-layout export is a `cascade=` for configs/world.py, which follows the mask it
  was trained with, and score_world_cascade.py samples and scores it."""
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
  assert [r[1] for r in rows] == ["-", "64 px", "32 px", "base 32 px", "sr256 64 px"]
  assert all(0.0 <= v <= 1.0 for r in rows for v in r[2].values())
  # The text-sensitivity probe, on the same loaded models: the caption moves an untrained
  # UNet's epsilon by about its own size (1.06 measured at t=500); a trained one learns
  # to need less (the step-7750 world cascade: 0.013).
  moved = moved[str(out)]
  print("text sensitivity: " + ", ".join(f"t={t} {v:.4f}" for t, v in moved.items()))
  assert moved.keys() == {100, 500, 900} and all(0.3 < v < 3.0 for v in moved.values())
