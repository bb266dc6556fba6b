"""LoRA fine-tuning: low-rank adapters are the only trainable UNet state.

`config.lora` (off while rank is 0):

  rank           r of every adapter; 0 = full fine-tuning
  alpha          the update is scaled by alpha / rank (0 = rank: scale 1, as diffusers'
                 IF LoRA DreamBooth script)
  dropout        on the adapters' input while training (peft's lora_dropout)
  targets        'attention' (diffusers' IF recipe: to_q, to_k, to_v, to_out.0, add_k_proj,
                 add_v_proj), 'attention+resnets' (also every ResNet's conv1 and conv2),
                 or a regex over module paths such as 'mid_block/attentions/0/to_q'
  base_dtype     '' = config.model.param_dtype; 'bfloat16' stores the frozen UNets in half
                 the memory (they get no updates, so no precision is lost to rounding)
  init_seed      A's initial values (B starts at zero)
  merged_export  also export full diffusers UNet folders with the adapters merged in
  text_encoder   also adapt T5's attention (q, k, v, o of every block, as peft names them);
                 the prompts are then encoded inside the step, so T5 stays on the devices
                 while training instead of only while encoding

A tuned stage becomes a `LoRAStage`: the same UNet with `layers.LoRA` modules on
the target layers. Its `params` are the adapters only (what the train state,
optimiser and checkpoints hold: megabytes); the pretrained weights stay in
the frozen `Stage` and enter the step as its `frozen` argument. The two meet
in an `Adapted` pytree, which `Stage.apply` runs like plain params, so the
loss, the samplers and the cascade need no LoRA code of their own.

Export (`export_stage`): `<export>/<stage>/pytorch_lora_weights.safetensors` in
the peft format that diffusers' `IFPipeline.load_lora_weights(dir)` and
`IFSuperResolutionPipeline.load_lora_weights(dir)` read ("unet.<module>.lora_A
.weight" [r, in], "lora_B.weight" [out, r]); alpha / rank is folded into B, so
the file loads at diffusers' default scale of 1 with the same outputs. T5's
adapters (`LoRAText`) go into the first tuned stage's file as "text_encoder.<module>
.lora_linear_layer.down/up.weight" (see `export_stage` for why that spelling), where
`IFPipeline.load_lora_weights` puts them into its T5.
"""

from __future__ import annotations

import dataclasses
import json
import re
import zlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreambooth_jax import config_lib, utils
from dreambooth_jax.models.layers import Conv, Dense, LoRA
from dreambooth_jax.weights.safetensors_io import save_file
from dreambooth_jax.weights.t5 import save_t5_encoder

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' load_lora_weights looks for
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the adapters' LoraConfig
_ATTENTION = r"to_q|to_k|to_v|to_out/0|add_k_proj|add_v_proj"
TARGETS = {
    "attention": rf"(^|/)({_ATTENTION})$",
    "attention+resnets": rf"(^|/)({_ATTENTION}|conv1|conv2)$",
}
TEXT_TARGETS = r"(^|/)SelfAttention/(q|k|v|o)$"  # T5's attention projections
TEXT = "text_encoder"  # the key of T5's adapters in the train state's params


@dataclasses.dataclass(frozen=True)
class LoRASettings:
  rank: int
  alpha: float
  dropout: float
  targets: str       # the regex (a preset name resolved)
  base_dtype: str
  init_seed: int
  merged_export: bool
  text_encoder: bool = False

  @property
  def scale(self) -> float:
    return (self.alpha or self.rank) / self.rank


def enabled(config) -> bool:
  lora = config.get("lora")
  return bool(lora) and int(lora.get("rank", 0)) > 0


