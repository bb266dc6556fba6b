"""Cascade stages with real (tiny) IF UNets against the diffusers IF pipeline procedure."""

import copy
import dataclasses
import json

import diffusers.schedulers.scheduling_ddpm as ddpm_module
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from dreambooth_jax import cascade, diffusion, samplers, weights
from unet_configs import TEXT_DIM, TEXT_LEN, TINY_IF_I, TINY_IF_II

B, STEPS = 2, 25
SR_CFG = dict(TINY_IF_II, sample_size=32)


def _torch_unet(cfg, seed):
  torch.manual_seed(seed)
  model = UNet2DConditionModel(**cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.1)
  return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """Tiny IF stage I (16 px) and stage II (16 -> 32 px) as torch models and our stages."""
  root = tmp_path_factory.mktemp("tiny_if")
  t1, t2 = _torch_unet(TINY_IF_I, 1), _torch_unet(SR_CFG, 2)
  t1.save_pretrained(root / "I")
  t2.save_pretrained(root / "II")
  base = cascade.Stage("base", weights.load_unet(str(root / "I")),
                       cascade.StageSettings(resolution=16, guidance_scale=7.0, num_steps=STEPS),
                       scheduler_config=cascade.IF_STAGE_I_SCHEDULER)
  sr = cascade.Stage("sr", weights.load_unet(str(root / "II")),
                     cascade.StageSettings(resolution=32, guidance_scale=4.0, num_steps=STEPS),
                     scheduler_config=cascade.IF_STAGE_II_SCHEDULER, lowres_resolution=16)
  rs = np.random.RandomState(0)
  text = rs.randn(B, TEXT_LEN, TEXT_DIM).astype(np.float32)
  mask = np.ones((B, TEXT_LEN), np.int32)
  mask[0, 4:] = 0
  return dict(t1=t1, t2=t2, base=base, sr=sr,
              cond={"text": text, "mask": mask},
              uncond={"text": np.zeros_like(text), "mask": np.ones_like(mask)})


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _torch_if_loop(model, scheduler_cfg, x_T, noises, cond, uncond, scale, class_labels=None,
                   lowres=None, monkeypatch=None):
  """IFPipeline / IFSuperResolutionPipeline's denoising loop, with our noise fed in."""
  sched = DDPMScheduler.from_config(scheduler_cfg)
  sched.set_timesteps(STEPS)
  current = {}
  monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *a, **k: current["noise"])
  x = _nchw(x_T)
  text = torch.cat([torch.from_numpy(uncond["text"]), torch.from_numpy(cond["text"])])
  c = x.shape[1]
  for i, t in enumerate(sched.timesteps):
    inp = torch.cat([x, _nchw(lowres)], dim=1) if lowres is not None else x
    with torch.no_grad():
      # No encoder_attention_mask, as IFPipeline: the stage ignores the (padded) text mask.
      out = model(torch.cat([inp] * 2), t, encoder_hidden_states=text,
                  class_labels=None if class_labels is None else
                  torch.from_numpy(np.concatenate([class_labels] * 2))).sample
    out_u, out_c = out.chunk(2)
    eps_u, _ = out_u.split(c, dim=1)
    eps_c, var = out_c.split(c, dim=1)
    pred = torch.cat([eps_u + scale * (eps_c - eps_u), var], dim=1)
    current["noise"] = _nchw(noises[i])
    x = sched.step(pred, t, x, return_dict=False)[0]
  return x.clamp(-1, 1).numpy().transpose(0, 2, 3, 1)


def _our_noise(rng, shape):
  """The x_T and per-step noises that Stage.sample draws from `rng`."""
  _, rng_sample = jax.random.split(rng)
  init_key, loop_key = samplers.split_rng(rng_sample)
  x_T = np.asarray(jax.random.normal(init_key, shape))
  return x_T, [np.asarray(samplers.step_noise(loop_key, i, shape)) for i in range(STEPS)]


