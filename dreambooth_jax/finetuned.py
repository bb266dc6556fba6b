"""A training workdir's fine-tuned cascade, ready to sample: `FineTuned.load(workdir)`.

The handle the sample and evaluation CLIs and the notebooks share. It rebuilds
the run's models from its saved config (weights load on first use, each
tensor into its sharding on this machine's mesh), restores what the
checkpoint learned (orbax reshards: a TPU-trained workdir samples on a laptop),
and embeds prompts through the workdir's prompt cache, so T5 is loaded only for
prompts it has not seen. Tuned stages never load their pretrained weights: the
checkpoint's params take their place.

`stage_3=` adds DeepFloyd's public stage III (the SD x4 upscaler download) to a
workdir trained without one, so it samples to 1024 px (`with_stage_3`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from dreambooth_jax import checkpoint as checkpoint_lib
from dreambooth_jax import config_lib, embeddings, methods, pipeline, prompts, sharding
from dreambooth_jax import state as state_lib
from dreambooth_jax import identifiers, utils
from dreambooth_jax import lora as lora_lib
from dreambooth_jax import weights
from dreambooth_jax.weights import sd_upscaler


def load_config(workdir) -> Any:
  """The config a training workdir was run with (its config.json), locked."""
  path = utils.as_path(workdir) / "config.json"
  if not path.exists():
    raise state_lib.TrainError(f"{str(workdir)!r} has no config.json: not a dreambooth_jax.train "
                               "workdir")
  return config_lib.load(path)


def check_stage_3(folder: str) -> str:
  """The stabilityai/stable-diffusion-x4-upscaler download `folder` names (its root; its
  unet/ is accepted too), checked from configs and safetensors headers only
  (`weights.check_sd_upscaler`: about a second at full size). Anything else is a
  WeightsError of one paragraph that says what the folder holds."""
  root = sd_upscaler.download_root(folder)  # a bare unet/ with no pipeline around it raises
  if root is None:
    # Not the upscaler: the preflight names what it is (an IF stage, T5, nothing readable)...
    weights.check_pretrained({"stage_3": folder})
    # ...or it is an IF-style pixel SR UNet, which this option does not add.
    raise weights.WeightsError(
        f"--stage_3={folder}: holds an IF-style pixel super-resolution UNet, not the x4 "
        f"upscaler; --stage_3 adds DeepFloyd's public stage III, the whole "
        f"{sd_upscaler.REPO} download (the folder with model_index.json, unet/, vae/, "
        "text_encoder/, tokenizer/ and the schedulers).")
  sd_upscaler.check_sd_upscaler(root)
  return root


def with_stage_3(config, folder: str, workdir=None):
  """A workdir's `config` with the x4 upscaler download `folder` (checked first,
  `check_stage_3`) as its stage III, `config.pretrained.stage_3`: the tuned stages
  are untouched and the upscaler samples their 256 px images to 1024 px, frozen."""
  who = workdir if workdir is not None else "this config"
  if config.model.kind != "pretrained":
    raise config_lib.ConfigError(
        f"--stage_3: {who} uses the tiny random cascade (config.model.kind="
        f"{config.model.kind!r}), which has no IF stages for the x4 upscaler download to follow; "
        "a tiny run gets a tiny random stage III from configs/imagen_dog.py:stage3")
  config.pretrained.stage_3 = check_stage_3(folder)  # set in place: a workdir's fresh copy
  return config


def restore_params(config, models: pipeline.Models, workdir, step: int | None = None):
  """What a workdir checkpoint learned: ({stage: State} and/or {"tokens": rows}, step),
  restored onto `models.mesh` whatever mesh trained it. LoRA adapters come bound to
  their frozen weights (`lora.Adapted`), T5's under "text_encoder" (T5 is loaded)."""
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise state_lib.TrainError(f"{str(workdir)!r} has no checkpoint yet; train first")
  stages = {n: models.cascade.by_name[n] for n in models.tuned}
  phase = state_lib.checkpoint_phase(config, ckpt, step)
  t5 = text = None
  if phase.train_unets:
    stages = lora_lib.wrap(config, stages)
    t5 = models.load_t5() if lora_lib.adapts_text(config) else None
    text = lora_lib.text_adapters(config, t5)
  ps = state_lib.setup(config, stages, phase, models.mesh, models.rules,
                       num_tokens=len(models.tokenizer.learned_tokens), token_width=models.t5_width,
                       text=text)
  state = state_lib.restore_state(ckpt, step, ps.abstract, ps.shardings)
  # LoRA adapters are bound to their stage's frozen weights: params the cascade samples with.
  params = {**state.get("fixed", {}), **lora_lib.bind_all(stages, state["params"])}
  if text is not None:
    params[lora_lib.TEXT] = text.bind(nnx.state(t5), params[lora_lib.TEXT])
  return params, step


