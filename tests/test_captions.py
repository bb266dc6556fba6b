"""IF's prompt preprocessing: our port against diffusers' IFPipeline, end to end through T5 ids.

IFPipeline lowercases and strips every prompt and by default (clean_caption=True)
cleans it; `captions.preprocess` must give the same text, `Tokenizer.__call__`
the same ids as diffusers' T5Tokenizer on diffusers' preprocessed prompt, and
the identifiers we choose must come through it unchanged.

The corpus: the DreamBooth benchmark prompts (read from the dataset when
DREAMBOOTH_DATASET is set, else the built-in templates below), hand-written
prompts with everything the cleaner handles, and seeded random mixtures.
"""

import ast
import inspect
import os
import random
import sys
import textwrap

import numpy as np
import pytest
from diffusers.pipelines.deepfloyd_if import pipeline_if, pipeline_if_superresolution

from dreambooth_jax import captions
from dreambooth_jax.identifiers import (Identifier, instance_prompt, rare_token_identifier,
                                        resolve_identifier)
from dreambooth_jax.tokenizer import Tokenizer

RANGE = (100, 800)  # the test vocabulary has ~800 pieces (conftest.spiece_dir)
MODE_TO_CLEAN_CAPTION = {"clean": True, "lower": False}

# google/dreambooth prompts_and_classes.txt: {0} = identifier, {1} = class noun.
BENCHMARK_TEMPLATES = [
    "a {0} {1} in the jungle", "a {0} {1} in the snow", "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street", "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor", "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background", "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest", "a {0} {1} with a wheat field in the background",
    "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background", "a {0} {1} floating in an ocean of milk",
    "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} wearing a black top hat and a monocle", "a {0} {1} in a purple wizard outfit",
    "a {0} {1} wearing a santa hat", "a red {0} {1}", "a cube shaped {0} {1}", "a wet {0} {1}",
]
BENCHMARK_CLASSES = ["dog", "cat", "backpack", "stuffed animal", "sneaker", "teapot", "toy"]

HANDWRITTEN = [
    "A SKS Dog", "  a sks dog  ", "a photo of sks dog, Trending on ArtStation",
    "A Photo Of The Eiffel Tower At Night.", "UPPER lower MiXeD", "ΟΔΟΣ Straße İstanbul",
    "see https://example.com/dogs?id=3 and www.dogs.org/page for more",
    "http://t.co/abc a dog", "dogs.net/gallery/1 cute", "<b>bold</b> <i>dog</i> <br/> on grass",
    "a <person> with a dog", "&amp; &quot;quoted&quot; &lt;tag&gt; &amp;amp; &#39;x&#39; &nbsp;dog",
    "@dog_lover posted #dogs #123 #12345 #cute", "file dog_photo.jpg and IMG_001.PNG, scan.pdf",
    "eps png jpg images of a dog", "download free a dog wallpaper free shipping worldwide",
    "click on this dog, click for more", "page 12 of the dog book",
    "em—dash en–dash minus−sign ‐hyphen ﹣small －fullwidth", "“curly” ‘single’ «guillemets» `tick´",
    "日本語の犬 a dog 中文 ㈱ ㌀", "192.168.0.1 is an ip, 10.0.0.255 too", "wait... what.. ok. .. .",
    "jc6640 jc6640vc 6640vc231 j2d1a2a ab12 abc1234 a1b", "1920x1080 wallpaper 3.5x2 prints",
    "order 1234567 and 123456", "article 3:45 ", "line one\\nline two", "***AUSVERKAUFT***",
    "this-is-my-cute-cat", "this_is_my_cute_cat_photo", "'''quoted''' \"\"double\"\"",
    "\"a dog in quotes\"", "'single quoted dog'", "_leading underscore", "trailing plus+",
    "-dash start", "key : value  :  pair", "a,b.c/d e, f. g/", "%20encoded%21 text+plus",
    "cafÃ© mojibake naÃ¯ve", "tabs\tand\nnewlines\r\n  spaced   out", "", "   ", ".hidden",
    "emoji 🐶🐕 dog ™ ® © § ¿ ¡ ½", "a {0} dog [with] (brackets) {and} |pipes| \\slash/",
    "<extra_id_0> a </s> b <pad> <unk>", "a photo of <rare> backpack", "a <dog*> dog",
]