def test_base_stage_25_step_loop_matches_diffusers(tiny, monkeypatch):
  rng = jax.random.key(7)
  got = tiny["base"].sample(tiny["base"].params, tiny["cond"], tiny["uncond"], rng)
  x_T, noises = _our_noise(rng, (B, 16, 16, 3))
  want = _torch_if_loop(tiny["t1"], cascade.IF_STAGE_I_SCHEDULER, x_T, noises, tiny["cond"],
                        tiny["uncond"], 7.0, monkeypatch=monkeypatch)
  err = np.abs(np.asarray(got) - want).max()
  print(f"\ntiny IF-I UNet, 25-step guided ancestral loop vs diffusers: max abs error {err:.2e}")
  assert err < 1e-4 and np.std(want) > 0.1


def test_sr_stage_loop_matches_diffusers(tiny, monkeypatch):
  sr = tiny["sr"]
  low = np.random.RandomState(1).uniform(-1, 1, (B, 16, 16, 3)).astype(np.float32)
  rng = jax.random.key(3)
  rng_low, _ = jax.random.split(rng)
  # The conditioning image: IF upsamples bilinearly (align_corners) and noises it
  # with image_noising_scheduler.add_noise at noise_level 250.
  noised, labels = sr.lowres_input(jnp.asarray(low), rng_low)
  up = torch.nn.functional.interpolate(_nchw(low), size=(32, 32), mode="bilinear", align_corners=True)
  ref_noised = DDPMScheduler.from_config(cascade.IF_IMAGE_NOISING_SCHEDULER).add_noise(
      up, _nchw(jax.random.normal(rng_low, (B, 32, 32, 3))), torch.tensor([250] * B))
  np.testing.assert_allclose(np.asarray(noised), ref_noised.numpy().transpose(0, 2, 3, 1), atol=2e-6)
  np.testing.assert_array_equal(np.asarray(labels), [250.0] * B)

  got = sr.sample(sr.params, tiny["cond"], tiny["uncond"], rng, lowres=jnp.asarray(low))
  x_T, noises = _our_noise(rng, (B, 32, 32, 3))
  want = _torch_if_loop(tiny["t2"], cascade.IF_STAGE_II_SCHEDULER, x_T, noises, tiny["cond"],
                        tiny["uncond"], 4.0, class_labels=np.asarray(labels),
                        lowres=np.asarray(noised), monkeypatch=monkeypatch)
  err = np.abs(np.asarray(got) - want).max()
  print(f"\ntiny IF-II UNet, 25-step guided SR loop vs diffusers: max abs error {err:.2e}")
  assert err < 1e-4


def test_cascade_sample_every_stage_deterministic(tiny):
  casc = cascade.Cascade([tiny["base"], tiny["sr"]])
  kw = dict(uncond_embeddings=tiny["uncond"], num_steps={"base": 3, "sr": 3})
  a = casc.sample(tiny["cond"], jax.random.key(0), **kw)
  b = casc.sample(tiny["cond"], jax.random.key(0), **kw)
  c = casc.sample(tiny["cond"], jax.random.key(1), **kw)
  assert a["base"].shape == (B, 16, 16, 3) and a["sr"].shape == (B, 32, 32, 3)
  assert a["base"].dtype == np.uint8
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
    assert np.any(a[k] != c[k])
  only_base = casc.sample(tiny["cond"], jax.random.key(0), upto="base", **kw)
  assert list(only_base) == ["base"]
  np.testing.assert_array_equal(only_base["base"], a["base"])


