"""Builders shared by the text tests: a small T5-layout SentencePiece model.

Fixtures that use them live in conftest.py (session-scoped, built once).
"""

import pathlib
import random

WORDS = ("a the dog cat photo of sks on in with red blue green beach mountain city at night "
         "sitting standing running jumping backpack toy car painting style van gogh rare teapot "
         "bowl sunglasses wearing hat snow grass table floor near river forest colorful cute small "
         "large old new shiny wooden metal plastic").split()
SYLLABLES = "ka ri to mo ne sa lu vi pe do ga zu fi ho ji wa ye qu ex or an st th ch sh".split()


def train_spiece(folder: pathlib.Path, vocab_size: int = 800) -> str:
  """Trains a unigram spiece.model with T5's special ids (pad 0, eos 1, unk 2, no bos) in `folder`.

  The corpus mixes real words with made-up syllable words, capitals,
  punctuation, numbers and a little non-ASCII, so the vocabulary has word-
  initial and continuation pieces of every length, like T5's.
  """
  import sentencepiece as spm

  rng = random.Random(0)
  words = WORDS + ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(600)]
  lines = []
  for _ in range(4000):
    line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 15)))
    if rng.random() < 0.3:
      line = line.capitalize() + rng.choice(".!?,;")
    if rng.random() < 0.1:
      line += f" {rng.randint(0, 1000)}"
    lines.append(line)
  lines += ["café naïve résumé", "Ünïcödé ß æ ø",
            "12345 67890 - _ ( ) [ ] { } : ' \" / \\ @ # $ % ^ & * + ="]
  corpus = folder / "corpus.txt"
  corpus.write_text("\n".join(lines), encoding="utf-8")
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=vocab_size,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
      minloglevel=2)
  corpus.unlink()
  (folder / "spiece.vocab").unlink()
  return str(folder)
