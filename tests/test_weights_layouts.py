"""Weight folders as the reference libraries write them: layouts, IF repos, wrong models, preflight.

Every folder is written by transformers' or diffusers' own `save_pretrained`
(tests/if_repos.py); the PyTorch modules are the reference each load is
compared against. JAX compiles three programs here (tiny IF-I UNet, IF-II
UNet, T5), each shared by every load of the same architecture.
"""

import json
import math
import os
import pathlib
import shutil
import struct
import time

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import if_repos as R
from dreambooth_jax import weights
from dreambooth_jax.tokenizer import Tokenizer
from dreambooth_jax.weights import preflight, safetensors_io
from dreambooth_jax.weights.safetensors_io import SafetensorsFile, WeightsError, open_folder
from unet_configs import TEXT_DIM, TEXT_LEN, TINY_IF_I, TINY_IF_II

STEM = {"unet": "diffusion_pytorch_model", "t5": "model"}
# The file or index each layout must be read from: a silent fall-back to another file fails.
SOURCE = {"single": "{s}.safetensors", "sharded": "{s}.safetensors.index.json",
          "fp16": "{s}.fp16.safetensors", "fp16_sharded": "{s}.safetensors.index.fp16.json",
          "fp16_sharded_legacy": "{s}.safetensors.fp16.index.json"}
T5_VOCAB = 1024  # = if_repos.t5_vocab_size(900): the IF-I repo's T5 shares the compiled program

_apply = nnx.jit(lambda model, *a, **k: model(*a, **k))


def _unet_inputs(cfg, seed=0):
  rng = np.random.RandomState(seed)
  b, s = 2, cfg["sample_size"]
  mask = np.ones((b, TEXT_LEN), np.int64)
  mask[1, 3:] = 0
  return dict(x=rng.randn(b, cfg["in_channels"], s, s).astype(np.float32),
              t=np.array([3.0, 777.0], np.float32),
              text=rng.randn(b, TEXT_LEN, TEXT_DIM).astype(np.float32), mask=mask,
              labels=np.array([0.01, 250.0], np.float32) if cfg.get("class_embed_type") else None)


def _unet_torch(model, i):
  labels = None if i["labels"] is None else torch.tensor(i["labels"])
  with torch.no_grad():
    return model(torch.tensor(i["x"]), torch.tensor(i["t"]), torch.tensor(i["text"]),
                 encoder_attention_mask=torch.tensor(i["mask"]), class_labels=labels).sample.numpy()


def _unet_ours(model, i):
  labels = None if i["labels"] is None else jnp.asarray(i["labels"])
  out = _apply(model, jnp.asarray(i["x"].transpose(0, 2, 3, 1)), jnp.asarray(i["t"]),
               jnp.asarray(i["text"]), attention_mask=jnp.asarray(i["mask"]), class_labels=labels)
  return np.asarray(out).transpose(0, 3, 1, 2)


def _t5_inputs(vocab=T5_VOCAB):
  ids = np.random.default_rng(0).integers(3, vocab, size=(2, 16)).astype(np.int32)
  mask = np.ones_like(ids)
  ids[1, 9], ids[1, 10:], mask[1, 10:] = 1, 0, 0
  return ids, mask


def _t5_torch(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids).long(),
                 attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()


def _compare(name, ref, got):
  err, scale = np.abs(ref - got).max(), np.abs(ref).max()
  print(f"\n{name}: max abs error {err:.3e} (max |ref| {scale:.2f})")
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * max(scale, 1.0))


@pytest.fixture()
def no_tensor_reads(monkeypatch):
  """Makes any read of tensor data fail: what runs under it reads headers only."""
  def refuse(*_):
    raise AssertionError("tensor data was read")
  monkeypatch.setattr(SafetensorsFile, "__getitem__", refuse)
  monkeypatch.setattr(SafetensorsFile, "_data", refuse)


# ----------------------------------------------------------------------------- every layout


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
  root = tmp_path_factory.mktemp("layouts")
  unet, t5 = R.tiny_unet(TINY_IF_I, 0), R.tiny_t5(T5_VOCAB, 1)
  return {"unet": (unet, R.save_layouts(unet, root / "unet", "unet")),
          "t5": (t5, R.save_layouts(t5, root / "t5", "t5"))}


