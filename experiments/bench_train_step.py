r"""One DreamBooth train step: our jitted, sharded step vs the same step in PyTorch/diffusers.

  python experiments/bench_train_step.py                          # tiny IF-I base, 32 px, 1+1 images
  python experiments/bench_train_step.py --batch=4 --prior_batch=4 --reps=10
  python experiments/bench_train_step.py --stage=sr256            # tiny IF-II, 64 px from 32 px
  python experiments/bench_train_step.py --profile                # where our step's time goes
  python experiments/bench_train_step.py --unet=if-i-m --compile_only   # full-size: build + compile
  python experiments/bench_train_step.py --quick                  # tiny, one repetition (the test)

One step, on both sides: the instance batch and the class-prior batch go
through the UNet as one batch; t ~ U{0..999}, x_t = alpha_t x + sigma_t eps on
IF's squaredcos schedule; the loss is the epsilon MSE on the first 3 of the
6 output channels (IF stage I/II predict epsilon plus the learned variance),
instance mean + prior_weight * prior mean; global-norm clipping, then AdamW
with the config's hyperparameters. SR stages see the image downsampled
(bicubic, antialiased), clipped, upsampled (bilinear, align_corners) and
noised at the training augmentation level 1e-5, which is also their
class_labels (x1000).

Ours is built exactly as `dreambooth_jax.train.run` builds it: `pipeline.build`
on the tiny config, the trainer's abstract state and shardings, the jitted
`methods.make_train_step` with in/out shardings and a donated state, on a mesh
over the local devices (all on `fsdp`, the trainer's default). Theirs is
diffusers' `UNet2DConditionModel` loaded from our weights (exported with
`weights.save_unet_diffusers`), `torch.optim.AdamW` and
`clip_grad_norm_`, eager, as diffusers' DreamBooth script runs it; float32;
torch threads = usable cores. Before timing, both losses and gradient norms
are compared on the same t and noise (the `parity` line).

Repetitions alternate (ours, theirs, ours, ...) after warm-up, so both sides
see the same background load; the table reports medians.

`--unet=if-i-m` builds an IF-I-M-*like* base UNet from
../shared/reference_configs/if_i_m_unet.json. That file is incomplete: every
size of IF-I-M is unknown (null). The known fields are kept and the null ones
are taken from IF-I-XL's config (same block types, 3 resnets per level,
64-dim heads, 64 pooling heads) with block widths [w, 2w, 3w, 4w] and
cross_attention_dim 4w for `--channels=w` (default 256, ~620M params): a
stand-in of the right architecture, not IF-I-M's real size. On CPU use
`--compile_only` (abstract params, nothing allocated); on a GPU it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import imagen_dog  # noqa: E402
from dreambooth_jax import cascade as cascade_lib  # noqa: E402
from dreambooth_jax import diffusion, methods, pipeline, sharding  # noqa: E402
from dreambooth_jax import state as state_lib  # noqa: E402
from dreambooth_jax.models import unet as unet_lib  # noqa: E402
import op_breakdown  # noqa: E402  (experiments/, beside this script)

TEXT_LEN = 77      # IF's T5 max length
PROMPT_TOKENS = 6  # "a sks dog" + </s>: the rest of the 77 is padding (T5's mask only)


def reference_configs_dir() -> pathlib.Path:
  value = os.environ.get("DREAMBOOTH_REFERENCE_CONFIGS")
  return pathlib.Path(value) if value else ROOT.parent / "shared" / "reference_configs"


def if_i_m_like_config(width: int, resolution: int) -> dict:
  """IF-I-M's known config fields; its unknown (null) sizes from IF-I-XL's, at width `width`."""
  folder = reference_configs_dir()
  with open(folder / "if_i_m_unet.json") as f:
    m = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
  with open(folder / "if_i_xl_unet.json") as f:
    xl = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
  d = {k: (xl.get(k) if v is None else v) for k, v in m.items()}
  d.update({k: v for k, v in xl.items() if k not in d})
  d.update(block_out_channels=[width * i for i in (1, 2, 3, 4)], cross_attention_dim=4 * width,
           sample_size=resolution)
  return d


# ----------------------------------------------------------------------------
# Ours: the trainer's state, shardings and jitted step
# ----------------------------------------------------------------------------

def make_config(args):
  config = imagen_dog.get_config(f"tiny,stages={args.stage}")
  config.model.dtype = args.dtype
  config.model.remat = args.remat
  config.train.batch_size, config.train.prior_batch_size = args.batch, args.prior_batch
  config.log.tensorboard = False
  if args.stage == "base":
    config.tiny.unet_channels = args.channels
    config.cascade.base.resolution = args.resolution
  else:
    config.tiny.sr_channels = args.channels
    config.cascade.sr256.resolution = args.resolution
    config.cascade.base.resolution = args.lowres
  return config


def build_stages(args, config):
  """({stage name: Stage} tuned, text width, the tuned stage's UNetConfig): the trainer's
  own stages (`pipeline.build`) for the tiny cascade; for --unet=if-i-m one IF-I-M-like
  stage (`pipeline.stage`)."""
  if args.unet == "tiny":
    models = pipeline.build(config)
    return ({n: models.cascade.by_name[n] for n in models.tuned}, models.t5_width,
            pipeline.tiny_unet_config(args.stage, config))
  cfg = unet_lib.UNetConfig.from_diffusers(if_i_m_like_config(args.channels, args.resolution),
                                           source="IF-I-M-like")
  kw = dict(dtype=jnp.dtype(args.dtype), param_dtype=jnp.float32, remat=args.remat)
  load = None if args.compile_only else (lambda: nnx.state(unet_lib.init_unet(cfg, **kw)))
  stage = pipeline.stage(config, "base", cfg, scheduler=cascade_lib.IF_STAGE_I_SCHEDULER,
                         load_params=load)
  return {"base": stage}, cfg.encoder_hid_dim, cfg


def make_host_batch(args, stage, text_dim: int, seed: int = 0) -> dict:
  """Numpy inputs shared by both sides: images in [-1, 1], one prompt's text per half."""
  rs = np.random.RandomState(seed)
  r, c = args.resolution, stage.channels
  image = lambda n: rs.uniform(-1, 1, (n, r, r, c)).astype(np.float32)
  mask = np.zeros((1, TEXT_LEN), np.int32)
  mask[:, :PROMPT_TOKENS] = 1
  text = lambda: {"text": (rs.randn(1, TEXT_LEN, text_dim) * 0.2).astype(np.float32), "mask": mask}
  return {"instance": image(args.batch), "prior": image(args.prior_batch),
          "text": {"instance": text(), "class": text()}}


def build_ours(args, config, stages, width, host):
  """(compiled step, state, device batch, compile seconds) as `train.run` sets them up."""
  devices = jax.devices()[:args.devices] if args.devices else jax.devices()
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices=devices)
  rules = pipeline.rules_of(config)
  ps = state_lib.setup(config, stages, methods.phases(config)[0], mesh, rules, num_tokens=0,
                       token_width=width)
  tx, abstract, shardings = ps.tx, ps.abstract, ps.shardings
  name = args.stage

  # The trainer's batch layout (`state.batch_layout`): a leading micro-batch axis
  # (grad_accum = 1); the batch axis split over the data axes when both halves divide.
  _, batch_sh = state_lib.batch_layout(mesh, {name: args.resolution}, batch_size=args.batch,
                                       prior_batch_size=args.prior_batch, text_width=width)
  batch = {name: {"instance": host["instance"][None], "prior": host["prior"][None]},
           "text": jax.tree.map(lambda x: x[None], host["text"])}
  step_fn = jax.jit(methods.make_train_step(stages, tx, config.prior.weight),
                    in_shardings=(shardings, None), out_shardings=(shardings, None),
                    donate_argnums=(0,))

  t0 = time.perf_counter()
  if args.compile_only:
    abstract_batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  batch, batch_sh)
    with jax.set_mesh(mesh):  # as the trainer traces it
      lowered = step_fn.lower(state_lib.with_shardings(abstract, shardings), abstract_batch)
    t_lower = time.perf_counter() - t0
    compiled = lowered.compile()
    return dict(compiled=compiled, lower_s=t_lower, compile_s=time.perf_counter() - t0,
                mesh=mesh, stages=stages)

  params = {n: jax.device_put(s.params, shardings["params"][n]) for n, s in stages.items()}
  state = dict(params=params,
               opt_state=jax.jit(tx.init, out_shardings=shardings["opt_state"])(params),
               step=jax.jit(lambda: jnp.int32(0), out_shardings=shardings["step"])(),
               rng=jax.jit(lambda: jax.random.key(config.seed), out_shardings=shardings["rng"])())
  batch = jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, x), batch, batch_sh)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):  # as the trainer traces it
    compiled = step_fn.lower(state, batch).compile()
  return dict(compiled=compiled, compile_s=time.perf_counter() - t0, state=state, batch=batch,
              mesh=mesh, stages=stages)


