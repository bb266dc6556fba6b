"""Evaluation encoders against transformers: DINO (ViTModel), CLIP (CLIPModel), preprocessing.

Tiny random models are saved with `save_pretrained(safe_serialization=True)`,
loaded by our importers and run on the same inputs; full-size models are checked
by shape only (parameter counts from the reference configs).
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

from dreambooth_jax.evaluation import preprocess as pre
from dreambooth_jax import sharding
from dreambooth_jax.weights import encoders
from dreambooth_jax.weights import safetensors_io
from dreambooth_jax.weights.safetensors_io import WeightsError

TOL = 1e-4
IMAGE, PATCH, VOCAB, TEXT_LEN = 32, 8, 100, 12


def _randomise(model, seed):
  """Every tensor random (norm scales around 1), so a wrong layout cannot hide."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
      p.copy_(base + torch.randn_like(p) * 0.2)
  return model.eval()


def _report(what, ours, ref):
  err = float(np.max(np.abs(np.asarray(ours, np.float32) - np.asarray(ref, np.float32))))
  print(f"\n{what}: max abs error {err:.3e}")
  return err


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
  cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  patch_size=PATCH, image_size=IMAGE, layer_norm_eps=1e-12)
  model = _randomise(ViTModel(cfg), seed=0)  # add_pooling_layer=True: the loader must skip it
  folder = tmp_path_factory.mktemp("dino")
  model.save_pretrained(folder, safe_serialization=True)
  return model, str(folder)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  cfg = CLIPConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=16, bos_token_id=0,
                       eos_token_id=2, pad_token_id=1),
      vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, image_size=IMAGE, patch_size=PATCH),
      projection_dim=16)
  model = _randomise(CLIPModel(cfg), seed=1)
  folder = tmp_path_factory.mktemp("clip")
  model.save_pretrained(folder, safe_serialization=True)
  sharded = tmp_path_factory.mktemp("clip_sharded")
  model.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
  assert (sharded / "model.safetensors.index.json").is_file()
  return model, str(folder), str(sharded)


def _pixels(seed, b=2):
  return np.random.RandomState(seed).randn(b, IMAGE, IMAGE, 3).astype(np.float32)


def _text_batch(eos, high):
  """Right-padded ids [3, TEXT_LEN]: BOS 0, random tokens < `high`, `eos`, then pad 1."""
  rng = np.random.RandomState(3)
  lengths = [TEXT_LEN, 7, 4]
  ids = np.ones((3, TEXT_LEN), np.int64)
  mask = np.zeros((3, TEXT_LEN), np.int64)
  for i, n in enumerate(lengths):
    body = rng.randint(3, high, size=n - 2)
    body[body == eos] = 3
    ids[i, :n] = [0, *body, eos]
    mask[i, :n] = 1
  return ids, mask


# --- DINO ------------------------------------------------------------------------------------

def test_dino_matches_vitmodel(dino):
  ref, folder = dino
  model = encoders.load_dino(folder, jnp.float32)
  x = _pixels(0)
  with torch.no_grad():
    want = ref(torch.tensor(x).permute(0, 3, 1, 2)).last_hidden_state.numpy()
  out = nnx.jit(lambda m, p: m(p))(model, x)
  assert out.last_hidden_state.shape == want.shape
  assert _report("DINO last_hidden_state", out.last_hidden_state, want) < TOL
  assert _report("DINO CLS", model.encode_image(x), want[:, 0]) < TOL


def test_dino_bfloat16_and_size_check(dino):
  ref, folder = dino
  x = _pixels(0)
  f32 = encoders.load_dino(folder).encode_image(x)
  bf16 = encoders.load_dino(folder, jnp.bfloat16)
  assert bf16.layernorm.scale[...].dtype == jnp.bfloat16
  got = bf16.encode_image(x)
  assert got.dtype == jnp.bfloat16
  assert _report("DINO CLS bf16 vs f32", got, f32) < 0.1
  with pytest.raises(ValueError, match="interpolation is not supported"):
    bf16.encode_image(np.zeros((1, IMAGE + PATCH, IMAGE, 3), np.float32))


