"""End to end against diffusers' own IF pipelines, on tiny IF repositories in the Hub layout.

The repositories (conftest's `if_repos`) are what a user downloads: fp16 variant
only, sharded, written by diffusers and transformers. Our cascade is built from
them by the same config path as a real run (`pipeline.build`), and diffusers'
`IFPipeline` then `IFSuperResolutionPipeline` run from the same folders with the
same starting noise and the same per-step noise (`Cascade.noise` hands over what
our sampler draws). Nothing of our own stands in for the reference: the prompt
goes through IF's caption cleaning, T5 with its mask, UNets without one, the
schedulers, guidance, thresholding and the low-res noising on both sides.
"""

import diffusers.pipelines.deepfloyd_if.pipeline_if as if_module
import diffusers.pipelines.deepfloyd_if.pipeline_if_superresolution as if_sr_module
import diffusers.schedulers.scheduling_ddpm as ddpm_module
import jax
import numpy as np
import pytest
import torch
from diffusers import IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel

from dreambooth_jax import embeddings, pipeline
from train_helpers import if_config

# Capitals, punctuation runs, a URL and HTML: IFPipeline's clean_caption rewrites all of it.
PROMPT = "A Photo of a DOG on the Beach!!! https://example.com/dog.png <b>Sunny</b> -- #42"
STEPS = {"base": 5, "sr256": 4}
TOL = 2e-5


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(x):
  return x.detach().numpy().transpose(0, 2, 3, 1)


def _feed(monkeypatch, module, draws):
  """Makes `module.randn_tensor` return `draws` in order (each NHWC, given to torch as NCHW)."""
  queue = [nchw(d) for d in draws]
  monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: queue.pop(0))
  return queue


def _diffusers_cascade(monkeypatch, stage_1: str, stage_2: str, prompt: str, noise, *,
                       unet_1=None, text_encoder=None, lora_dirs=None):
  """IFPipeline then IFSuperResolutionPipeline, as diffusers' IF docs run them (stage II
  without its own text encoder, given stage I's prompt embeddings), on our noise;
  `lora_dirs` {"base", "sr256"} folders go to each pipeline's `load_lora_weights`."""
  kw = dict(variant="fp16", dtype=torch.float32)
  extra = {} if unet_1 is None else {"unet": unet_1}
  if text_encoder is not None:
    extra["text_encoder"] = text_encoder
  pipe_1 = IFPipeline.from_pretrained(stage_1, **kw, **extra)
  pipe_2 = IFSuperResolutionPipeline.from_pretrained(stage_2, text_encoder=None, **kw)
  for name, pipe in (("base", pipe_1), ("sr256", pipe_2)):
    pipe.set_progress_bar_config(disable=True)
    if lora_dirs and name in lora_dirs:
      pipe.load_lora_weights(lora_dirs[name])
  _feed(monkeypatch, if_module, [noise["base"]["x_init"]])
  steps_1 = _feed(monkeypatch, ddpm_module, list(noise["base"]["steps"]))
  # The prompt as typed: IFPipeline cleans it itself (its __call__ defaults to clean_caption=True).
  base = pipe_1(prompt, guidance_scale=7.0, num_inference_steps=STEPS["base"],
                output_type="pt").images
  assert len(steps_1) == 1  # every step but the last (t=0) drew its noise from us

  # Stage II has no text encoder of its own; the docs hand it stage I's embeddings.
  # (encode_prompt's own default is clean_caption=False, unlike __call__'s.)
  cond, uncond = pipe_1.encode_prompt(prompt, clean_caption=True)
  _feed(monkeypatch, if_sr_module, [noise["sr256"]["x_init"], noise["sr256"]["lowres"]])
  _feed(monkeypatch, ddpm_module, list(noise["sr256"]["steps"]))
  sr = pipe_2(image=base, prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=4.0,
              noise_level=250, num_inference_steps=STEPS["sr256"], output_type="pt").images
  return {"base": nhwc(base.clamp(-1, 1)), "sr256": nhwc(sr.clamp(-1, 1))}


def _ours(models, prompt, rng, params=None, t5=None):
  t5 = t5 if t5 is not None else models.load_t5()
  e, m = embeddings.encode_prompts(t5, models.tokenizer, [prompt, ""])
  cond, uncond = {"text": e[:1], "mask": m[:1]}, {"text": e[1:], "mask": m[1:]}
  out = models.cascade.sample(cond, rng, uncond_embeddings=uncond, params=params, batch_size=1,
                              num_steps=STEPS, as_uint8=False)
  return {k: np.asarray(v) for k, v in out.items()}