# ----------------------------------------------------------------------------
# Theirs: diffusers UNet2DConditionModel + torch AdamW, the same step
# ----------------------------------------------------------------------------

def torch_reference(args, config, stage, unet_cfg, params, host, device):
  """`step()` -> loss, and `loss_at(t, noise, aug_noise)` -> (loss, grad norm) for parity."""
  import torch
  import torch.nn.functional as F
  from diffusers import UNet2DConditionModel
  from dreambooth_jax.weights import save_unet_diffusers

  with tempfile.TemporaryDirectory(prefix="bench_train_step_") as folder:
    if args.unet == "tiny":  # identical weights: export ours, load with diffusers
      save_unet_diffusers(nnx.merge(stage.graphdef, params), folder)
      unet = UNet2DConditionModel.from_pretrained(folder)
    else:  # full size: timing only, diffusers' own init (saves writing GBs)
      unet = UNet2DConditionModel.from_config(unet_cfg.to_diffusers())
  unet = unet.to(device).train()
  t = config.train
  opt = torch.optim.AdamW(unet.parameters(), lr=t.lr, betas=(t.b1, t.b2), eps=t.eps,
                          weight_decay=t.weight_decay)
  autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16)
              if args.dtype == "bfloat16" else None)

  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2))).to(device)
  x0 = torch.cat([nchw(host["instance"]), nchw(host["prior"])])
  n_inst, b, c = host["instance"].shape[0], x0.shape[0], stage.channels
  expand = lambda e, n: {k: torch.from_numpy(np.repeat(v, n, axis=0)).to(device) for k, v in e.items()}
  inst, cls = expand(host["text"]["instance"], n_inst), expand(host["text"]["class"], b - n_inst)
  text = torch.cat([inst["text"], cls["text"]])
  mask = torch.cat([inst["mask"], cls["mask"]])
  sched = stage.schedule
  alpha, sigma = (torch.from_numpy(np.array(a, np.float32)).to(device)
                  for a in sched.alpha_sigma(jnp.arange(sched.num_train_timesteps)))
  lowres_up = None
  if stage.is_sr:  # the low-res view is fixed per image; its noise is drawn per step
    r = x0.shape[-1]
    low = F.interpolate(x0, size=(stage.lowres_resolution,) * 2, mode="bicubic", antialias=True,
                        align_corners=False).clamp(-1, 1)
    lowres_up = F.interpolate(low, size=(r, r), mode="bilinear", align_corners=True)
    level = stage.settings.train_aug_level
    a_aug, s_aug = (float(v) for v in stage.noising_schedule.alpha_sigma(
        stage.noising_schedule.time_from_fraction(jnp.float32(level))))
    class_labels = torch.full((b,), level * 1000.0, device=device)
  prior_weight = config.prior.weight

  def loss_fn(t_idx, noise, aug_noise):
    x_t = alpha[t_idx][:, None, None, None] * x0 + sigma[t_idx][:, None, None, None] * noise
    kw = {}
    if stage.is_sr:
      x_t = torch.cat([x_t, a_aug * lowres_up + s_aug * aug_noise], dim=1)
      kw["class_labels"] = class_labels
    # No encoder_attention_mask: IF's UNets attend to every text position (as IFPipeline).
    out = unet(x_t, t_idx, encoder_hidden_states=text, return_dict=False, **kw)[0]
    per = torch.mean(torch.square(out[:, :c].float() - noise), dim=(1, 2, 3))
    return per[:n_inst].mean() + prior_weight * per[n_inst:].mean()

  def step():
    opt.zero_grad(set_to_none=True)
    t_idx = torch.randint(0, sched.num_train_timesteps, (b,), device=device)
    noise = torch.randn_like(x0)
    aug_noise = torch.randn_like(x0) if stage.is_sr else None
    if autocast is not None:
      with autocast:
        loss = loss_fn(t_idx, noise, aug_noise)
    else:
      loss = loss_fn(t_idx, noise, aug_noise)
    loss.backward()
    if t.grad_clip:
      torch.nn.utils.clip_grad_norm_(unet.parameters(), t.grad_clip)
    opt.step()
    return loss.item()  # syncs, like our block_until_ready

  def loss_at(t_idx, noise, aug_noise):
    unet.zero_grad(set_to_none=True)
    loss = loss_fn(torch.from_numpy(t_idx).to(device), nchw(noise),
                   None if aug_noise is None else nchw(aug_noise))
    loss.backward()
    g = torch.sqrt(sum(torch.sum(torch.square(p.grad.double())) for p in unet.parameters()
                       if p.grad is not None))
    unet.zero_grad(set_to_none=True)
    return float(loss.detach()), float(g)

  return types.SimpleNamespace(step=step, loss_at=loss_at, unet=unet, x0=x0, text=text, mask=mask,
                               n=b)


