"""Stage III (the x4 latent upscaler) against diffusers: every DDIM step, the low-res
noising, a three-stage cascade whose stage III runs against `StableDiffusionUpscalePipeline`,
and its fine-tuning: one loss evaluation against diffusers' pieces, the train step, the export.

The tiny upscaler download is test_sd_upscaler's (`repo`: diffusers' and transformers' own
`save_pretrained` in the Hub layout). The pipeline is fed our initial latents (`latents=`)
and our low-res noise (its one `randn_tensor` draw); everything else (CLIP tokenizer and
encoder, the negative prompt "", the noise-level class labels, the guidance batch, DDIM,
the VAE decode and clipping) is the pipeline's own."""

import os
import shutil

import diffusers.models.autoencoders.vae as vae_module
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_upscale as upscale_module
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline
from diffusers import UNet2DConditionModel

from dreambooth_jax import cascade, checkpoint, config_lib, diffusion, embeddings, finetuned
from dreambooth_jax import methods, pipeline, samplers, upscaler
from dreambooth_jax import weights
from dreambooth_jax.weights import WeightsError
from conftest import run_cli
from if_repos import randomized, reference_config
from test_sd_upscaler import _tiny, repo  # noqa: F401  (the tiny download fixture)
from test_if_pipelines import STEPS
from train_helpers import if_config

TOL = 1e-4  # float32, 75 steps of a UNet through a VAE
LOW = 32  # the low-res side: the tiny IF-II's output (train_helpers.if_config)


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def test_default_schedulers_are_the_published_ones(reference_configs_dir):
  for name, ours in (("sd_x4_upscaler_scheduler.json", upscaler.UPSCALER_SCHEDULER),
                     ("sd_x4_upscaler_low_res_scheduler.json", upscaler.UPSCALER_LOW_RES_SCHEDULER)):
    published = reference_config(reference_configs_dir, name)
    for key, value in ours.items():
      assert published.get(key) == value, (name, key, published.get(key), value)


@jax.jit
def _ddim(out, x, row):
  config = samplers.StepConfig.from_config(upscaler.UPSCALER_SCHEDULER)
  return samplers.ddim_step(config, out, x, row, jnp.zeros_like(x))


def test_every_ddim_step_matches_diffusers(reference_configs_dir):
  """All 75 steps of the pipeline's DDIM (v-prediction, set_alpha_to_one False, steps_offset
  1) as Stage III walks them, against `DDIMScheduler.step` from the published config."""
  cfg = reference_config(reference_configs_dir, "sd_x4_upscaler_scheduler.json")
  ref = DDIMScheduler.from_config(cfg)
  ref.set_timesteps(75)
  steps = diffusion.DiscreteSchedule.from_config(cfg).respace(
      75, prev="stride", final_alpha_bar=float(ref.alphas_cumprod[0]))
  np.testing.assert_array_equal(np.asarray(steps.t), ref.timesteps.numpy())
  rs = np.random.RandomState(0)
  worst = 0.0
  for i in range(75):
    x, out = (rs.randn(2, 8, 8, 4).astype(np.float32) for _ in range(2))
    want_prev, want_x0 = ref.step(nchw(out), ref.timesteps[i], nchw(x), eta=0.0, return_dict=False)
    got_prev, got_x0 = _ddim(out, x, jax.tree.map(lambda a: a[i], steps))
    worst = max(worst, float(np.abs(nhwc(want_prev) - np.asarray(got_prev)).max()),
                float(np.abs(nhwc(want_x0) - np.asarray(got_x0)).max()))
  print(f"\nx4 upscaler DDIM, 75 steps vs DDIMScheduler.step: max abs err {worst:.2e}")
  assert worst < 1e-5


def test_lowres_noising_matches_add_noise(repo):
  folder, _ = repo
  settings = cascade.StageSettings(resolution=4 * LOW, sampler="ddim", sample_aug_level=0.1)
  stage = upscaler.load_stage("sr1024", folder, settings, lowres_resolution=LOW)  # nothing loaded
  ref = DDPMScheduler.from_pretrained(folder, subfolder="low_res_scheduler")
  rs = np.random.RandomState(1)
  image = np.tanh(rs.randn(2, LOW, LOW, 3)).astype(np.float32)
  noise = rs.randn(2, LOW, LOW, 3).astype(np.float32)
  worst = 0.0
  for level in (0, 20, 100, 350):
    got, labels = stage.lowres_input(image, None, level / 1000, noise=noise)
    want = ref.add_noise(nchw(image), nchw(noise), torch.tensor([level]))
    assert np.asarray(labels).tolist() == [level, level]
    worst = max(worst, float(np.abs(nhwc(want) - np.asarray(got)).max()))
  print(f"\nlow-res noising vs DDPMScheduler.add_noise (levels 0-350): max abs err {worst:.2e}")
  assert worst < 1e-6
  for bad in (0.351, 0.1005):  # past max_noise_level; between integer levels
    with pytest.raises(ValueError, match="noise_level"):
      stage.lowres_input(image, None, bad, noise=noise)


