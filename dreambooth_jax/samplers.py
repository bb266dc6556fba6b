"""Ancestral (DDPM) and DDIM sampling, classifier-free guidance, dynamic thresholding.

The step functions reproduce diffusers' `DDPMScheduler.step` and
`DDIMScheduler.step` (tested to 1e-5 against them), but take the respaced
alpha_bar values from a `diffusion.Steps` row instead of looking timesteps up
in a stateful scheduler, so they work inside `lax.scan` and on either schedule.

`sample` runs the whole denoising loop as one `lax.scan` inside one jit: no
Python per step, no host round trips, and the batch can be sharded over a
mesh. Per-step noise is drawn from `fold_in(key, step)`, so a given rng gives
the same images whatever the sharding or batch layout.

The network is `model_fn(x_nhwc, model_time [B], cond) -> [B, H, W, C or 2C]`
where `cond` is any pytree whose leaves have the batch as leading axis. For a
large model pass a `jax.tree_util.Partial(apply, params)`: its bound arrays
are traced jit arguments, whereas a plain closure bakes them in as constants.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from dreambooth_jax import diffusion
from dreambooth_jax.diffusion import Schedule, Steps
from dreambooth_jax.sharding import batch_sharding

Array = jax.Array

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The sampler half of a diffusers scheduler config (the schedule is the other half)."""
  prediction_type: str = "epsilon"
  variance_type: str = "fixed_small"
  clip_sample: bool = True
  clip_sample_range: float = 1.0
  thresholding: bool = False
  dynamic_thresholding_ratio: float = 0.995
  sample_max_value: float = 1.0
  set_alpha_to_one: bool = True            # DDIM: alpha_bar past the last step
  use_clipped_model_output: bool = False   # DDIM: re-derive eps from the clipped x0
  lambda_min_clipped: float = -float("inf")  # DPM-Solver: skip times with log-SNR below it
  # Only a spacing the config names explicitly: diffusers' from_config does not carry
  # one scheduler's defaults to another, so DPM-Solver from IF's DDPM config uses its
  # own default, linspace (DDPM's is leading).
  timestep_spacing: str | None = None

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> "StepConfig":
    """Reads the matching keys of a diffusers scheduler config; others are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    cfg = cls(**{k: v for k, v in config.items() if k in names and v is not None})
    if cfg.variance_type not in VARIANCE_TYPES:
      # fixed_large_log: diffusers takes the sqrt of a log variance (NaN); not supported.
      raise NotImplementedError(f"variance_type {cfg.variance_type!r}")
    return cfg

  @property
  def learned_variance(self) -> bool:
    return self.variance_type in ("learned", "learned_range")


# ----------------------------------------------------------------------------
# Single steps
# ----------------------------------------------------------------------------

def quantile_nonneg(a: Array, q: float) -> Array:
  """torch.quantile(a, q, dim=1) (linear interpolation) for float32 a >= 0, shape [B, N].

  Sorting every image at every step dominated sampling time (XLA's CPU sort
  is ~20x slower than this at 64x64, and a 256x256 image has 196k values).
  The two order statistics are found instead by bisection on the float bit
  patterns, which sort like the values when a >= 0: 31 rounds of
  compare-and-count, exact, and cheap reductions on any backend.
  """
  n = a.shape[1]
  # torch turns q into a float32 tensor: rank and weight are float32 values.
  rank = np.float32(q) * np.float32(n - 1)
  j = int(np.floor(rank))
  w = np.float32(rank - np.float32(j))
  bits = jax.lax.bitcast_convert_type(a, jnp.int32)

  def halve(_, bounds):  # smallest b with #(bits <= b) >= j + 1 lies in [lo, hi]
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(bits <= mid[:, None], axis=1) >= j + 1
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  b = a.shape[0]
  lo, _ = jax.lax.fori_loop(0, 31, halve, (jnp.zeros((b,), jnp.int32),
                                           jnp.full((b,), 0x7F800000, jnp.int32)))
  below = jax.lax.bitcast_convert_type(lo, jnp.float32)  # sorted[j]
  if j + 1 < n:  # sorted[j + 1]: a tie with sorted[j], or the next larger value
    ties = jnp.sum(a <= below[:, None], axis=1) >= j + 2
    above = jnp.where(ties, below, jnp.min(jnp.where(a > below[:, None], a, jnp.inf), axis=1))
  else:
    above = below
  # torch's lerp, which switches form at w = 0.5 for accuracy.
  return jnp.where(w < 0.5, below + w * (above - below), above - (above - below) * (1 - w))


def threshold_sample(x0: Array, ratio: float, max_value: float) -> Array:
  """Imagen's dynamic thresholding, as diffusers' `_threshold_sample`.

  s = clip(quantile(|x0|, ratio), 1, max_value) per image; x0 -> clip(x0, -s, s) / s.
  """
  flat = jnp.abs(x0.reshape(x0.shape[0], -1).astype(jnp.float32))
  s = jnp.clip(quantile_nonneg(flat, ratio), 1.0, max_value)
  s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
  return (jnp.clip(x0, -s, s) / s).astype(x0.dtype)


def _clean_x0(config: StepConfig, x0: Array) -> Array:
  if config.thresholding:
    return threshold_sample(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
  if config.clip_sample:
    return jnp.clip(x0, -config.clip_sample_range, config.clip_sample_range)
  return x0


def split_output(config: StepConfig, model_output: Array, channels: int):
  """(prediction, predicted variance values or None) from a C- or 2C-channel output.

  A 2C output with a fixed variance type drops its variance half, as the IF
  pipelines do before calling a fixed-variance scheduler.
  """
  n = model_output.shape[-1]
  if n == 2 * channels:
    pred, var = model_output[..., :channels], model_output[..., channels:]
    return pred, (var if config.learned_variance else None)
  if n != channels:
    raise ValueError(f"model output has {n} channels for a {channels}-channel sample")
  if config.learned_variance:
    raise ValueError(f"variance_type {config.variance_type!r} needs a {2 * channels}-channel output")
  return model_output, None


def ddpm_step(config: StepConfig, model_output: Array, x: Array, step: Steps,
              noise: Array) -> tuple[Array, Array]:
  """One ancestral step x_t -> x_prev; returns (x_prev, predicted x0).

  `step` is one row of `Schedule.respace(...)` (scalar fields). Same math and
  operation order as `DDPMScheduler.step`, including respaced betas,
  learned-range variance and dynamic thresholding; `noise` stands in for the
  variance noise diffusers draws.
  """
  x = x.astype(jnp.float32)
  pred, var_values = split_output(config, model_output.astype(jnp.float32), x.shape[-1])
  a_t, a_prev = step.alpha_bar, step.alpha_bar_prev
  beta_prod_t, beta_prod_prev = 1 - a_t, 1 - a_prev
  current_alpha = a_t / a_prev
  current_beta = 1 - current_alpha

  x0 = diffusion.pred_to_x0(config.prediction_type, pred, x, a_t ** 0.5, beta_prod_t ** 0.5)
  x0 = _clean_x0(config, x0)
  mean = ((a_prev ** 0.5 * current_beta) / beta_prod_t * x0
          + current_alpha ** 0.5 * beta_prod_prev / beta_prod_t * x)

  # Posterior variance beta~_t, clamped because learned_range takes its log.
  variance = jnp.maximum(beta_prod_prev / beta_prod_t * current_beta, 1e-20)
  vt = config.variance_type
  if vt == "fixed_small":
    std = variance ** 0.5
  elif vt == "fixed_small_log":
    std = jnp.exp(0.5 * jnp.log(variance))
  elif vt == "fixed_large":
    std = current_beta ** 0.5
  elif vt == "learned":
    std = var_values ** 0.5
  elif vt == "learned_range":
    frac = (var_values + 1) / 2
    log_var = frac * jnp.log(current_beta) + (1 - frac) * jnp.log(variance)
    std = jnp.exp(0.5 * log_var)
  else:
    raise NotImplementedError(f"variance_type {vt!r}")
  x_prev = jnp.where(step.add_noise, mean + std * noise, mean)
  return x_prev, x0


def ddim_step(config: StepConfig, model_output: Array, x: Array, step: Steps, noise: Array,
              eta=0.0) -> tuple[Array, Array]:
  """One DDIM step (`DDIMScheduler.step`); eta=0 is deterministic, eta=1 is DDPM-like.

  Respace with `prev='stride'` and `final_alpha_bar` from `set_alpha_to_one`
  to land on the timesteps diffusers' DDIM uses. A learned-variance half of
  the output is ignored.
  """
  x = x.astype(jnp.float32)
  pred = model_output.astype(jnp.float32)[..., :x.shape[-1]]
  a_t, a_prev = step.alpha_bar, step.alpha_bar_prev
  beta_prod_t, beta_prod_prev = 1 - a_t, 1 - a_prev
  alpha, sigma = a_t ** 0.5, beta_prod_t ** 0.5
  x0 = diffusion.pred_to_x0(config.prediction_type, pred, x, alpha, sigma)
  eps = diffusion.pred_to_eps(config.prediction_type, pred, x, alpha, sigma)
  x0 = _clean_x0(config, x0)
  variance = (beta_prod_prev / beta_prod_t) * (1 - a_t / a_prev)
  std = eta * variance ** 0.5
  if config.use_clipped_model_output:
    eps = (x - alpha * x0) / sigma
  x_prev = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
  # diffusers adds noise only when eta > 0; std is 0 then, so this is the same.
  return x_prev + std * noise, x0


# ----------------------------------------------------------------------------
# DPM-Solver++(2M): a deterministic multistep solver, good samples in ~20-25 steps
# ----------------------------------------------------------------------------

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")


class DPMSteps(NamedTuple):
  """Per-step coefficients of DPM-Solver++(2M), as diffusers' DPMSolverMultistepScheduler
  (algorithm_type='dpmsolver++', solver_order=2, solver_type='midpoint',
  final_sigmas_type='zero', lower_order_final=True) computes them in `step`.

  x_next = coef_x * x - coef_d * (m0 + 0.5 * second * inv_r0 * (m0 - m_prev)),
  with m the (thresholded) predicted x0 of this step and the previous one.
  """
  model_t: Array   # [N] timestep fed to the network
  alpha: Array     # [N] alpha and sigma at this step (x0 from the prediction)
  sigma: Array
  coef_x: Array    # [N] sigma_next / sigma_now
  coef_d: Array    # [N] alpha_next * (exp(-h) - 1)
  inv_r0: Array    # [N] h / h_prev (second-order steps)
  second: Array    # [N] bool: a second-order (multistep) update


def dpm_solver_steps(schedule: diffusion.DiscreteSchedule, num_steps: int, *,
                     spacing: str | None = None,
                     lambda_min_clipped: float = -float("inf")) -> DPMSteps:
  """DPMSolverMultistepScheduler.set_timesteps(num_steps) and its step coefficients, in
  float32 in diffusers' operation order. Its 'leading' spacing differs from DDPM's
  (T // (N + 1) strides), and `lambda_min_clipped` (IF: -5.1) drops the noisiest
  times. `spacing` defaults to DPMSolverMultistepScheduler's own, linspace."""
  n, spacing = schedule.num_train_timesteps, spacing or "linspace"
  ac = schedule.alphas_cumprod.astype(np.float32)
  with np.errstate(divide="ignore"):
    lam = np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))
  last = n - int(np.searchsorted(lam[::-1], lambda_min_clipped))
  if spacing == "linspace":
    ts = np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
  elif spacing == "leading":
    ratio = last // (num_steps + 1)
    ts = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + schedule.steps_offset
  elif spacing == "trailing":
    ts = np.arange(last, 0, -n / num_steps).round().astype(np.int64) - 1
  else:
    raise ValueError(f"timestep_spacing {spacing!r}: use 'linspace', 'leading' or 'trailing'")
  table = ((1 - ac) / ac) ** 0.5
  sig = np.concatenate([np.interp(ts, np.arange(n), table), [0.0]]).astype(np.float32)
  alpha = (1 / (sig ** 2 + 1) ** 0.5).astype(np.float32)
  sigma = (sig * alpha).astype(np.float32)
  with np.errstate(divide="ignore", invalid="ignore"):
    lam_t = np.log(alpha) - np.log(sigma)        # +inf at the final (zero-sigma) point
    h = lam_t[1:] - lam_t[:-1]
    h_prev = np.concatenate([[np.nan], h[:-1]])
    coef_x = sigma[1:] / sigma[:-1]
    coef_d = alpha[1:] * (np.exp(-h) - 1.0)
    inv_r0 = np.where(np.isfinite(h) & np.isfinite(h_prev), h / h_prev, 0.0)
  k = len(ts)
  second = (np.arange(k) > 0) & (np.arange(k) < k - 1)  # first order first and last
  as32 = lambda a: jnp.asarray(np.asarray(a, np.float32))
  return DPMSteps(model_t=jnp.asarray(ts, jnp.int32), alpha=as32(alpha[:-1]), sigma=as32(sigma[:-1]),
                  coef_x=as32(coef_x), coef_d=as32(coef_d), inv_r0=as32(inv_r0),
                  second=jnp.asarray(second))


