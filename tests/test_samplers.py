"""DDPM/DDIM steps, guidance and the scanned sampling loop vs diffusers' schedulers."""

import functools

import diffusers.schedulers.scheduling_ddpm as ddpm_module
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from dreambooth_jax import cascade, diffusion, samplers, sharding

IF_I = dict(cascade.IF_STAGE_I_SCHEDULER)

STEP_CONFIGS = {
    # IF stage I: learned-range variance + dynamic thresholding (p=0.95, max 1.5).
    "if_learned_range_threshold": IF_I,
    "fixed_small_clip": dict(IF_I, variance_type="fixed_small", thresholding=False),
    "fixed_large_v": dict(IF_I, variance_type="fixed_large", thresholding=False,
                          prediction_type="v_prediction"),
    "fixed_small_log_sample_noclip": dict(IF_I, variance_type="fixed_small_log",
                                          thresholding=False, clip_sample=False,
                                          prediction_type="sample"),
}

SHAPE = (8, 8, 8, 3)  # NHWC; batch 8 so the mesh test reuses the loop test's compile


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


@functools.partial(jax.jit, static_argnames=("config",))
def _jit_ddpm(config, out, x, row, noise):
  return samplers.ddpm_step(config, out, x, row, noise)


@functools.partial(jax.jit, static_argnames=("config",))
def _jit_ddim(config, out, x, row, noise, eta):
  return samplers.ddim_step(config, out, x, row, noise, eta)


def _row(steps, i):
  return jax.tree.map(lambda a: a[i], steps)


@pytest.mark.parametrize("name", sorted(STEP_CONFIGS))
def test_ddpm_step_matches_diffusers(name, monkeypatch):
  cfg = STEP_CONFIGS[name]
  ref = DDPMScheduler.from_config(cfg)
  ref.set_timesteps(25)
  config = samplers.StepConfig.from_config(cfg)
  steps = diffusion.DiscreteSchedule.from_config(cfg).respace(25)
  np.testing.assert_array_equal(np.asarray(steps.t), ref.timesteps.numpy())
  rs = np.random.RandomState(0)
  n_out = 6 if config.learned_variance else 3
  worst = 0.0
  for i in (0, 5, 12, 23, 24):  # 24 is t=0: no noise
    x = (rs.randn(*SHAPE) * 1.5).astype(np.float32)
    out = rs.randn(*SHAPE[:3], n_out).astype(np.float32)
    noise = rs.randn(*SHAPE).astype(np.float32)
    monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *a, **k: nchw(noise))
    t = ref.timesteps[i]
    want_prev, want_x0 = ref.step(nchw(out), t, nchw(x), return_dict=False)
    got_prev, got_x0 = _jit_ddpm(config, out, x, _row(steps, i), noise)
    err = max(np.abs(nhwc(want_prev) - np.asarray(got_prev)).max(),
              np.abs(nhwc(want_x0) - np.asarray(got_x0)).max())
    worst = max(worst, err)
  print(f"\nddpm_step[{name}] vs DDPMScheduler.step (25 leading steps): max abs err {worst:.2e}")
  assert worst < 1e-5


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("variant", ["if_threshold", "clip_v_clipped_eps"])
def test_ddim_step_matches_diffusers(eta, variant):
  cfg = IF_I if variant == "if_threshold" else dict(
      IF_I, thresholding=False, prediction_type="v_prediction", use_clipped_model_output=True,
      set_alpha_to_one=False)
  ref = DDIMScheduler.from_config(cfg)
  ref.set_timesteps(25)
  config = samplers.StepConfig.from_config(cfg)
  final = None if config.set_alpha_to_one else float(ref.alphas_cumprod[0])
  steps = diffusion.DiscreteSchedule.from_config(cfg).respace(25, prev="stride",
                                                              final_alpha_bar=final)
  rs = np.random.RandomState(1)
  worst = 0.0
  for i in (0, 7, 24):
    x = (rs.randn(*SHAPE) * 1.5).astype(np.float32)
    out = rs.randn(*SHAPE).astype(np.float32)
    noise = rs.randn(*SHAPE).astype(np.float32)
    want_prev, want_x0 = ref.step(nchw(out), ref.timesteps[i], nchw(x), eta=eta,
                                  use_clipped_model_output=config.use_clipped_model_output,
                                  variance_noise=nchw(noise), return_dict=False)
    got_prev, got_x0 = _jit_ddim(config, out, x, _row(steps, i), noise, eta)
    err = max(np.abs(nhwc(want_prev) - np.asarray(got_prev)).max(),
              np.abs(nhwc(want_x0) - np.asarray(got_x0)).max())
    worst = max(worst, err)
  print(f"\nddim_step[{variant}, eta={eta}] vs DDIMScheduler.step: max abs err {worst:.2e}")
  assert worst < 1e-5


