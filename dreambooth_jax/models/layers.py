"""Parameter-owning building blocks shared by every model of the zoo.

Each block stores its weights as `nnx.Param` carrying an `axes` metadata tuple
of *logical* axis names (see `dreambooth_jax.sharding`), so a whole model can be
sharded by rules without touching model code. We keep our own metadata key
instead of flax's `sharding`, because flax 0.12 shards annotated variables
eagerly and demands a mesh at construction; our models are built abstractly
(`nnx.eval_shape`) or on one host first, and placed on a mesh afterwards.

Parameter names follow one convention that the weight importers rely on:
`kernel` (Dense: [in, out]; Conv: [kh, kw, in, out]), `bias`, `scale` (norms)
and `embedding` (lookup tables). PyTorch's `weight` maps onto these by name and
rank, see `dreambooth_jax.weights.torch_layout`.

Dtypes: `param_dtype` is what is stored (float32 master weights when
training), `dtype` is what the math runs in (bfloat16 on TPU). Norm statistics
and softmax always run in float32.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Axes = tuple[str | None, ...]


class KeyGen:
  """A deterministic stream of init keys, counted in Python.

  `nnx.Rngs` keeps its counter as traced state; under `nnx.eval_shape` or a
  jitted sharded init every draw then costs a provenance search in the tracer,
  quadratic in the number of params (16 s for IF-II-L's 900 tensors). Counting
  in Python makes building a full-size abstract model take a fraction of that.
  """

  def __init__(self, seed: int | jax.Array = 0):
    self.key = jax.random.key(seed) if isinstance(seed, int) else seed
    self.count = 0

  def __call__(self) -> jax.Array:
    self.count += 1
    return jax.random.fold_in(self.key, self.count)


Rngs = nnx.Rngs | KeyGen | None


def param(rngs: Rngs, init, shape: Sequence[int], dtype, axes: Axes) -> nnx.Param:
  """Creates a Param with logical `axes`; `rngs=None` draws from a fixed key.

  Importers build models abstractly and overwrite every value, so the
  initialiser only matters for training from scratch and for tests.
  """
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match shape {tuple(shape)}")
  if isinstance(rngs, nnx.Rngs):
    key = rngs.params()
  elif rngs is not None:
    key = rngs()
  else:
    key = jax.random.key(0)
  return nnx.Param(init(key, tuple(shape), dtype), axes=tuple(axes))


def random_init(abstract: nnx.Module, seed: int = 0, place=None) -> nnx.Module:
  """Fills an abstract (`nnx.eval_shape`) model with random values drawn on the host.

  For tiny models and tests: kernels ~ N(0, 1/fan_in) (fan_in = product of all
  but the output axis), embeddings ~ N(0, 1), other matrices ~ N(0, 1/last
  dim), biases 0, norm scales 1. Running the modules' own jax initializers
  instead compiles one XLA program per parameter eagerly (~20 s for two tiny
  UNets on CPU) or a 10 s unrolled threefry program under jit; pretrained
  fine-tuning never uses either. Deterministic in `seed` and the param paths.
  Values are cast on the host (a device-side cast compiles a program per shape);
  `place(path, array)` may put each straight into its sharding, as the weight
  loaders do (`sharding.placer`).
  """
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(state):
    sds, leaf = var.get_value(), str(path[-1])
    shape, dtype = tuple(sds.shape), sds.dtype
    if leaf == "bias":
      value = np.zeros(shape)
    elif leaf == "scale":
      value = np.ones(shape)
    elif leaf == "embedding":
      value = rng.standard_normal(shape)
    else:
      fan_in = int(np.prod(shape[:-1])) if leaf == "kernel" else shape[-1]
      value = rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))
    value = np.asarray(value).astype(dtype)
    var.set_value(place(path, value) if place is not None else jnp.asarray(value))
  return nnx.merge(graphdef, state)


def _cast(x, dtype):
  return x if dtype is None else jnp.asarray(x, dtype)


class Dense(nnx.Module):
  """y = x @ kernel + bias, with logical axes for [in, out]."""

  def __init__(self, in_features: int, out_features: int, *, axes: Axes = ("embed", "mlp"),
               use_bias: bool = True, dtype=None, param_dtype=jnp.float32,
               rngs: Rngs = None, kernel_init=nnx.initializers.lecun_normal()):
    self.in_features, self.out_features = in_features, out_features
    self.dtype = dtype
    self.kernel = param(rngs, kernel_init, (in_features, out_features), param_dtype, axes)
    self.bias = (param(rngs, nnx.initializers.zeros, (out_features,), param_dtype, (axes[1],))
                 if use_bias else None)

  def __call__(self, x):
    dtype = self.dtype or x.dtype
    x = _cast(x, dtype)
    y = jnp.dot(x, _cast(self.kernel[...], dtype))
    if self.bias is not None:
      y = y + _cast(self.bias[...], dtype)
    lora = getattr(self, "lora", None)  # set by `dreambooth_jax.lora.inject`
    return y if lora is None else y + lora(x, dtype)


class Conv(nnx.Module):
  """2-D convolution on NHWC inputs, kernel [kh, kw, in, out], symmetric padding."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, *,
               stride: int = 1, padding: int | None = None, use_bias: bool = True,
               dtype=None, param_dtype=jnp.float32, rngs: Rngs = None):
    self.stride = stride
    self.padding = kernel_size // 2 if padding is None else padding
    self.dtype = dtype
    self.kernel = param(rngs, nnx.initializers.lecun_normal(),
                        (kernel_size, kernel_size, in_features, out_features), param_dtype,
                        (None, None, "conv_in", "conv_out"))
    self.bias = (param(rngs, nnx.initializers.zeros, (out_features,), param_dtype, ("conv_out",))
                 if use_bias else None)

  def __call__(self, x):
    dtype = self.dtype or x.dtype
    x = _cast(x, dtype)
    y = _conv(x, _cast(self.kernel[...], dtype), self.stride, self.padding)
    if self.bias is not None:
      y = y + _cast(self.bias[...], dtype)
    lora = getattr(self, "lora", None)  # set by `dreambooth_jax.lora.inject`
    return y if lora is None else y + lora(x, dtype)