def our_loss_at(config, stage, params, host, t_idx, noise, aug_noise):
  """Our (loss, grad norm) at given t and noise: the math of Stage.loss / dreambooth_loss."""
  x0 = jnp.concatenate([host["instance"], host["prior"]])
  n = host["instance"].shape[0]
  rep = lambda e, k: jax.tree.map(lambda v: jnp.repeat(v, k, axis=0), e)
  inst, cls = rep(host["text"]["instance"], n), rep(host["text"]["class"], x0.shape[0] - n)
  cond = {"text": jnp.concatenate([inst["text"], cls["text"]]),
          "mask": jnp.concatenate([inst["mask"], cls["mask"]])}
  if stage.is_sr:
    cond["lowres"], cond["aug"] = diffusion.lowres_condition(
        x0, stage.lowres_resolution, stage.settings.train_aug_level, None, stage.noising_schedule,
        noise=jnp.asarray(aug_noise))

  def loss(p):
    per, _ = diffusion.loss(lambda x, t, c: stage.apply(p, x, t, c), stage.schedule, x0,
                            jax.random.key(0), cond, prediction_type=stage.prediction_type,
                            learned_variance=stage.learned_variance, t=jnp.asarray(t_idx),
                            noise=jnp.asarray(noise))
    return per[:n].mean() + config.prior.weight * per[n:].mean()

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return float(value), float(methods.global_norm(grads))


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------

