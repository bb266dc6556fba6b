"""Images/s of our jitted, scanned sampler vs a Python loop of diffusers components.

Both sides run the same model with identical weights, the IF stage-I
scheduler (learned-range variance, dynamic thresholding), classifier-free
guidance in one batched call, the same steps and batch, on this machine's
CPU. The diffusers side is IFPipeline's denoising loop without the pipeline
around it: `DDPMScheduler.step` plus the PyTorch model, under no_grad.

  python experiments/bench_sampler.py                          # tiny conv stand-in
  python experiments/bench_sampler.py --model=pointwise        # sampler overhead only
  python experiments/bench_sampler.py --model=if-unet          # tiny IF UNet pair
  python experiments/bench_sampler.py --batch=8 --size=64 --steps=50

`--model=if-unet` builds diffusers' UNet2DConditionModel from the tiny IF
stage-I test config with random weights and loads the same weights into
`dreambooth_jax.models.unet` through `dreambooth_jax.weights.load_unet`.
Each run also checks the two samplers agree when fed the same noise.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from jax.tree_util import Partial

import diffusers.schedulers.scheduling_ddpm as ddpm_module
from diffusers import DDPMScheduler

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dreambooth_jax import cascade, diffusion, samplers  # noqa: E402


# ----------------------------------------------------------------------------
# Models: (jax model_fn, cond, uncond, torch forward, torch cond) per --model
# ----------------------------------------------------------------------------

def tiny_conv(batch: int, width: int = 32, emb_dim: int = 16):
  """conv3x3(3->w) + time/text bias, SiLU, conv3x3(w->w), SiLU, conv3x3(w->6)."""
  rs = np.random.RandomState(0)
  w = lambda *s: (rs.randn(*s) / np.sqrt(np.prod(s[:-1]))).astype(np.float32)
  k1, k2, k3 = w(3, 3, 3, width), w(3, 3, width, width), w(3, 3, width, 6)
  w_t, w_c = w(1, width), w(emb_dim, width)
  text = rs.randn(batch, emb_dim).astype(np.float32)

  def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def jax_model(x, t, cond):
    bias = (jnp.asarray(t, jnp.float32)[:, None] / 1000.0) @ w_t + cond["text"] @ w_c
    h = jax.nn.silu(conv(x, k1) + bias[:, None, None, :])
    return conv(jax.nn.silu(conv(h, k2)), k3)

  tk = [torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1))) for k in (k1, k2, k3)]
  tw_t, tw_c = torch.from_numpy(w_t), torch.from_numpy(w_c)

  def torch_model(x, t, text_emb):
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1).expand(x.shape[0], 1)
    bias = (t / 1000.0) @ tw_t + text_emb @ tw_c
    h = F.silu(F.conv2d(x, tk[0], padding=1) + bias[:, :, None, None])
    return F.conv2d(F.silu(F.conv2d(h, tk[1], padding=1)), tk[2], padding=1)

  return jax_model, {"text": text}, {"text": np.zeros_like(text)}, torch_model


def pointwise(batch: int, emb_dim: int = 16):
  """A near-free 1x1 linear model: isolates the cost of the sampler itself."""
  rs = np.random.RandomState(0)
  w, w_c = (rs.randn(3, 6) * 0.3).astype(np.float32), (rs.randn(emb_dim, 6) * 0.1).astype(np.float32)
  text = rs.randn(batch, emb_dim).astype(np.float32)

  def jax_model(x, t, cond):
    return x @ w + (cond["text"] @ w_c)[:, None, None, :]

  tw, tw_c = torch.from_numpy(w), torch.from_numpy(w_c)

  def torch_model(x, t, text_emb):
    return (x.permute(0, 2, 3, 1) @ tw + (text_emb @ tw_c)[:, None, None, :]).permute(0, 3, 1, 2)

  return jax_model, {"text": text}, {"text": np.zeros_like(text)}, torch_model


def if_unet(batch: int):
  """The tiny IF stage-I UNet pair (diffusers reference, our nnx port), same weights."""
  from diffusers import UNet2DConditionModel
  from flax import nnx
  from dreambooth_jax import weights
  sys.path.insert(0, str(ROOT / "tests"))
  from unet_configs import TEXT_DIM, TEXT_LEN, TINY_IF_I

  torch.manual_seed(0)
  ref = UNet2DConditionModel(**TINY_IF_I).eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.copy_(torch.randn_like(p) * 0.05)
  with tempfile.TemporaryDirectory(prefix="bench_if_unet_") as folder:
    ref.save_pretrained(folder)
    graphdef, state = nnx.split(weights.load_unet(folder))

  def apply(params, x, t, cond):
    return nnx.merge(graphdef, params)(x, t, cond["text"])

  text = np.random.RandomState(0).randn(batch, TEXT_LEN, TEXT_DIM).astype(np.float32)

  def torch_model(x, t, text_emb):
    return ref(x, t, encoder_hidden_states=text_emb).sample

  return Partial(apply, state), {"text": text}, {"text": np.zeros_like(text)}, torch_model


MODELS = {"tiny-conv": tiny_conv, "pointwise": pointwise, "if-unet": if_unet}


# ----------------------------------------------------------------------------
# The two samplers
# ----------------------------------------------------------------------------

def diffusers_loop(cfg, torch_model, x_T, cond, uncond, scale, num_steps, noises=None):
  """IFPipeline's denoising loop around DDPMScheduler.step (NCHW torch tensors)."""
  sched = DDPMScheduler.from_config(cfg)
  sched.set_timesteps(num_steps)
  x = x_T
  emb = torch.cat([uncond, cond])
  c = x.shape[1]
  with torch.no_grad():
    for i, t in enumerate(sched.timesteps):
      out = torch_model(torch.cat([x] * 2), t, emb)
      out_u, out_c = out.chunk(2)
      eps_u, _ = out_u.split(c, dim=1)
      eps_c, var = out_c.split(c, dim=1)
      pred = torch.cat([eps_u + scale * (eps_c - eps_u), var], dim=1)
      if noises is not None:  # feed our noise instead of diffusers' own draw
        ddpm_module.randn_tensor = lambda *a, _n=noises[i], **k: _n
      x = sched.step(pred, t, x, return_dict=False)[0]
  return x.clamp(-1, 1)