@pytest.mark.parametrize("layout", R.LAYOUTS)
def test_unet_layout_loads_and_matches_diffusers(layouts, layout):
  from diffusers import UNet2DConditionModel
  model, folders = layouts["unet"]
  tensors = open_folder(folders[layout], (STEM["unet"],))  # variant None: fp16 is the fall-back
  assert os.path.basename(tensors.source) == SOURCE[layout].format(s=STEM["unet"])
  assert tensors.variant == ("fp16" if layout.startswith("fp16") else None)
  ref_model = model
  if layout.startswith("fp16"):  # diffusers reads the legacy naming too (with a warning)
    ref_model = UNet2DConditionModel.from_pretrained(folders[layout], variant="fp16",
                                                     dtype=torch.float32).eval()
  inputs = _unet_inputs(TINY_IF_I)
  _compare(f"UNet {layout}", _unet_torch(ref_model, inputs),
           _unet_ours(weights.load_unet(folders[layout]), inputs))


@pytest.mark.parametrize("layout", R.LAYOUTS)
def test_t5_layout_loads_and_matches_transformers(layouts, layout):
  from transformers import T5EncoderModel
  model, folders = layouts["t5"]
  tensors = open_folder(folders[layout], (STEM["t5"],))
  assert os.path.basename(tensors.source) == SOURCE[layout].format(s=STEM["t5"])
  ref_model = model
  if layout.startswith("fp16"):
    # transformers 5 no longer reads diffusers' legacy names; the legacy folder holds the
    # same fp16 numbers as the new-style one (renamed files), so that is its reference.
    src = folders["fp16_sharded" if layout.endswith("legacy") else layout]
    ref_model = T5EncoderModel.from_pretrained(src, variant="fp16", dtype=torch.float32).eval()
  ids, mask = _t5_inputs()
  _compare(f"T5 {layout}", _t5_torch(ref_model, ids, mask),
           np.asarray(_apply(weights.load_t5_encoder(folders[layout]), ids, mask)))


def test_variant_policy_and_no_weights_messages(layouts, tmp_path):
  folders = layouts["unet"][1]
  both = tmp_path / "both"
  both.mkdir()
  for layout in ("single", "fp16"):
    for name in os.listdir(folders[layout]):
      shutil.copy(os.path.join(folders[layout], name), both)
  stem = STEM["unet"]
  assert open_folder(str(both), (stem,)).source.endswith(f"{stem}.safetensors")  # fp32 first
  assert open_folder(str(both), (stem,), "fp16").source.endswith(f"{stem}.fp16.safetensors")
  with pytest.raises(WeightsError) as e:
    open_folder(folders["fp16"], (stem,), "bf16")
  msg = str(e.value)
  assert folders["fp16"] in msg and "variant 'fp16'" in msg
  assert f"{stem}.safetensors.index.bf16.json" in msg and f"{stem}.safetensors.bf16.index.json" in msg
  # Shards whose index was not downloaded, next to a pickle: both are named.
  partial = tmp_path / "partial"
  shutil.copytree(folders["fp16_sharded"], partial)
  os.remove(partial / f"{stem}.safetensors.index.fp16.json")
  (partial / f"{stem}.bin").write_bytes(b"not read")
  with pytest.raises(WeightsError) as e:
    weights.load_unet(str(partial))
  msg = str(e.value)
  print("\n" + msg)
  assert "no index" in msg and f"{stem}.fp16-00001-of-00004.safetensors" in msg
  assert "pickle" in msg and f"{stem}.bin" in msg and f"{stem}.safetensors.index.json" in msg


# ----------------------------------------------------------------------------- IF repositories


@pytest.fixture(scope="module")
def if_torch(if_repos):
  """The repos loaded back by diffusers itself, fp16 files upcast to float32."""
  from diffusers import IFPipeline, IFSuperResolutionPipeline
  return {"stage_1": IFPipeline.from_pretrained(if_repos["stage_1"], variant="fp16",
                                                dtype=torch.float32),
          "stage_2": IFSuperResolutionPipeline.from_pretrained(if_repos["stage_2"], variant="fp16",
                                                               dtype=torch.float32)}