def dpmpp_2m_step(config: StepConfig, model_output: Array, x: Array, step: DPMSteps,
                  m_prev: Array) -> tuple[Array, Array]:
  """One DPM-Solver++(2M) update; returns (x_next, m) where m, the predicted x0 (after
  dynamic thresholding), is the next step's `m_prev`. A learned-variance half of the
  output is ignored, as diffusers does."""
  x = x.astype(jnp.float32)
  pred = model_output.astype(jnp.float32)[..., :x.shape[-1]]
  m0 = diffusion.pred_to_x0(config.prediction_type, pred, x, step.alpha, step.sigma)
  if config.thresholding:
    m0 = threshold_sample(m0, config.dynamic_thresholding_ratio, config.sample_max_value)
  d = m0 + jnp.where(step.second, 0.5 * step.inv_r0, 0.0) * (m0 - m_prev)
  return step.coef_x * x - step.coef_d * d, m0


# ----------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------

def _interleave(a: Array, b: Array) -> Array:
  """[B, ...] x2 -> [2B, ...] as (a0, b0, a1, b1, ...).

  Interleaving instead of concatenating keeps every row on the device that
  holds its batch shard, so a batch-sharded guided call needs no all-to-all.
  """
  return jnp.stack([a, b], axis=1).reshape((-1,) + a.shape[1:])