def _compare(ours, theirs, what):
  for stage in ("base", "sr256"):
    err = float(np.abs(ours[stage] - theirs[stage]).max())
    print(f"\n{what} {stage}: ours vs diffusers max abs err {err:.2e} "
          f"(image std {ours[stage].std():.3f})")
    assert ours[stage].std() > 0.05  # a real image, not a constant both sides agree on
    assert err < TOL, (stage, err)


@pytest.mark.xdist_group("if_cascade")  # test_upscaler's three-stage test reuses its programs
def test_cascade_matches_if_pipelines(if_repos, monkeypatch):
  config = if_config(if_repos, **{"cascade.base.num_steps": STEPS["base"],
                                  "cascade.sr256.num_steps": STEPS["sr256"]})
  models = pipeline.build(config)
  rng = jax.random.key(3)
  ours = _ours(models, PROMPT, rng)
  theirs = _diffusers_cascade(monkeypatch, if_repos["stage_1"], if_repos["stage_2"], PROMPT,
                              models.cascade.noise(rng, 1, num_steps=STEPS))
  _compare(ours, theirs, "IF pipelines")


def test_unet_text_mask_is_off_as_in_if(if_repos):
  """IF never masks the UNets' text attention; masking changes the images (so the default
  is a real choice, and the option does something)."""
  rng = jax.random.key(4)
  off = pipeline.build(if_config(if_repos))
  on = pipeline.build(if_config(if_repos, **{"model.unet_text_mask": True}))
  assert not off.cascade.stages[0].settings.text_mask and on.cascade.stages[0].settings.text_mask
  t5 = off.load_t5()
  a, b = _ours(off, PROMPT, rng, t5=t5), _ours(on, PROMPT, rng, t5=t5)
  diff = float(np.abs(a["base"] - b["base"]).max())
  print(f"\nmasked vs unmasked UNet text attention, base stage: max diff {diff:.3f}")
  assert diff > 1e-3
  assert off.weights_fingerprint != on.weights_fingerprint  # class priors are redone


@pytest.mark.xdist_group("if_finetune")
def test_exported_stage_runs_the_same_in_ifpipeline(if_repos, tmp_path, monkeypatch):
  """Fine-tune the base stage on the IF repositories (the real `if` path: preflight,
  loading, caption cleaning, priors, the sharded step, export), load export/base into
  IFPipeline and sample both with the same noise."""
  from dreambooth_jax import finetuned
  from dreambooth_jax import train as train_lib
  workdir = str(tmp_path / "run")
  config = if_config(if_repos, stages="base", **{"cascade.base.num_steps": STEPS["base"],
                                                 "cascade.sr256.num_steps": STEPS["sr256"],
                                                 "train.lr": 1e-3, "subject.min_size": 64})
  train_lib.run(config, workdir)
  tuned = finetuned.FineTuned.load(workdir)
  prompt = tuned.fill("A [V] DOG on the beach!")
  rng = jax.random.key(5)
  ours = _ours(tuned.models, prompt, rng, params=tuned.params)
  pretrained = _ours(tuned.models, prompt, rng)  # the stage's own (pretrained) params
  moved = float(np.abs(ours["base"] - pretrained["base"]).max())
  print(f"\nfine-tuned vs pretrained base samples: max diff {moved:.3f}")
  assert moved > 1e-3  # training changed the model
  unet = UNet2DConditionModel.from_pretrained(f"{workdir}/export/base", dtype=torch.float32)
  theirs = _diffusers_cascade(monkeypatch, if_repos["stage_1"], if_repos["stage_2"], prompt,
                              tuned.models.cascade.noise(rng, 1, num_steps=STEPS), unet_1=unet)
  _compare(ours, theirs, "fine-tuned, exported")


