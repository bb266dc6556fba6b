"""Prompt-embedding cache: computed once, read back from disk, invalidated, repaired, sharded.

The encoder is a tiny random-init T5 (vocabulary padded past the 900 ids of the
conftest tokenizer, as T5's 32128 rows pad its 32100), also saved as a Hugging
Face folder so that the folder fingerprint and the bf16 loader are exercised.
"""

import gc
import json
import os
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dreambooth_jax import sharding
from dreambooth_jax.embeddings import (PromptEmbeddingCache, encode_prompts, encoder_fingerprint,
                                       stack_embeddings)
from dreambooth_jax.models.t5 import T5Config, T5EncoderModel
from dreambooth_jax.tokenizer import Tokenizer
from dreambooth_jax.weights.safetensors_io import save_file
from dreambooth_jax.weights.t5 import load_t5_encoder
from dreambooth_jax.weights.torch_layout import export_params

TINY = dict(vocab_size=928, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", relative_attention_max_distance=64)
PROMPTS = ["a sks dog", "a dog", "", "a sks dog on the beach at night", "a sks dog"]


def _model(seed=0):
  return T5EncoderModel(T5Config(**TINY), rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def tok(spiece_dir):
  return Tokenizer.from_pretrained(spiece_dir)


@pytest.fixture(scope="module")
def t5():
  return _model()


@pytest.fixture(scope="module")
def t5_folder(t5, tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny_t5")
  save_file(export_params(t5), str(folder / "model.safetensors"))
  (folder / "config.json").write_text(json.dumps(dict(TINY, model_type="t5")))
  return str(folder)


class Counting:
  """encode_fn that records each call's prompts."""

  def __init__(self, t5, tok, **kw):
    self.t5, self.tok, self.kw, self.calls = t5, tok, kw, []

  def __call__(self, prompts):
    self.calls.append(list(prompts))
    return encode_prompts(self.t5, self.tok, prompts, **self.kw)


def test_computes_once_then_reads_disk(t5, tok, tmp_path):
  fp = encoder_fingerprint(t5, tok)
  encode = Counting(t5, tok, batch_size=2)
  cache = PromptEmbeddingCache(str(tmp_path))
  table = cache.get_or_compute(PROMPTS, encode, fp)
  distinct = list(dict.fromkeys(PROMPTS))
  assert encode.calls == [distinct] and list(table) == distinct
  assert (cache.hits, cache.misses) == (0, 4)
  tokens = tok(distinct)
  for row, prompt in enumerate(distinct):
    emb, mask = table[prompt]
    assert emb.shape == (77, TINY["d_model"]) and emb.dtype == np.float32 and mask.dtype == np.int32
    np.testing.assert_array_equal(mask, tokens["attention_mask"][row])
  assert table[""].mask.sum() == 1  # the unconditional prompt is just </s>

  # A new cache object on the same folder reads every prompt back without encoding.
  again = PromptEmbeddingCache(str(tmp_path)).get_or_compute(PROMPTS, encode, fp)
  assert len(encode.calls) == 1
  for prompt in distinct:
    np.testing.assert_array_equal(again[prompt].embeddings, table[prompt].embeddings)
    np.testing.assert_array_equal(again[prompt].mask, table[prompt].mask)
  # Only a new prompt is encoded, alone.
  more = cache.get_or_compute(["a dog", "a sks dog in the snow"], encode, fp)
  assert encode.calls[-1] == ["a sks dog in the snow"] and set(more) == {"a dog", "a sks dog in the snow"}
  index = json.loads((tmp_path / "index.json").read_text())
  assert sorted(v["prompt"] for v in index.values()) == sorted(distinct + ["a sks dog in the snow"])
  assert not [n for n in os.listdir(tmp_path) if not n.endswith((".safetensors", "index.json"))]

  batch = stack_embeddings(table, ["a sks dog", "a dog"])
  assert batch["text"].shape == (2, 77, TINY["d_model"]) and batch["mask"].shape == (2, 77)


def test_embeddings_equal_direct_t5_output(t5, tok, tmp_path):
  table = PromptEmbeddingCache(str(tmp_path)).get_or_compute(
      PROMPTS, Counting(t5, tok, batch_size=3), encoder_fingerprint(t5, tok))
  distinct = list(dict.fromkeys(PROMPTS))
  tokens = tok(distinct)
  direct = np.asarray(nnx.jit(lambda m, i, k: m(i, k))(t5, tokens["input_ids"], tokens["attention_mask"]))
  for row, prompt in enumerate(distinct):
    np.testing.assert_allclose(table[prompt].embeddings, direct[row], atol=1e-5, rtol=1e-5)


def test_changed_fingerprint_recomputes(t5, tok, t5_folder, tmp_path):
  cache = PromptEmbeddingCache(str(tmp_path))
  encode = Counting(t5, tok)
  fp = encoder_fingerprint(t5_folder, tok)
  cache.get_or_compute(["a sks dog", "a dog"], encode, fp)
  cache.get_or_compute(["a sks dog", "a dog"], encode, fp + "x")
  assert encode.calls == [["a sks dog", "a dog"]] * 2
  cache.get_or_compute(["a sks dog", "a dog"], encode, fp)  # both versions stay on disk
  assert len(encode.calls) == 2


def test_fingerprint_covers_weights_tokenizer_and_dtype(t5, tok, t5_folder, spiece_dir, tmp_path):
  fp = encoder_fingerprint(t5_folder, tok)
  assert fp == encoder_fingerprint(t5_folder, spiece_dir) and len(fp) == 32
  assert fp != encoder_fingerprint(t5_folder, tok, dtype="bfloat16")
  assert fp != encoder_fingerprint(t5_folder, Tokenizer.from_pretrained(spiece_dir, max_length=16))
  assert fp != encoder_fingerprint(t5_folder, tok, extra={"seed": 1})
  # The same bytes under another name are the same weights; one changed value is not.
  other = tmp_path / "copy"
  other.mkdir()
  for name in ("config.json", "model.safetensors"):
    (other / name).write_bytes(open(os.path.join(t5_folder, name), "rb").read())
  assert encoder_fingerprint(str(other), tok) == fp
  blob = bytearray((other / "model.safetensors").read_bytes())
  blob[-3] ^= 0xFF
  (other / "model.safetensors").write_bytes(bytes(blob))
  assert encoder_fingerprint(str(other), tok) != fp
  # In memory: stable, and a different init (same config, shapes, dtypes) differs.
  assert encoder_fingerprint(t5, tok) == encoder_fingerprint(t5, tok) != encoder_fingerprint(_model(1), tok)
  with pytest.raises(TypeError):
    encoder_fingerprint(42, tok)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_shape", "nan", "other_prompt"])
def test_corrupt_file_is_recomputed(t5, tok, tmp_path, damage):
  cache = PromptEmbeddingCache(str(tmp_path))
  encode = Counting(t5, tok)
  fp = encoder_fingerprint(t5, tok)
  good = cache.get_or_compute(["a sks dog", "a dog"], encode, fp)
  path = cache.path("a dog", fp)
  meta = {"prompt": "a dog", "fingerprint": fp}
  emb, mask = good["a dog"]
  if damage == "truncate":
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) - 100)
  elif damage == "garbage":
    with open(path, "wb") as f:
      f.write(os.urandom(1000))
  elif damage == "wrong_shape":
    save_file({"embeddings": emb, "attention_mask": mask[:10]}, path, metadata=meta)
  elif damage == "nan":
    save_file({"embeddings": np.full_like(emb, np.nan), "attention_mask": mask}, path, metadata=meta)
  else:  # a file of another prompt moved onto this name
    save_file({"embeddings": emb, "attention_mask": mask}, path, metadata=dict(meta, prompt="a cat"))
  fixed = PromptEmbeddingCache(str(tmp_path)).get_or_compute(["a sks dog", "a dog"], encode, fp)
  assert encode.calls == [["a sks dog", "a dog"], ["a dog"]]
  np.testing.assert_array_equal(fixed["a dog"].embeddings, emb)
  assert cache.load("a dog", fp) is not None  # repaired on disk


def test_bf16_encoder_round_trips(tok, t5_folder, tmp_path):
  t5_bf16 = load_t5_encoder(t5_folder, dtype=jnp.bfloat16)
  fp = encoder_fingerprint(t5_folder, tok, dtype="bfloat16")
  first = PromptEmbeddingCache(str(tmp_path)).get_or_compute(["a sks dog"], Counting(t5_bf16, tok), fp)
  del t5_bf16
  read = PromptEmbeddingCache(str(tmp_path)).get_or_compute(["a sks dog"], _never, fp)
  assert read["a sks dog"].embeddings.dtype == jnp.bfloat16
  np.testing.assert_array_equal(read["a sks dog"].embeddings.view(np.uint16),
                                first["a sks dog"].embeddings.view(np.uint16))


def _never(prompts):
  raise AssertionError(f"encode_fn called for {prompts}")


def test_bad_encode_fn_output_is_refused(tmp_path):
  cache = PromptEmbeddingCache(str(tmp_path))
  with pytest.raises(ValueError, match=r"\[N, L, D\]"):
    cache.get_or_compute(["a", "b"], lambda ps: (np.zeros((1, 77, 8)), np.ones((1, 77))), "fp")
  nan = lambda ps: (np.full((len(ps), 77, 8), np.nan, np.float32), np.ones((len(ps), 77)))
  with pytest.raises(ValueError, match="non-finite"):
    cache.get_or_compute(["a"], nan, "fp")
  assert not any(n.endswith(".safetensors") for n in os.listdir(tmp_path))


def test_sharded_encode_equals_unsharded(t5, tok):
  assert jax.device_count() == 8
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  prompts = list(dict.fromkeys(PROMPTS))
  ref_emb, ref_mask = encode_prompts(t5, tok, prompts, batch_size=4)
  # batch_size 3 is rounded up to 4, a multiple of the 2x2 data-parallel devices.
  emb, mask = encode_prompts(t5, tok, prompts, batch_size=3, mesh=mesh)
  assert isinstance(emb, np.ndarray) and emb.shape == (4, 77, TINY["d_model"])
  np.testing.assert_array_equal(mask, ref_mask)
  np.testing.assert_allclose(emb, ref_emb, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_mesh", [False, True])
def test_encoder_is_not_kept_alive(tok, tmp_path, use_mesh):
  """After encoding, dropping the model frees its parameters: nothing else references them."""
  model = _model(2)
  param = model.encoder.block[0].layer[1].DenseReluDense.wi_0.kernel.get_value()
  ref = weakref.ref(param)
  del param
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1}) if use_mesh else None
  # `model` bound as a default: a closure over it reads as undefined after the `del` below.
  encode = lambda ps, m=model: encode_prompts(m, tok, ps, batch_size=8, mesh=mesh)
  cache = PromptEmbeddingCache(str(tmp_path))
  table = cache.get_or_compute(["a sks dog", ""], encode, encoder_fingerprint(model, tok))
  del model, encode
  gc.collect()
  assert ref() is None
  assert table["a sks dog"].embeddings.shape == (77, TINY["d_model"])