def interleaved(fns: dict, reps: int) -> dict:
  """Seconds per call of each fn, alternating between them so both see the same load."""
  times = {k: [] for k in fns}
  for _ in range(reps):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t0)
  return times


def profile_ours(args, config, stage, params, host, theirs, reps):
  """Median ms of forward, forward+backward and the full step, ours and theirs, same batch."""
  import torch
  x0 = jnp.concatenate([host["instance"], host["prior"]])
  b = x0.shape[0]
  cond = {"text": jnp.asarray(theirs.text.cpu().numpy()), "mask": jnp.asarray(theirs.mask.cpu().numpy())}
  if stage.is_sr:
    cond["lowres"], cond["aug"] = x0, jnp.full((b,), 0.01, jnp.float32)
  t_idx = jnp.asarray(np.arange(b) * 997 % 1000, jnp.int32)
  fwd = jax.jit(lambda p: stage.apply(p, x0, t_idx, cond))
  fwd_bwd = jax.jit(jax.grad(lambda p: jnp.mean(jnp.square(stage.apply(p, x0, t_idx, cond)))))
  jax.block_until_ready((fwd(params), fwd_bwd(params)))

  xt = theirs.x0 if not stage.is_sr else torch.cat([theirs.x0, theirs.x0], dim=1)
  tt = torch.from_numpy(np.asarray(t_idx)).to(xt.device)
  kw = {"class_labels": torch.full((b,), 0.01, device=xt.device)} if stage.is_sr else {}
  run = lambda: theirs.unet(xt, tt, encoder_hidden_states=theirs.text, return_dict=False, **kw)[0]

  def t_fwd():
    with torch.no_grad():
      run().sum().item()

  def t_fwd_bwd():
    theirs.unet.zero_grad(set_to_none=True)
    out = run()
    torch.mean(torch.square(out)).backward()
    next(theirs.unet.parameters()).grad.sum().item()

  t_fwd(), t_fwd_bwd()
  times = interleaved({"ours forward": lambda: fwd(params).block_until_ready(),
                       "theirs forward": t_fwd,
                       "ours forward+backward": lambda: jax.block_until_ready(fwd_bwd(params)),
                       "theirs forward+backward": t_fwd_bwd}, reps)
  return {k: 1e3 * statistics.median(v) for k, v in times.items()}