@pytest.mark.xdist_group("if_lora")
def test_exported_lora_loads_into_if_pipelines(if_repos, tmp_path, monkeypatch):
  """LoRA on both stages (attention and ResNet convs) and on T5's attention, on the IF
  repositories; diffusers' own `load_lora_weights` puts our exported adapters into
  IFPipeline (UNet and T5) and IFSuperResolutionPipeline built from the same base, and
  the cascade matches ours with the same noise. The merged export, as plain UNet and T5
  folders, matches too."""
  from transformers import T5EncoderModel
  from dreambooth_jax import finetuned
  from dreambooth_jax import train as train_lib
  workdir = str(tmp_path / "run")
  config = if_config(if_repos, "if,runlocal,lora=4", **{
      "cascade.base.num_steps": STEPS["base"], "cascade.sr256.num_steps": STEPS["sr256"],
      "train.lr": 3e-2, "subject.min_size": 64, "lora.targets": "attention+resnets",
      "lora.alpha": 8.0, "lora.merged_export": True, "lora.base_dtype": "float32",
      "lora.text_encoder": True})
  train_lib.run(config, workdir)
  tuned = finetuned.FineTuned.load(workdir)
  prompt = tuned.fill("A [V] DOG on the beach!")
  rng = jax.random.key(5)
  t5 = tuned.text_encoder.module()  # T5 with its adapters
  ours = _ours(tuned.models, prompt, rng, params=tuned.params, t5=t5)
  pretrained = _ours(tuned.models, prompt, rng)
  for stage in ("base", "sr256"):
    moved = float(np.abs(ours[stage] - pretrained[stage]).max())
    print(f"\nLoRA-tuned vs pretrained {stage} samples: max diff {moved:.3f}")
    assert moved > 1e-3  # the adapters changed both models
  e_tuned = embeddings.encode_prompts(t5, tuned.models.tokenizer, [prompt])[0]
  e_frozen = embeddings.encode_prompts(tuned.models.load_t5(), tuned.models.tokenizer, [prompt])[0]
  print(f"T5 with adapters vs frozen: max embedding diff {np.abs(e_tuned - e_frozen).max():.3e}")
  assert np.abs(e_tuned - e_frozen).max() > 1e-4  # T5's adapters learned something
  noise = tuned.models.cascade.noise(rng, 1, num_steps=STEPS)
  export = f"{workdir}/export"
  theirs = _diffusers_cascade(monkeypatch, if_repos["stage_1"], if_repos["stage_2"], prompt, noise,
                              lora_dirs={"base": f"{export}/base", "sr256": f"{export}/sr256"})
  _compare(ours, theirs, "LoRA adapters via load_lora_weights")
  merged = UNet2DConditionModel.from_pretrained(f"{export}/base_merged", dtype=torch.float32)
  merged_t5 = T5EncoderModel.from_pretrained(f"{export}/text_encoder_merged", dtype=torch.float32)
  theirs = _diffusers_cascade(monkeypatch, if_repos["stage_1"], if_repos["stage_2"], prompt, noise,
                              unet_1=merged, text_encoder=merged_t5,
                              lora_dirs={"sr256": f"{export}/sr256"})
  _compare(ours, theirs, "LoRA merged into the base UNet")


def _bytes_per_device(arrays) -> dict:
  out = {d: 0 for d in jax.devices()}
  for a in arrays:
    for shard in a.addressable_shards:
      out[shard.device] += shard.data.nbytes
  return out


def test_loading_puts_every_tensor_into_its_sharding(if_repos):
  """The real load path (`pipeline.build`, then each stage's params and T5 on first use) on
  a 2 x 4 mesh: every tensor lands in the sharding its logical axes give, and the bytes
  that appear on each device are exactly that device's shards: nothing whole on device 0."""
  from flax import nnx
  from dreambooth_jax import sharding
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  models = pipeline.build(if_config(if_repos), mesh)
  import gc
  gc.collect()
  before = jax.live_arrays()  # held, so no new array can reuse one's id
  known = {id(a) for a in before}
  loaded = {s.name: s.params for s in models.cascade.stages}
  loaded["t5"] = nnx.state(models.load_t5(), nnx.Param)
  gc.collect()
  # Every array the load left alive (not only the params: a stray whole copy would show).
  grown = _bytes_per_device(a for a in jax.live_arrays() if id(a) not in known)
  expected, split = 0, 0
  for name, state in loaded.items():
    for path, var in nnx.to_flat_state(state):
      x, axes = var.get_value(), var.get_metadata()["axes"]
      want = sharding.logical_to_spec(axes, x.shape, mesh, models.rules)
      assert x.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, want), x.ndim), (name, path)
      parts = np.prod([mesh.shape[a] for e in want if e for a in (e if isinstance(e, tuple) else (e,))])
      expected += x.nbytes // int(parts)
      split += int(parts > 1)
  print(f"\nloaded {sum(len(jax.tree.leaves(s)) for s in loaded.values())} tensors, {split} split; "
        f"per-device growth {sorted(set(grown.values()))} bytes, arithmetic {expected}")
  assert split > 0
  assert set(grown.values()) == {expected}