@pytest.mark.xdist_group("if_cascade")  # after test_if_pipelines: its IF programs, compiled once
@pytest.mark.filterwarnings("ignore:Passing `image` as torch tensor")  # IF's docs pass [-1, 1] too
def test_three_stage_cascade_matches_upscale_pipeline(if_repos, repo, monkeypatch):
  """config.pretrained.stage_3 = the upscaler download: IF-I -> IF-II -> x4 upscaler through
  pipeline.build and Cascade.sample (16 -> 32 -> 128 px; T5 for IF's stages, the upscaler's
  CLIP for its own). Stage III, a whole run (DDIM, guidance 9, noise_level 100), against
  StableDiffusionUpscalePipeline given our stage-II image and our noise: final latents and
  the decoded, clipped images."""
  folder, _ = repo
  # 25 DDIM steps: each of the pipeline's 75 is checked above, and CI time is short.
  config = if_config(if_repos, **{"pretrained.stage_3": folder, "cascade.sr1024.resolution": 128,
                                  "cascade.sr1024.num_steps": 25})
  models = pipeline.build(config)
  stage = models.cascade.stages[-1]
  assert isinstance(stage, upscaler.LatentUpscaleStage) and not stage.params_loaded
  assert models.cascade.stages[1].settings.sampler == "ddpm"  # IF's stages as they were
  prompt = "A Photo of a DOG on the Beach!"  # stage III reads it as typed: no IF cleaning
  e, m = embeddings.encode_prompts(models.load_t5(), models.tokenizer, [prompt, ""])
  cond = {"text": e[:1], "mask": m[:1]}
  kw = dict(uncond_embeddings={"text": e[1:], "mask": m[1:]}, num_steps=STEPS, as_uint8=False)
  rng = jax.random.key(3)
  latents, decode = [], upscaler._decode  # our final latents, on their way to the VAE
  monkeypatch.setattr(upscaler, "_decode", lambda g, s, z: latents.append(np.asarray(z)) or decode(g, s, z))
  out = {k: np.asarray(v) for k, v in
         models.cascade.sample(cond, rng, prompts=prompt, **kw).items()}
  assert {k: v.shape for k, v in out.items()} == {
      "base": (1, 16, 16, 3), "sr256": (1, 32, 32, 3), "sr1024": (1, 128, 128, 3)}

  noise = models.cascade.noise(rng, 1)["sr1024"]
  assert set(noise) == {"x_init", "lowres"}  # DDIM at eta 0 draws nothing per step
  pipe = StableDiffusionUpscalePipeline.from_pretrained(folder, dtype=torch.float32)
  pipe.set_progress_bar_config(disable=True)
  draws = [nchw(noise["lowres"])]  # its one randn_tensor call: the low-res image's noise
  monkeypatch.setattr(upscale_module, "randn_tensor", lambda *a, **k: draws.pop(0))
  seen = []  # the pipeline's latents after each step
  with torch.no_grad():
    theirs = pipe(prompt, image=nchw(out["sr256"]), num_inference_steps=25, guidance_scale=9.0,
                  noise_level=100, latents=nchw(noise["x_init"]), output_type="np",
                  callback=lambda i, t, x: seen.append(x.clone()), callback_steps=1).images
  assert not draws and len(seen) == 25 and len(latents) == 1
  err_latents = float(np.abs(latents[0] - nhwc(seen[-1])).max())
  ours = out["sr1024"] / 2 + 0.5  # the pipeline's postprocess: [0, 1]
  err = float(np.abs(ours - theirs).max())
  print(f"\nStage III in the cascade vs StableDiffusionUpscalePipeline (25 steps, tiny random "
        f"models): final latents max abs err {err_latents:.2e} (std {latents[0].std():.3f}), "
        f"images [0, 1] max abs err {err:.2e} (std {theirs.std():.3f})")
  assert theirs.std() > 0.02 and err_latents < TOL and err < TOL
  # The VAE (0.2 GiB at full size) is replicated: its 1024 px activations are the memory.
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(stage._vae.get()))
  assert not all(x.sharding.is_fully_replicated for x in jax.tree.leaves(stage.params))

  # Without prompt texts (class priors, training previews) the cascade ends at stage II,
  # with the same images; naming stage III then is an error.
  two = models.cascade.sample(cond, rng, **kw)
  assert set(two) == {"base", "sr256"}
  for name in two:
    np.testing.assert_array_equal(np.asarray(two[name]), out[name])
  with pytest.raises(ValueError, match="prompts="):
    models.cascade.sample(cond, rng, upto="sr1024", **kw)