def test_dino_loader_errors(dino, tmp_path):
  _, folder = dino
  empty = tmp_path / "no_weights"
  empty.mkdir()
  shutil.copy(f"{folder}/config.json", empty)
  with pytest.raises(WeightsError, match=str(empty)):
    encoders.load_dino(str(empty))
  with pytest.raises(WeightsError, match="does not exist"):
    encoders.load_dino(str(tmp_path / "missing"))
  # A config that does not belong to the weights: every extra tensor is named.
  wrong = tmp_path / "wrong_config"
  shutil.copytree(folder, wrong)
  cfg = json.loads((wrong / "config.json").read_text())
  cfg["num_hidden_layers"] = 3
  (wrong / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(WeightsError, match=r"missing tensor 'encoder\.layer\.2\.attention"):
    encoders.load_dino(str(wrong))


def test_dino_vit_prefix(dino, tmp_path):
  """A ViTModel saved inside ViTFor* has keys `vit.*`; they load the same."""
  _, folder = dino
  tensors = safetensors_io.open_folder(folder, ("model",))
  shutil.copy(f"{folder}/config.json", tmp_path)
  safetensors_io.save_file({"vit." + k: np.asarray(tensors[k]) for k in tensors},
                           str(tmp_path / "model.safetensors"))
  x = _pixels(5, b=1)
  a = encoders.load_dino(folder).encode_image(x)
  b = encoders.load_dino(str(tmp_path)).encode_image(x)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- CLIP ------------------------------------------------------------------------------------

def test_clip_image_matches(clip):
  ref, folder, sharded = clip
  x = _pixels(1, b=3)
  with torch.no_grad():
    want = ref.get_image_features(pixel_values=torch.tensor(x).permute(0, 3, 1, 2))
  want = getattr(want, "pooler_output", want).numpy()  # transformers 5 returns an output object
  for name, f in (("single file", folder), ("sharded", sharded)):
    model = encoders.load_clip(f, jnp.float32)
    got = nnx.jit(lambda m, p: m.encode_image(p))(model, x)
    assert got.shape == (3, 16)
    assert _report(f"CLIP image embeds ({name})", got, want) < TOL
  assert np.isclose(float(model.logit_scale[...]), ref.logit_scale.item())


def _torch_text(ref, ids, mask=None):
  with torch.no_grad():
    out = ref.get_text_features(input_ids=torch.tensor(ids),
                                attention_mask=None if mask is None else torch.tensor(mask))
  return getattr(out, "pooler_output", out).numpy()


def test_clip_text_matches_legacy_eos(clip):
  """eos_token_id == 2 (openai/clip-vit-base-patch32): pooled at argmax(input_ids)."""
  ref, folder, _ = clip
  model = encoders.load_clip(folder)
  ids, mask = _text_batch(eos=VOCAB - 1, high=VOCAB - 1)
  encode = nnx.jit(lambda m, i, a: m.encode_text(i, a))
  got_masked = encode(model, ids, mask)
  assert _report("CLIP text embeds, padded + mask", got_masked, _torch_text(ref, ids, mask)) < TOL
  got = nnx.jit(lambda m, i: m.encode_text(i))(model, ids)
  assert _report("CLIP text embeds, padded, no mask", got, _torch_text(ref, ids)) < TOL
  # Causal attention: right padding cannot reach the EOS token, mask or not.
  assert np.max(np.abs(np.asarray(got) - np.asarray(got_masked))) < TOL


def test_clip_text_matches_eos_id(clip, tmp_path):
  """Any other eos_token_id: pooled at its first occurrence, even if larger ids precede it."""
  ref, folder, _ = clip
  eos = 50
  copy = tmp_path / "clip_eos"
  shutil.copytree(folder, copy)
  cfg = json.loads((copy / "config.json").read_text())
  cfg["text_config"]["eos_token_id"] = eos
  (copy / "config.json").write_text(json.dumps(cfg))
  model = encoders.load_clip(str(copy))
  ids, mask = _text_batch(eos=eos, high=VOCAB)
  assert (ids.max(-1) > eos).all()  # argmax(ids) would pick a different position
  old = ref.text_model.eos_token_id
  ref.text_model.eos_token_id = eos
  try:
    want = _torch_text(ref, ids, mask)
  finally:
    ref.text_model.eos_token_id = old
  got = model.encode_text(ids, mask)
  assert _report(f"CLIP text embeds, eos_token_id={eos}", got, want) < TOL


def test_clip_logits_and_sharding(clip):
  ref, folder, _ = clip
  model = encoders.load_clip(folder)
  x, (ids, mask) = _pixels(2), _text_batch(eos=VOCAB - 1, high=VOCAB - 1)
  with torch.no_grad():
    want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
               pixel_values=torch.tensor(x).permute(0, 3, 1, 2)).logits_per_image.numpy()
  assert _report("CLIP logits_per_image", model(x, ids, mask), want) < 1e-3
  # Every logical axis name used by the encoders has a sharding rule.
  specs = sharding.param_specs(nnx.state(model, nnx.Param), sharding.make_mesh())
  assert jax.tree.leaves(specs)


