"""T5 tokenizer: id-for-id parity with transformers' T5Tokenizer.from_pretrained(dir).

A small unigram SentencePiece model with T5's special ids (pad 0, eos 1, unk 2,
no bos) is trained on a generated corpus (the session fixture `spiece_dir` of
conftest.py); transformers 5 converts that same spiece.model to a `tokenizers`
Unigram model, which is what IF users run.
"""

import random

import numpy as np
import pytest

from dreambooth_jax.tokenizer import IF_MAX_LENGTH, Tokenizer
from text_helpers import WORDS

PROMPTS = [
    "a sks dog",
    "",
    "   ",
    "a  photo   of\ta sks dog  on the beach ",
    "Hello, world! (test) [x] {y} 'q' \"z\" -- don't stop-it... ok?!",
    "café naïve résumé Ünïcödé ß æ ø 日本語 🐶",
    "ｆｕｌｌｗｉｄｔｈ ① ﬁ ligature, e\u0301 combining",
    "nbsp\u00a0em\u2003ideographic\u3000space zero\u200bwidth\ufeffbom",
    "\nnew\r\nlines\n",
    "12345 67890 3.14 1,000 -7 #1 @user 100%",
    "a sks dog " + " ".join(random.Random(3).choice(WORDS) for _ in range(120)),  # > 77 tokens
    "<extra_id_0> a </s> b <pad> <unk> <extra_id_99><extra_id_5>",
    "dog<extra_id_0>cat <extra_id_100> <extra_id_05> <PAD> <s>",
    "UPPER lower MiXeD",
]


@pytest.fixture(scope="module")
def tokenizers(spiece_dir):
  from transformers import T5Tokenizer
  # Raw tokenization (preprocess="none"): IF's preprocessing is compared in test_captions.py.
  return (Tokenizer.from_pretrained(spiece_dir, preprocess="none"),
          T5Tokenizer.from_pretrained(spiece_dir))


def test_batch_parity_with_transformers(tokenizers):
  ours, ref = tokenizers
  out = ours(PROMPTS)
  expected = ref(PROMPTS, padding="max_length", max_length=77, truncation=True)
  assert set(out) == {"input_ids", "attention_mask"}
  assert out["input_ids"].shape == (len(PROMPTS), IF_MAX_LENGTH) and out["input_ids"].dtype == np.int32
  assert out["attention_mask"].dtype == np.int32
  for i, prompt in enumerate(PROMPTS):
    assert out["input_ids"][i].tolist() == expected["input_ids"][i], prompt
    assert out["attention_mask"][i].tolist() == expected["attention_mask"][i], prompt
  # The long prompt is truncated and still ends in </s>; the empty one is just </s>.
  long_row = PROMPTS.index(PROMPTS[10])
  assert out["attention_mask"][long_row].all() and out["input_ids"][long_row, -1] == 1
  assert out["input_ids"][1].tolist() == [1] + [0] * 76


def test_single_string_and_unpadded_encode(tokenizers):
  ours, ref = tokenizers
  np.testing.assert_array_equal(ours("a sks dog")["input_ids"], ours(["a sks dog"])["input_ids"])
  for prompt in PROMPTS:
    assert ours.encode(prompt) == ref(prompt)["input_ids"], prompt
    assert ours.encode(prompt, add_eos=False) == ref(prompt, add_special_tokens=False)["input_ids"]


def test_vocab_layout(tokenizers):
  ours, ref = tokenizers
  assert ours.vocab_size == len(ref) == ours.sp_size + 100 == 900
  assert (ours.pad_id, ours.eos_id, ours.unk_id) == (ref.pad_token_id, ref.eos_token_id, ref.unk_token_id)
  every = list(range(ours.vocab_size))
  assert [ours.id_to_piece(i) for i in every] == ref.convert_ids_to_tokens(every)
  assert ours.piece_to_id("<extra_id_0>") == 899 and ours.piece_to_id("<extra_id_99>") == 800
  assert ours.piece_to_id("\u2581dog") == ref.convert_tokens_to_ids("\u2581dog")
  with pytest.raises(IndexError):
    ours.id_to_piece(900)


def test_decode_parity(tokenizers):
  ours, ref = tokenizers
  rng = np.random.default_rng(0)
  cases = [ours.encode(p) for p in PROMPTS] + [ours(PROMPTS)["input_ids"][3]]
  cases += [rng.integers(0, ours.vocab_size, size=12).tolist() for _ in range(20)]
  cases += [[i] for i in range(0, ours.vocab_size, 7)] + [[]]
  for ids in cases:
    for skip in (False, True):
      assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
          list(map(int, ids)), skip_special_tokens=skip), (ids, skip)


def test_max_length_truncates_keeping_eos(spiece_dir):
  tok = Tokenizer.from_pretrained(spiece_dir, max_length=8)
  out = tok(["a sks dog on the beach at night with a red hat", "a dog"])
  assert out["input_ids"].shape == (2, 8)
  assert out["input_ids"][0, -1] == 1 and out["attention_mask"][0].sum() == 8


def test_decode_roundtrip(spiece_dir):
  tok = Tokenizer.from_pretrained(spiece_dir)
  assert tok.decode(tok.encode("a sks dog"), skip_special_tokens=True) == "a sks dog"


def test_bad_paths(tmp_path):
  import sentencepiece as spm

  with pytest.raises(FileNotFoundError, match="spiece.model"):
    Tokenizer.from_pretrained(str(tmp_path))
  # SentencePiece's default ids (unk 0, bos 1, eos 2) are not T5's layout.
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(" ".join(WORDS[i:i + 6]) for i in range(len(WORDS))))
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "spiece"),
                                 vocab_size=60, minloglevel=2)
  with pytest.raises(ValueError, match="pad/eos/unk"):
    Tokenizer.from_pretrained(str(tmp_path))
