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
  rows = score_world_cascade.main([f"--cascade={out}", "--num=2", "--steps=2"])
  print(f"score: {time.time() - t0:.1f} s")
  assert [r[1] for r in rows] == ["-", "64 px", "32 px", "base 32 px", "sr256 64 px"]
  assert all(0.0 <= v <= 1.0 for r in rows for v in r[2].values())
  # The text-sensitivity probe: the caption moves even an untrained UNet's epsilon (by
  # about its own size: nothing has taught it to ignore the text yet).
  moved = score_world_cascade.text_sensitivity(str(out), ["a red ball", "a box at night"], 0, (500,))
  print(f"text sensitivity at t=500: {moved[500]:.4f}")
  assert moved.keys() == {500} and 0.0 < moved[500] < 10.0