def _conv(x, kernel, stride: int, padding: int):
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


class LoRA(nnx.Module):
  """The low-rank update a frozen Dense or Conv adds to its output: scale * B(A(x)).

  Hu et al.'s LoRA in the forward form (as peft computes it): the update is two thin
  matmuls on the activations, so training never forms the frozen layer's full weight
  gradient, only A's and B's. Dense: A [in, r], B [r, out]. Conv: A is a [kh, kw, in,
  r] convolution with the layer's stride and padding and B a 1x1 [r, out] one (peft's
  Conv2d LoRA). B starts at zero, so an adapted model starts as the frozen one. Both
  are `nnx.LoRAParam`, which `nnx.split(model, nnx.LoRAParam, ...)` separates from the
  frozen weights. Dropout on the input (peft's lora_dropout) runs only when a key is
  set on the module, which `lora.Adapted` does inside a train step. Adapters with a
  leading subject axis (`train_many`) never reach this layer stacked: the loss is
  vmapped over that axis, so each call sees one subject's A and B.
  """

  def __init__(self, a, b, a_axes: Axes, b_axes: Axes, *, scale: float, dropout: float = 0.0,
               conv: tuple[int, int] | None = None):
    self.a = nnx.LoRAParam(a, axes=tuple(a_axes))
    self.b = nnx.LoRAParam(b, axes=tuple(b_axes))
    self.scale, self.dropout = float(scale), float(dropout)
    self.conv = conv  # (stride, padding) of the adapted Conv; None for a Dense

  def __call__(self, x, dtype):
    key = getattr(self, "dropout_key", None)
    if self.dropout and key is not None:
      keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
    a, b = _cast(self.a[...], dtype), _cast(self.b[...], dtype)
    h = jnp.dot(x, a) if self.conv is None else _conv(x, a, *self.conv)
    return jnp.dot(h, b) * jnp.asarray(self.scale, h.dtype)


