"""CLIP (transformers' `CLIPModel`) in flax.nnx, for the CLIP-I and CLIP-T metrics,
and its text tower alone (`CLIPTextModel`), the text encoder of the SD x4 upscaler.

The DreamBooth protocol scores images with CLIP ViT-B/32 image embeddings
(CLIP-I: generated vs real) and prompts with its text embeddings (CLIP-T). We
mirror `CLIPModel` module for module, named after its state-dict keys
(including transformers' historical spelling `pre_layrnorm`), so the importer
needs no renames:

- vision tower: bias-free conv patch embedding, a learned `class_embedding`,
  position embeddings, `pre_layrnorm`, pre-LN encoder, `post_layernorm` on the
  CLS token, then the bias-free `visual_projection`;
- text tower: token + position embeddings, causal (and padding) mask, encoder,
  `final_layer_norm`, the hidden state at the end-of-text token, then the
  bias-free `text_projection`.

`encode_image` / `encode_text` return the projected, *unnormalised*
embeddings, like `CLIPModel.get_image_features` / `get_text_features`; callers
normalise before taking cosines. Images are NHWC floats already normalised with
CLIP's mean/std (see `dreambooth_jax.evaluation.preprocess`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dreambooth_jax.models.layers import Conv, Dense, Embed, KeyGen, LayerNorm, activation, param
from dreambooth_jax.models.vit import attention


@dataclasses.dataclass(frozen=True)
class CLIPTowerConfig:
  """One tower's shape. Defaults are CLIPVisionConfig's; `text_defaults()` gives the text ones."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  # vision only
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  # text only
  vocab_size: int = 49408
  max_position_embeddings: int = 77
  eos_token_id: int = 49407

  @classmethod
  def text_defaults(cls) -> "CLIPTowerConfig":
    return cls(hidden_size=512, intermediate_size=2048, num_attention_heads=8)

  @classmethod
  def from_hf_text(cls, d: dict[str, Any], source: str = "config") -> "CLIPTowerConfig":
    """From a transformers CLIPTextModel config.json dict (a diffusers pipeline's text_encoder/)."""
    if d.get("model_type", "clip_text_model") != "clip_text_model":
      raise ValueError(f"{source}: model_type {d.get('model_type')!r} is not 'clip_text_model'; "
                       "expected a CLIPTextModel folder such as the text_encoder/ of "
                       "stabilityai/stable-diffusion-x4-upscaler.")
    return _tower(d, cls.text_defaults(), source, "text")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  text: CLIPTowerConfig = dataclasses.field(default_factory=CLIPTowerConfig.text_defaults)
  vision: CLIPTowerConfig = dataclasses.field(default_factory=CLIPTowerConfig)
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592

  @classmethod
  def from_hf(cls, d: dict[str, Any], source: str = "config") -> "CLIPConfig":
    """From a Hugging Face CLIPModel config.json dict.

    Like transformers' CLIPConfig, the legacy `text_config_dict` /
    `vision_config_dict` blocks (old openai/* uploads) override `text_config` /
    `vision_config`, and missing keys take the CLIPTextConfig/CLIPVisionConfig defaults.
    """
    if d.get("model_type", "clip") != "clip":
      raise ValueError(f"{source}: model_type {d.get('model_type')!r} is not 'clip'; expected a "
                       "CLIPModel folder such as openai/clip-vit-base-patch32.")

    def tower(name: str, defaults: CLIPTowerConfig) -> CLIPTowerConfig:
      merged = {**(d.get(f"{name}_config") or {}), **(d.get(f"{name}_config_dict") or {})}
      return _tower(merged, defaults, source, name)

    return cls(text=tower("text", CLIPTowerConfig.text_defaults()),
               vision=tower("vision", CLIPTowerConfig()),
               projection_dim=int(d.get("projection_dim") or 512),
               logit_scale_init_value=float(d.get("logit_scale_init_value") or 2.6592))


def _tower(merged: dict[str, Any], defaults: CLIPTowerConfig, source: str,
           name: str) -> CLIPTowerConfig:
  """One tower's config from its HF dict; missing keys take transformers' defaults."""
  values = {}
  for f in dataclasses.fields(CLIPTowerConfig):
    v = merged.get(f.name)
    values[f.name] = getattr(defaults, f.name) if v is None else v
  for k in ("image_size", "patch_size"):
    v = values[k]
    if isinstance(v, (list, tuple)):
      if len(set(v)) != 1:
        raise ValueError(f"{source}: non-square {name} {k} {v} is not supported.")
      values[k] = v[0]
  if not isinstance(values["eos_token_id"], int):
    raise ValueError(f"{source}: {name}_config.eos_token_id must be one integer, got "
                     f"{values['eos_token_id']!r}.")
  cfg = CLIPTowerConfig(**values)
  if cfg.hidden_size % cfg.num_attention_heads:
    raise ValueError(f"{source}: {name} hidden_size {cfg.hidden_size} is not divisible by "
                     f"num_attention_heads {cfg.num_attention_heads}.")
  activation(cfg.hidden_act)
  return cfg