def test_guidance_learned_variance_follows_if_pipeline():
  b, c = 2, 3
  rs = np.random.RandomState(2)
  x = jnp.asarray(rs.randn(b, 4, 4, c), jnp.float32)
  cond = {"emb": jnp.asarray(rs.randn(b, 5), jnp.float32)}
  uncond = {"emb": jnp.zeros((b, 5), jnp.float32)}
  calls = []

  def model(xx, t, cd):
    calls.append(xx.shape[0])
    s = cd["emb"].sum(-1)[:, None, None, None]
    return jnp.concatenate([xx + s, xx * 0 + s + t[:, None, None, None] / 1000], -1)

  out = samplers.guided_output(model, x, jnp.int32(500), cond, uncond, 7.0)
  assert calls == [2 * b]  # one batched call for both branches
  s = cond["emb"].sum(-1)[:, None, None, None]
  eps_u, eps_c = x, x + s
  np.testing.assert_allclose(out[..., :c], eps_u + 7.0 * (eps_c - eps_u), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[..., c:], jnp.broadcast_to(s + 0.5, x.shape), rtol=1e-6)


# ---------------------------------------------------------------------------
# A tiny deterministic model, written identically in JAX and PyTorch.
# The lead swaps in the tiny IF UNet pair here once models/unet.py lands.
# ---------------------------------------------------------------------------

_RS = np.random.RandomState(3)
W_IN = (_RS.randn(3, 16) * 0.5).astype(np.float32)
W_T = (_RS.randn(16) * 0.5).astype(np.float32)
W_C = (_RS.randn(8, 16) * 0.3).astype(np.float32)
W_OUT = (_RS.randn(16, 6) * 0.3).astype(np.float32)
W_SKIP = (_RS.randn(3, 6) * 0.3).astype(np.float32)


def jax_model(x, t, cond):
  t = jnp.asarray(t, jnp.float32)[:, None, None, None] / 1000.0
  c = (cond["emb"] @ W_C)[:, None, None, :]
  h = jnp.tanh(x @ W_IN + t * W_T + c)
  return h @ W_OUT + x @ W_SKIP


def torch_model(x, t, emb):
  x = x.permute(0, 2, 3, 1)
  t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1) / 1000.0
  c = (emb @ torch.from_numpy(W_C))[:, None, None, :]
  h = torch.tanh(x @ torch.from_numpy(W_IN) + t * torch.from_numpy(W_T) + c)
  out = h @ torch.from_numpy(W_OUT) + x @ torch.from_numpy(W_SKIP)
  return out.permute(0, 3, 1, 2)


def _torch_guided_loop(cfg, x_T, step_noises, cond, uncond, scale, num_steps, monkeypatch):
  """IFPipeline's denoising loop, minus the UNet: diffusers' scheduler does the steps."""
  ref = DDPMScheduler.from_config(cfg)
  ref.set_timesteps(num_steps)
  current = {}
  monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *a, **k: current["noise"])
  x = nchw(x_T)
  emb = torch.cat([torch.from_numpy(uncond), torch.from_numpy(cond)])
  c = x.shape[1]
  for i, t in enumerate(ref.timesteps):
    out = torch_model(torch.cat([x] * 2), t.repeat(2 * x.shape[0]), emb)
    out_u, out_c = out.chunk(2)
    eps_u, _ = out_u.split(c, dim=1)
    eps_c, var = out_c.split(c, dim=1)
    pred = torch.cat([eps_u + scale * (eps_c - eps_u), var], dim=1)
    current["noise"] = nchw(step_noises[i])
    x = ref.step(pred, t, x, return_dict=False)[0]
  return nhwc(x.clamp(-1, 1))