def test_colour_fix_keeps_the_lowres_input_and_the_detail():
  rs = np.random.RandomState(3)
  # A smooth low-res image, as a base stage's sample is next to pixel noise.
  lowres = diffusion.upsample_bilinear(
      jnp.asarray(rs.uniform(-0.8, 0.8, (2, 4, 4, 3)), jnp.float32), (16, 16))
  # An SR sample whose colours drifted (a constant cast, as the tiny world SR's) over detail.
  detail = jnp.asarray(rs.uniform(-0.1, 0.1, (2, 32, 32, 3)), jnp.float32)
  good = diffusion.upsample_bilinear(lowres, (32, 32)) + detail
  drifted = good + jnp.asarray([0.3, -0.2, 0.1])
  fixed = cascade.keep_lowres_colours(drifted, lowres)
  err = lambda x: float(jnp.abs(diffusion.downsample(x, 16) - lowres).mean())
  print(f"|down(x) - lowres|: drifted {err(drifted):.4f}, fixed {err(fixed):.4f}, "
        f"good {err(good):.4f}")
  assert err(drifted) > 0.15 and err(fixed) < err(good) + 0.01
  # The cast is gone and the detail kept: the fix moves a drifted sample back to the good one.
  assert float(jnp.abs(fixed - good).mean()) < 0.05  # measured 0.023
  assert float(jnp.abs(drifted - good).mean()) > 0.15  # 0.2: the cast


def test_colour_fix_is_a_stage_setting_and_an_override(tiny):
  sr = tiny["sr"]
  lowres = jnp.asarray(np.random.RandomState(4).uniform(-1, 1, (B, 16, 16, 3)), jnp.float32)
  kw = dict(lowres=lowres, num_steps=3)
  off = sr.sample(sr.params, tiny["cond"], None, jax.random.key(0), **kw)
  on = sr.sample(sr.params, tiny["cond"], None, jax.random.key(0), colour_fix=True, **kw)
  np.testing.assert_allclose(on, cascade.keep_lowres_colours(off, lowres), atol=1e-6)
  # The setting (configs/world.py turns it on for its SR stage) does what the override does.
  sr_on = copy.copy(sr)
  sr_on.settings = dataclasses.replace(sr.settings, colour_fix=True)
  np.testing.assert_allclose(sr_on.sample(sr.params, tiny["cond"], None, jax.random.key(0), **kw),
                             on, atol=1e-6)


def test_sr_loss_sees_lowres_and_aug_level(tiny):
  sr = tiny["sr"]
  hi = jnp.asarray(np.random.RandomState(2).uniform(-1, 1, (B, 32, 32, 3)), jnp.float32)
  text, mask = jnp.asarray(tiny["cond"]["text"]), jnp.asarray(tiny["cond"]["mask"])
  loss = jax.jit(lambda p, x, lvl: sr.loss(p, x, text, mask, jax.random.key(0), aug_level=lvl)[0])
  base = loss(sr.params, hi, 1e-5)
  # A different low-res view (same hi-res target is impossible to keep while changing
  # the low-res input through the public API, so change the hi-res image's low band).
  other = hi.at[:, :16].multiply(-1.0)
  assert float(jnp.abs(loss(sr.params, hi, 1e-3) - base).max()) > 0  # continuous level matters
  assert float(jnp.abs(loss(sr.params, other, 1e-5) - base).max()) > 0


def test_cascade_validates_stage_order(tiny):
  with pytest.raises(ValueError, match="base"):
    cascade.Cascade([tiny["sr"]])
  with pytest.raises(ValueError, match="super-resolution from 32"):
    cascade.Cascade([tiny["base"], tiny["sr"], tiny["sr"]])


@pytest.mark.parametrize("name,const", [
    ("if_scheduler_stage_i.json", cascade.IF_STAGE_I_SCHEDULER),
    ("if_scheduler_stage_ii.json", cascade.IF_STAGE_II_SCHEDULER),
    ("if_image_noising_scheduler.json", cascade.IF_IMAGE_NOISING_SCHEDULER)])
def test_embedded_if_scheduler_configs_match_reference(reference_configs_dir, name, const):
  ref = json.loads((reference_configs_dir / name).read_text())
  for key, value in const.items():
    assert ref[key] == value, key
  # The discrete tables built from either are identical.
  a = diffusion.DiscreteSchedule.from_config(const).alphas_cumprod
  b = diffusion.DiscreteSchedule.from_config(ref).alphas_cumprod
  np.testing.assert_array_equal(a, b)
