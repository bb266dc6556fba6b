"""The T5 (v1.1) text encoder in flax.nnx, a mirror of transformers' `T5EncoderModel`.

DeepFloyd IF and Imagen condition every stage on the frozen encoder of T5 v1.1
XXL. We only ever need the encoder: the text is embedded once per prompt and
cached (see `dreambooth_jax.embeddings`), or, for textual inversion, run with one
learned row of the token embedding.

The module tree and attribute names copy the PyTorch state-dict names
(`shared`, `encoder.block.N.layer.0.SelfAttention.q`, `...layer.1.DenseReluDense.wi_0`,
`encoder.final_layer_norm`), so `weights.torch_layout` maps Hugging Face
checkpoints onto it without renames. T5 particulars kept exactly:

- no biases anywhere and no 1/sqrt(d_kv) scaling of attention scores (it is
  folded into the initialisation of `q`);
- a learned relative position bias owned by the first block only and shared by
  all blocks, over log-spaced bidirectional buckets;
- RMS layer norms (pre-norm) and a gated-GELU feed-forward whose GELU is the
  tanh approximation (`gated-gelu` -> `gelu_new` in transformers);
- padding keys masked additively with the float32 minimum, softmax in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreambooth_jax.models.layers import Dense, Embed, RMSNorm, activation

# Activations transformers' T5 accepts after the optional "gated-" prefix.
_T5_ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu", "swish", "gelu_pytorch_tanh", "quick_gelu")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The encoder-relevant fields of a Hugging Face T5 `config.json`.

  Defaults are transformers' `T5Config` defaults (the original T5, ReLU FFN),
  so a config.json that omits a key means what it means to transformers.
  """
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"
  initializer_factor: float = 1.0

  def __post_init__(self):
    parts = self.feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or parts[-1] not in _T5_ACTIVATIONS:
      raise ValueError(f"T5 feed_forward_proj {self.feed_forward_proj!r} is not supported; use "
                       f"'gated-<act>' or '<act>' with act in {_T5_ACTIVATIONS}")

  @property
  def is_gated_act(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def dense_act_fn(self) -> str:
    # transformers special-cases exactly this spelling to the tanh approximation.
    if self.feed_forward_proj == "gated-gelu":
      return "gelu_new"
    return self.feed_forward_proj.split("-")[-1]

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "T5Config":
    """From a config.json dict; unknown keys (decoder sizes, dropout...) are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


@functools.lru_cache(maxsize=64)
def relative_position_buckets(query_length: int, key_length: int, num_buckets: int,
                              max_distance: int, bidirectional: bool = True) -> np.ndarray:
  """Bucket index [query_length, key_length] of `key_pos - query_pos`, like transformers.

  Computed on the host in float32 with the same operation order as the PyTorch
  reference: the log-spaced buckets are truncated to integers, so a different
  rounding at a bucket edge would silently move a position to the next bucket.
  The sequence length is static under jit, so this costs nothing at run time.
  """
  rel = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
  buckets = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets += (rel > 0).astype(rel.dtype) * num_buckets
    rel = np.abs(rel)
  else:
    rel = -np.minimum(rel, 0)
  max_exact = num_buckets // 2
  is_small = rel < max_exact
  with np.errstate(divide="ignore"):  # log(0) only where is_small picks the exact bucket
    scaled = (np.log(rel.astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact))
              * np.float32(num_buckets - max_exact))
  large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  out = (buckets + np.where(is_small, rel, large)).astype(np.int32)
  out.setflags(write=False)  # shared through the cache
  return out


def _linear(n_in: int, n_out: int, axes, std: float, **kw) -> Dense:
  """A bias-free Dense with T5's normal(std) initialisation."""
  return Dense(n_in, n_out, axes=axes, use_bias=False, kernel_init=nnx.initializers.normal(std), **kw)


class T5Attention(nnx.Module):
  """Multi-head self-attention without biases or score scaling."""

  def __init__(self, config: T5Config, *, has_relative_attention_bias: bool = False,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    self.n_heads, self.d_kv = config.num_heads, config.d_kv
    self.num_buckets = config.relative_attention_num_buckets
    self.max_distance = config.relative_attention_max_distance
    d, inner, f = config.d_model, config.num_heads * config.d_kv, config.initializer_factor
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # transformers' _init_weights: q absorbs the missing 1/sqrt(d_kv) score scaling.
    self.q = _linear(d, inner, ("embed", "heads"), f * (d * config.d_kv) ** -0.5, **kw)
    self.k = _linear(d, inner, ("embed", "heads"), f * d ** -0.5, **kw)
    self.v = _linear(d, inner, ("embed", "heads"), f * d ** -0.5, **kw)
    self.o = _linear(inner, d, ("heads", "embed"), f * inner ** -0.5, **kw)
    self.relative_attention_bias = (
        Embed(self.num_buckets, config.num_heads, axes=("relpos_buckets", "heads"), dtype=dtype,
              param_dtype=param_dtype, rngs=rngs, init=nnx.initializers.normal(f * d ** -0.5))
        if has_relative_attention_bias else None)

  def compute_bias(self, query_length: int, key_length: int) -> jax.Array:
    """Relative position bias [1, heads, query_length, key_length] in float32."""
    if self.relative_attention_bias is None:
      raise ValueError("only the first T5 block owns the relative attention bias")
    buckets = relative_position_buckets(query_length, key_length, self.num_buckets, self.max_distance)
    values = self.relative_attention_bias(jnp.asarray(buckets)).astype(jnp.float32)  # [q, k, heads]
    return jnp.transpose(values, (2, 0, 1))[None]

  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    """`bias`: float32 [B or 1, heads, L, L], relative positions plus the padding mask."""
    b, length, _ = x.shape
    split = lambda t: t.reshape(b, length, self.n_heads, self.d_kv)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(scores + bias, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, self.n_heads * self.d_kv)
    return self.o(out)


class T5LayerSelfAttention(nnx.Module):
  def __init__(self, config: T5Config, *, has_relative_attention_bias: bool = False,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    self.SelfAttention = T5Attention(config, has_relative_attention_bias=has_relative_attention_bias,
                                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, bias):
    return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nnx.Module):
  """act(x @ wi_0) * (x @ wi_1) @ wo: T5 v1.1's gated feed-forward."""

  def __init__(self, config: T5Config, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs | None = None):
    d, d_ff, f = config.d_model, config.d_ff, config.initializer_factor
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.wi_0 = _linear(d, d_ff, ("embed", "mlp"), f * d ** -0.5, **kw)
    self.wi_1 = _linear(d, d_ff, ("embed", "mlp"), f * d ** -0.5, **kw)
    self.wo = _linear(d_ff, d, ("mlp", "embed"), f * d_ff ** -0.5, **kw)
    self.act = config.dense_act_fn  # a name: static, hashable graph metadata

  def __call__(self, x):
    return self.wo(activation(self.act)(self.wi_0(x)) * self.wi_1(x))


class T5DenseActDense(nnx.Module):
  """act(x @ wi) @ wo: the original T5's (ungated) feed-forward."""

  def __init__(self, config: T5Config, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs | None = None):
    d, d_ff, f = config.d_model, config.d_ff, config.initializer_factor
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.wi = _linear(d, d_ff, ("embed", "mlp"), f * d ** -0.5, **kw)
    self.wo = _linear(d_ff, d, ("mlp", "embed"), f * d_ff ** -0.5, **kw)
    self.act = config.dense_act_fn  # a name: static, hashable graph metadata

  def __call__(self, x):
    return self.wo(activation(self.act)(self.wi(x)))


class T5LayerFF(nnx.Module):
  def __init__(self, config: T5Config, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs | None = None):
    ff = T5DenseGatedActDense if config.is_gated_act else T5DenseActDense
    self.DenseReluDense = ff(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nnx.Module):
  """`layer[0]` self-attention, `layer[1]` feed-forward (encoder blocks have no cross-attention)."""

  def __init__(self, config: T5Config, *, has_relative_attention_bias: bool = False,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    self.layer = nnx.List([
        T5LayerSelfAttention(config, has_relative_attention_bias=has_relative_attention_bias,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs),
        T5LayerFF(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
    ])

  def __call__(self, x, bias):
    return self.layer[1](self.layer[0](x, bias))


def _run_block(block: T5Block, x, bias):
  return block(x, bias)


class T5Stack(nnx.Module):
  """The encoder stack: blocks and the final norm. The token table lives in the parent
  (`shared`), as in transformers, where `encoder.embed_tokens` is only a tied alias."""

  def __init__(self, config: T5Config, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs | None = None, remat: bool = False):
    self.remat = remat
    self.block = nnx.List([
        T5Block(config, has_relative_attention_bias=(i == 0), dtype=dtype, param_dtype=param_dtype,
                rngs=rngs)
        for i in range(config.num_layers)])
    self.final_layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs)

  def __call__(self, hidden: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    length = hidden.shape[1]
    bias = self.block[0].layer[0].SelfAttention.compute_bias(length, length)
    if attention_mask is not None:
      # Additive float32-minimum mask like transformers: padding keys get zero weight,
      # and an all-padding row stays finite (uniform) instead of turning into NaN.
      keep = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
      bias = bias + jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min)
    # Unrolled on purpose: 24 distinct blocks compile fine, keep their torch-style
    # names, and let the relative bias live in block 0 only (a scan wants equal blocks).
    run = nnx.remat(_run_block) if self.remat else _run_block
    for block in self.block:
      hidden = run(block, hidden, bias)
    return self.final_layer_norm(hidden)


class T5EncoderModel(nnx.Module):
  """`T5EncoderModel(config)(input_ids, attention_mask) -> last_hidden_state [B, L, d_model]`.

  `dtype` is the compute dtype (None: the parameters' dtype), `param_dtype` the
  storage dtype. `remat=True` rematerialises each block in the backward pass,
  for the rare case of training through the encoder (textual inversion).
  """

  def __init__(self, config: T5Config, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs | None = None, remat: bool = False):
    self.config = config
    self.shared = Embed(config.vocab_size, config.d_model, axes=("vocab", "embed"), dtype=dtype,
                        param_dtype=param_dtype, rngs=rngs,
                        init=nnx.initializers.normal(config.initializer_factor))
    self.encoder = T5Stack(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, remat=remat)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    return self.from_embeddings(self.shared(jnp.asarray(input_ids)), attention_mask)

  def from_embeddings(self, inputs_embeds: jax.Array,
                      attention_mask: jax.Array | None = None) -> jax.Array:
    """Runs the encoder on given token embeddings [B, L, d_model] (for learned tokens)."""
    return self.encoder(inputs_embeds, attention_mask)


def count_params(model: nnx.Module) -> int:
  """Number of parameter scalars of a concrete or abstract (`nnx.eval_shape`) model."""
  state = nnx.state(model, nnx.Param)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))