def interleaved(fns, repeats: int):
  """Fastest of `repeats` runs of each fn, alternating between them.

  The CPU may be shared: alternating exposes both sides to the same
  background load, and the minimum is the least disturbed run.
  """
  times = [[] for _ in fns]
  for _ in range(repeats):
    for ts, fn in zip(times, fns):
      t0 = time.perf_counter()
      fn()
      ts.append(time.perf_counter() - t0)
  return [min(ts) for ts in times]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", choices=sorted(MODELS), default="tiny-conv")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--size", type=int, default=None, help="default: 64 tiny-conv, 32 if-unet")
  p.add_argument("--steps", type=int, default=25)
  p.add_argument("--guidance", type=float, default=7.0)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args(argv)
  args.size = args.size or (32 if args.model == "if-unet" else 64)

  cfg = dict(cascade.IF_STAGE_I_SCHEDULER)
  schedule = diffusion.DiscreteSchedule.from_config(cfg)
  step_cfg = samplers.StepConfig.from_config(cfg)
  model_fn, cond, uncond, torch_model = MODELS[args.model](args.batch)
  shape = (args.batch, args.size, args.size, 3)
  cond_j, uncond_j = (jax.tree.map(jnp.asarray, c) for c in (cond, uncond))
  cond_t, uncond_t = torch.from_numpy(cond["text"]), torch.from_numpy(uncond["text"])

  run_jax = lambda key: samplers.sample(
      model_fn, schedule, shape, key, cond_j, uncond_j, num_steps=args.steps,
      guidance_scale=args.guidance, config=step_cfg).block_until_ready()
  t0 = time.perf_counter()
  ours = run_jax(jax.random.key(0))
  first_jax = time.perf_counter() - t0

  # Parity on the timed workload: diffusers gets exactly our x_T and step noise.
  init_key, loop_key = samplers.split_rng(jax.random.key(0))
  to_t = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))
  x_T = to_t(jax.random.normal(init_key, shape))
  noises = [to_t(samplers.step_noise(loop_key, i, shape)) for i in range(args.steps)]
  original_randn = ddpm_module.randn_tensor
  try:
    t0 = time.perf_counter()
    theirs = diffusers_loop(cfg, torch_model, x_T, cond_t, uncond_t, args.guidance, args.steps,
                            noises)
    first_torch = time.perf_counter() - t0
  finally:
    ddpm_module.randn_tensor = original_randn
  max_diff = float(np.abs(np.asarray(ours).transpose(0, 3, 1, 2) - theirs.numpy()).max())

  gen = torch.Generator().manual_seed(0)
  keys = iter(range(1, 10 ** 6))
  run_torch = lambda: diffusers_loop(
      cfg, torch_model, torch.randn((args.batch, 3, args.size, args.size), generator=gen),
      cond_t, uncond_t, args.guidance, args.steps)
  jax_s, torch_s = interleaved([lambda: run_jax(jax.random.key(next(keys))), run_torch],
                               args.repeats)

  print(f"\nmodel={args.model} batch={args.batch} size={args.size} steps={args.steps} "
        f"guidance={args.guidance} | jax {jax.__version__} on {jax.devices()[0].platform} "
        f"({os.cpu_count()} cpus), torch {torch.__version__} threads={torch.get_num_threads()}, "
        f"load avg {os.getloadavg()[0]:.2f}")
  print(f"{'sampler':<44} {'first call s':>12} {'best s/batch':>12} {'images/s':>9}")
  rows = [("dreambooth_jax samplers.sample (jit + scan)", first_jax, jax_s),
          ("diffusers DDPMScheduler.step loop + torch", first_torch, torch_s)]
  for name, first, s in rows:
    print(f"{name:<44} {first:>12.3f} {s:>12.4f} {args.batch / s:>9.2f}")
  print(f"speed-up (jax images/s / diffusers images/s): {torch_s / jax_s:.2f}x")
  print(f"max |jax - diffusers| on the same noise: {max_diff:.2e}")


if __name__ == "__main__":
  main()