# -- learned tokens (textual inversion) ---------------------------------------------------------


def test_learned_token_ids_and_rows(tok):
  learned = tok.with_learned_tokens(["<rare>"])
  ids = learned.encode("a photo of <rare> dog", add_eos=False)
  assert ids == tok.encode("a photo of", add_eos=False) + [-1] + tok.encode("dog", add_eos=False)
  assert learned.decode(ids) == "a photo of <rare> dog"
  assert learned.vocab_size == tok.vocab_size  # T5's table does not grow
  with pytest.raises(ValueError, match="learned token"):
    tok.with_learned_tokens(["two words"])

  model = _model()
  with pytest.raises(ValueError, match="learned_rows"):
    encode_prompts(model, learned, ["a photo of <rare> dog"])
  # The row of a learned token is what the encoder reads at its position...
  dog = tok.encode("dog", add_eos=False)
  assert len(dog) == 1
  rows = np.asarray(model.shared.embedding[...][dog[0]])[None]
  via_row, _ = encode_prompts(model, learned, ["a photo of <rare>"], learned_rows=rows)
  via_word, _ = encode_prompts(model, tok, ["a photo of dog"])
  err = float(np.abs(via_row - via_word).max())
  print(f"\nlearned row = word's row: max abs error {err:.3e}")
  assert err < 1e-6
  # ...and plain prompts ignore the rows.
  plain, _ = encode_prompts(model, learned, ["a dog"], learned_rows=rows + 1)
  np.testing.assert_array_equal(plain, encode_prompts(model, tok, ["a dog"])[0])


def test_gradient_reaches_the_learned_row_only(tok):
  from dreambooth_jax.embeddings import encode_with_learned
  learned = tok.with_learned_tokens(["<rare>"])
  model = _model()
  graphdef, params = nnx.split(model)
  t = learned(["a photo of <rare> dog"])
  rows = jnp.ones((1, TINY["d_model"]), jnp.float32) * 0.1

  def loss(rows, params):
    out = encode_with_learned(nnx.merge(graphdef, params), rows, t["input_ids"], t["attention_mask"])
    return jnp.sum(out ** 2)

  g_rows, g_params = jax.grad(loss, argnums=(0, 1))(rows, params)
  assert float(jnp.abs(g_rows).max()) > 0
  # T5's own table gets gradient only at real tokens' ids, never through the learned id.
  table_grad = np.asarray(g_params["shared"]["embedding"][...])
  touched = set(np.nonzero(np.abs(table_grad).sum(-1))[0].tolist())
  assert touched == {int(i) for i in t["input_ids"][0] if i >= 0}