def settings(config) -> LoRASettings | None:
  """The validated `config.lora`, or None when LoRA is off; ConfigError names the key."""
  if not enabled(config):
    if config.get("lora") and int(config.lora.get("rank", 0)) < 0:
      raise config_lib.ConfigError(f"config.lora.rank={config.lora.rank}: use 0 (off) or a rank >= 1")
    return None
  c = config.lora
  if not 0.0 <= float(c.dropout) < 1.0:
    raise config_lib.ConfigError(f"config.lora.dropout={c.dropout}: use a rate in [0, 1)")
  if float(c.alpha) < 0:
    raise config_lib.ConfigError(f"config.lora.alpha={c.alpha}: use 0 (= rank) or a positive scale")
  pattern = TARGETS.get(c.targets, c.targets)
  try:
    re.compile(pattern)
  except re.error as e:
    raise config_lib.ConfigError(f"config.lora.targets={c.targets!r} is neither a preset "
                                 f"({', '.join(TARGETS)}) nor a valid regex: {e}") from e
  if c.base_dtype not in ("", "float32", "bfloat16", "float16"):
    raise config_lib.ConfigError(f"config.lora.base_dtype={c.base_dtype!r}: use '', float32 or "
                                 "bfloat16")
  # (.get: workdirs written before the text encoder option have no such key)
  return LoRASettings(int(c.rank), float(c.alpha), float(c.dropout), pattern, c.base_dtype,
                      int(c.init_seed), bool(c.merged_export), bool(c.get("text_encoder", False)))


def module_path(path) -> str:
  return "/".join(str(k) for k in path)


def _key_path(path) -> str:
  """A pytree key path of an nnx.State leaf as 'down_blocks/0/resnets/0/conv1/kernel'."""
  keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
  return module_path(keys[:-1] if keys and keys[-1] == "value" else keys)


def inject(module: nnx.Module, s: LoRASettings, subjects: int = 0, targets: str | None = None
           ) -> list[str]:
  """Puts an abstract `layers.LoRA` on every Dense/Conv of `module` whose path matches
  `targets` (default `s.targets`), in place; returns the adapted paths
  ('down_blocks/1/attentions/0/to_q'). `subjects` > 0 gives every adapter a leading
  subject axis (one adapter per subject, logical axis "subjects"), which
  `subjects.joint_loss` vmaps over."""
  regex = re.compile(s.targets if targets is None else targets)
  found = [(module_path(p), m) for p, m in nnx.iter_graph(module)
           if isinstance(m, (Dense, Conv)) and regex.search(module_path(p))]
  for _, layer in found:
    kernel = layer.kernel
    shape, (ax_in, ax_out) = kernel.get_value().shape, kernel.get_metadata()["axes"][-2:]
    f32 = jnp.float32  # adapters learn in float32 whatever the frozen weights are stored in
    if isinstance(layer, Conv):
      kh, kw, cin, cout = shape
      a = jax.ShapeDtypeStruct((kh, kw, cin, s.rank), f32)
      a_axes, conv = (None, None, ax_in, None), (layer.stride, layer.padding)
    else:
      cin, cout = shape
      a, a_axes, conv = jax.ShapeDtypeStruct((cin, s.rank), f32), (ax_in, None), None
    b, b_axes = jax.ShapeDtypeStruct((s.rank, cout), f32), (None, ax_out)
    if subjects:
      a = jax.ShapeDtypeStruct((subjects,) + a.shape, f32)
      b = jax.ShapeDtypeStruct((subjects,) + b.shape, f32)
      a_axes, b_axes = ("subjects",) + a_axes, ("subjects",) + b_axes
    layer.lora = LoRA(a, b, a_axes, b_axes, scale=s.scale, dropout=s.dropout, conv=conv)
  return [p for p, _ in found]