class GroupNorm(nnx.Module):
  """GroupNorm over the channel (last) axis; statistics and affine in float32.

  `scale_shift=(s, t)` applies IF's ResNet time conditioning, norm(x) * (1 + s) + t,
  in the compute dtype after the cast, exactly as diffusers orders it. (Folding
  affine and modulation into one float32 multiply-add, x * a + b, ran ~5% faster
  on CPU but kept float32 activations alive for the backward pass: +4 GiB per chip
  for IF-I-XL in the v4-8 plan, 15.92 -> 19.89 GiB. A one-pass variance was no
  faster and less exact.)
  """

  def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-5,
               affine: bool = True, dtype=None, param_dtype=jnp.float32,
               rngs: Rngs = None):
    if num_channels % num_groups:
      raise ValueError(f"GroupNorm: {num_channels} channels not divisible by {num_groups} groups")
    self.num_groups, self.eps, self.dtype = num_groups, eps, dtype
    self.scale = param(rngs, nnx.initializers.ones, (num_channels,), param_dtype, ("norm",)) if affine else None
    self.bias = param(rngs, nnx.initializers.zeros, (num_channels,), param_dtype, ("norm",)) if affine else None

  def __call__(self, x, scale_shift=None):
    dtype = self.dtype or x.dtype
    shape = x.shape
    xg = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, shape[-1] // self.num_groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(xg - mean).mean(axis=(1, 3), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
    if self.scale is not None:
      y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    y = y.astype(dtype)
    if scale_shift is not None:
      s, t = scale_shift
      y = y * (1 + s) + t
    return y


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis; statistics in float32."""

  def __init__(self, num_features: int, *, eps: float = 1e-5, use_bias: bool = True,
               dtype=None, param_dtype=jnp.float32, rngs: Rngs = None):
    self.eps, self.dtype = eps, dtype
    self.scale = param(rngs, nnx.initializers.ones, (num_features,), param_dtype, ("norm",))
    self.bias = (param(rngs, nnx.initializers.zeros, (num_features,), param_dtype, ("norm",))
                 if use_bias else None)

  def __call__(self, x):
    dtype = self.dtype or x.dtype
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(dtype)


class RMSNorm(nnx.Module):
  """T5's LayerNorm: no mean subtraction, no bias; variance in float32."""

  def __init__(self, num_features: int, *, eps: float = 1e-6, dtype=None,
               param_dtype=jnp.float32, rngs: Rngs = None):
    self.eps, self.dtype = eps, dtype
    self.scale = param(rngs, nnx.initializers.ones, (num_features,), param_dtype, ("norm",))

  def __call__(self, x):
    dtype = self.dtype or x.dtype
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)
    # Like transformers, the normalised value is rounded to the weight dtype
    # before scaling, which keeps bf16 outputs identical to the reference.
    return (self.scale[...].astype(dtype) * y.astype(dtype)).astype(dtype)


class Embed(nnx.Module):
  """Lookup table [num_embeddings, features]."""

  def __init__(self, num_embeddings: int, features: int, *, axes: Axes = ("vocab", "embed"),
               dtype=None, param_dtype=jnp.float32, rngs: Rngs = None,
               init=nnx.initializers.normal(1.0)):
    self.dtype = dtype
    self.embedding = param(rngs, init, (num_embeddings, features), param_dtype, axes)

  def __call__(self, ids):
    table = self.embedding[...]
    return jnp.take(table, ids, axis=0).astype(self.dtype or table.dtype)


def activation(name: str):
  """diffusers' / transformers' activation names to jax functions (exact, not tanh-approx)."""
  table = {
      "silu": jax.nn.silu, "swish": jax.nn.silu, "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),
      "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
      "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
      "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
      "relu": jax.nn.relu,
  }
  if name not in table:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(table)}")
  return table[name]