def test_tiny_stage_three_is_opt_in():
  """The tiny cascade compiles no third stage unless asked (`:stage3`), which gives it a
  tiny random x4 upscaler of the real architecture, 64 -> 256 px; tuned only if asked."""
  from configs import imagen_dog
  default = pipeline.build(imagen_dog.get_config("tiny"))
  assert [s.name for s in default.cascade.stages] == ["base", "sr256"]
  models = pipeline.build(imagen_dog.get_config("tiny,stage3"))
  stage = models.cascade.stages[-1]
  assert isinstance(stage, upscaler.LatentUpscaleStage) and not stage.params_loaded
  assert (stage.lowres_resolution, stage.settings.resolution, stage.settings.num_steps) == (64, 256, 10)
  assert stage.step_config.prediction_type == "v_prediction" and stage.max_noise_level == 350
  assert default.weights_fingerprint != models.weights_fingerprint
  # Tuning it (`stages=...+sr1024`; what pipeline.build checks, called alone: each build of
  # the tiny cascade costs a second): full fine-tuning, at an integer noise level.
  pipeline.check_x4_tuning(imagen_dog.get_config("tiny,stage3,stages=base+sr256+sr1024"))
  assert stage.train_noise_level() == 0  # the config's lowered level
  with pytest.raises(ValueError, match="noise_level 0.01"):
    stage.train_noise_level(1e-5)  # the pixel stages' level is between integer levels
  for arg, fragment in (("lora=4", "LoRA"), ("method=ti_then_finetune", "own CLIP")):
    with pytest.raises(config_lib.ConfigError, match=fragment):
      pipeline.check_x4_tuning(imagen_dog.get_config(f"tiny,stage3,stages=sr1024,{arg}"))


def test_wrong_stage_three_folder_is_one_paragraph(if_repos, repo, tmp_path):
  folder, _ = repo
  bare = tmp_path / "unet_alone"  # the upscaler's unet/ without its pipeline around it
  shutil.copytree(os.path.join(folder, "unet"), bare)
  no_vae = tmp_path / "no_vae"
  shutil.copytree(folder, no_vae, ignore=shutil.ignore_patterns("vae"))
  cases = {if_repos["stage_1"]: ["stage-I base", "stabilityai/stable-diffusion-x4-upscaler"],
           str(bare): ["x4 upscaler's UNet only", "whole", "huggingface-cli"],
           str(no_vae): ["lists vae", "StableDiffusionUpscalePipeline"]}
  for given, fragments in cases.items():
    with pytest.raises(WeightsError) as e:
      weights.check_pretrained({"stage_3": given})
    msg = str(e.value)
    print(f"\nstage_3={os.path.basename(given)}: {msg}")
    assert given in msg and "\n" not in msg, msg
    for fragment in fragments:
      assert fragment in msg, (fragment, msg)
  checked = weights.check_pretrained({"stage_3": os.path.join(folder, "unet")})  # its parent
  assert checked.upscaler.folder == folder and not checked.unets

  # --stage_3 (sample / evaluate CLIs, FineTuned.load) takes only the upscaler download: the
  # same paragraphs, and one for an IF-style pixel SR UNet, which a config's stage_3 accepts.
  cases[if_repos["stage_2"]] = ["IF-style pixel super-resolution UNet", "model_index.json"]
  for given, fragments in cases.items():
    with pytest.raises(WeightsError) as e:
      finetuned.check_stage_3(given)
    msg = str(e.value)
    assert given in msg and "\n" not in msg and all(f in msg for f in fragments), msg
  assert finetuned.check_stage_3(os.path.join(folder, "unet")) == folder