def initial_adapters(abstract, seed: int, subjects: int = 0):
  """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (peft's kaiming-uniform with a=sqrt(5)), B = 0;
  drawn on the host per path, so every process and every resume gets the same. With a
  subject axis every subject starts from the same draw: the start a run of that subject
  alone would have."""
  def one(path, x):
    name = _key_path(path)
    shape = x.shape[1:] if subjects else x.shape
    if name.endswith("/b"):
      value = np.zeros(shape, x.dtype)
    else:
      rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
      bound = 1.0 / np.sqrt(int(np.prod(shape[:-1])))
      value = rng.uniform(-bound, bound, shape).astype(x.dtype)
    return np.broadcast_to(value, x.shape).copy() if subjects else value
  return jax.tree_util.tree_map_with_path(one, abstract)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Adapted:
  """Frozen weights + adapters (+ a dropout key while training): params `Stage.apply` runs."""
  base: Any
  adapters: Any
  rng: Any = None
  graphdef: Any = dataclasses.field(default=None, metadata=dict(static=True))

  def module(self) -> nnx.Module:
    # Fresh Variables at the current trace level: the frozen base arrives as an argument of
    # an outer trace (the jitted step, outside its grad), and lifted transforms (nnx.remat)
    # refuse to update Variables of another trace.
    base, adapters = jax.tree.map(lambda x: x, (self.base, self.adapters))
    model = nnx.merge(self.graphdef, base, adapters)
    if self.rng is not None:
      loras = [m for _, m in nnx.iter_graph(model) if isinstance(m, LoRA)]
      for i, m in enumerate(loras):  # plain attributes of this traced, throwaway module
        object.__setattr__(m, "dropout_key", jax.random.fold_in(self.rng, i))
    return model


class _Adapters:
  """Adapters on a frozen module: the injected graph, the adapted paths, the adapters'
  abstract shapes, their initial values and `bind`. `abstract` is the frozen module's
  params (ShapeDtypeStructs suffice: only the structure is read)."""

  def __init__(self, graphdef, abstract, s: LoRASettings, subjects: int, targets: str):
    self.lora, self.subjects, self.pattern = s, subjects, targets
    module = nnx.merge(graphdef, abstract)
    self.targets = inject(module, s, subjects, targets)
    self.graphdef, adapters, _ = nnx.split(module, nnx.LoRAParam, ...)
    self.abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), adapters)
    self._initial = None

  @property
  def params(self):
    """The adapters a run starts from."""
    if self._initial is None:
      self._initial = jax.tree.map(jnp.asarray, initial_adapters(
          self.abstract_params, self.lora.init_seed, self.subjects))
    return self._initial

  def release(self) -> None:
    self._initial = None  # the frozen weights stay: the step needs them

  def bind(self, base, adapters, rng=None) -> Adapted:
    return Adapted(base, adapters, rng, self.graphdef)

  def num_adapter_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_params))


class LoRAStage(_Adapters):
  """A cascade stage trained through adapters; quacks like `cascade.Stage` for the train
  state and the step (`params` are the adapters, `release` keeps the frozen weights)."""

  def __init__(self, stage, s: LoRASettings, subjects: int = 0):
    self.stage = stage
    super().__init__(stage.graphdef, stage.abstract_params, s, subjects, s.targets)
    if not self.targets:
      raise config_lib.ConfigError(
          f"config.lora.targets={s.targets!r} matches no Dense or Conv of stage {stage.name!r}; "
          f"use a preset ({', '.join(TARGETS)}) or a regex over paths such as "
          "'mid_block/attentions/0/to_q'")

  def __getattr__(self, name):  # settings, schedules, is_sr, ... are the frozen stage's
    if name == "stage":
      raise AttributeError(name)
    return getattr(self.stage, name)

  @property
  def base_params(self):
    """The frozen pretrained weights (loaded on first use, kept: every step reads them)."""
    return self.stage.params

  def loss(self, params, *args, **kw):
    return self.stage.loss(params, *args, **kw)


class LoRAText(_Adapters):
  """T5's attention projections trained through adapters (`config.lora.text_encoder`).

  Built from the encoder module (concrete or `nnx.eval_shape`d: only its structure is
  read); `bind(nnx.state(t5), adapters).module()` is the adapted encoder, which
  `embeddings.encode_with_learned` runs like T5 itself."""

  name = TEXT

  def __init__(self, t5: nnx.Module, s: LoRASettings):
    graphdef, state = nnx.split(t5)
    self.t5_graphdef = graphdef  # the plain encoder's, for the merged export
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    super().__init__(graphdef, abstract, s, 0, TEXT_TARGETS)
    if not self.targets:
      raise config_lib.ConfigError("config.lora.text_encoder=True but the text encoder has no "
                                   "SelfAttention q/k/v/o layers to adapt")


