"""Stable Diffusion's x4 upscaler (DeepFloyd's stage III) against diffusers / transformers.

One tiny download in the Hub's layout (`repo`, written by diffusers' and
transformers' own `save_pretrained`: sharded float32 and an `fp16` variant
of the UNet, a sharded text encoder saved by transformers 5, a CLIP BPE
tokenizer, both schedulers, model_index.json) is loaded by our loaders and
run against the reference models on the same inputs: the UNet, VAE encode
and decode, and the text encoder, each in float32 and compiled once.
Full-size models are checked by parameter count, on shapes only.
"""

import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from flax import nnx
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dreambooth_jax.evaluation.tiny_encoders import write_clip_tokenizer
from dreambooth_jax.models import clip as clip_lib, unet as unet_lib, vae as vae_lib
from dreambooth_jax import weights
from dreambooth_jax.weights import safetensors_io, sd_upscaler
from dreambooth_jax.weights.safetensors_io import WeightsError
from if_repos import randomized, reference_config
from unet_configs import TINY_IF_II

TOL = 1e-4
TEXT_LEN, SIZE = 8, 16  # tiny text length for the UNet; latent side (image side for the VAE)
NAMES = {"unet": "sd_x4_upscaler_unet.json", "vae": "sd_x4_upscaler_vae.json",
         "text_encoder": "sd_x4_upscaler_text_encoder.json"}


def _tiny(reference_dir, name: str, **widths) -> dict:
  return dict(reference_config(reference_dir, NAMES[name]), **widths)


def _report(what: str, ours, ref) -> float:
  ref = np.asarray(ref, np.float32)
  err = float(np.max(np.abs(np.asarray(ours, np.float32) - ref)))
  print(f"\n{what}: max abs error {err:.3e} (reference max |x| {np.abs(ref).max():.3f})")
  return err


