"""Noise schedules, forward noising, training targets, the denoising loss and
noise-conditioning augmentation for super-resolution stages.

Two schedules share one interface (`Schedule`):

* `DiscreteSchedule` is DeepFloyd IF's (and diffusers') DDPM schedule: 1000
  betas, `alphas_cumprod[t]` for integer t. Its tables are computed on the host
  exactly as diffusers' `DDPMScheduler` computes them in float32, bit for bit,
  so a model trained by diffusers sees the same noise levels here.
* `ContinuousCosineSchedule` is Imagen's continuous-time cosine log-SNR
  schedule (t in [0, 1]), as in VDM and Imagen.

Everything here is a pure function of arrays: `loss` and `q_sample` can be
called inside a jitted train step. Images are NHWC in [-1, 1].

Time conventions (the part that is easy to get wrong):

* A discrete schedule's time is the diffusers timestep. Integer t indexes
  `alphas_cumprod` exactly as `DDPMScheduler.add_noise` does. Float t is a
  continuous level on the same 0..T scale (`alpha_sigma` docstring), needed by
  DreamBooth's noise-conditioning augmentation: its levels 1e-5 and 1e-3 are
  0.01 and 1.0 on IF's 0..1000 scale and must not round to the same step.
* `Schedule.model_time(t)` is what the network is fed as its timestep; for
  the discrete schedule that is t itself, as in diffusers.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ModelFn = Callable[[Array, Array, Any], Array]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class Steps(NamedTuple):
  """The respaced time grid a sampler walks, one entry per sampling step.

  `lax.scan` over a `Steps` hands the step function one row (scalar fields).
  """
  t: Array               # schedule time of the step (int32 for discrete schedules)
  model_t: Array         # what the network is fed as its timestep
  alpha_bar: Array       # alpha_bar at t (alpha^2 = sigmoid(logsnr))
  alpha_bar_prev: Array  # alpha_bar at the time the step lands on (1 past the end)
  add_noise: Array       # bool: does an ancestral step add noise (diffusers: t > 0)

  @property
  def betas(self) -> Array:
    """Respaced betas, 1 - alpha_bar/alpha_bar_prev, as diffusers' step derives them."""
    return 1.0 - self.alpha_bar / self.alpha_bar_prev

  @property
  def num_steps(self) -> int:
    return int(np.shape(self.t)[0])


class Schedule(abc.ABC):
  """A variance-preserving noise schedule: x_t = alpha(t) x_0 + sigma(t) eps."""

  @abc.abstractmethod
  def alpha_sigma(self, t) -> tuple[Array, Array]:
    """(alpha, sigma) at time(s) t, float32, same shape as t."""

  @abc.abstractmethod
  def logsnr(self, t) -> Array:
    """log(alpha^2 / sigma^2) at time(s) t."""

  @abc.abstractmethod
  def sample_t(self, rng: Array, batch: int) -> Array:
    """Training times, uniform over the schedule's support, shape [batch]."""

  @abc.abstractmethod
  def respace(self, num_steps: int, **kw) -> Steps:
    """The sampling grid of `num_steps` steps, from noise to clean."""

  @abc.abstractmethod
  def time_from_fraction(self, frac) -> Array:
    """Maps a fraction of the way to pure noise (0..1) onto this schedule's time."""

  def model_time(self, t) -> Array:
    """What the network is fed as its timestep for schedule time t."""
    return jnp.asarray(t)


# ----------------------------------------------------------------------------
# Discrete (DDPM / DeepFloyd IF)
# ----------------------------------------------------------------------------