@dataclasses.dataclass
class FineTuned:
  """A training workdir's fine-tuned cascade, ready to sample."""
  workdir: Any
  config: Any
  models: pipeline.Models
  identifier: identifiers.Identifier
  params: Mapping[str, Any]   # tuned stages' params at `step` (LoRA: `lora.Adapted`)
  step: int
  learned_rows: np.ndarray | None = None  # [K, d_model] rows of learned tokens, if any
  text_encoder: Any = None  # T5 with its LoRA adapters (`lora.Adapted`), if they learned

  @classmethod
  def load(cls, workdir, step: int | None = None, mesh=None, *,
           stage_3: str | None = None) -> "FineTuned":
    """`mesh` defaults to every local device on fsdp; `stage_3` adds the x4 upscaler
    download as stage III (`with_stage_3`, checked before any model is built)."""
    config = load_config(workdir)
    if stage_3:
      config = with_stage_3(config, stage_3, workdir)
    models = pipeline.build(config, mesh if mesh is not None else sharding.make_mesh())
    identifier = prompts.read_identifier(workdir)
    params, step = restore_params(config, models, workdir, step)
    rows = params.pop(methods.TOKENS, None)
    text = params.pop(lora_lib.TEXT, None)
    return cls(utils.as_path(workdir), config, models, identifier, params, step,
               None if rows is None else np.asarray(jax.device_get(rows)), text)

  @property
  def method(self) -> str:
    return self.config.method

  @property
  def class_noun(self) -> str:
    return self.config.subject.class_noun

  def fill(self, prompt: str) -> str:
    """'[V]' -> this run's identifier (see `prompts.fill`)."""
    return prompts.fill(self.config, self.identifier, prompt)

  def embed(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """{"text", "mask"} [len(texts), L, D] through the workdir's prompt cache; learned
    tokens are embedded with this checkpoint's rows."""
    texts = [self.fill(p) for p in texts]
    unique = list(dict.fromkeys(texts))
    learned = [p for p in unique if prompts.has_learned(self.models.tokenizer, p)]
    plain = [p for p in unique if p not in learned]
    cache = self.workdir / "prompt_embeddings"
    table = {}
    if self.text_encoder is not None:  # every prompt through the adapted T5, "" included
      table.update(self.models.encode(unique, cache, rows=self.learned_rows,
                                      t5=self.text_encoder.module(), salt=self._adapters_digest))
      return embeddings.stack_embeddings(table, texts)
    if plain:
      table.update(self.models.encode(plain, cache))
    if learned:
      table.update(self.models.encode(learned, cache, rows=self.learned_rows))
    return embeddings.stack_embeddings(table, texts)

  @functools.cached_property
  def _adapters_digest(self) -> str:
    """Names T5's adapters in the prompt cache's key: entries of other steps never match."""
    h = hashlib.sha256()
    for x in jax.tree.leaves(jax.device_get(self.text_encoder.adapters)):
      h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()[:32]

  def generate(self, prompt: str, num: int, rng: jax.Array, *, upto: str | None = None,
               mesh=None) -> dict[str, np.ndarray]:
    """{stage: uint8 [num, H, W, 3]} for one prompt ('[V]' allowed); deterministic per rng.
    A stage with its own text encoder (the x4 upscaler) reads the filled prompt as typed."""
    return self.models.cascade.sample(self.embed([prompt]), rng, uncond_embeddings=self.embed([""]),
                                      params=self.params, batch_size=num, upto=upto, mesh=mesh,
                                      prompts=self.fill(prompt))


def sample(workdir, texts: list[str], *, num: int = 4, seed: int = 0, step: int | None = None,
           upto: str | None = None, stage_3: str | None = None
           ) -> list[tuple[str, dict[str, np.ndarray]]]:
  """[(prompt, {stage: uint8 [num, H, W, 3]})] from a workdir's fine-tuned cascade
  (`stage_3`: the x4 upscaler download, for a workdir trained without it)."""
  tuned = FineTuned.load(workdir, step, stage_3=stage_3)
  print(f"sampling {workdir} at step {tuned.step} (identifier {tuned.identifier.text!r})", flush=True)
  tuned.embed(list(texts) + [""])  # one T5 load for every prompt not in the cache
  return [(tuned.fill(p), tuned.generate(p, num, jax.random.key(seed + i), upto=upto))
          for i, p in enumerate(texts)]