def adapts_text(config) -> bool:
  """Whether `config.lora` also adapts T5 (then T5 stays loaded with the adapters)."""
  s = settings(config)
  return s is not None and s.text_encoder


def text_adapters(config, t5: nnx.Module | None) -> LoRAText | None:
  """T5's adapters when `config.lora.text_encoder` is on (and T5 is given), else None."""
  return LoRAText(t5, settings(config)) if adapts_text(config) and t5 is not None else None


def wrap(config, stages: Mapping[str, Any]) -> dict[str, Any]:
  """{name: LoRAStage} for a LoRA config, else `stages` unchanged."""
  s = settings(config)
  if s is None:
    return dict(stages)
  return {n: LoRAStage(st, s) for n, st in stages.items()}


def bind_all(stages: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
  """Sampling params: learned adapters bound to their stage's frozen weights."""
  return {n: (stages[n].bind(stages[n].base_params, p) if isinstance(stages.get(n), LoRAStage)
              else p) for n, p in params.items()}


# == Merging and export ==========================================================


def _flat(state) -> dict[str, Any]:
  return {module_path(p): v.get_value() if isinstance(v, nnx.Variable) else v
          for p, v in nnx.to_flat_state(state)}


def deltas(stage: _Adapters, adapters) -> dict[str, np.ndarray]:
  """{kernel path: scale * A B} in the kernel's layout ([in, out] or [kh, kw, in, out])."""
  flat = {k: np.asarray(v, np.float32) for k, v in _flat(adapters).items()}
  out = {}
  for target in stage.targets:
    a, b = flat[f"{target}/lora/a"], flat[f"{target}/lora/b"]
    out[f"{target}/kernel"] = stage.lora.scale * np.tensordot(a, b, axes=([a.ndim - 1], [0]))
  return out


def merged_params(stage: _Adapters, base, adapters):
  """The frozen weights with the adapters merged in: plain params of the frozen stage's
  graphdef (host numpy, the base's dtype); for the merged export."""
  d = deltas(stage, adapters)
  def one(path, v):
    name = _key_path(path)
    x = np.asarray(v)
    return (x.astype(np.float32) + d[name]).astype(x.dtype) if name in d else x
  return jax.tree_util.tree_map_with_path(one, jax.device_get(base))


def diffusers_lora_tensors(stage: _Adapters, adapters, prefix: str = "unet", *,
                           subject: int | None = None) -> dict[str, np.ndarray]:
  """The adapters as diffusers/peft tensors: '<prefix>.<module>.lora_A.weight' [r, in] (Conv:
  [r, in, kh, kw]) and 'lora_B.weight' [out, r] (Conv: [out, r, 1, 1]), scale folded into B.
  Per-subject adapters export one `subject` at a time."""
  flat = {k: np.asarray(v, np.float32) for k, v in _flat(adapters).items()}
  if stage.subjects:
    if subject is None:
      raise ValueError(f"stage {stage.name!r} has one adapter per subject: pass subject=")
    flat = {k: v[subject] for k, v in flat.items()}
  out = {}
  for target in stage.targets:
    a, b = flat[f"{target}/lora/a"], stage.lora.scale * flat[f"{target}/lora/b"]
    name = f"{prefix}.{target.replace('/', '.')}"
    if a.ndim == 4:  # [kh, kw, in, r] -> [r, in, kh, kw]; B [r, out] -> [out, r, 1, 1]
      out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.transpose(3, 2, 0, 1))
      out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.T[:, :, None, None])
    else:
      out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
      out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
  return out


