"""The metric arithmetic on hand-made embeddings whose cosines are known in closed form."""

import math

import numpy as np
import pytest

from dreambooth_jax.evaluation import metrics
from dreambooth_jax.weights import WeightsError


def _unit(deg):
  """A 2-d vector at `deg` degrees (scaled, so normalisation is exercised)."""
  r = math.radians(deg)
  return [3.0 * math.cos(r), 3.0 * math.sin(r)]


def test_mean_pairwise_cosine_generated_vs_real():
  # generated at 0 and 90 degrees, real at 0 and 60: cosines 1, 0.5, 0, cos(30) -> mean
  gen = np.array([_unit(0), _unit(90)])
  real = np.array([_unit(0), _unit(60)]) * [[1.0], [7.0]]  # lengths must not matter
  want = (1 + 0.5 + 0 + math.cos(math.radians(30))) / 4
  assert metrics.mean_pairwise_cosine(gen, real) == pytest.approx(want, abs=1e-12)
  np.testing.assert_allclose(metrics.cosine_matrix(gen, real),
                             [[1, 0.5], [0, math.cos(math.radians(30))]], atol=1e-12)


def test_real_vs_real_uses_distinct_pairs_only():
  x = np.array([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
  # pairs (0,1)=0, (0,2)=(1,2)=1/sqrt2; self pairs (cosine 1) must not count
  want = (0 + 2 / math.sqrt(2)) / 3
  got = metrics.mean_distinct_pair_cosine(x)
  assert got == pytest.approx(want, abs=1e-12)
  assert got != pytest.approx(metrics.mean_pairwise_cosine(x, x))  # the all-pairs mean is higher
  assert metrics.mean_distinct_pair_cosine(np.array([[1.0, 2.0], [2.0, 4.0]])) == pytest.approx(1)
  with pytest.raises(ValueError, match="at least 2"):
    metrics.mean_distinct_pair_cosine(np.array([[1.0, 0.0]]))


def test_distinct_pairs_counts():
  for n in range(6):
    i, j = metrics.distinct_pairs(n)
    assert len(i) == n * (n - 1) // 2 and np.all(i < j)


def test_clip_t_pairs_each_image_with_its_prompt():
  text = np.array([_unit(0), _unit(90)])                   # prompt 0, prompt 1
  images = np.array([_unit(0), _unit(60), _unit(90), _unit(45)])
  got = metrics.clip_t(images, text, [0, 0, 1, 1])
  np.testing.assert_allclose(got, [1, 0.5, 1, math.cos(math.radians(45))], atol=1e-12)
  with pytest.raises(ValueError, match="zero norm"):
    metrics.clip_t(np.zeros((1, 2)), text, [0])


def test_div_counts_pairs_within_each_prompt_only():
  calls = []

  def distance(x, y):  # |x - y| on scalar "images"; records the pairs it is given
    calls.append(len(x))
    return np.abs(x - y).reshape(-1)

  groups = [np.array([0.0, 1.0]), np.array([0.0, 1.0, 3.0]), np.array([10.0, 10.0, 10.0, 10.0])]
  mean, per_group, pairs = metrics.diversity(distance, groups)
  assert pairs == 1 + 3 + 6 and calls == [1, 3, 6]
  assert per_group == pytest.approx([1.0, (1 + 3 + 2) / 3, 0.0])
  assert mean == pytest.approx((1.0 + 2.0 + 0.0) / 3)  # mean of per-prompt means, no cross pairs
  with pytest.raises(ValueError, match="at least 2"):
    metrics.diversity(distance, [np.array([1.0])])


def test_padded_batches_keep_one_shape_and_order():
  x = np.arange(10)
  chunks = list(metrics._padded_batches(x, 4))
  assert [c.shape for c, _ in chunks] == [(4,)] * 3 and [n for _, n in chunks] == [4, 4, 2]
  np.testing.assert_array_equal(np.concatenate([c[:n] for c, n in chunks]), x)


def test_encoders_lpips_batches_pairs_in_order():
  seen = []

  def fake_lpips(a, b):
    seen.append(a.shape)
    assert a.dtype == np.float32 and a.min() >= -1 and a.max() <= 1
    return np.abs(a - b).mean(axis=(1, 2, 3))

  enc = metrics.Encoders.__new__(metrics.Encoders)  # only the LPIPS path: no networks needed
  enc.batch, enc._lpips = 4, fake_lpips
  rng = np.random.RandomState(0)
  x = rng.randint(0, 256, (6, 8, 8, 3)).astype(np.uint8)
  y = rng.randint(0, 256, (6, 8, 8, 3)).astype(np.uint8)
  got = enc.lpips(x, y)
  want = np.abs(x / 127.5 - y / 127.5).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert seen == [(4, 8, 8, 3)] * 2


def test_missing_encoders_name_the_flag_and_the_download(tmp_path):
  (tmp_path / "clip").mkdir()
  (tmp_path / "clip" / "config.json").write_text("{}")
  (tmp_path / "clip" / "model.safetensors").write_bytes(b"")
  with pytest.raises(WeightsError) as e:
    metrics.check_encoder_paths(str(tmp_path / "nodino"), str(tmp_path / "clip"),
                                str(tmp_path / "lpips.safetensors"))
  msg = str(e.value)
  assert f"--dino={tmp_path / 'nodino'} has no config.json + model.safetensors" in msg
  assert "facebook/dino-vits16" in msg
  assert "vocab.json + merges.txt" in msg and "openai/clip-vit-base-patch32" in msg
  assert f"--lpips={tmp_path / 'lpips.safetensors'} is not a file" in msg
