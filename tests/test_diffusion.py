"""Schedules, forward noising, targets, loss and SR noise augmentation vs diffusers/torch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from dreambooth_jax import cascade, diffusion

SCHEDULER_CONFIGS = {
    # The package's embedded copies of IF's scheduler configs (test_cascade checks
    # them against shared/reference_configs).
    "if_stage_i": lambda: dict(cascade.IF_STAGE_I_SCHEDULER),
    "if_stage_ii": lambda: dict(cascade.IF_STAGE_II_SCHEDULER),
    "if_noising": lambda: dict(cascade.IF_IMAGE_NOISING_SCHEDULER),
    "linear": lambda: {"beta_schedule": "linear"},
    "scaled_linear": lambda: {"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                              "beta_end": 0.012},
    "linear_777": lambda: {"beta_schedule": "linear", "num_train_timesteps": 777},
}


def torch_scheduler(cfg):
  cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
  return DDPMScheduler.from_config(cfg)


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("name", sorted(SCHEDULER_CONFIGS))
def test_tables_match_diffusers_bitwise(name):
  cfg = SCHEDULER_CONFIGS[name]()
  ours, ref = diffusion.DiscreteSchedule.from_config(cfg), torch_scheduler(cfg)
  assert ours.betas.dtype == np.float32 and ours.alphas_cumprod.dtype == np.float32
  np.testing.assert_array_equal(ours.betas, ref.betas.numpy())
  np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [1, 25, 27, 100, 1000])
def test_timesteps_match_set_timesteps(spacing, num_steps):
  cfg = dict(dict(cascade.IF_STAGE_I_SCHEDULER), timestep_spacing=spacing)
  ref = torch_scheduler(cfg)
  ref.set_timesteps(num_steps)
  steps = diffusion.DiscreteSchedule.from_config(cfg).respace(num_steps)
  np.testing.assert_array_equal(np.asarray(steps.t), ref.timesteps.numpy())
  # The respaced betas are what DDPMScheduler.step derives from consecutive entries.
  ts = ref.timesteps.numpy()
  prev = [ref.previous_timestep(int(t)) for t in ts]
  a_prev = np.array([ref.alphas_cumprod[p].item() if p >= 0 else 1.0 for p in prev], np.float32)
  np.testing.assert_array_equal(np.asarray(steps.alpha_bar_prev), a_prev)
  np.testing.assert_array_equal(np.asarray(steps.add_noise), ts > 0)


def test_default_spacing_is_leading_for_if():
  # IF's scheduler_config.json predates timestep_spacing; diffusers defaults it to leading.
  cfg = dict(cascade.IF_STAGE_I_SCHEDULER)
  assert "timestep_spacing" not in cfg
  assert torch_scheduler(cfg).config.timestep_spacing == "leading"
  assert diffusion.DiscreteSchedule.from_config(cfg).timestep_spacing == "leading"


def test_q_sample_matches_add_noise():
  cfg = dict(cascade.IF_STAGE_I_SCHEDULER)
  ours, ref = diffusion.DiscreteSchedule.from_config(cfg), torch_scheduler(cfg)
  rs = np.random.RandomState(0)
  x0 = rs.uniform(-1, 1, (6, 8, 8, 3)).astype(np.float32)
  noise = rs.randn(6, 8, 8, 3).astype(np.float32)
  t = np.array([0, 1, 250, 500, 998, 999], np.int32)
  got = diffusion.q_sample(ours, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
  want = ref.add_noise(nchw(x0), nchw(noise), torch.from_numpy(t.astype(np.int64)))
  err = np.abs(np.asarray(got).transpose(0, 3, 1, 2) - want.numpy()).max()
  print(f"\nq_sample vs DDPMScheduler.add_noise: max abs err {err:.2e}")
  assert err < 1e-6


def test_float_time_on_discrete_schedule():
  sched = diffusion.DiscreteSchedule()
  ks = jnp.arange(1, 1000, 37, dtype=jnp.int32)
  a_int, s_int = sched.alpha_sigma(ks)
  a_flt, s_flt = sched.alpha_sigma(ks.astype(jnp.float32))
  np.testing.assert_array_equal(a_int, a_flt)
  np.testing.assert_array_equal(s_int, s_flt)
  a0, s0 = sched.alpha_sigma(jnp.float32(0.0))
  assert float(a0) == 1.0 and float(s0) == 0.0
  grid = jnp.linspace(0.0, 999.0, 20001)
  _, s = sched.alpha_sigma(grid)
  assert np.all(np.diff(np.asarray(s)) >= 0), "noise must grow with t"
  l = np.asarray(sched.logsnr(grid))
  assert np.all(np.diff(l) <= 0) and np.isinf(l[0])
  # DreamBooth's augmentation levels 1e-5 and 1e-3 must not collapse to one step.
  _, s_lo = sched.alpha_sigma(jnp.float32(1e-5 * 1000))
  _, s_hi = sched.alpha_sigma(jnp.float32(1e-3 * 1000))
  assert 0 < float(s_lo) < float(s_hi)
  np.testing.assert_allclose(float(s_lo) / float(s_hi), 0.1, rtol=1e-4)
  # Between knots log-SNR is linear.
  l_mid = float(sched.logsnr(jnp.float32(250.5)))
  l_k = np.asarray(sched.logsnr(jnp.array([250, 251], jnp.int32)))
  np.testing.assert_allclose(l_mid, l_k.mean(), rtol=1e-5)


def test_continuous_cosine_schedule():
  sched = diffusion.ContinuousCosineSchedule(logsnr_min=-20.0, logsnr_max=20.0)
  t = np.array([1e-12, 1e-9, 1e-3, 0.25, 0.5, 0.9, 1.0], np.float32)
  l = np.asarray(sched.logsnr(t))
  want = np.clip(-2 * np.log(np.tan(np.pi * t.astype(np.float64) / 2)), -20, 20)
  np.testing.assert_allclose(l, want, rtol=1e-4, atol=1e-3)
  assert l[0] == pytest.approx(20.0, abs=1e-3) and l[-1] == pytest.approx(-20.0, abs=1e-3)
  alpha, sigma = sched.alpha_sigma(t)
  np.testing.assert_allclose(np.square(alpha) + np.square(sigma), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(alpha)[3], np.sqrt(1 / (1 + np.tan(np.pi / 8) ** 2)),
                             rtol=1e-6)
  steps = sched.respace(10)
  assert steps.num_steps == 10 and float(steps.t[0]) == 1.0
  assert not bool(steps.add_noise[-1]) and bool(steps.add_noise[0])
  np.testing.assert_allclose(steps.model_t, np.asarray(steps.t) * 1000, rtol=1e-6)
  assert bool(jnp.all(steps.betas > 0)) and bool(jnp.all(steps.betas < 1))


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_target_conversions_round_trip(prediction_type):
  sched = diffusion.DiscreteSchedule()
  rs = np.random.RandomState(1)
  x0, noise = (jnp.asarray(rs.randn(3, 4, 4, 3), jnp.float32) for _ in range(2))
  t = jnp.array([10, 400, 900], jnp.int32)
  alpha, sigma = sched.alpha_sigma(t)
  x_t = diffusion.q_sample(sched, x0, t, noise)
  tgt = diffusion.target(prediction_type, x0, noise, alpha, sigma)
  np.testing.assert_allclose(diffusion.pred_to_x0(prediction_type, tgt, x_t, alpha, sigma), x0,
                             atol=2e-4)
  np.testing.assert_allclose(diffusion.pred_to_eps(prediction_type, tgt, x_t, alpha, sigma),
                             noise, atol=2e-4)


def test_loss_learned_variance_uses_epsilon_half_only():
  sched = diffusion.DiscreteSchedule()
  rs = np.random.RandomState(2)
  x0 = jnp.asarray(rs.uniform(-1, 1, (4, 8, 8, 3)), jnp.float32)
  w = jnp.asarray(rs.randn(3, 3) * 0.3, jnp.float32)
  eps_model = lambda x, t, c: x @ w
  junk = lambda scale: (lambda x, t, c: jnp.concatenate([x @ w, scale * (x + 100.0)], -1))
  kw = dict(t=jnp.array([3, 100, 500, 990], jnp.int32),
            noise=jnp.asarray(rs.randn(4, 8, 8, 3), jnp.float32))
  rng = jax.random.key(0)
  plain, _ = diffusion.loss(eps_model, sched, x0, rng, None, **kw)
  a, _ = diffusion.loss(junk(1.0), sched, x0, rng, None, learned_variance=True, **kw)
  b, metrics = diffusion.loss(junk(-50.0), sched, x0, rng, None, learned_variance=True, **kw)
  np.testing.assert_array_equal(plain, a)
  np.testing.assert_array_equal(a, b)
  # Hand computation: mean over pixels of (eps_hat - eps)^2.
  x_t = diffusion.q_sample(sched, x0, kw["t"], kw["noise"])
  want = np.mean(np.square(np.asarray(x_t @ w) - np.asarray(kw["noise"])), axis=(1, 2, 3))
  np.testing.assert_allclose(plain, want, rtol=1e-6)
  assert metrics["loss"].shape == () and plain.shape == (4,)
  with pytest.raises(ValueError, match="channels"):
    diffusion.loss(junk(1.0), sched, x0, rng, None, **kw)


def _weighted_loss(seed, t, **kw):
  """diffusion.loss of the model 0.5 * x_t on fixed draws at timesteps `t`, and those draws
  in float64 for a hand computation: (per-example loss, metrics, alphas_cumprod, x0, noise)."""
  sched = diffusion.DiscreteSchedule()
  rs = np.random.RandomState(seed)
  x0 = jnp.asarray(rs.uniform(-1, 1, (5, 4, 4, 3)), jnp.float32)
  noise = jnp.asarray(rs.randn(5, 4, 4, 3), jnp.float32)
  t = jnp.array(t, jnp.int32)
  got, metrics = diffusion.loss(lambda x, tt, c: 0.5 * x, sched, x0, jax.random.key(1), None,
                                t=t, noise=noise, **kw)
  ac = sched.alphas_cumprod[np.asarray(t)].astype(np.float64)
  return got, metrics, ac, np.asarray(x0, np.float64), np.asarray(noise, np.float64)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weighting_matches_hand_computation(prediction_type):
  got, metrics, ac, x0n, nn = _weighted_loss(3, [0, 50, 200, 600, 999], prediction_type=prediction_type,
                                             weighting="min_snr", min_snr_gamma=5.0)
  snr = ac / (1 - ac)
  a, s = np.sqrt(ac)[:, None, None, None], np.sqrt(1 - ac)[:, None, None, None]
  x_t = a * x0n + s * nn
  tgt = {"epsilon": nn, "sample": x0n, "v_prediction": a * nn - s * x0n}[prediction_type]
  mse = np.mean(np.square(0.5 * x_t - tgt), axis=(1, 2, 3))
  weight = {"epsilon": np.minimum(snr, 5) / snr, "sample": np.minimum(snr, 5),
            "v_prediction": np.minimum(snr, 5) / (snr + 1)}[prediction_type]
  np.testing.assert_allclose(got, weight * mse, rtol=2e-5)
  np.testing.assert_allclose(metrics["weight"], weight.mean(), rtol=2e-5)


def test_v_weighting_on_epsilon_is_the_v_loss_above_its_floor():
  """weighting='v' on an epsilon model is the MSE of the v that epsilon implies
  (v = (eps - sigma x_t) / alpha), wherever snr >= 1/gamma; below, the weight stops at
  (snr + 1) * gamma instead of growing as 1/snr."""
  gamma = 5.0
  got, _, ac, x0n, nn = _weighted_loss(4, [0, 300, 600, 900, 999], weighting="v", min_snr_gamma=gamma)
  a, s = np.sqrt(ac)[:, None, None, None], np.sqrt(1 - ac)[:, None, None, None]
  x_t = a * x0n + s * nn
  v_mse = np.mean(np.square((0.5 * x_t - s * x_t) / a - (a * nn - s * x0n)), axis=(1, 2, 3))
  eps_mse = np.mean(np.square(0.5 * x_t - nn), axis=(1, 2, 3))
  snr = ac / (1 - ac)
  above = snr >= 1 / gamma
  assert above.sum() == 3 and not above[-1]
  np.testing.assert_allclose(np.asarray(got)[above], v_mse[above], rtol=1e-4)
  np.testing.assert_allclose(np.asarray(got)[~above], ((snr + 1) * gamma * eps_mse)[~above], rtol=1e-4)
  with pytest.raises(ValueError, match="'v'"):
    diffusion.loss_weight("x0", jnp.ones(2), "epsilon")


def test_loss_under_jit_samples_t_and_noise():
  sched = diffusion.DiscreteSchedule()
  x0 = jnp.zeros((8, 4, 4, 3))
  f = jax.jit(lambda rng: diffusion.loss(lambda x, t, c: x, sched, x0, rng, None))
  l1, m1 = f(jax.random.key(0))
  l2, _ = f(jax.random.key(0))
  np.testing.assert_array_equal(l1, l2)
  assert l1.shape == (8,) and np.isfinite(float(m1["loss"]))


@pytest.mark.parametrize("size_in,size_out", [((8, 8), (32, 32)), ((5, 7), (13, 16))])
def test_upsample_matches_torch_bilinear_align_corners(size_in, size_out):
  x = np.random.RandomState(4).uniform(-1, 1, (2,) + size_in + (3,)).astype(np.float32)
  got = np.asarray(diffusion.upsample_bilinear(jnp.asarray(x), size_out)).transpose(0, 3, 1, 2)
  want = F.interpolate(nchw(x), size_out, mode="bilinear", align_corners=True).numpy()
  err = np.abs(got - want).max()
  print(f"\nupsample {size_in}->{size_out} vs F.interpolate(align_corners=True): {err:.2e}")
  assert err < 1e-6


def test_lowres_condition_levels_and_class_labels():
  sched = diffusion.DiscreteSchedule.from_config(dict(cascade.IF_IMAGE_NOISING_SCHEDULER))
  x = jnp.asarray(np.random.RandomState(5).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  rng = jax.random.key(7)
  base = diffusion.down_up(x, 8)
  assert base.shape == x.shape
  clean, labels0 = diffusion.lowres_condition(x, 8, 0.0, rng, sched)
  np.testing.assert_array_equal(clean, base)
  np.testing.assert_array_equal(labels0, [0.0, 0.0])
  lo, labels_lo = diffusion.lowres_condition(x, 8, 1e-5, rng, sched)
  hi, labels_hi = diffusion.lowres_condition(x, 8, 1e-3, rng, sched)
  np.testing.assert_allclose(labels_lo, [0.01, 0.01], rtol=1e-6)
  np.testing.assert_allclose(labels_hi, [1.0, 1.0], rtol=1e-6)
  d_lo, d_hi = float(jnp.std(lo - base)), float(jnp.std(hi - base))
  assert 0 < d_lo < d_hi, (d_lo, d_hi)
  assert d_hi / d_lo == pytest.approx(10.0, rel=0.05)
  # IF's inference noise_level=250 is aug level 0.25: identical to add_noise at step 250.
  noise = jax.random.normal(rng, x.shape)
  at250, labels = diffusion.lowres_condition(x, 8, 0.25, rng, sched, noise=noise)
  ref = torch_scheduler(dict(cascade.IF_IMAGE_NOISING_SCHEDULER))
  want = ref.add_noise(nchw(base), nchw(noise), torch.tensor([250, 250]))
  np.testing.assert_allclose(np.asarray(at250).transpose(0, 3, 1, 2), want.numpy(), atol=1e-6)
  np.testing.assert_array_equal(labels, [250.0, 250.0])
  # Per-example levels.
  _, mixed = diffusion.lowres_condition(x, 8, jnp.array([1e-5, 1e-3]), rng, sched)
  np.testing.assert_allclose(mixed, [0.01, 1.0], rtol=1e-6)


def test_schedule_is_hashable_and_from_config_ignores_sampler_keys():
  cfg = dict(cascade.IF_STAGE_I_SCHEDULER)
  a = diffusion.DiscreteSchedule.from_config(cfg)
  b = diffusion.DiscreteSchedule.from_config(dict(cascade.IF_IMAGE_NOISING_SCHEDULER))
  assert a == b and hash(a) == hash(b)  # same noise schedule, different sampler settings
  assert math.isclose(float(a.alphas_cumprod[-1]), torch_scheduler(cfg).alphas_cumprod[-1].item())