# --- Full size, by shape ---------------------------------------------------------------------

def test_reference_param_counts(reference_configs_dir):
  dino_cfg = json.loads((reference_configs_dir / "dino_vits16.json").read_text())
  clip_cfg = json.loads((reference_configs_dir / "clip_vit_b_32.json").read_text())
  dino_model = encoders.abstract_dino(dino_cfg)
  clip_model = encoders.abstract_clip(clip_cfg)
  assert encoders.param_count(dino_model) == dino_cfg["_param_count"]["computed_ViTModel_no_pooler"]
  expected = clip_cfg["_param_count"]
  assert encoders.param_count(clip_model) == expected["computed_CLIPModel"]
  assert encoders.param_count(clip_model.text_model) == expected["text_model"]
  assert encoders.param_count(clip_model.vision_model) == expected["vision_model"]
  assert dino_model.cfg.layer_norm_eps == 1e-12 and dino_model.cfg.grid == (14, 14)
  assert clip_model.cfg.text.eos_token_id == 2  # legacy pooling rule for ViT-B/32


# --- Preprocessing ---------------------------------------------------------------------------

def _images():
  """Smooth-plus-noise uint8 images; odd (size - crop) differences exercise crop rounding."""
  rng = np.random.RandomState(4)
  out = []
  for h, w in ((300, 257), (224, 451), (150, 181), (513, 512), (256, 483)):
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(yy / 17.0), np.cos(xx / 23.0), np.sin((xx + yy) / 31.0)], -1)
    a = (base * 90 + 128 + rng.randn(h, w, 3) * 20).clip(0, 255).astype(np.uint8)
    out.append(a)
  return out


def _torchvision_like(a, resize, crop, mean, std):
  """transforms.Compose([Resize(resize, BICUBIC), CenterCrop(crop), ToTensor(), Normalize])."""
  img = Image.fromarray(a)
  w, h = img.size
  if w <= h:
    size = (resize, int(resize * h / w))
  else:
    size = (int(resize * w / h), resize)
  img = img.resize(size, Image.BICUBIC)
  w, h = img.size
  top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
  img = img.crop((left, top, left + crop, top + crop))
  t = np.asarray(img, np.float32) / np.float32(255)
  return (t - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def test_preprocess_dino_matches_torchvision_semantics():
  images = _images()
  got = pre.preprocess_dino([Image.fromarray(a) for a in images])
  assert got.shape == (len(images), 224, 224, 3) and got.dtype == np.float32
  want = np.stack([_torchvision_like(a, 256, 224, pre.IMAGENET_MEAN, pre.IMAGENET_STD)
                   for a in images])
  assert _report("DINO preprocessing vs PIL/torchvision recipe", got, want) < 1e-5
  # uint8 arrays, a single image, and a uint8 batch give the same pixels as PIL input.
  np.testing.assert_array_equal(pre.preprocess_dino(images), got)
  np.testing.assert_array_equal(pre.preprocess_dino(images[1]), got[1:2])
  with pytest.raises(TypeError, match="uint8"):
    pre.preprocess_dino(images[0].astype(np.float32))


def test_preprocess_clip_matches_clipimageprocessor():
  try:
    from transformers import CLIPImageProcessorPil as Processor
  except ImportError:  # older transformers: the PIL implementation was the default one
    from transformers import CLIPImageProcessor as Processor
  proc = Processor(do_resize=True, size={"shortest_edge": 224}, resample=Image.BICUBIC,
                   do_center_crop=True, crop_size={"height": 224, "width": 224}, do_rescale=True,
                   rescale_factor=1 / 255, do_normalize=True, image_mean=list(pre.CLIP_MEAN),
                   image_std=list(pre.CLIP_STD), do_convert_rgb=True)
  images = _images()
  pil = [Image.fromarray(a) for a in images] + [Image.fromarray(images[0][..., 0])]  # + grayscale
  want = np.asarray(proc(images=pil, return_tensors="np")["pixel_values"]).transpose(0, 2, 3, 1)
  got = pre.preprocess_clip(pil)
  assert got.shape == want.shape == (len(pil), 224, 224, 3)
  assert _report("CLIP preprocessing vs CLIPImageProcessor", got, want) < 1e-5
  # The one-pixel crop-offset difference between the two rounding rules is real:
  tv = pre.preprocess_clip(pil, crop_rounding="torchvision")
  assert np.max(np.abs(tv - got)) > 1e-2
