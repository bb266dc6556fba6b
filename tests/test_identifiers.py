"""DreamBooth identifiers: the rare-token rule, re-tokenisation, prompts, user strings, storage.

The tokenizer is the ~800-piece T5-layout SentencePiece model of conftest.py,
so the paper's id range (5000, 10000) lies outside it and tests use RANGE.
`tok` preprocesses prompts as IFPipeline does by default ("clean"); `tok_raw`
does not ("none"). tests/test_captions.py checks the choice against diffusers.
"""

import json

import pytest

from dreambooth_jax import captions
from dreambooth_jax.identifiers import (CLASS_TEMPLATE, INSTANCE_TEMPLATE, T5_RARE_ID_RANGE,
                                        Identifier, class_prompt, instance_prompt,
                                        rare_token_candidates, rare_token_identifier,
                                        resolve_identifier)
from dreambooth_jax.tokenizer import Tokenizer

RANGE = (100, 800)
SEEDS = range(12)
MARK = "\u2581"


@pytest.fixture(scope="module")
def tok(spiece_dir):
  return Tokenizer.from_pretrained(spiece_dir)


@pytest.fixture(scope="module")
def tok_raw(spiece_dir):
  return Tokenizer.from_pretrained(spiece_dir, preprocess="none")


def _comes_through(text: str, mode: str) -> bool:
  """IFPipeline._text_preprocessing leaves `text` alone (the port is pinned to diffusers in
  test_captions.py)."""
  if mode == "none":
    return True
  return captions.text_preprocessing(text, clean_caption=mode == "clean") == text


@pytest.mark.parametrize("mode", captions.MODES)
def test_candidates_follow_the_rule(spiece_dir, mode):
  """Membership equals the rule written independently with `decode`, over the whole range."""
  tok = Tokenizer.from_pretrained(spiece_dir, preprocess=mode)
  candidates = set(rare_token_candidates(tok, id_range=RANGE).tolist())
  expected, dropped = set(), set()
  for i in range(*RANGE):
    text = tok.decode([i])  # one token's text: the word marker becomes a dropped leading space
    if 1 <= len(text) <= 3 and " " not in text and any(c.isalnum() for c in text):
      (expected if _comes_through(text, mode) else dropped).add(i)
  assert candidates == expected and len(candidates) > 50
  # Capitals exist in the range, so the preprocessing rule removes candidates in both modes.
  assert (len(dropped) > 10) == (mode != "none")
  if mode != "none":
    assert not any(c.isupper() for i in candidates for c in tok.decode([i]))
  with_punct = set(rare_token_candidates(tok, id_range=RANGE, allow_punctuation=True).tolist())
  assert candidates < with_punct
  assert all(not any(c.isalnum() for c in tok.decode([i])) for i in with_punct - candidates)
  assert all(_comes_through(tok.decode([i]), mode) for i in with_punct)


@pytest.mark.parametrize("num_tokens", [1, 2, 3])
def test_sampled_identifiers_retokenise_exactly(tok, num_tokens):
  seen = set()
  for seed in SEEDS:
    ident = rare_token_identifier(tok, num_tokens=num_tokens, seed=seed, id_range=RANGE)
    ids = list(ident.token_ids)
    assert len(ids) == num_tokens and ident.source == "rare_tokens" and ident.seed == seed
    assert ident.id_range == RANGE
    for i in ids:  # <= 3 characters, no space, in range, never special
      piece = tok.id_to_piece(i)
      text = piece[1:] if piece.startswith(MARK) else piece
      assert RANGE[0] <= i < RANGE[1] and not tok.is_special(i)
      assert 1 <= len(text) <= 3 and not any(c.isspace() or c == MARK for c in text), piece
    assert ident.pieces == tuple(tok.id_to_piece(i) for i in ids)
    assert tok.id_to_piece(ids[0]).startswith(MARK)  # it follows "a " in the prompt
    # Detokenised: pieces joined, a word-initial piece starts a new word.
    assert ident.text == tok.decode(ids) and ident.text == ident.text.strip()
    assert ident.text.count(" ") == sum(tok.id_to_piece(i).startswith(MARK) for i in ids[1:])
    # Re-tokenised alone and inside "a [V] dog": exactly the chosen ids, nothing merged or split.
    assert tok.encode(ident.text, add_eos=False) == ids
    prompt = instance_prompt(ident, "dog")
    assert prompt == f"a {ident.text} dog"
    assert tok.encode(prompt) == tok.encode("a", add_eos=False) + ids + tok.encode("dog")
    # ...and IF's prompt preprocessing leaves both alone, so the batch encoding agrees.
    assert tok.preprocessed(ident.text) == ident.text and tok.preprocessed(prompt) == prompt
    row = tok(prompt)["input_ids"][0].tolist()
    assert row[:len(tok.encode(prompt))] == tok.encode(prompt)
    seen.add(ident.token_ids)
  assert len(seen) > len(SEEDS) // 2  # different seeds, different identifiers