def test_guided_25_step_loop_matches_diffusers(monkeypatch):
  cond, uncond = _loop_inputs()
  rng = jax.random.key(42)
  schedule = diffusion.DiscreteSchedule.from_config(IF_I)
  config = samplers.StepConfig.from_config(IF_I)
  got = samplers.sample(jax_model, schedule, SHAPE, rng, {"emb": jnp.asarray(cond)},
                        {"emb": jnp.asarray(uncond)}, num_steps=25, guidance_scale=7.0,
                        config=config)
  # Rebuild the exact noise `sample` drew, and hand it to diffusers.
  init_key, loop_key = samplers.split_rng(rng)
  x_T = np.asarray(jax.random.normal(init_key, SHAPE))
  noises = [np.asarray(samplers.step_noise(loop_key, i, SHAPE)) for i in range(25)]
  want = _torch_guided_loop(IF_I, x_T, noises, cond, uncond, 7.0, 25, monkeypatch)
  err = np.abs(np.asarray(got) - want).max()
  print(f"\n25-step guided DDPM loop (IF stage I config, scale 7) vs diffusers: max abs err {err:.2e}")
  assert err < 1e-5
  assert float(jnp.abs(got).max()) <= 1.0 and float(jnp.std(got)) > 0.1
  # Supplying the same x_T and noise explicitly gives the same images.
  again = samplers.sample(jax_model, schedule, SHAPE, jax.random.key(0), {"emb": jnp.asarray(cond)},
                          {"emb": jnp.asarray(uncond)}, num_steps=25, guidance_scale=7.0,
                          config=config, x_init=jnp.asarray(x_T), noise=jnp.asarray(np.stack(noises)))
  np.testing.assert_allclose(again, got, atol=1e-6)


def _loop_inputs():
  rs = np.random.RandomState(4)
  cond = rs.randn(SHAPE[0], 8).astype(np.float32)
  return cond, np.zeros_like(cond)


def test_sample_sharded_over_mesh_matches_single_device():
  assert jax.device_count() == 8
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  cond, uncond = ({"emb": jnp.asarray(a)} for a in _loop_inputs())
  schedule = diffusion.DiscreteSchedule.from_config(IF_I)
  # Same static arguments and shapes as the 25-step parity loop: one new compile only.
  kw = dict(num_steps=25, guidance_scale=4.0, config=samplers.StepConfig.from_config(IF_I))
  single = samplers.sample(jax_model, schedule, SHAPE, jax.random.key(1), cond, uncond, **kw)
  sharded = samplers.sample(jax_model, schedule, SHAPE, jax.random.key(1), cond, uncond,
                            mesh=mesh, **kw)
  assert sharded.sharding.is_equivalent_to(sharding.batch_sharding(mesh, SHAPE), 4)
  err = float(jnp.abs(sharded - single).max())
  print(f"\nsharded (data=2, fsdp=4) vs single-device sample: max abs err {err:.2e}")
  assert err < 1e-5
  other = samplers.sample(jax_model, schedule, SHAPE, jax.random.key(2), cond, uncond, **kw)
  assert float(jnp.abs(other - single).max()) > 0.1  # the rng matters


def test_ddim_loop_on_continuous_schedule_runs():
  cond = {"emb": jnp.asarray(_loop_inputs()[0])}
  config = samplers.StepConfig.from_config(dict(IF_I, variance_type="fixed_small"))
  x = samplers.sample(jax_model, diffusion.ContinuousCosineSchedule(), SHAPE, jax.random.key(3),
                      cond, num_steps=25, sampler="ddim", eta=0.5, config=config)
  assert x.shape == SHAPE and bool(jnp.all(jnp.isfinite(x)))
  assert float(jnp.abs(x).max()) <= 1.0 and float(jnp.std(x)) > 0.1


@pytest.mark.parametrize("scale", [0.3, 0.6, 0.75, 3.0])
def test_threshold_sample_matches_diffusers(scale):
  # Scales chosen so the 95th percentile lands below 1, inside (1, 1.5) and above 1.5.
  ref = DDPMScheduler.from_config(IF_I)
  x = (np.random.RandomState(7).randn(*SHAPE) * scale).astype(np.float32)
  got = samplers.threshold_sample(jnp.asarray(x), IF_I["dynamic_thresholding_ratio"],
                                  IF_I["sample_max_value"])
  want = nhwc(ref._threshold_sample(nchw(x)))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)


@pytest.mark.parametrize("shape,q", [((4, 12288), 0.95), ((3, 192), 0.995), ((2, 7), 0.5),
                                     ((2, 5), 1.0), ((2, 5), 0.0)])