def test_if_repos_are_in_the_hub_layout(if_repos, if_torch):
  for stage, root in if_repos.items():
    index = json.loads(pathlib.Path(root, "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["tokenizer"] == ["transformers", "T5Tokenizer"]
    assert os.path.isfile(os.path.join(root, "tokenizer", "spiece.model"))
    files = [f for _, _, fs in os.walk(root) for f in fs if ".safetensors" in f]
    assert files and all(".fp16" in f for f in files), files  # nothing but the fp16 variant
    pipe = if_torch[stage]
    assert pipe.unet.dtype == torch.float32 and type(pipe.tokenizer).__name__ == "T5Tokenizer"
  assert json.loads(pathlib.Path(if_repos["stage_2"], "model_index.json").read_text())[
      "text_encoder"] == [None, None]
  assert if_torch["stage_2"].text_encoder is None
  assert len(os.listdir(os.path.join(if_repos["stage_1"], "text_encoder"))) >= 4  # 2+ shards
  for stage, cap in (("stage_1", 1.5), ("stage_2", 1.0)):
    cfg = if_torch[stage].scheduler.config
    assert cfg.sample_max_value == cap and cfg.variance_type == "learned_range"
  assert if_torch["stage_2"].image_noising_scheduler.config.variance_type == "fixed_small"


def test_if_scheduler_constants_are_the_published_ones(reference_configs_dir):
  """The fixtures' (and our default) scheduler configs equal DeepFloyd's published files."""
  from dreambooth_jax import cascade
  for name, ours in (("if_scheduler_stage_i.json", cascade.IF_STAGE_I_SCHEDULER),
                     ("if_scheduler_stage_ii.json", cascade.IF_STAGE_II_SCHEDULER),
                     ("if_image_noising_scheduler.json", cascade.IF_IMAGE_NOISING_SCHEDULER)):
    published = R.reference_config(reference_configs_dir, name)
    for key, value in ours.items():
      assert published.get(key) == value, (name, key, published.get(key), value)


@pytest.mark.parametrize("stage", ["stage_1", "stage_2"])
def test_if_repo_unet_matches_diffusers(if_repos, if_torch, stage):
  ours = weights.load_unet(if_repos[stage], role=stage)  # the repo root resolves to unet/
  inputs = _unet_inputs(TINY_IF_I if stage == "stage_1" else TINY_IF_II, seed=1)
  _compare(f"IF repo {stage} unet (fp16 files)", _unet_torch(if_torch[stage].unet, inputs),
           _unet_ours(ours, inputs))


def test_if_repo_tokenizer_and_text_encoder(if_repos, if_torch):
  from transformers import T5Tokenizer
  folder = os.path.join(if_repos["stage_1"], "tokenizer")
  ours, ref = Tokenizer.from_pretrained(folder), T5Tokenizer.from_pretrained(folder)
  prompts = ["a photo of sks dog", "A red backpack on the beach at night!",
             "café naïve résumé 12345", "qu ka ri forest " * 30]  # the last one is truncated
  for prompt in prompts:  # the SentencePiece model read from the repo, capitals and all
    assert ours.encode(prompt) == ref(prompt)["input_ids"], prompt
  # The batch as IF encodes it: preprocessed prompts, padded and truncated to 77 tokens.
  got = ours(prompts)
  want = ref([ours.preprocessed(p) for p in prompts], padding="max_length", max_length=77,
             truncation=True, return_tensors="np")
  np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
  np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])
  # Both repos' tokenizer/ folders are the same tokenizer, as on the Hub.
  assert ours.vocab_size == len(ref) == preflight.check_tokenizer_folder(if_repos["stage_2"]).vocab_size
  ids, mask = got["input_ids"][:2, :16].astype(np.int32), got["attention_mask"][:2, :16]
  _compare("IF repo text_encoder (fp16 files)", _t5_torch(if_torch["stage_1"].text_encoder, ids, mask),
           np.asarray(_apply(weights.load_t5_encoder(if_repos["stage_1"]), ids, mask)))


# ----------------------------------------------------------------------------- wrong models