def test_deterministic_per_seed(tok):
  a = rare_token_identifier(tok, num_tokens=2, seed=7, id_range=RANGE)
  b = rare_token_identifier(Tokenizer.from_pretrained(tok.path), num_tokens=2, seed=7, id_range=RANGE)
  assert a == b
  assert rare_token_identifier(tok, num_tokens=2, seed=8, id_range=RANGE) != a


def test_single_word_identifiers(tok):
  for num_tokens in (2, 3):
    for seed in range(6):
      ident = rare_token_identifier(tok, num_tokens=num_tokens, seed=seed, id_range=RANGE,
                                    single_word=True)
      assert " " not in ident.text and len(ident.token_ids) == num_tokens
      assert all(not tok.id_to_piece(i).startswith(MARK) for i in ident.token_ids[1:])
      assert tok.encode(ident.text, add_eos=False) == list(ident.token_ids)


def test_small_vocab_errors_name_the_range(tok):
  # The paper's T5 range is past the end of an 800-piece vocabulary: a clear error, not a clip to nothing.
  with pytest.raises(ValueError, match=r"id_range \(5000, 10000\).*800 pieces.*id_range=\(lo, hi\)"):
    rare_token_identifier(tok)
  assert T5_RARE_ID_RANGE == (5000, 10000)
  # A range reaching past the vocabulary is clipped to the SentencePiece pieces (no sentinels).
  ident = rare_token_identifier(tok, seed=1, id_range=(700, 10_000))
  assert 700 <= ident.token_ids[0] < tok.sp_size
  # A range holding only punctuation has no candidates.
  punct = next(i for i in range(3, tok.sp_size)
               if not any(c.isalnum() for c in tok.id_to_piece(i).lstrip(MARK)))
  with pytest.raises(ValueError, match="no identifier tokens.*Widen id_range"):
    rare_token_identifier(tok, id_range=(punct, punct + 1))
  with pytest.raises(ValueError, match="num_tokens"):
    rare_token_identifier(tok, num_tokens=4, id_range=RANGE)


def test_failed_retokenisation_is_redrawn_then_reported(tok, tok_raw):
  # "_{identifier}" glues the identifier to "_": its word-initial first piece can never
  # come back, so every draw fails and the error says why after max_tries.
  assert not any(tok.id_to_piece(i).startswith(MARK + "_") for i in range(3, tok.sp_size))
  with pytest.raises(ValueError, match="mode 'none'.*re-tokenised.*in 5 draws.*last failure"):
    rare_token_identifier(tok_raw, id_range=RANGE, template="_{identifier} {class_noun}",
                          max_tries=5)
  # IF's cleaner strips a leading "_" ("_sks dog" -> "sks dog"), so in mode "clean" the
  # identifier stands alone again and the same template works, as it would in IFPipeline.
  ident = rare_token_identifier(tok, id_range=RANGE, template="_{identifier} {class_noun}")
  assert tok.preprocessed(f"_{ident} dog") == f"{ident} dog"
  # Glued to a letter, the identifier is never a word of the preprocessed prompt.
  with pytest.raises(ValueError, match="mode 'clean'.*in 5 draws.*last failure.*without"):
    rare_token_identifier(tok, id_range=RANGE, template="x{identifier} {class_noun}", max_tries=5)