@pytest.fixture(scope="module")
def repo(tmp_path_factory, reference_configs_dir):
  """A tiny stabilityai/stable-diffusion-x4-upscaler download: (folder, torch models)."""
  root = tmp_path_factory.mktemp("sd_x4_upscaler")
  vocab = write_clip_tokenizer(str(root / "tokenizer"))
  config = json.loads((root / "tokenizer" / "tokenizer_config.json").read_text())
  # OpenCLIP-H's tokenizer pads with "!" (id 0), not with end-of-text as OpenAI's CLIP does.
  (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(dict(config, pad_token="!")))
  torch.manual_seed(0)
  # The upscaler's block types, only_cross_attention pattern, 8 heads and noise-level table;
  # toy widths and one resnet per block.
  unet = randomized(UNet2DConditionModel(**_tiny(
      reference_configs_dir, "unet", block_out_channels=[16, 16, 32, 32], norm_num_groups=4,
      layers_per_block=1, cross_attention_dim=32, sample_size=SIZE)), seed=0)
  vae = randomized(AutoencoderKL(**_tiny(reference_configs_dir, "vae", block_out_channels=[8, 16, 16],
                                         norm_num_groups=4, layers_per_block=1)), seed=1, scale=0.1)
  text = randomized(CLIPTextModel(CLIPTextConfig(**_tiny(
      reference_configs_dir, "text_encoder", hidden_size=32, intermediate_size=64,
      num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab))), seed=2)
  unet.save_pretrained(root / "unet", max_shard_size="100KB")
  copy.deepcopy(unet).half().save_pretrained(root / "unet", variant="fp16")  # the Hub has both
  vae.save_pretrained(root / "vae")
  text.save_pretrained(root / "text_encoder", max_shard_size="40KB")
  for name, cls in (("scheduler", DDIMScheduler), ("low_res_scheduler", DDPMScheduler)):
    cls.from_config(reference_config(reference_configs_dir, f"sd_x4_upscaler_{name}.json")
                    ).save_pretrained(root / name)
  (root / "model_index.json").write_text(json.dumps({  # the Hub's, see the scheduler reference
      "_class_name": "StableDiffusionUpscalePipeline", "max_noise_level": 350,
      "low_res_scheduler": ["diffusers", "DDPMScheduler"], "scheduler": ["diffusers", "DDIMScheduler"],
      "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
      "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}))
  names = sorted(os.listdir(root / "unet"))
  assert "diffusion_pytorch_model.safetensors.index.json" in names, names
  assert "diffusion_pytorch_model.fp16.safetensors" in names, names
  assert (root / "text_encoder" / "model.safetensors.index.json").is_file()
  return str(root), {"unet": unet, "vae": vae, "text_encoder": text}


_apply = nnx.jit(lambda model, *a, **k: model(*a, **k))


def test_unet_matches_diffusers(repo):
  folder, ref = repo
  rng = np.random.RandomState(0)
  x = rng.randn(2, 7, SIZE, SIZE).astype(np.float32)  # 4 noisy latent + 3 low-res image channels
  t, noise_level = np.array([3.0, 777.0], np.float32), np.array([20, 350])
  text = rng.randn(2, TEXT_LEN, 32).astype(np.float32)
  mask = np.ones((2, TEXT_LEN), np.int64)
  mask[1, 3:] = 0  # reaches attn2 only, as in diffusers (attn1 gets the unused pixel mask)
  with torch.no_grad():
    want = ref["unet"](torch.tensor(x), torch.tensor(t), torch.tensor(text),
                       class_labels=torch.tensor(noise_level),
                       encoder_attention_mask=torch.tensor(mask)).sample.numpy()
  model = sd_upscaler.load_upscaler_unet(folder)  # the pipeline folder: unet/, float32 shards
  got = _apply(model, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(text),
               attention_mask=jnp.asarray(mask), class_labels=jnp.asarray(noise_level))
  assert _report("x4 upscaler tiny UNet fp32 vs diffusers",
                 np.asarray(got).transpose(0, 3, 1, 2), want) < TOL


def test_unet_fp16_variant(repo):
  folder, _ = repo
  full = sd_upscaler.load_upscaler_unet(folder)
  half = sd_upscaler.load_upscaler_unet(os.path.join(folder, "unet"), jnp.float16, variant="fp16")
  for a, b in zip(jax.tree.leaves(nnx.state(full)), jax.tree.leaves(nnx.state(half))):
    assert b.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(a).astype(np.float16), np.asarray(b))


def test_unet_export_round_trip(repo, tmp_path):
  """save_unet_diffusers writes the upscaler's config and tensors back as diffusers reads them."""
  folder, ref = repo
  out = weights.save_unet_diffusers(sd_upscaler.load_upscaler_unet(folder), str(tmp_path / "unet"))
  reloaded = UNet2DConditionModel.from_pretrained(out)
  want = ref["unet"].state_dict()
  got = reloaded.state_dict()
  assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
  assert reloaded.config.mid_block_type == "UNetMidBlock2DCrossAttn"
  assert reloaded.config.num_class_embeds == 1000 and reloaded.config.use_linear_projection


def test_vae_matches_diffusers(repo):
  folder, ref = repo
  rng = np.random.RandomState(1)
  images = np.tanh(rng.randn(2, 3, SIZE, SIZE)).astype(np.float32)
  latents = rng.randn(2, 4, SIZE // 4, SIZE // 4).astype(np.float32)
  vae = sd_upscaler.load_vae(folder)
  assert vae.cfg.scaling_factor == 0.08333 and vae.cfg.downsample_factor == 4
  with torch.no_grad():
    posterior = ref["vae"].encode(torch.tensor(images)).latent_dist
    decoded = ref["vae"].decode(torch.tensor(latents) / 0.08333).sample.numpy()
  nhwc = lambda a: np.asarray(a).transpose(0, 2, 3, 1)
  # One compiled program for the encoder and decoder paths the pipelines use.
  key = jax.random.key(0)
  step = nnx.jit(lambda m, x, z: (m.encode(x), m.encode_latents(x, key), m.decode_latents(z)))
  (mean, logvar), sampled, images_out = step(vae, jnp.asarray(nhwc(images)), jnp.asarray(nhwc(latents)))
  assert _report("x4 upscaler tiny VAE encode mean", mean, nhwc(posterior.mean)) < TOL
  assert _report("x4 upscaler tiny VAE encode logvar", logvar, nhwc(posterior.logvar)) < TOL
  # latents = (mean + std * noise) * scaling_factor, as the pipelines scale them.
  noise = (np.asarray(sampled) / 0.08333 - np.asarray(mean)) / np.exp(0.5 * np.asarray(logvar))
  np.testing.assert_allclose(noise, np.asarray(jax.random.normal(key, mean.shape)), atol=1e-3)
  assert _report("x4 upscaler tiny VAE decode", images_out, nhwc(decoded)) < TOL


def test_attention_score_cap_chunks_on_every_backend():
  """The VAE's cap on one score block applies where the CPU chunking is off (TPU plans)."""
  q, k, v = (jnp.asarray(np.random.RandomState(i).randn(1, 256, 1, 8), jnp.float32) for i in range(3))
  unet_lib.CHUNK_QUERIES = False  # as on TPU
  try:
    assert unet_lib._query_chunk(256, 256) is None and unet_lib._query_chunk(256, 256, 1 << 12) == 16
    capped = jax.jit(lambda *a: unet_lib.dot_attention(*a, max_scores=1 << 12))(q, k, v)
    plain = jax.jit(unet_lib.dot_attention)(q, k, v)
  finally:
    unet_lib.CHUNK_QUERIES = None
  np.testing.assert_allclose(np.asarray(capped), np.asarray(plain), atol=1e-6)


PROMPTS = ["a photo of a dog on the beach", "The Dog!", "dog " * 100]  # the last one is truncated


def test_tokenizer_and_text_encoder_match(repo):
  folder, ref = repo
  tok = sd_upscaler.load_tokenizer(folder)
  hf = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
  got = tok(PROMPTS)
  want = hf(PROMPTS, padding="max_length", max_length=hf.model_max_length, truncation=True,
            return_tensors="np")  # StableDiffusionUpscalePipeline.encode_prompt's call
  np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
  assert got["input_ids"].shape == (3, 77) and got["input_ids"][2, -1] == tok.eos_id
  assert tok.pad_id == 0 and got["input_ids"][0, -1] == 0  # padded with "!"
  ids = got["input_ids"]
  with torch.no_grad():
    want_h = ref["text_encoder"](torch.tensor(ids, dtype=torch.long)).last_hidden_state.numpy()
  model = sd_upscaler.load_text_encoder(folder)
  assert _report("x4 upscaler tiny CLIP text encoder last_hidden_state",
                 _apply(model, jnp.asarray(ids)), want_h) < TOL


def test_text_encoder_with_transformers4_prefix(repo, tmp_path):
  """The published checkpoint names tensors `text_model.*` (transformers 4); ours saved without."""
  folder, ref = repo
  tensors = {k: v.numpy() for k, v in ref["text_encoder"].state_dict().items()}
  assert not any(k.startswith("text_model.") for k in tensors)  # transformers 5's names
  old = {"text_model." + k: v for k, v in tensors.items()}
  old["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]  # v4 saved it
  shutil.copy(os.path.join(folder, "text_encoder", "config.json"), tmp_path / "config.json")
  safetensors_io.save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
  a = nnx.state(sd_upscaler.load_text_encoder(folder))
  b = nnx.state(sd_upscaler.load_text_encoder(str(tmp_path)))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # transformers itself reads the prefixed file as the same model.
  with torch.no_grad():
    reloaded = CLIPTextModel.from_pretrained(str(tmp_path))
    ids = torch.arange(10)[None]
    assert torch.equal(reloaded(ids).last_hidden_state, ref["text_encoder"](ids).last_hidden_state)


def test_whole_pipeline_folder(repo):
  folder, ref = repo
  counts = sd_upscaler.check_sd_upscaler(folder)
  assert counts == {k: sum(p.numel() for p in m.parameters()) for k, m in ref.items()}
  pipe = sd_upscaler.load_sd_upscaler(folder)
  assert pipe.max_noise_level == 350 and pipe.vae.cfg.scaling_factor == 0.08333
  assert pipe.scheduler["prediction_type"] == "v_prediction"
  assert pipe.scheduler["_class_name"] == "DDIMScheduler"
  assert pipe.low_res_scheduler["_class_name"] == "DDPMScheduler"
  assert pipe.unet.cfg.num_class_embeds == 1000 and pipe.unet.cfg.in_channels == 7


def test_full_size_param_counts(reference_configs_dir):
  """Ours from jax.eval_shape (no weights) against diffusers / transformers on the meta device."""
  raw = {k: json.loads((reference_configs_dir / f).read_text()) for k, f in NAMES.items()}
  ours = {
      "unet": unet_lib.abstract_unet(unet_lib.UNetConfig.from_diffusers(raw["unet"])),
      "vae": vae_lib.abstract_vae(vae_lib.VAEConfig.from_diffusers(raw["vae"])),
      "text_encoder": clip_lib.abstract_clip_text_model(
          clip_lib.CLIPTowerConfig.from_hf_text(raw["text_encoder"])),
  }
  clean = {k: {n: v for n, v in d.items() if not n.startswith("_")} for k, d in raw.items()}
  with torch.device("meta"):
    ref = {"unet": UNet2DConditionModel.from_config(clean["unet"]),
           "vae": AutoencoderKL.from_config(clean["vae"]),
           "text_encoder": CLIPTextModel(CLIPTextConfig(**clean["text_encoder"]))}
  for name in NAMES:
    got, want = unet_lib.param_count(ours[name]), sum(p.numel() for p in ref[name].parameters())
    print(f"\n{NAMES[name]}: ours {got:,} reference {want:,}")
    expected = raw[name]["_param_count"]
    assert got == want == expected.get("computed", expected.get("computed_CLIPTextModel"))
  print(f"\nfull pipeline: {sum(unet_lib.param_count(m) for m in ours.values()):,}")


# ----------------------------------------------------------------------------- wrong folders


@pytest.fixture(scope="module")
def wrong(repo, tmp_path_factory):
  folder, _ = repo
  root = tmp_path_factory.mktemp("wrong_x4")
  no_vae = root / "no_vae"  # a download whose vae/ never arrived
  shutil.copytree(folder, no_vae, ignore=shutil.ignore_patterns("vae"))
  if_unet = root / "if_unet"  # IF-II's UNet where the upscaler's belongs
  if_unet.mkdir()
  (if_unet / "config.json").write_text(json.dumps(dict(TINY_IF_II, _class_name="UNet2DConditionModel")))
  t5 = root / "t5"
  t5.mkdir()
  (t5 / "config.json").write_text(json.dumps({"architectures": ["T5EncoderModel"], "model_type": "t5"}))
  spiece = root / "spiece"  # DeepFloyd IF's tokenizer/
  spiece.mkdir()
  (spiece / "spiece.model").write_bytes(b"")
  no_weights = root / "no_weights"
  no_weights.mkdir()
  shutil.copy(os.path.join(folder, "vae", "config.json"), no_weights / "config.json")
  return dict(no_vae=str(no_vae), if_unet=str(if_unet), t5=str(t5), spiece=str(spiece),
              no_weights=str(no_weights), missing=str(root / "nope"))


WRONG_CASES = [  # (loader, folder, where the message must point, fragments it must hold)
    ("load_vae", "no_vae", "", ["StableDiffusionUpscalePipeline", "lists vae", "huggingface-cli"]),
    ("load_upscaler_unet", "if_unet", "", ["DeepFloyd IF stage-II", "weights.load_unet",
                                           "in_channels 7"]),
    ("load_text_encoder", "t5", "", ["model_type 't5'", "CLIPTextModel"]),
    ("load_vae", "if_unet", "", ["DeepFloyd IF stage-II", "AutoencoderKL"]),
    ("load_tokenizer", "spiece", "", ["spiece.model", "vocab.json", "byte-level BPE"]),
    ("load_vae", "no_weights", "", ["no weights", "diffusion_pytorch_model.safetensors"]),
    ("load_text_encoder", "missing", "", ["does not exist", "huggingface-cli download"]),
]


@pytest.mark.parametrize("loader,name,sub,fragments", WRONG_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in WRONG_CASES])
def test_wrong_folder_is_named(wrong, loader, name, sub, fragments):
  folder = os.path.join(wrong[name], sub) if sub else wrong[name]
  with pytest.raises(WeightsError) as e:
    getattr(sd_upscaler, loader)(wrong[name])
  msg = str(e.value)
  print(f"\n{loader}({name}): {msg}")
  assert folder in msg and "\n" not in msg, msg  # one paragraph, naming the folder
  for fragment in fragments:
    assert fragment in msg, (fragment, msg)