PIECES = [
    "dog", "Dog", "SKS", "sks", "a", "the", "Eiffel Tower", "https://x.com/a/b", "www.site.ru/p",
    "http://a.co", "<b>", "</b>", "<br/>", "&amp;", "&quot;", "&lt;", "&gt;", "&#39;", "@handle",
    "#tag", "#12", "#123456", "photo.jpg", "x.PNG", "doc.pdf", "—", "–", "‐", "“", "”", "‘", "’",
    "«", "»", "´", "日本", "犬", "㈱", "10.0.0.1", "...", "..", ".", ",", ":", ";", "!", "?",
    "'", "\"", "''", "-", "_", "+", "*", "(", ")", "[", "]", "{", "}", "|", "/", "\\", "~", "§",
    "ab123", "jc6640vc", "12x34", "1234567", "page 3", "click on", "free shipping", "download",
    "%20", "cafÃ©", "ΣΟΦΙΑ", "İ", "\\n", "\n", "\t", "  ", "42", "3:45", "<person>", "🐶",
]
SEPARATORS = [" ", " ", " ", "", "  ", ", ", ". ", "\t", "-"]


def _random_prompts(n: int, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    parts = [rng.choice(PIECES) for _ in range(rng.randint(1, 12))]
    out.append("".join(p + rng.choice(SEPARATORS) for p in parts).strip(" ")
               if rng.random() < 0.7 else "".join(p + rng.choice(SEPARATORS) for p in parts))
  return out


def _benchmark_prompts() -> list[str]:
  if os.environ.get("DREAMBOOTH_DATASET"):
    from dreambooth_jax.evaluation import benchmark
    bench = benchmark.load_benchmark(os.environ["DREAMBOOTH_DATASET"])
    prompts = [p for s in bench.subjects for ident in ("sks", "SKS", "")
               for p in bench.prompts_for(s, ident)]
  else:
    prompts = [t.format(ident, c) for t in BENCHMARK_TEMPLATES for c in BENCHMARK_CLASSES
               for ident in ("sks", "SKS")]
  return list(dict.fromkeys(prompts))


@pytest.fixture(scope="module")
def corpus() -> list[str]:
  prompts = list(dict.fromkeys(_benchmark_prompts() + HANDWRITTEN + _random_prompts(400)))
  print(f"\n[test_captions] corpus: {len(prompts)} prompts compared with "
        "IFPipeline._text_preprocessing")
  return prompts


@pytest.fixture(scope="module")
def if_pipe():
  # No weights needed: the preprocessing methods use nothing of the instance but the class regex.
  return pipeline_if.IFPipeline.__new__(pipeline_if.IFPipeline)


@pytest.fixture(scope="module")
def t5_tokenizer(spiece_dir):
  from transformers import T5Tokenizer
  return T5Tokenizer.from_pretrained(spiece_dir)


def _calls(fn) -> list[tuple]:
  """(pattern, replacement) of every re.sub/re.compile call in `fn`'s source, in source order."""
  tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
  calls = [n for n in ast.walk(tree)
           if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
           and isinstance(n.func.value, ast.Name) and n.func.value.id == "re"]
  calls.sort(key=lambda n: (n.lineno, n.col_offset))
  value = lambda a: a.value if isinstance(a, ast.Constant) else "<expr>"
  return [(n.func.attr,) + tuple(value(a) for a in n.args[:2]) for n in calls]


# ---------------------------------------------------------------------------------------------
# The port
# ---------------------------------------------------------------------------------------------


def test_port_has_diffusers_regexes_in_order():
  ref = pipeline_if.IFPipeline
  ours = _calls(captions.clean_caption)
  assert ours == _calls(ref._clean_caption) and len(ours) > 40
  assert captions.BAD_PUNCT_REGEX.pattern == ref.bad_punct_regex.pattern
  # The super-resolution stage (and the other IF pipelines) carry the same copy.
  sr = pipeline_if_superresolution.IFSuperResolutionPipeline
  strip = lambda fn: [line for line in inspect.getsource(fn).splitlines()
                      if not line.strip().startswith("#")]
  for name in ("_clean_caption", "_text_preprocessing"):
    assert strip(getattr(sr, name)) == strip(getattr(ref, name)), name
  assert sr.bad_punct_regex.pattern == ref.bad_punct_regex.pattern


def test_preprocess_matches_diffusers(corpus, if_pipe):
  for mode, clean in MODE_TO_CLEAN_CAPTION.items():
    expected = if_pipe._text_preprocessing(corpus, clean_caption=clean)
    got = [captions.preprocess(p, mode) for p in corpus]
    bad = [(p, g, e) for p, g, e in zip(corpus, got, expected) if g != e]
    assert not bad, f"{len(bad)} of {len(corpus)} differ in mode {mode!r}, e.g. {bad[:3]}"
    assert got == [captions.text_preprocessing(p, clean) for p in corpus]
  assert [captions.preprocess(p, "none") for p in corpus] == corpus
  # The corpus exercises the cleaner: it changes many prompts beyond lowercasing.
  lowered = if_pipe._text_preprocessing(corpus, clean_caption=False)
  cleaned = if_pipe._text_preprocessing(corpus, clean_caption=True)
  assert sum(c != lo for c, lo in zip(cleaned, lowered)) > 300
  assert sum(lo != p for lo, p in zip(lowered, corpus)) > 300


def test_modes():
  assert captions.MODES == ("clean", "lower", "none") and captions.DEFAULT_MODE == "clean"
  assert captions.preprocess("A SKS Dog ") == "a sks dog"
  with pytest.raises(ValueError, match="'clean', 'lower', 'none'"):
    captions.preprocess("a dog", "strip")
  with pytest.raises(TypeError, match="str"):
    captions.preprocess(["a dog"])


def test_missing_cleaner_packages_are_named(monkeypatch):
  monkeypatch.setitem(sys.modules, "bs4", None)  # import bs4 -> ImportError
  with pytest.raises(ImportError, match="pip install beautifulsoup4 ftfy"):
    captions.require_cleaner()
  with pytest.raises(ImportError, match="beautifulsoup4 and ftfy"):
    captions.clean_caption("a dog")
  assert captions.preprocess("A Dog", "lower") == "a dog"  # needs neither


# ---------------------------------------------------------------------------------------------
# Protected (learned) tokens
# ---------------------------------------------------------------------------------------------

LEARNED = ["<rare>", "<dog*>", "<Ab12>", "<my-token>"]


def test_protected_tokens_survive_verbatim(corpus, if_pipe):
  ref = lambda text: if_pipe._text_preprocessing(text, clean_caption=True)[0]
  # Without protection IF's cleaner mangles them: the reason protection exists.
  assert ref("a photo of <rare> backpack") == "a photo of backpack"
  assert ref("a <dog*> dog") == "a dog"
  assert captions.preprocess("A photo of <rare> Backpack", protected=LEARNED) == \
      "a photo of <rare> backpack"
  assert captions.preprocess("A <dog*>'s Toy ", "lower", protected=LEARNED) == "a <dog*>'s toy"
  assert captions.preprocess("A <dog*>'s Toy", "none", protected=LEARNED) == "A <dog*>'s Toy"
  rng = random.Random(1)
  for prompt in [p for p in corpus if not any(t in p for t in LEARNED)][::3]:
    words = prompt.split(" ")
    cut = rng.randrange(len(words) + 1)
    left, right, token = " ".join(words[:cut]), " ".join(words[cut:]), rng.choice(LEARNED)
    with_token = f"{left} {token} {right}"
    got = captions.preprocess(with_token, protected=LEARNED)
    # The token verbatim, the text on either side cleaned as diffusers cleans it.
    assert got == " ".join(p for p in (ref(left), token, ref(right)) if p), with_token
    lower = captions.preprocess(with_token, "lower", protected=LEARNED)
    assert lower == f"{left.lower()} {token} {right.lower()}".strip(), with_token
    # Prompts without the tokens are untouched by `protected`.
    assert captions.preprocess(prompt, protected=["<zzz>"]) == ref(prompt)


def test_survives():
  assert captions.survives("sks") and captions.survives("sks", context="a sks dog")
  assert not captions.survives("SKS") and captions.survives("SKS", "none")
  assert not captions.survives("")
  for dropped in ("eps", "ab1234", "a/b", "#1", "x.jpg", "a..b"):
    assert not captions.survives(dropped), dropped
  assert captions.survives("click") and captions.survives("click", context="a click dog")
  # The cleaner drops "click on the": the neighbours matter.
  assert not captions.survives("click", context="a click on the beach")
  assert not captions.survives("sks", context="a xsks dog")  # not a word of the prompt
  assert captions.survives("<rare>", context="a <rare> dog", protected=["<rare>"])
  assert not captions.survives("<rare>", context="a <rare> dog")


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------


def test_tokenizer_ids_match_diffusers_encode_path(corpus, if_pipe, t5_tokenizer, spiece_dir):
  """Tokenizer(prompts) == T5Tokenizer(IFPipeline._text_preprocessing(prompts)), as in
  IFPipeline.encode_prompt."""
  for mode in ("clean", "lower", "none"):
    tok = Tokenizer.from_pretrained(spiece_dir, preprocess=mode)
    text = corpus if mode == "none" else if_pipe._text_preprocessing(
        corpus, clean_caption=MODE_TO_CLEAN_CAPTION[mode])
    expected = t5_tokenizer(text, padding="max_length", max_length=77, truncation=True,
                            add_special_tokens=True)
    out = tok(corpus)
    bad = [p for i, p in enumerate(corpus)
           if out["input_ids"][i].tolist() != expected["input_ids"][i]
           or out["attention_mask"][i].tolist() != expected["attention_mask"][i]]
    assert not bad, f"mode {mode!r}: {len(bad)} prompts differ, e.g. {bad[:3]}"
  # The modes differ on this corpus, so each comparison above pins its own mode.
  rows = {m: Tokenizer.from_pretrained(spiece_dir, preprocess=m)(corpus)["input_ids"]
          for m in captions.MODES}
  assert not np.array_equal(rows["clean"], rows["lower"])
  assert not np.array_equal(rows["lower"], rows["none"])


def test_tokenizer_setting(spiece_dir):
  tok = Tokenizer.from_pretrained(spiece_dir)
  assert tok.preprocess == "clean" and "preprocess='clean'" in repr(tok)
  np.testing.assert_array_equal(tok("A SKS Dog")["input_ids"], tok("a sks dog")["input_ids"])
  assert tok.encode("A SKS Dog") != tok.encode("a sks dog")  # encode stays raw
  with pytest.raises(ValueError, match="'clean', 'lower', 'none'"):
    Tokenizer.from_pretrained(spiece_dir, preprocess="clean_caption")
  for mode in captions.MODES:
    learned = Tokenizer.from_pretrained(spiece_dir, preprocess=mode).with_learned_tokens(LEARNED)
    assert learned.preprocess == mode  # carried
    prompt = "A photo of <rare> Backpack, <dog*>!"
    assert learned.preprocessed(prompt) == captions.preprocess(prompt, mode, LEARNED)
    ids = learned(prompt)["input_ids"][0].tolist()
    assert ids[:ids.index(1) + 1] == learned.encode(learned.preprocessed(prompt))
    assert ids.count(-1) == 1 and ids.count(-2) == 1  # both learned tokens reach the encoder


# ---------------------------------------------------------------------------------------------
# Identifiers
# ---------------------------------------------------------------------------------------------


def _reaches_t5_in_diffusers(ident: Identifier, if_pipe, t5_tokenizer, template: str) -> bool:
  """IFPipeline's prompt for `template` holds the identifier's text and its exact token ids."""
  prompt = instance_prompt(ident, "dog", template=template)
  text = if_pipe._text_preprocessing(prompt, clean_caption=True)[0]
  ids = t5_tokenizer(text, add_special_tokens=False)["input_ids"]
  n = len(ident.token_ids)
  alone = if_pipe._text_preprocessing(ident.text, clean_caption=True)[0]
  return alone == ident.text and any(tuple(ids[i:i + n]) == ident.token_ids
                                     for i in range(len(ids) - n + 1))


@pytest.mark.parametrize("template", ["a {identifier} {class_noun}",
                                      "A photo of {identifier} {class_noun}, trending"])
def test_clean_identifiers_survive_diffusers(spiece_dir, if_pipe, t5_tokenizer, template):
  tok = Tokenizer.from_pretrained(spiece_dir)
  raw = Tokenizer.from_pretrained(spiece_dir, preprocess="none")
  raw_failures = 0
  for seed in range(40):
    for num_tokens in (1, 2, 3):
      kw = dict(num_tokens=num_tokens, seed=seed, id_range=RANGE, template=template)
      ident = rare_token_identifier(tok, **kw)
      assert _reaches_t5_in_diffusers(ident, if_pipe, t5_tokenizer, template), ident
      assert not any(c.isupper() for c in ident.text), ident
      raw_failures += not _reaches_t5_in_diffusers(rare_token_identifier(raw, **kw), if_pipe,
                                                   t5_tokenizer, template)
  # Control: the same draws without the preprocessing rule often pick identifiers IF changes.
  assert raw_failures > 10


def test_user_identifier_must_survive(spiece_dir):
  tok = Tokenizer.from_pretrained(spiece_dir)
  assert resolve_identifier(tok, "sks").text == "sks"
  with pytest.raises(ValueError, match=r"identifier 'SKS' does not survive .*mode 'clean'.*"
                                       r"becomes 'sks'.*Use the lowercase 'sks' instead"):
    resolve_identifier(tok, "SKS")
  with pytest.raises(ValueError, match=r"'Sks' .*mode 'lower'.*becomes 'sks'.*Use the lowercase 'sks'"):
    resolve_identifier(Tokenizer.from_pretrained(spiece_dir, preprocess="lower"), "Sks")
  with pytest.raises(ValueError, match=r"'ab1234' .*removed entirely.*lowercase letters"):
    resolve_identifier(tok, "ab1234")
  with pytest.raises(ValueError,
                     match=r"'a click on the beach' becomes 'a beach'.*without 'click'"):
    resolve_identifier(tok, "click", template="a {identifier} on the beach")
  # Without preprocessing (an encoder trained on raw text) capitals are the user's choice.
  raw = Tokenizer.from_pretrained(spiece_dir, preprocess="none")
  assert resolve_identifier(raw, "SKS").text == "SKS"


def test_fingerprint_changes_with_mode(tmp_path, spiece_dir):
  from dreambooth_jax.embeddings import encoder_fingerprint
  from dreambooth_jax.weights.safetensors_io import save_file

  (tmp_path / "config.json").write_text('{"d_model": 4}')
  save_file({"w": np.arange(8, dtype=np.float32)}, str(tmp_path / "model.safetensors"))
  fingerprint = lambda **kw: encoder_fingerprint(str(tmp_path),
                                                 Tokenizer.from_pretrained(spiece_dir, **kw))
  prints = {m: fingerprint(preprocess=m) for m in captions.MODES}
  assert len(set(prints.values())) == 3
  assert prints["clean"] == fingerprint()  # the default mode, and deterministic