@pytest.fixture(scope="module")
def wrong(tmp_path_factory, if_repos, reference_configs_dir):
  root = tmp_path_factory.mktemp("wrong")
  x4 = R.build_x4_upscaler(root / "x4", reference_configs_dir)
  folders = dict(R.build_text_models(root / "text", reference_configs_dir),
                 x4=x4, x4_unet=os.path.join(x4, "unet"), x4_vae=os.path.join(x4, "vae"),
                 sd=R.build_sd_unet(root / "sd"),
                 if_i=if_repos["stage_1"], if_ii=if_repos["stage_2"],
                 t5_folder=os.path.join(if_repos["stage_1"], "text_encoder"),
                 unet_folder=os.path.join(if_repos["stage_1"], "unet"))
  no_unet = root / "no_unet"  # an IF download whose unet/ never arrived
  shutil.copytree(if_repos["stage_1"], no_unet, ignore=shutil.ignore_patterns("unet"))
  folders["no_unet"] = str(no_unet)
  cross = root / "cross_attn_mid"  # IF blocks, a mid block IF does not have
  shutil.copytree(os.path.join(if_repos["stage_1"], "unet"), cross)
  cfg = json.loads((cross / "config.json").read_text())
  (cross / "config.json").write_text(json.dumps(dict(cfg, mid_block_type="UNetMidBlock2DCrossAttn")))
  folders["cross_attn_mid"] = str(cross)
  return folders


UNET_CASES = [  # (folder, role, where the message must point, fragments it must hold)
    ("if_ii", "stage_1", "unet", ["stage-II super-resolution", "stage_1 needs an IF stage-I"]),
    ("if_i", "stage_2", "unet", ["stage-I base", "stage_2 needs an IF-style super-resolution"]),
    ("x4", "stage_1", "unet", ["x4 upscaler", "in_channels 7", "stage III", "config.pretrained.stage_3",
                               "vae/, low_res_scheduler/"]),
    ("x4", "stage_2", "unet", ["x4 upscaler", "stage III", "config.pretrained.stage_3"]),
    ("x4_unet", "stage_3", "", ["x4 upscaler", "num_class_embeds 1000", "whole download",
                                "StableDiffusionUpscalePipeline"]),
    ("sd", "stage_1", "", ["Stable Diffusion 1.x text-to-image", "in_channels 4",
                           "CrossAttnDownBlock2D"]),
    ("sd", None, "", ["Stable Diffusion", "latent"]),
    ("x4_vae", "stage_3", "", ["VAE (AutoencoderKL)", "unet/"]),
    ("t5_folder", "stage_1", "", ["T5EncoderModel", "text encoder, not a UNet"]),
    ("no_unet", "stage_1", "", ["IFPipeline", "model_index.json", "lists unet"]),
    ("cross_attn_mid", None, "", ["mid_block_type", "UNetMidBlock2DCrossAttn"]),
]


@pytest.mark.parametrize("name,role,sub,fragments", UNET_CASES,
                         ids=[f"{c[0]}-as-{c[1]}" for c in UNET_CASES])
def test_wrong_unet_is_named(wrong, name, role, sub, fragments):
  folder = os.path.join(wrong[name], sub) if sub else wrong[name]
  for check in (lambda: weights.load_unet(wrong[name], role=role),
                lambda: preflight.check_unet_folder(wrong[name], role)):
    with pytest.raises(WeightsError) as e:
      check()
    msg = str(e.value)
    assert folder in msg and "\n" not in msg, msg  # one paragraph, naming the folder
    for fragment in fragments:
      assert fragment in msg, (fragment, msg)
  print(f"\n{name} as {role}: {msg}")


T5_CASES = [
    ("mt5", ["mT5", "model_type 'mt5'", "vocabulary"]),
    ("umt5", ["UMT5", "model_type 'umt5'"]),
    ("llama", ["decoder-only", "'llama'"]),
    ("gpt2", ["decoder-only", "'gpt2'"]),
    ("t5_decoder", ["T5 decoder stack", "is_decoder"]),
    ("clip", ["CLIP text encoder", "clip_text_model"]),
    ("unet_folder", ["diffusers UNet2DConditionModel", "not a text encoder"]),
    ("if_ii", ["IFSuperResolutionPipeline", "no text_encoder"]),
]


@pytest.mark.parametrize("name,fragments", T5_CASES, ids=[c[0] for c in T5_CASES])
def test_wrong_text_encoder_is_named(wrong, name, fragments):
  for check in (lambda: weights.load_t5_encoder(wrong[name]),
                lambda: preflight.check_t5_folder(wrong[name])):
    with pytest.raises(WeightsError) as e:
      check()
    msg = str(e.value)
    assert wrong[name] in msg and "\n" not in msg, msg
    for fragment in fragments + ["t5-v1_1-xxl"]:
      assert fragment in msg, (fragment, msg)