def guided_output(model_fn, x: Array, model_t: Array, cond: Any, uncond: Any,
                  guidance_scale) -> Array:
  """Model output with classifier-free guidance, cond and uncond in one batched call.

  Like IFPipeline: eps = uncond + scale * (cond - uncond) on the first C
  channels; a learned-variance half (channels C:) is taken from the
  conditional branch unguided. With `uncond=None` it is one plain call.
  """
  b, c = x.shape[0], x.shape[-1]
  t = jnp.broadcast_to(jnp.asarray(model_t), (b,))
  if uncond is None:
    return model_fn(x, t, cond)
  both = jax.tree.map(_interleave, uncond, cond)
  out = model_fn(_interleave(x, x), jnp.repeat(t, 2), both)
  out = out.reshape((b, 2) + out.shape[1:])
  out_u, out_c = out[:, 0].astype(jnp.float32), out[:, 1].astype(jnp.float32)
  eps = out_u[..., :c] + guidance_scale * (out_c[..., :c] - out_u[..., :c])
  return jnp.concatenate([eps, out_c[..., c:]], axis=-1)


# ----------------------------------------------------------------------------
# The sampling loop
# ----------------------------------------------------------------------------

def step_noise(rng: Array, index, shape) -> Array:
  """The variance noise of step `index` (0 = first, noisiest step) of `sample`."""
  return jax.random.normal(jax.random.fold_in(rng, index), shape, jnp.float32)