def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
  """torch.linspace(start, end, n, dtype=float32), bit for bit on x86 CPUs.

  torch evaluates start + step*i from the front half and end - step*(n-1-i)
  from the back, in float32 with a fused multiply-add; the float64 product of
  two float32 values is exact, so one rounding at the end reproduces the FMA.
  """
  f32 = np.float32
  lo, hi = f32(start), f32(end)
  if n == 1:
    return np.array([lo], f32)
  step = np.float64(f32((hi - lo) / f32(n - 1)))
  i = np.arange(n, dtype=np.float64)
  front = np.float64(lo) + step * i
  back = np.float64(hi) - step * (n - 1 - i)
  return np.where(np.arange(n) < n // 2, front, back).astype(f32)


def _cosine_betas(n: int, max_beta: float) -> np.ndarray:
  """GLIDE's squaredcos_cap_v2 betas, in float64 then float32 like diffusers."""
  alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
  return np.asarray(betas, np.float64).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class DiscreteSchedule(Schedule):
  """diffusers' DDPMScheduler noise schedule (DeepFloyd IF: squaredcos_cap_v2, T=1000).

  Frozen and hashable by value, so it can be a static jit argument; the
  float32 tables are computed once on the host.
  """
  num_train_timesteps: int = 1000
  beta_schedule: str = "squaredcos_cap_v2"
  beta_start: float = 1e-4
  beta_end: float = 0.02
  trained_betas: tuple[float, ...] | None = None
  max_beta: float = 0.999
  timestep_spacing: str = "leading"
  steps_offset: int = 0

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> "DiscreteSchedule":
    """Reads a diffusers scheduler config (dict or parsed scheduler_config.json).

    Keys that only steer the sampler (variance_type, thresholding, ...) are
    read by `samplers.StepConfig.from_config`; unknown keys are ignored, as
    diffusers ignores IF's stray `lambda_min_clipped`.
    """
    if config.get("rescale_betas_zero_snr"):
      raise NotImplementedError("rescale_betas_zero_snr: zero terminal SNR has infinite log-SNR")
    trained = config.get("trained_betas")
    kw = dict(trained_betas=None if trained is None else tuple(float(b) for b in trained))
    for f in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
              "timestep_spacing", "steps_offset"):
      if config.get(f) is not None:
        kw[f] = config[f]
    return cls(**kw)

  @functools.cached_property
  def betas(self) -> np.ndarray:
    n = self.num_train_timesteps
    if self.trained_betas is not None:
      return np.asarray(self.trained_betas, np.float32)
    if self.beta_schedule == "linear":
      return _torch_linspace_f32(self.beta_start, self.beta_end, n)
    if self.beta_schedule == "scaled_linear":
      b = _torch_linspace_f32(self.beta_start ** 0.5, self.beta_end ** 0.5, n)
      return b * b
    if self.beta_schedule == "squaredcos_cap_v2":
      return _cosine_betas(n, self.max_beta)
    raise NotImplementedError(f"beta_schedule {self.beta_schedule!r}")

  @functools.cached_property
  def alphas_cumprod(self) -> np.ndarray:
    # torch.cumprod on CPU accumulates float32 inputs in float64 and rounds
    # each output; np.cumprod in float32 would drift by up to a few ulps.
    alphas = (np.float32(1) - self.betas).astype(np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)

  @functools.cached_property
  def _logsnr_table(self) -> np.ndarray:
    ac = self.alphas_cumprod.astype(np.float64)
    return (np.log(ac) - np.log1p(-ac)).astype(np.float32)

  # Jitted with the (hashable) schedule static: eager callers get one compiled
  # kernel per shape instead of one per primitive; inside jit it just inlines.
  @functools.partial(jax.jit, static_argnums=0)
  def _alpha2_sigma2(self, t) -> tuple[Array, Array]:
    """(alpha^2, sigma^2), computed separately so tiny sigmas keep their precision."""
    t = jnp.asarray(t)
    ac = jnp.asarray(self.alphas_cumprod)
    if jnp.issubdtype(t.dtype, jnp.integer):
      a2 = ac[t]
      return a2, 1.0 - a2
    n = self.num_train_timesteps
    t = jnp.clip(t.astype(jnp.float32), 0.0, n - 1)
    k = jnp.floor(t).astype(jnp.int32)
    frac = t - k
    table = jnp.asarray(self._logsnr_table)
    l = (1 - frac) * table[k] + frac * table[jnp.minimum(k + 1, n - 1)]
    # On [0, 1) there is no knot to interpolate from: t = 0 is the clean image
    # (infinite log-SNR). sigma^2 grows linearly from 0 to step 1's value,
    # which is how 1 - alpha_bar behaves near t = 0 for these schedules.
    low_s2 = t * (1.0 - ac[1])
    on_knot = frac == 0
    a2 = jnp.where(t < 1, 1.0 - low_s2, jnp.where(on_knot, ac[k], jax.nn.sigmoid(l)))
    s2 = jnp.where(t < 1, low_s2, jnp.where(on_knot, 1.0 - ac[k], jax.nn.sigmoid(-l)))
    return a2, s2

  def alpha_sigma(self, t) -> tuple[Array, Array]:
    """(alpha, sigma) at t.

    Integer t: sqrt(alphas_cumprod[t]), sqrt(1 - alphas_cumprod[t]), exactly
    what `DDPMScheduler.add_noise` uses. Float t in [0, T-1]: integral values
    k >= 1 equal the integer lookup; between knots k and k+1 log-SNR is
    interpolated linearly; on [0, 1) sigma^2 rises linearly from 0 (clean at
    t = 0) to sigma^2 at step 1. So float 0.01 and 1.0 give different noise.
    """
    a2, s2 = self._alpha2_sigma2(t)
    return jnp.sqrt(a2), jnp.sqrt(s2)

  def logsnr(self, t) -> Array:
    a2, s2 = self._alpha2_sigma2(t)
    return jnp.log(a2) - jnp.log(s2)

  def sample_t(self, rng, batch):
    return jax.random.randint(rng, (batch,), 0, self.num_train_timesteps, dtype=jnp.int32)

  def time_from_fraction(self, frac):
    return jnp.asarray(frac, jnp.float32) * self.num_train_timesteps

  def timesteps(self, num_steps: int, spacing: str | None = None) -> np.ndarray:
    """diffusers' `DDPMScheduler.set_timesteps(num_steps)` grid, descending int64."""
    n, spacing = self.num_train_timesteps, spacing or self.timestep_spacing
    if not 0 < num_steps <= n:
      raise ValueError(f"num_steps must be in [1, {n}], got {num_steps}")
    if spacing == "linspace":
      return np.linspace(0, n - 1, num_steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
      ratio = n // num_steps
      return (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.int64) + self.steps_offset
    if spacing == "trailing":
      return np.round(np.arange(n, 0, -n / num_steps)).astype(np.int64) - 1
    raise ValueError(f"timestep_spacing {spacing!r}: use 'linspace', 'leading' or 'trailing'")

  def respace(self, num_steps: int | None = None, spacing: str | None = None, *,
              timesteps=None, prev: str = "next", final_alpha_bar: float | None = None) -> Steps:
    """Sampling grid: `num_steps` spaced as diffusers does, or custom `timesteps`.

    prev: 'next' lands each step on the next grid entry (DDPMScheduler's
      `previous_timestep`); 'stride' on t - T // num_steps (DDIMScheduler).
    final_alpha_bar: alpha_bar past the end, 1 by default (DDIM's
      set_alpha_to_one=False uses alphas_cumprod[0]).
    """
    if (num_steps is None) == (timesteps is None):
      raise ValueError("pass exactly one of num_steps and timesteps")
    if timesteps is None:
      ts = self.timesteps(num_steps, spacing)
    else:
      ts = np.asarray(timesteps, np.int64)
      if np.any(np.diff(ts) >= 0) or ts[0] >= self.num_train_timesteps:
        raise ValueError(f"custom timesteps must descend from below T: {ts}")
    if prev == "next":
      prev_t = np.append(ts[1:], -1)
    elif prev == "stride":
      prev_t = ts - self.num_train_timesteps // len(ts)
    else:
      raise ValueError(f"prev {prev!r}: use 'next' or 'stride'")
    ac = self.alphas_cumprod
    final = np.float32(1.0 if final_alpha_bar is None else final_alpha_bar)
    a_prev = np.where(prev_t >= 0, ac[np.maximum(prev_t, 0)], final).astype(np.float32)
    t32 = jnp.asarray(ts, jnp.int32)
    return Steps(t=t32, model_t=t32, alpha_bar=jnp.asarray(ac[ts]),
                 alpha_bar_prev=jnp.asarray(a_prev), add_noise=jnp.asarray(ts > 0))


# ----------------------------------------------------------------------------
# Continuous (Imagen / VDM cosine log-SNR)
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ContinuousCosineSchedule(Schedule):
  """logsnr(t) = -2 log tan(pi t / 2), clipped to [logsnr_min, logsnr_max], t in [0, 1].

  alpha = sqrt(sigmoid(logsnr)), sigma = sqrt(sigmoid(-logsnr)). The network
  is fed t * time_scale, so IF-style UNets that embed timesteps on a 0..1000
  scale can be trained on it unchanged.
  """
  logsnr_min: float = -20.0
  logsnr_max: float = 20.0
  time_scale: float = 1000.0

  @property
  def _t_range(self) -> tuple[float, float]:
    # Clipping t to the times where logsnr hits its bounds is the same as
    # clipping logsnr (it is monotone), and avoids tan(pi/2) and log(0).
    to_t = lambda l: 2 / math.pi * math.atan(math.exp(-0.5 * l))
    return to_t(self.logsnr_max), to_t(self.logsnr_min)

  @functools.partial(jax.jit, static_argnums=0)
  def logsnr(self, t) -> Array:
    lo, hi = self._t_range
    t = jnp.clip(jnp.asarray(t, jnp.float32), lo, hi)
    # Clip again: float32 tan near pi/2 overshoots the bound by ~1e-3.
    return jnp.clip(-2.0 * jnp.log(jnp.tan(jnp.pi * t / 2)), self.logsnr_min, self.logsnr_max)

  def alpha_sigma(self, t) -> tuple[Array, Array]:
    l = self.logsnr(t)
    return jnp.sqrt(jax.nn.sigmoid(l)), jnp.sqrt(jax.nn.sigmoid(-l))

  def sample_t(self, rng, batch):
    return jax.random.uniform(rng, (batch,), jnp.float32)

  def time_from_fraction(self, frac):
    return jnp.asarray(frac, jnp.float32)

  def model_time(self, t):
    return jnp.asarray(t, jnp.float32) * self.time_scale

  def respace(self, num_steps: int, spacing: str | None = None, **unused) -> Steps:
    """Uniform grid t_i = 1 - i/N; the last step lands on t = 0 without noise."""
    del spacing, unused  # one natural spacing for continuous time
    t = jnp.asarray(1.0 - np.arange(num_steps) / num_steps, jnp.float32)
    t_prev = jnp.asarray(1.0 - np.arange(1, num_steps + 1) / num_steps, jnp.float32)
    ab = lambda s: jax.nn.sigmoid(self.logsnr(s))
    return Steps(t=t, model_t=self.model_time(t), alpha_bar=ab(t), alpha_bar_prev=ab(t_prev),
                 add_noise=t_prev > 0)


# ----------------------------------------------------------------------------
# Forward process, targets, loss
# ----------------------------------------------------------------------------

def _expand(v: Array, ndim: int) -> Array:
  """[B] -> [B, 1, 1, ...] so per-example coefficients broadcast over pixels."""
  v = jnp.asarray(v)
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def q_sample(schedule: Schedule, x0: Array, t, noise: Array) -> Array:
  """x_t = alpha(t) x0 + sigma(t) noise; equals DDPMScheduler.add_noise for integer t."""
  alpha, sigma = schedule.alpha_sigma(t)
  return _expand(alpha, x0.ndim) * x0 + _expand(sigma, x0.ndim) * noise


def target(prediction_type: str, x0: Array, noise: Array, alpha: Array, sigma: Array) -> Array:
  """What the network regresses: epsilon, x0 ('sample') or v = alpha eps - sigma x0."""
  if prediction_type == "epsilon":
    return noise
  if prediction_type == "sample":
    return x0
  if prediction_type == "v_prediction":
    return _expand(alpha, x0.ndim) * noise - _expand(sigma, x0.ndim) * x0
  raise ValueError(f"prediction_type {prediction_type!r}: use one of {PREDICTION_TYPES}")


def pred_to_x0(prediction_type: str, pred: Array, x_t: Array, alpha, sigma) -> Array:
  """The x0 a prediction implies (diffusers' `pred_original_sample`)."""
  a, s = _expand(alpha, x_t.ndim), _expand(sigma, x_t.ndim)
  if prediction_type == "epsilon":
    return (x_t - s * pred) / a
  if prediction_type == "sample":
    return pred
  if prediction_type == "v_prediction":
    return a * x_t - s * pred
  raise ValueError(f"prediction_type {prediction_type!r}: use one of {PREDICTION_TYPES}")


def pred_to_eps(prediction_type: str, pred: Array, x_t: Array, alpha, sigma) -> Array:
  """The epsilon a prediction implies."""
  a, s = _expand(alpha, x_t.ndim), _expand(sigma, x_t.ndim)
  if prediction_type == "epsilon":
    return pred
  if prediction_type == "sample":
    return (x_t - a * pred) / s
  if prediction_type == "v_prediction":
    return a * pred + s * x_t
  raise ValueError(f"prediction_type {prediction_type!r}: use one of {PREDICTION_TYPES}")


def loss_weight(weighting: str, snr: Array, prediction_type: str, gamma: float = 5.0) -> Array:
  """Per-example weight of the MSE on the prediction.

  'min_snr' (Hang et al. 2023) weights the x0-space loss by min(snr, gamma);
  expressed on an epsilon or v target that is min(snr, gamma)/snr and
  min(snr, gamma)/(snr + 1), the same as diffusers' training scripts. It lowers
  the low-noise steps and never raises the high-noise ones.

  'v' weights the loss as v-prediction's loss does, snr + 1 in x0 space, with the
  snr floored at 1/gamma: on an epsilon target (snr + 1) / max(snr, 1/gamma), which
  rises from 1 at low noise to about gamma at high noise. An epsilon loss sees the
  image's content only through alpha/sigma, small exactly at the noise levels where
  content (and so the caption) is decided; this gives those steps weight. The floor
  keeps the last steps (snr ~ 1e-9 on IF's cosine schedule) finite.
  """
  if weighting == "uniform":
    return jnp.ones_like(snr)
  if weighting == "v":
    return {"epsilon": (snr + 1) / jnp.maximum(snr, 1.0 / gamma),
            "v_prediction": jnp.ones_like(snr), "sample": snr + 1}[prediction_type]
  if weighting != "min_snr":
    raise ValueError(f"weighting {weighting!r}: use 'uniform', 'min_snr' or 'v'")
  clipped = jnp.minimum(snr, gamma)
  if prediction_type == "epsilon":
    return clipped / snr
  if prediction_type == "v_prediction":
    return clipped / (snr + 1)
  return clipped


def loss(model_fn: ModelFn, schedule: Schedule, x0: Array, rng: Array, cond: Any, *,
         prediction_type: str = "epsilon", weighting: str = "uniform",
         min_snr_gamma: float = 5.0, learned_variance: bool = False,
         t: Array | None = None, noise: Array | None = None) -> tuple[Array, dict]:
  """Denoising loss: per-example [B] loss and scalar metrics.

  model_fn(x_t, model_time, cond) -> prediction, NHWC. With
  `learned_variance` the model returns 2C channels (IF: epsilon, then the
  learned-range variance values) and only the first C are regressed; the
  variance half gets no signal here, as in diffusers' IF DreamBooth.
  `t` and `noise` override the random draws (tests, fixed-t evaluation).
  """
  b, c = x0.shape[0], x0.shape[-1]
  x0 = x0.astype(jnp.float32)
  rng_t, rng_n = jax.random.split(rng)
  t = schedule.sample_t(rng_t, b) if t is None else jnp.asarray(t)
  noise = jax.random.normal(rng_n, x0.shape, jnp.float32) if noise is None else noise
  alpha, sigma = schedule.alpha_sigma(t)
  x_t = q_sample(schedule, x0, t, noise)
  out = model_fn(x_t, schedule.model_time(t), cond)
  expected = 2 * c if learned_variance else c
  if out.shape[-1] != expected:
    raise ValueError(f"model output has {out.shape[-1]} channels, expected {expected} "
                     f"(learned_variance={learned_variance})")
  pred = out[..., :c].astype(jnp.float32)
  mse = jnp.mean(jnp.square(pred - target(prediction_type, x0, noise, alpha, sigma)),
                 axis=tuple(range(1, x0.ndim)))
  weight = loss_weight(weighting, jnp.square(alpha) / jnp.square(sigma), prediction_type,
                       min_snr_gamma)
  per_example = weight * mse
  metrics = {"loss": per_example.mean(), "mse": mse.mean(), "weight": weight.mean(),
             "t": jnp.mean(jnp.asarray(t, jnp.float32))}
  return per_example, metrics


# ----------------------------------------------------------------------------
# Noise-conditioning augmentation (super-resolution stages)
# ----------------------------------------------------------------------------

def _align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] linear-interpolation weights of F.interpolate(align_corners=True)."""
  m = np.zeros((n_out, n_in), np.float32)
  scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
  src = np.arange(n_out, dtype=np.float32) * np.float32(scale)
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  w = (src - i0).astype(np.float32)
  rows = np.arange(n_out)
  np.add.at(m, (rows, i0), 1 - w)
  np.add.at(m, (rows, i1), w)
  return m


def upsample_bilinear(x: Array, size: tuple[int, int]) -> Array:
  """NHWC bilinear resize with align_corners=True.

  IFSuperResolutionPipeline upsamples stage I's output with
  F.interpolate(mode='bilinear', align_corners=True); jax.image.resize only
  has half-pixel centres, so this applies the two separable weight matrices.
  """
  mh = jnp.asarray(_align_corners_matrix(x.shape[1], size[0]))
  mw = jnp.asarray(_align_corners_matrix(x.shape[2], size[1]))
  hi = jax.lax.Precision.HIGHEST  # default TPU precision (bf16 passes) would blur pixels
  y = jnp.einsum("oh,bhwc->bowc", mh, x.astype(jnp.float32), precision=hi)
  return jnp.einsum("pw,bowc->bopc", mw, y, precision=hi)


def downsample(x_hr: Array, low_size: int | tuple[int, int], *, method: str = "bicubic") -> Array:
  """The previous stage's view of a hi-res training image: an antialiased resize (equal to
  torch's `F.interpolate(mode="bicubic", antialias=True)`), clipped to [-1, 1] because
  at inference the low-res input is a previous stage's sample, which the sampler
  clips; bicubic overshoot would otherwise be a training-only signal."""
  b, _, _, c = x_hr.shape
  lh, lw = (low_size, low_size) if isinstance(low_size, int) else tuple(low_size)
  low = jax.image.resize(x_hr.astype(jnp.float32), (b, lh, lw, c), method=method, antialias=True)
  return jnp.clip(low, -1.0, 1.0)


def down_up(x_hr: Array, low_size: int | tuple[int, int], *, method: str = "bicubic") -> Array:
  """The low-res view a pixel SR stage sees: `downsample`, then IF-style upsample."""
  return upsample_bilinear(downsample(x_hr, low_size, method=method), x_hr.shape[1:3])


def lowres_condition(x_hr: Array, low_size: int | tuple[int, int], aug_level, rng: Array,
                     schedule: Schedule, *, method: str = "bicubic",
                     noise: Array | None = None) -> tuple[Array, Array]:
  """Noise-conditioning augmentation: (noised low-res image at hi-res size, class_labels).

  aug_level is a fraction of the way to pure noise, scalar or [B]: Imagen
  pre-trains at 1e-3 and DreamBooth fine-tunes its SR stages at 1e-5; IF's
  inference default noise_level=250 is 0.25. The image is noised at the
  *float* level aug_level * T on `schedule` (never rounded: on IF's 1000-step
  grid 1e-5 and 1e-3 would both round to step 0), and class_labels =
  aug_level * 1000, IF's class-embedding scale (stage II embeds noise_level).
  """
  up = down_up(x_hr, low_size, method=method)
  b = x_hr.shape[0]
  frac = jnp.broadcast_to(jnp.asarray(aug_level, jnp.float32), (b,))
  if noise is None:
    noise = jax.random.normal(rng, up.shape, jnp.float32)
  noised = q_sample(schedule, up, schedule.time_from_fraction(frac), noise)
  return noised, frac * 1000.0