# ----------------------------------------------------------------------------- preflight


def test_preflight_of_if_repos_reads_headers_only(if_repos, no_tensor_reads):
  from diffusers import UNet2DConditionModel
  t0 = time.perf_counter()
  result = weights.check_pretrained({"stage_1": if_repos["stage_1"], "stage_2": if_repos["stage_2"]},
                                    t5=if_repos["stage_1"], tokenizer=if_repos["stage_2"])
  seconds = time.perf_counter() - t0
  print(f"\npreflight of the tiny IF-I + IF-II repos, T5 and tokenizer: {seconds:.3f}s")
  for stage, cfg in (("stage_1", TINY_IF_I), ("stage_2", TINY_IF_II)):
    got = result.unets[stage]
    assert got.folder == os.path.join(if_repos[stage], "unet") and got.variant == "fp16"
    assert got.weights.endswith("diffusion_pytorch_model.safetensors.index.fp16.json")
    with torch.device("meta"):
      assert got.num_params == sum(p.numel() for p in UNet2DConditionModel(**cfg).parameters())
    assert got.text_width == result.t5.config.d_model == 48
  assert result.t5.folder == os.path.join(if_repos["stage_1"], "text_encoder")
  assert result.tokenizer.folder == os.path.join(if_repos["stage_2"], "tokenizer")
  assert result.tokenizer.vocab_size == 900 <= result.t5.config.vocab_size
  assert seconds < 20  # configs and headers only; a real load would compile and copy


def _header_only(folder, model, stem: str, config: dict):
  """A folder whose safetensors file has `model`'s full header and a sparse, unwritten body."""
  from dreambooth_jax.weights import torch_layout
  header, offset = {}, 0
  for path, var in nnx.to_flat_state(nnx.split(model)[1]):
    shape = torch_layout.to_torch(str(path[-1]), np.empty(var.get_value().shape, np.bool_)).shape
    size = math.prod(shape) * 2
    header[torch_layout.torch_key(path)] = dict(dtype="F16", shape=list(shape),
                                                data_offsets=[offset, offset + size])
    offset += size
  os.makedirs(folder, exist_ok=True)
  blob = json.dumps(header).encode()
  blob += b" " * (-len(blob) % 8)
  path = os.path.join(folder, f"{stem}.fp16.safetensors")
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    f.truncate(8 + len(blob) + offset)
  if os.stat(path).st_blocks * 512 > 1 << 28:
    pytest.skip("this filesystem has no sparse files; a full-size header-only file would be written")
  pathlib.Path(folder, "config.json").write_text(json.dumps(config))


def test_preflight_full_size_if_i_xl_and_t5_xxl(reference_configs_dir, tmp_path, no_tensor_reads):
  from dreambooth_jax.models import unet as unet_lib
  from dreambooth_jax.weights.t5 import abstract_t5_encoder
  raw = json.loads((reference_configs_dir / "if_i_xl_unet.json").read_text())
  t5_raw = json.loads((reference_configs_dir / "t5_v1_1_xxl.json").read_text())
  _header_only(tmp_path / "unet", unet_lib.abstract_unet(unet_lib.UNetConfig.from_diffusers(raw)),
               "diffusion_pytorch_model", raw)
  _header_only(tmp_path / "t5", abstract_t5_encoder(t5_raw), "model", t5_raw)
  t0 = time.perf_counter()
  result = weights.check_pretrained({"stage_1": str(tmp_path / "unet")}, t5=str(tmp_path / "t5"))
  print(f"\npreflight of full-size IF-I-XL ({result.unets['stage_1'].num_params:,} params) + "
        f"T5 v1.1 XXL encoder ({result.t5.num_params:,}), fp16 headers: "
        f"{time.perf_counter() - t0:.2f}s")
  assert result.unets["stage_1"].num_params == raw["_param_count"]["computed"]
  assert result.t5.num_params == t5_raw["_param_count"]["computed_T5EncoderModel"]
  assert result.unets["stage_1"].text_width == result.t5.config.d_model == 4096