def split_rng(rng: Array) -> tuple[Array, Array]:
  """(initial-noise key, per-step-noise key) that `sample` derives from its rng."""
  init_key, loop_key = jax.random.split(rng)
  return init_key, loop_key


@functools.partial(jax.jit, static_argnames=("sampler", "config", "mesh", "clip_output"),
                   donate_argnames=("x_init",))
def _loop(model_fn, steps, x_init, loop_key, noise, cond, uncond, guidance_scale, eta,
          *, sampler, config, mesh, clip_output):
  if mesh is not None:
    constrain = lambda a: jax.lax.with_sharding_constraint(a, batch_sharding(mesh, a.shape))
  else:
    constrain = lambda a: a
  cond, uncond = jax.tree.map(constrain, cond), jax.tree.map(constrain, uncond)

  def body(carry, xs):
    x, m_prev = carry
    i, row, z = xs
    out = guided_output(model_fn, x, row.model_t, cond, uncond, guidance_scale)
    if sampler == "dpmpp_2m":
      x, m_prev = dpmpp_2m_step(config, out, x, row, m_prev)
      return (constrain(x), constrain(m_prev)), None
    if z is None:
      z = step_noise(loop_key, i, x.shape)
    if sampler == "ddpm":
      x, _ = ddpm_step(config, out, x, row, constrain(z))
    else:
      x, _ = ddim_step(config, out, x, row, constrain(z), eta)
    return (constrain(x), m_prev), None

  x0 = constrain(x_init.astype(jnp.float32))
  # The previous step's x0 (DPM-Solver++'s second order); a scalar when unused.
  m0 = jnp.zeros_like(x0) if sampler == "dpmpp_2m" else jnp.zeros((), jnp.float32)
  xs = (jnp.arange(steps.model_t.shape[0]), steps, noise)
  (x, _), _ = jax.lax.scan(body, (x0, m0), xs)
  return jnp.clip(x, -1.0, 1.0) if clip_output else x