def export_stage(stage: LoRAStage, adapters, folder, dtype=None, *, subject: int | None = None,
                 text: tuple[LoRAText, Any] | None = None) -> str:
  """Writes `folder/pytorch_lora_weights.safetensors` for `load_lora_weights(folder)`;
  `text` (LoRAText, its adapters) adds T5's under "text_encoder.", in the same file."""
  folder = utils.as_path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  tensors = diffusers_lora_tensors(stage, adapters, subject=subject)
  config = peft_config(stage, "unet")
  if text is not None:
    # diffusers (0.42) converts a text encoder's keys through its CLIP-only peft name table,
    # which knows no T5 names: its own "lora_linear_layer.down/up" spelling is what passes
    # through to peft unchanged. The ranks come from the metadata (peft's LoraConfig).
    t5 = diffusers_lora_tensors(text[0], text[1], prefix=TEXT)
    tensors.update({k.replace(".lora_A.", ".lora_linear_layer.down.")
                    .replace(".lora_B.", ".lora_linear_layer.up."): v for k, v in t5.items()})
    config.update(peft_config(text[0], TEXT))
  if dtype is not None:
    tensors = {k: v.astype(dtype) for k, v in tensors.items()}
  path = folder / WEIGHTS_NAME
  save_file(tensors, path, metadata={"format": "pt", METADATA_KEY: json.dumps(config, sort_keys=True)})
  return str(path)


def peft_config(stage: _Adapters, prefix: str) -> dict:
  """peft's LoraConfig of `stage`'s adapters, keys prefixed as diffusers' `save_lora_weights`
  stores them in the file's metadata (`load_lora_weights` builds the adapters from it).
  alpha = rank: the scale is already folded into lora_B."""
  config = dict(r=stage.lora.rank, lora_alpha=stage.lora.rank, lora_dropout=0.0, rank_pattern={},
                alpha_pattern={}, use_dora=False, lora_bias=False,
                target_modules=sorted(t.replace("/", ".") for t in stage.targets))
  return {f"{prefix}.{k}": v for k, v in config.items()}


def export_all(export_dir, stages: Mapping[str, LoRAStage], adapters: Mapping[str, Any], *,
               text: LoRAText | None = None, text_base=None) -> dict:
  """Every LoRA stage's peft file in `export_dir/<stage>/` (and, with merged_export, a full
  UNet folder in `<stage>_merged/`); returns what `export/dreambooth.json` records of them.
  T5's adapters (`text`, on `text_base`) join the first stage's file, which IFPipeline
  (the stage that owns T5) loads; merged, they are a T5 folder `text_encoder_merged/`."""
  from dreambooth_jax import checkpoint  # here, not at the top: cascade imports lora, and
  # orbax (checkpoint's import) should not load with every model
  export_dir = utils.as_path(export_dir)
  merged, info = {}, {}
  for i, (n, s) in enumerate(stages.items()):
    with_text = (text, adapters[TEXT]) if text is not None and i == 0 else None
    export_stage(s, adapters[n], export_dir / n, text=with_text)
    if s.lora.merged_export:  # full UNet folders, for users without peft
      merged[n] = f"{n}_merged"
      checkpoint.export_stage(s.stage.graphdef, merged_params(s, s.base_params, adapters[n]),
                              export_dir / merged[n])
  if text is not None:
    info["text_encoder_lora"] = dict(describe(text), folder=next(iter(stages)))
    if text.lora.merged_export:
      t5 = nnx.merge(text.t5_graphdef, merged_params(text, text_base, adapters[TEXT]))
      save_t5_encoder(t5, export_dir / "text_encoder_merged")
      merged[TEXT] = "text_encoder_merged"
  return dict(info, lora={n: describe(s) for n, s in stages.items()}, folders={n: n for n in stages},
              merged_folders=merged)


def describe(stage: _Adapters) -> dict:
  """JSON-able: what the adapters of a stage are (for export/dreambooth.json)."""
  s = stage.lora
  return dict(rank=s.rank, alpha=s.alpha or s.rank, scale=s.scale, dropout=s.dropout,
              targets=stage.pattern, modules=len(stage.targets), params=stage.num_adapter_params(),
              file=WEIGHTS_NAME, scale_folded_into_lora_B=True)