def test_user_identifier_passes_through(tok):
  ident = resolve_identifier(tok, "sks")
  assert ident.text == "sks" and ident.source == "user" and ident.seed is None
  assert list(ident.token_ids) == tok.encode("sks", add_eos=False)
  assert instance_prompt(ident, "dog") == "a sks dog" and class_prompt("dog") == "a dog"
  assert tok.encode("a sks dog")[1:-2] == list(ident.token_ids)
  # Multi-word user identifiers and extra whitespace are fine; whitespace is normalised.
  assert resolve_identifier(tok, "  sks  toy ").text == "sks toy"
  with pytest.raises(ValueError, match="empty"):
    resolve_identifier(tok, "  ")
  with pytest.raises(ValueError, match="does not survive tokenisation"):
    resolve_identifier(tok, "sks", template="x{identifier} {class_noun}")
  with pytest.raises(ValueError, match="does not survive tokenisation"):
    resolve_identifier(Tokenizer.from_pretrained(tok.path, preprocess="none"), "sks",
                       template="_{identifier} {class_noun}")
  with pytest.raises(TypeError, match="seed"):
    resolve_identifier(tok, "sks", seed=3)


def test_resolve_samples_when_none(tok):
  sampled = resolve_identifier(tok, None, num_tokens=3, seed=5, id_range=RANGE, class_noun="cat")
  assert sampled == rare_token_identifier(tok, num_tokens=3, seed=5, id_range=RANGE, class_noun="cat")
  assert resolve_identifier(tok, sampled) is sampled


def test_a_configs_word_or_its_rare_tokens(tok, tmp_path):
  """The training path (`prompts.resolve_identifier` on a config, which always carries the
  rare-token settings): a given word is used as is, stored, and read back on resume;
  without one, the settings sample rare tokens. A given word once raised a TypeError here."""
  import ml_collections
  from dreambooth_jax import prompts
  config = ml_collections.ConfigDict(dict(
      seed=5, method="dreambooth",
      subject=dict(identifier="red", class_noun="ball", instance_template=INSTANCE_TEMPLATE,
                   identifier_tokens=1, identifier_id_range=RANGE)))
  ident = prompts.resolve_identifier(config, tok, tmp_path / "run")
  assert ident.text == "red" and ident.source == "user"
  assert prompts.resolve_identifier(config, tok, tmp_path / "run") == ident
  config.subject.identifier = ""
  assert prompts.resolve_identifier(config, tok, tmp_path / "other") == rare_token_identifier(
      tok, num_tokens=1, seed=5, id_range=RANGE, class_noun="ball")


def test_templates():
  assert INSTANCE_TEMPLATE == "a {identifier} {class_noun}" and CLASS_TEMPLATE == "a {class_noun}"
  assert instance_prompt("sks", "backpack", template="a photo of {identifier} {class_noun}") == \
      "a photo of sks backpack"
  assert instance_prompt("sks", "") == "a sks"  # the paper's no-class-noun ablation
  assert class_prompt("dog", template="a photo of a {class_noun}") == "a photo of a dog"
  assert instance_prompt("<rare>", "backpack", template="a photo of {identifier} {class_noun}") == \
      "a photo of <rare> backpack"


def test_json_roundtrip(tok):
  for ident in (rare_token_identifier(tok, num_tokens=2, seed=3, id_range=RANGE),
                resolve_identifier(tok, "sks")):
    s = ident.to_json()
    assert json.loads(s)["text"] == ident.text
    back = Identifier.from_json(s)
    assert back == ident and back.verify(tok) is back
  # str() is the text, so an Identifier drops into format strings.
  assert f"a {resolve_identifier(tok, 'sks')} dog" == "a sks dog"


def test_verify_refuses_another_tokenizer_or_mode(tok):
  bad = Identifier(text="sks", token_ids=(5, 6), source="user")
  with pytest.raises(ValueError, match="not the one the identifier was made with"):
    bad.verify(tok)
  # Stored by a run without preprocessing: right ids, but IFPipeline would lowercase it.
  upper = Identifier(text="SKS", token_ids=tuple(tok.encode("SKS", add_eos=False)), source="user")
  assert upper.verify(Tokenizer.from_pretrained(tok.path, preprocess="none")) is upper
  with pytest.raises(ValueError, match="'SKS' becomes 'sks'.*mode 'clean'.*another preprocessing"):
    upper.verify(tok)
  with pytest.raises(ValueError, match="not the one"):
    resolve_identifier(tok, bad)