def sample(model_fn, schedule: Schedule, shape, rng: Array, cond: Any, uncond: Any = None, *,
           num_steps: int | None = None, steps: Steps | None = None,
           guidance_scale: float = 1.0, sampler: str = "ddpm",
           config: StepConfig = StepConfig(), eta: float = 0.0, spacing: str | None = None,
           mesh=None, x_init: Array | None = None, noise: Array | None = None,
           clip_output: bool = True) -> Array:
  """Generates a batch of `shape` = (B, H, W, C) images in [-1, 1], float32.

  model_fn: (x, model_time [B], cond) -> [B, H, W, C or 2C]; wrapped in a
    `Partial` if it is not one (jit caches on the function's identity).
  cond, uncond: pytrees with batch-leading leaves of the same structure;
    uncond=None samples without guidance (one model call per step).
  num_steps / steps: respace the schedule (`spacing` defaults to the
    schedule's, 'leading' for IF), or pass a ready `Steps` grid.
  sampler: 'ddpm' (ancestral, IF's default), 'ddim' (`eta`), or 'dpmpp_2m'
    (DPM-Solver++(2M), deterministic: `noise` is unused; fewer steps).
  config: variance type, clipping and dynamic thresholding
    (`StepConfig.from_config(scheduler_json)`).
  mesh: shard the batch over its ('data', 'fsdp') axes.
  x_init, noise: supply the initial x_T and/or the per-step variance noise
    [num_steps, B, H, W, C] (parity tests); by default they come from
    `split_rng(rng)`: x_T ~ N(0, I) from the first key, step i's noise
    `step_noise(second_key, i, shape)`.
  clip_output: clip the result to [-1, 1] (diffusers clips when converting).
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
  if sampler == "dpmpp_2m" and steps is None:
    if num_steps is None:
      raise ValueError("pass num_steps or steps")
    if not isinstance(schedule, diffusion.DiscreteSchedule):
      raise ValueError("the dpmpp_2m sampler needs a DiscreteSchedule")
    steps = dpm_solver_steps(schedule, num_steps,
                             spacing=spacing or config.timestep_spacing or "linspace",
                             lambda_min_clipped=config.lambda_min_clipped)
  if steps is None:
    if num_steps is None:
      raise ValueError("pass num_steps or steps")
    kw = {}
    if sampler == "ddim":  # land where DDIMScheduler lands (see ddim_step)
      kw["prev"] = "stride"
      if not config.set_alpha_to_one:
        if not isinstance(schedule, diffusion.DiscreteSchedule):
          raise ValueError("set_alpha_to_one=False needs a DiscreteSchedule")
        kw["final_alpha_bar"] = float(schedule.alphas_cumprod[0])
    steps = schedule.respace(num_steps, spacing, **kw)
  init_key, loop_key = split_rng(rng)
  if x_init is None:
    x_init = jax.random.normal(init_key, tuple(shape), jnp.float32)
  else:  # the loop donates its x buffer: never the caller's array
    x_init = jnp.array(x_init, jnp.float32, copy=True)
  if x_init.shape != tuple(shape):
    raise ValueError(f"x_init has shape {x_init.shape}, expected {tuple(shape)}")
  if not isinstance(model_fn, Partial):
    model_fn = Partial(model_fn)
  return _loop(model_fn, steps, x_init, loop_key, noise, cond, uncond,
               jnp.asarray(guidance_scale, jnp.float32), jnp.asarray(eta, jnp.float32),
               sampler=sampler, config=config, mesh=mesh, clip_output=clip_output)