# ----------------------------------------------------------------------------

def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--stage", choices=("base", "sr256"), default="base")
  p.add_argument("--unet", choices=("tiny", "if-i-m"), default="tiny",
                 help="tiny: the tiny config's IF UNet; if-i-m: IF-I-M-like stand-in (see above)")
  p.add_argument("--resolution", type=int, default=None,
                 help="default: 32 tiny base, 64 tiny sr256, 64 if-i-m")
  p.add_argument("--lowres", type=int, default=None, help="sr256 input size (default resolution/2)")
  p.add_argument("--batch", type=int, default=1, help="instance images per step")
  p.add_argument("--prior_batch", type=int, default=1, help="class-prior images per step")
  p.add_argument("--channels", type=int, default=None,
                 help="UNet width (default 32 tiny base, 16 tiny sr256, 256 if-i-m)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
  p.add_argument("--remat", action="store_true", help="rematerialise UNet blocks (ours only)")
  p.add_argument("--reps", type=int, default=7, help="timed repetitions per side")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--devices", type=int, default=0, help="mesh over the first N devices (0 = all)")
  p.add_argument("--compile_only", action="store_true",
                 help="ours: lower and compile on abstract params, then stop (full-size on CPU)")
  p.add_argument("--no_torch", action="store_true", help="skip the PyTorch side")
  p.add_argument("--profile", action="store_true",
                 help="also time forward and forward+backward alone, both sides")
  p.add_argument("--quick", action="store_true", help="tiny model, one repetition (for tests)")
  args = p.parse_args(argv)
  if args.unet == "if-i-m" and args.stage != "base":
    p.error("--unet=if-i-m is a base (stage I) UNet: use --stage=base")
  if args.quick:
    args.unet, args.reps, args.warmup, args.profile = "tiny", 1, 1, False
    args.channels = args.channels or 16
    args.resolution = args.resolution or (16 if args.stage == "base" else 32)
  big = args.unet == "if-i-m"
  args.channels = args.channels or (256 if big else 32 if args.stage == "base" else 16)
  args.resolution = args.resolution or (32 if args.stage == "base" and not big else 64)
  args.lowres = args.lowres or args.resolution // 2
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  config = make_config(args)
  t0 = time.perf_counter()
  stages, width, unet_cfg = build_stages(args, config)
  stage = stages[args.stage]
  build_s = time.perf_counter() - t0
  host = make_host_batch(args, stage, unet_cfg.encoder_hid_dim or unet_cfg.cross_attention_dim)
  ours = build_ours(args, config, stages, width, host)
  n_params = unet_lib.param_count(stage.abstract_params)
  desc = (f"stage={args.stage} unet={args.unet} ({n_params / 1e6:.2f}M params, channels "
          f"{args.channels}) {args.resolution}px"
          + (f" from {args.lowres}px" if args.stage == "sr256" else "")
          + f" batch={args.batch}+{args.prior_batch} dtype={args.dtype}")
  platform = jax.devices()[0].platform
  if args.compile_only:
    print(f"\n{desc} | jax {jax.__version__} on {platform}, mesh {dict(ours['mesh'].shape)}")
    print(f"build {build_s:.1f} s, lower {ours['lower_s']:.1f} s, lower+compile "
          f"{ours['compile_s']:.1f} s (abstract params; nothing run)")
    return dict(compile_s=ours["compile_s"], params=n_params)

  import torch
  cores = len(os.sched_getaffinity(0))
  torch.set_num_threads(cores)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  state, batch, compiled = ours["state"], ours["batch"], ours["compiled"]
  params0 = jax.device_get(state["params"][args.stage])

  theirs, parity = None, None
  if not args.no_torch:
    theirs = torch_reference(args, config, stage, unet_cfg, params0, host, device)
    if args.unet == "tiny":  # the same loss and gradients on the same draw
      rs = np.random.RandomState(1)
      shape = (theirs.n, args.resolution, args.resolution, stage.channels)
      t_idx = rs.randint(0, 1000, theirs.n).astype(np.int32)
      noise = rs.randn(*shape).astype(np.float32)
      aug_noise = rs.randn(*shape).astype(np.float32) if stage.is_sr else None
      ours_lg = our_loss_at(config, stage, params0, host, t_idx, noise, aug_noise)
      theirs_lg = theirs.loss_at(t_idx.astype(np.int64), noise, aug_noise)
      parity = dict(ours=ours_lg, theirs=theirs_lg)
      print(f"parity (same t and noise): loss ours {ours_lg[0]:.6f} theirs {theirs_lg[0]:.6f}, "
            f"|grad| ours {ours_lg[1]:.6f} theirs {theirs_lg[1]:.6f}")

  def run_ours():
    nonlocal state
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    return float(metrics["loss"])

  fns = {"ours": run_ours}
  if theirs is not None:
    fns["theirs"] = theirs.step
  losses = {k: [fn() for _ in range(args.warmup)] for k, fn in fns.items()}
  times = interleaved(fns, args.reps)
  med = {k: statistics.median(v) for k, v in times.items()}

  print(f"\n{desc} | jax {jax.__version__} on {platform}, mesh {dict(ours['mesh'].shape)}; "
        f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads; "
        f"{cores} cores, load avg {os.getloadavg()[0]:.2f}; {args.reps} reps")
  print(f"{'step':<44} {'median ms':>10} {'min ms':>9} {'compile s':>10}")
  print(f"{'ours: jax.jit sharded train_step':<44} {1e3 * med['ours']:>10.1f} "
        f"{1e3 * min(times['ours']):>9.1f} {ours['compile_s']:>10.2f}")
  result = dict(ours_ms=1e3 * med["ours"], compile_s=ours["compile_s"], params=n_params,
                losses=losses, parity=parity)
  if theirs is not None:
    print(f"{'theirs: torch eager diffusers + AdamW':<44} {1e3 * med['theirs']:>10.1f} "
          f"{1e3 * min(times['theirs']):>9.1f} {'-':>10}")
    ratio = med["theirs"] / med["ours"]
    print(f"ratio theirs/ours: {ratio:.2f}x ({'we are faster' if ratio > 1 else 'we are slower'})")
    result.update(theirs_ms=1e3 * med["theirs"], ratio=ratio)
  if args.profile and theirs is not None:
    prof = profile_ours(args, config, stage, params0, host, theirs, args.reps)
    print(f"{'part (same batch, fixed t)':<44} {'median ms':>10}")
    for k, v in prof.items():
      print(f"{k:<44} {v:>10.1f}")
    result["profile"] = prof
    ours_ops = op_breakdown.trace_ours(run_ours, compiled.as_text(), args.reps)
    theirs_ops = op_breakdown.trace_theirs(theirs.step, args.reps)
    op_breakdown.print_breakdown(ours_ops, theirs_ops, result["ours_ms"], result.get("theirs_ms"))
    result.update(ours_ops=ours_ops, theirs_ops=theirs_ops)
  return result


if __name__ == "__main__":
  main()