class CLIPAttention(nnx.Module):
  def __init__(self, cfg: CLIPTowerConfig, **kw):
    h = cfg.hidden_size
    self.heads = cfg.num_attention_heads
    self.k_proj = Dense(h, h, axes=("embed", "heads"), **kw)
    self.v_proj = Dense(h, h, axes=("embed", "heads"), **kw)
    self.q_proj = Dense(h, h, axes=("embed", "heads"), **kw)
    self.out_proj = Dense(h, h, axes=("heads", "embed"), **kw)

  def __call__(self, x, mask=None):
    b, t, c = x.shape
    split = lambda y: y.reshape(b, t, self.heads, c // self.heads)
    o = attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), mask)
    return self.out_proj(o.reshape(b, t, c))


class CLIPMLP(nnx.Module):
  def __init__(self, cfg: CLIPTowerConfig, **kw):
    self.act = activation(cfg.hidden_act)
    self.fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
    self.fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)

  def __call__(self, x):
    return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  def __init__(self, cfg: CLIPTowerConfig, **kw):
    h, eps = cfg.hidden_size, cfg.layer_norm_eps
    self.self_attn = CLIPAttention(cfg, **kw)
    self.layer_norm1 = LayerNorm(h, eps=eps, **kw)
    self.mlp = CLIPMLP(cfg, **kw)
    self.layer_norm2 = LayerNorm(h, eps=eps, **kw)

  def __call__(self, x, mask=None):
    x = x + self.self_attn(self.layer_norm1(x), mask)
    return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
  def __init__(self, cfg: CLIPTowerConfig, **kw):
    self.layers = nnx.List([CLIPEncoderLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers)])

  def __call__(self, x, mask=None):
    for layer in self.layers:
      x = layer(x, mask)
    return x


class CLIPVisionEmbeddings(nnx.Module):
  def __init__(self, cfg: CLIPTowerConfig, *, rngs=None, dtype=None, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.cfg = cfg
    h, p = cfg.hidden_size, cfg.patch_size
    self.class_embedding = param(rngs, nnx.initializers.normal(1.0), (h,), param_dtype, ("embed",))
    self.patch_embedding = Conv(cfg.num_channels, h, p, stride=p, padding=0, use_bias=False, **kw)
    n = (cfg.image_size // p) ** 2 + 1
    self.position_embedding = Embed(n, h, axes=("length", "embed"), **kw)

  def __call__(self, pixels):
    b, hgt, wid, ch = pixels.shape
    s = self.cfg.image_size
    if (hgt, wid, ch) != (s, s, self.cfg.num_channels):
      # transformers can interpolate the position table for other sizes; the
      # protocol always feeds the trained size, so refuse rather than approximate.
      raise ValueError(f"CLIP vision expects NHWC images of {s}x{s}x{self.cfg.num_channels}, got "
                       f"{hgt}x{wid}x{ch} (shape {pixels.shape}); resize and center-crop first "
                       "(dreambooth_jax.evaluation.preprocess).")
    x = self.patch_embedding(pixels)
    x = x.reshape(b, -1, x.shape[-1])  # row-major grid, as torch's flatten(2).transpose(1, 2)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    return x + self.position_embedding.embedding[...].astype(x.dtype)[None]


class CLIPVisionTransformer(nnx.Module):
  """transformers' CLIPVisionModel body: returns the post-layernormed CLS token [B, hidden]."""

  def __init__(self, cfg: CLIPTowerConfig, **kw):
    self.embeddings = CLIPVisionEmbeddings(cfg, **kw)
    self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
    self.encoder = CLIPEncoder(cfg, **kw)
    self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)

  def __call__(self, pixels):
    h = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
    return self.post_layernorm(h[:, 0])


class CLIPTextEmbeddings(nnx.Module):
  def __init__(self, cfg: CLIPTowerConfig, **kw):
    self.token_embedding = Embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), **kw)
    self.position_embedding = Embed(cfg.max_position_embeddings, cfg.hidden_size,
                                    axes=("length", "embed"), **kw)

  def __call__(self, input_ids):
    t = input_ids.shape[-1]
    table = self.position_embedding.embedding[...]
    if t > table.shape[0]:
      raise ValueError(f"CLIP text: sequence length {t} exceeds max_position_embeddings "
                       f"{table.shape[0]}; truncate the tokens.")
    return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(t))[None]