def test_stage_three_joins_a_workdir_trained_without_it(if_repos, repo, tmp_path):
  """`--stage_3` on a workdir of the IF stages (its config.json as saved): its config gains
  the x4 upscaler as stage III after the tuned stages; a wrong folder stops the sample CLI
  with one paragraph (exit 2) before any model is built."""
  folder, _ = repo
  workdir = tmp_path / "run"
  workdir.mkdir()
  config_lib.save(if_config(if_repos, **{"cascade.sr1024.resolution": 128}), workdir / "config.json")
  config = finetuned.with_stage_3(finetuned.load_config(workdir), folder, workdir)
  # What the three-stage test above builds from (pretrained.stage_3 = the download).
  assert config.pretrained.stage_3 == folder and config.stages == "base+sr256"
  assert pipeline.stage_names(config) == ["base", "sr256", "sr1024"]
  r = run_cli("dreambooth_jax.sample", f"--workdir={workdir}", "--prompt=a [V] dog",
              f"--stage_3={if_repos['stage_1']}")
  print(f"\nsample --stage_3=<IF-I>: exit {r.returncode}: {r.stderr.strip()}")
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
  assert "stabilityai/stable-diffusion-x4-upscaler" in r.stderr


# -- fine-tuning stage III ------------------------------------------------------------------

TRAIN_LOW = 8  # the tuned stage's latent and low-res side: 32 px training images
# The download's UNet at one level instead of four (its cross-attention blocks, mid block,
# noise-level table and linear projections): compiling the train step is most of this
# test, and the UNet's depth sets it (XLA:CPU, 2-core machine: 13 s of CPU at one level,
# 19 s at two). The four-level UNet's parity is test_sd_upscaler's.
ONE_LEVEL = dict(block_out_channels=[16], down_block_types=["CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D"], only_cross_attention=[False],
                 layers_per_block=1, norm_num_groups=4, cross_attention_dim=32, sample_size=TRAIN_LOW)
TRAIN_LEVEL = 20  # noise_level of the low-res input (train_aug_level 0.02): not 0, to see it
PROMPTS = ["a sks dog", "a dog"]  # instance and class prompt, through the upscaler's CLIP


def _training_images():
  return np.tanh(1.5 * np.random.RandomState(5).randn(2, 4 * TRAIN_LOW, 4 * TRAIN_LOW, 3)
                 ).astype(np.float32)


def reference_loss(pipe, images, draws, monkeypatch):
  """One loss evaluation as a diffusers training script assembles it from the pieces of
  `pipe` (a StableDiffusionUpscalePipeline): CLIP's last hidden state of the prompts,
  `vae.encode(x).latent_dist.sample() * scaling_factor`, the 4x-downsampled image noised by
  `low_res_scheduler.add_noise`, a `DDPMScheduler` of the pipeline's scheduler config (as the
  training scripts make one) for `add_noise` / `get_velocity` of the latents, the UNet on 7
  channels with noise_level as class label, per-example MSE. Every random draw is ours
  (`draws`); the posterior's is its one `randn_tensor` call."""
  scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
  ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                       truncation=True, return_tensors="pt").input_ids
  monkeypatch.setattr(vae_module, "randn_tensor", lambda *a, **k: nchw(draws["posterior"]))
  x = nchw(images)
  with torch.no_grad():
    text = pipe.text_encoder(ids).last_hidden_state
    latents = pipe.vae.encode(x).latent_dist.sample() * pipe.vae.config.scaling_factor
    low = F.interpolate(x, size=(TRAIN_LOW, TRAIN_LOW), mode="bicubic", antialias=True).clamp(-1, 1)
    levels = torch.full((x.shape[0],), TRAIN_LEVEL)
    low = pipe.low_res_scheduler.add_noise(low, nchw(draws["lowres"]), levels)
    t, noise = torch.tensor(np.asarray(draws["t"])).long(), nchw(draws["noise"])
    noisy = scheduler.add_noise(latents, noise, t)
    pred = pipe.unet(torch.cat([noisy, low], dim=1), t, encoder_hidden_states=text,
                     class_labels=levels).sample
    target = scheduler.get_velocity(latents, noise, t)
  assert scheduler.config.prediction_type == "v_prediction"
  assert pipe.vae.config.scaling_factor == 0.08333
  return ((pred - target) ** 2).mean(dim=(1, 2, 3)).numpy()