def _copy_unet(if_repos, tmp_path) -> pathlib.Path:
  dst = tmp_path / "unet"
  shutil.copytree(os.path.join(if_repos["stage_1"], "unet"), dst)
  return dst


def _shard(folder: pathlib.Path, k: int) -> pathlib.Path:
  return next(folder.glob(f"diffusion_pytorch_model.fp16-{k:05d}-of-*.safetensors"))


def _preflight_error(folder, role="stage_1") -> str:
  with pytest.raises(WeightsError) as e:
    preflight.check_unet_folder(str(folder), role)
  print("\n" + str(e.value))
  return str(e.value)


def test_preflight_catches_missing_shard(if_repos, tmp_path, no_tensor_reads):
  folder = _copy_unet(if_repos, tmp_path)
  shard = _shard(folder, 2)
  shard.unlink()
  msg = _preflight_error(folder)
  assert shard.name in msg and "missing" in msg and "index.fp16.json" in msg


def test_preflight_catches_truncated_files(if_repos, tmp_path, no_tensor_reads):
  folder = _copy_unet(if_repos, tmp_path)
  shard = _shard(folder, 1)
  data = shard.read_bytes()
  shard.write_bytes(data[:40])  # the header is cut: its length field points past the end
  msg = _preflight_error(folder)
  assert shard.name in msg and "not a readable safetensors file" in msg
  shard.write_bytes(data[:-64])  # header intact, the last tensor's bytes missing
  msg = _preflight_error(folder)
  assert shard.name in msg and "truncated" in msg


def test_preflight_catches_shape_mismatch(if_repos, tmp_path, monkeypatch):
  folder = _copy_unet(if_repos, tmp_path)
  shard = _shard(folder, 1)
  tensors = dict(SafetensorsFile(str(shard)))
  key = sorted(tensors)[0]
  bad = np.zeros((tensors[key].shape[0] + 1,) + tensors[key].shape[1:], np.float16)
  safetensors_io.save_file(dict(tensors, **{key: bad}), str(shard), metadata={"format": "pt"})
  expected = tensors[key].shape
  monkeypatch.setattr(SafetensorsFile, "__getitem__", lambda *_: pytest.fail("data was read"))
  msg = _preflight_error(folder)
  assert f"{key!r} has shape {bad.shape}, expected {tuple(expected)}" in msg


def test_preflight_cross_checks_t5_width_and_vocabulary(if_repos, tmp_path, no_tensor_reads):
  wide = tmp_path / "t5_wide"
  R.tiny_t5(T5_VOCAB, 2, d_model=64, d_kv=16).save_pretrained(wide)
  small = tmp_path / "t5_small_vocab"
  R.tiny_t5(512, 3).save_pretrained(small)
  unets = {"stage_1": if_repos["stage_1"], "stage_2": if_repos["stage_2"]}
  with pytest.raises(WeightsError) as e:
    weights.check_pretrained(unets, t5=str(wide), tokenizer=if_repos["stage_1"])
  msg = str(e.value)
  print("\n" + msg)
  assert str(wide) in msg and os.path.join(if_repos["stage_1"], "unet") in msg
  assert "d_model=64" in msg and "width 48" in msg and "4096" in msg
  with pytest.raises(WeightsError) as e:
    weights.check_pretrained(unets, t5=str(small), tokenizer=if_repos["stage_1"])
  msg = str(e.value)
  print(msg)
  assert str(small) in msg and "900 ids" in msg and "vocab_size=512" in msg


def test_preflight_lists_every_broken_folder_and_tokenizer_without_spiece(if_repos, tmp_path):
  from transformers import T5Tokenizer
  tok = tmp_path / "tokenizer"  # what transformers 5 writes: tokenizer.json, no spiece.model
  T5Tokenizer.from_pretrained(os.path.join(if_repos["stage_1"], "tokenizer")).save_pretrained(tok)
  with pytest.raises(WeightsError) as e:
    weights.check_pretrained({"stage_1": if_repos["stage_2"], "stage_2": if_repos["stage_1"]},
                             t5=if_repos["stage_1"], tokenizer=str(tok))
  msg = str(e.value)
  print("\n" + msg)
  assert msg.startswith("3 pretrained folders are unusable")
  assert "given as stage_1" in msg and "given as stage_2" in msg
  assert str(tok) in msg and "transformers 5" in msg and "spiece.model" in msg