def test_quantile_matches_torch_with_ties_and_zeros(shape, q):
  a = np.abs(np.random.RandomState(8).randn(*shape)).astype(np.float32)
  a[0, : shape[1] // 3] = 0.0
  a[-1, 1:] = a[-1, 0]  # all tied
  got = jax.jit(samplers.quantile_nonneg, static_argnums=1)(jnp.asarray(a), q)
  np.testing.assert_array_equal(np.asarray(got), torch.quantile(torch.from_numpy(a), q, dim=1).numpy())


# ----------------------------------------------------------------------------
# DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler
# ----------------------------------------------------------------------------

def _torch_dpm_loop(cfg, x_T, cond, uncond, scale, num_steps):
  """IFPipeline's loop with `DPMSolverMultistepScheduler.from_config(IF's DDPM config)`, as
  diffusers users swap it in: deterministic, so no noise is fed."""
  from diffusers import DPMSolverMultistepScheduler
  ref = DPMSolverMultistepScheduler.from_config(DDPMScheduler.from_config(cfg).config)
  ref.set_timesteps(num_steps)
  x = nchw(x_T)
  emb = torch.cat([torch.from_numpy(uncond), torch.from_numpy(cond)])
  c = x.shape[1]
  for t in ref.timesteps:
    out = torch_model(torch.cat([x] * 2), t.repeat(2 * x.shape[0]), emb)
    out_u, out_c = out.chunk(2)
    eps_u, _ = out_u.split(c, dim=1)
    eps_c, var = out_c.split(c, dim=1)
    pred = torch.cat([eps_u + scale * (eps_c - eps_u), var], dim=1)
    x = ref.step(pred, t, x, return_dict=False)[0]
  return nhwc(x.clamp(-1, 1)), ref.timesteps.numpy()


@pytest.mark.parametrize("num_steps,spacing", [(20, None), (7, "leading")])
def test_dpmpp_2m_loop_matches_diffusers(num_steps, spacing):
  cfg = dict(IF_I, lambda_min_clipped=-5.1)  # IF's published config carries -5.1
  if spacing:
    cfg["timestep_spacing"] = spacing
  cond, uncond = _loop_inputs()
  rng = jax.random.key(5)
  schedule = diffusion.DiscreteSchedule.from_config(cfg)
  config = samplers.StepConfig.from_config(cfg)
  steps = samplers.dpm_solver_steps(schedule, num_steps, spacing=spacing or "linspace",
                                    lambda_min_clipped=config.lambda_min_clipped)
  got = samplers.sample(jax_model, schedule, SHAPE, rng, {"emb": jnp.asarray(cond)},
                        {"emb": jnp.asarray(uncond)}, num_steps=num_steps, guidance_scale=7.0,
                        sampler="dpmpp_2m", config=config)
  x_T = np.asarray(jax.random.normal(samplers.split_rng(rng)[0], SHAPE))
  want, ts = _torch_dpm_loop(cfg, x_T, cond, uncond, 7.0, num_steps)
  np.testing.assert_array_equal(np.asarray(steps.model_t), ts)
  err = np.abs(np.asarray(got) - want).max()
  print(f"\n{num_steps}-step DPM-Solver++(2M) loop ({cfg.get('timestep_spacing', 'linspace')}, "
        f"lambda_min_clipped -5.1, thresholding) vs diffusers: max abs err {err:.2e}")
  # x0 = (x - sigma eps) / alpha with alpha = 0.006 at the first step: float32 differences
  # of the two models' outputs are amplified ~160x there (the steps alone agree to 4e-7).
  assert err < 1e-4
  assert float(jnp.std(got)) > 0.1


def test_dpmpp_2m_steps_match_diffusers():
  """Every update of a 7-step run, fed the same random model outputs, first and
  second order, thresholded, down to the zero-sigma final step."""
  from diffusers import DPMSolverMultistepScheduler
  cfg = dict(IF_I, lambda_min_clipped=-5.1)
  ref = DPMSolverMultistepScheduler.from_config(DDPMScheduler.from_config(cfg).config)
  ref.set_timesteps(7)
  config = samplers.StepConfig.from_config(cfg)
  steps = samplers.dpm_solver_steps(diffusion.DiscreteSchedule.from_config(cfg), 7,
                                    lambda_min_clipped=config.lambda_min_clipped)
  rs = np.random.RandomState(9)
  x = (rs.randn(*SHAPE) * 2).astype(np.float32)
  theirs, ours, m_prev, worst = nchw(x), jnp.asarray(x), jnp.zeros(SHAPE), 0.0
  step = jax.jit(samplers.dpmpp_2m_step, static_argnums=0)
  for i, t in enumerate(ref.timesteps):
    out = rs.randn(*SHAPE[:3], 6).astype(np.float32)
    theirs = ref.step(nchw(out), t, theirs, return_dict=False)[0]
    ours, m_prev = step(config, jnp.asarray(out), ours, _row(steps, i), m_prev)
    worst = max(worst, float(np.abs(np.asarray(ours) - nhwc(theirs)).max()))
  print(f"\nDPM-Solver++(2M) steps vs DPMSolverMultistepScheduler.step: max abs err {worst:.2e}")
  assert worst < 1e-5