class CLIPTextTransformer(nnx.Module):
  """transformers' CLIPTextModel body: returns the final-layernormed EOS hidden state [B, hidden]."""

  def __init__(self, cfg: CLIPTowerConfig, **kw):
    self.eos_token_id = cfg.eos_token_id
    self.embeddings = CLIPTextEmbeddings(cfg, **kw)
    self.encoder = CLIPEncoder(cfg, **kw)
    self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)

  def hidden_states(self, input_ids, attention_mask=None):
    """Final-layernormed hidden states [B, T, hidden]: transformers' last_hidden_state."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    t = input_ids.shape[-1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None]  # [1, 1, Tq, Tk]
    if attention_mask is not None:
      mask = mask & (jnp.asarray(attention_mask) != 0)[:, None, None, :]
    return self.final_layer_norm(self.encoder(self.embeddings(input_ids), mask))

  def __call__(self, input_ids, attention_mask=None):
    input_ids = jnp.asarray(input_ids, jnp.int32)
    h = self.hidden_states(input_ids, attention_mask)
    if self.eos_token_id == 2:
      # Checkpoints from before transformers PR #24773 (openai/clip-vit-base-patch32
      # among them) say eos_token_id=2; transformers then pools at the largest
      # token id, which is the end-of-text token in CLIP's vocabulary. Mirror it.
      pos = jnp.argmax(input_ids, axis=-1)
    else:
      # First occurrence of the EOS id (the pad id may equal it).
      pos = jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)
    return jnp.take_along_axis(h, pos[:, None, None], axis=1)[:, 0]


class CLIP(nnx.Module):
  """transformers' CLIPModel: `encode_image`, `encode_text` and `logit_scale`."""

  def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs | None = None, dtype=None,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.cfg = cfg
    self.text_model = CLIPTextTransformer(cfg.text, **kw)
    self.vision_model = CLIPVisionTransformer(cfg.vision, **kw)
    self.visual_projection = Dense(cfg.vision.hidden_size, cfg.projection_dim, axes=("embed", "mlp"),
                                   use_bias=False, **kw)
    self.text_projection = Dense(cfg.text.hidden_size, cfg.projection_dim, axes=("embed", "mlp"),
                                 use_bias=False, **kw)
    self.logit_scale = param(rngs, nnx.initializers.constant(cfg.logit_scale_init_value), (),
                             param_dtype, ())

  def _compute_dtype(self):
    return self.visual_projection.dtype or self.visual_projection.kernel[...].dtype

  def encode_image(self, pixels) -> jax.Array:
    """Normalised NHWC images [B, S, S, 3] -> projected image embeddings [B, projection_dim]."""
    return self.visual_projection(self.vision_model(jnp.asarray(pixels, self._compute_dtype())))

  def encode_text(self, input_ids, attention_mask=None) -> jax.Array:
    """Token ids [B, T] (CLIP tokenizer, with BOS/EOS) -> projected text embeddings [B, projection_dim].

    `attention_mask` [B, T] (1 = token, 0 = padding) is optional: with the
    causal mask, right padding cannot affect the EOS position anyway.
    """
    return self.text_projection(self.text_model(input_ids, attention_mask))

  def __call__(self, pixels, input_ids, attention_mask=None):
    """CLIPModel's logits_per_image [B_img, B_txt]: scaled cosine similarities."""
    img = self.encode_image(pixels).astype(jnp.float32)
    txt = self.encode_text(input_ids, attention_mask).astype(jnp.float32)
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
    return jnp.exp(self.logit_scale[...].astype(jnp.float32)) * img @ txt.T


class CLIPTextModel(nnx.Module):
  """transformers' CLIPTextModel: `model(input_ids) -> last_hidden_state` [B, T, hidden].

  What Stable Diffusion pipelines condition their UNets on (the x4 upscaler:
  OpenCLIP ViT-H's text tower cut to its first 23 of 24 layers, i.e. its
  penultimate layer, width 1024). Params sit under `text_model.`, the names
  transformers 4 saved; the loader maps transformers 5's unprefixed names too.
  """

  def __init__(self, cfg: CLIPTowerConfig, *, rngs=None, dtype=None, param_dtype=jnp.float32):
    self.cfg = cfg
    self.text_model = CLIPTextTransformer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, input_ids, attention_mask=None) -> jax.Array:
    """Token ids [B, T] -> hidden states [B, T, hidden]. Stable Diffusion passes no mask
    (only the causal one applies), so padding tokens get states too and are attended to."""
    return self.text_model.hidden_states(input_ids, attention_mask)

  def pooled(self, input_ids, attention_mask=None) -> jax.Array:
    """The end-of-text hidden state [B, hidden] (transformers' pooler_output)."""
    return self.text_model(input_ids, attention_mask)


def abstract_clip_text_model(cfg: CLIPTowerConfig, **kw) -> CLIPTextModel:
  """The text encoder with ShapeDtypeStruct params: shapes and logical axes, no memory."""
  return nnx.eval_shape(lambda: CLIPTextModel(cfg, rngs=KeyGen(0), **kw))


def abstract_clip_model(cfg: CLIPConfig, **kw) -> CLIP:
  """The model with ShapeDtypeStruct params: shapes and logical axes, no memory."""
  return nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0), **kw))