def test_stage_three_training_matches_diffusers_and_exports(repo, reference_configs_dir, tmp_path,
                                                             monkeypatch):
  """Stage III tuned alone by the library's step (`methods.make_train_step`: an instance and
  a prior image, its CLIP's states of the instance and class prompts in the stage's batch,
  the VAE a frozen part), one compiled program: the loss of step 1 against
  `reference_loss` on the draws the step makes; after 2 steps the UNet has moved, its
  noise-level table only in the trained level's row; the export, loaded by
  `StableDiffusionUpscalePipeline` as its `unet`, gives step 3's loss in the reference."""
  download, _ = repo
  folder = tmp_path / "x4_one_level"  # the download with a one-level UNet (ONE_LEVEL)
  shutil.copytree(download, folder, ignore=shutil.ignore_patterns("unet"))
  torch.manual_seed(0)
  unet = randomized(UNet2DConditionModel(**_tiny(reference_configs_dir, "unet", **ONE_LEVEL)), seed=3)
  unet.save_pretrained(folder / "unet")
  folder = str(folder)
  load = lambda **kw: StableDiffusionUpscalePipeline.from_pretrained(folder, dtype=torch.float32, **kw)
  settings = cascade.StageSettings(resolution=4 * TRAIN_LOW, sampler="ddim", sample_aug_level=0.1,
                                   train_aug_level=TRAIN_LEVEL / 1000)
  stage = upscaler.load_stage("sr1024", folder, settings, lowres_resolution=TRAIN_LOW)
  tx = optax.sgd(1e-2)  # a param moves iff its gradient is not zero
  params = {"sr1024": stage.params}
  key = jax.random.key(0)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0), "rng": key}
  frozen = {methods.FROZEN_PARTS: {"sr1024": stage.frozen_parts()}}
  text = np.asarray(stage.embed(PROMPTS)["text"])
  own = {k: {"text": text[None, i:i + 1], "mask": np.ones((1, 1, text.shape[1]), np.int32)}
         for i, k in enumerate(("instance", "class"))}
  images = _training_images()
  batch = {"sr1024": {"instance": images[None, :1], "prior": images[None, 1:], "text": own}}
  step = jax.jit(methods.make_train_step({"sr1024": stage}, tx, 1.0))
  loss_draws = jax.jit(stage.loss_draws, static_argnums=1)  # one program, not an op at a time

  def step_loss(state, pipe):
    """(ours, reference) per-example loss of the next step: its draws are those of the key
    the step folds (step, micro-batch 0, stage 0) and `loss_draws` materialises."""
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, int(state["step"])), 0), 0)
    draws = jax.device_get(loss_draws(rng, 2))
    state, m = step(state, batch, frozen)
    got = np.array([m["sr1024/instance_loss"], m["sr1024/prior_loss"]])
    return state, got, reference_loss(pipe, images, draws, monkeypatch)

  state, got, want = step_loss(state, load(unet=unet))
  err = float(np.abs(got - want).max())
  print(f"\nstage III loss (instance, prior; noise_level {TRAIN_LEVEL}) vs diffusers' pieces: "
        f"ours {got.tolist()} reference {want.tolist()}, max abs err {err:.2e}")
  assert err < 1e-5 * max(1.0, float(want.max()))
  state, metrics = step(state, batch, frozen)
  assert int(state["step"]) == 2 and metrics["finite"] == 1.0

  before = jax.tree_util.tree_leaves_with_path(params)
  moved = {jax.tree_util.keystr(p): float(np.abs(np.asarray(a) - np.asarray(b)).max())
           for (p, b), a in zip(before, jax.tree.leaves(state["params"]))}
  still = [k for k, v in moved.items() if not v > 0]
  assert not still, still
  table = lambda p: np.asarray(jax.tree.leaves(p["sr1024"]["class_embedding"])[0])
  rows = np.abs(table(state["params"]) - table(params)).max(axis=1)
  assert np.flatnonzero(rows).tolist() == [TRAIN_LEVEL]

  new = jax.device_get(state["params"]["sr1024"])
  export = checkpoint.export_final(str(tmp_path), {"sr1024": (stage.graphdef, new)},
                                   {"stages": ["sr1024"]})
  _, got, want = step_loss(state, load(unet=UNet2DConditionModel.from_pretrained(
      os.path.join(export, "sr1024"))))
  err_export = float(np.abs(got - want).max())
  print(f"after 2 steps, the export as StableDiffusionUpscalePipeline's unet: loss {want.tolist()} "
        f"vs ours {got.tolist()}, max abs err {err_export:.2e}; all {len(moved)} UNet tensors "
        f"moved (max {max(moved.values()):.2e}), the noise-level table in row {TRAIN_LEVEL} only")
  assert err_export < 1e-5 * max(1.0, float(want.max()))
