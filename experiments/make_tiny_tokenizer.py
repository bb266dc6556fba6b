"""Builds dreambooth_jax/assets/tiny_t5/spiece.model, the tokenizer of the tiny CPU default.

The tiny default config runs the whole pipeline without downloads, so it
needs a T5-layout SentencePiece model (pad 0, eos 1, unk 2, no bos). It is
trained here on the DreamBooth benchmark's prompt templates and class nouns
plus common words, so its prompts tokenize into real word pieces. Training is
deterministic; rerun only if the corpus below changes:

  python experiments/make_tiny_tokenizer.py
"""

import pathlib
import random
import tempfile

import sentencepiece as spm

OUT = pathlib.Path(__file__).resolve().parents[1] / "dreambooth_jax" / "assets" / "tiny_t5"

CLASSES = ("backpack stuffed animal bowl can candle cat clock sneaker dog glasses toy teapot "
           "vase boot cartoon monster sunglasses").split()
CONTEXTS = [
    "in the jungle", "in the snow", "on the beach", "on a cobblestone street", "on top of pink fabric",
    "on top of a wooden floor", "with a city in the background", "with a mountain in the background",
    "with a blue house in the background", "on top of a purple rug in a forest",
    "with a wheat field in the background", "with a tree and autumn leaves in the background",
    "with the Eiffel Tower in the background", "floating on top of water", "floating in an ocean of milk",
    "on top of green grass with sunflowers around it", "on top of a mirror",
    "on top of the sidewalk in a crowded street", "on top of a dirt road", "on top of a white rug",
    "in a chef outfit", "in a firefighter outfit", "in a police outfit", "wearing a red hat",
    "wearing a santa hat", "wearing a rainbow scarf", "wearing a black top hat and a monocle",
    "in a purple wizard outfit", "in a nurse outfit", "in a construction outfit",
    "wearing pink glasses", "wearing a yellow shirt", "a red", "a purple", "a shiny", "a wet", "a cube shaped",
]
WORDS = ("a an the photo picture painting of in on with at by dog cat rare sks style van gogh "
         "night day red blue green yellow white black small large cute old new").split()


def corpus(rng: random.Random) -> list[str]:
  lines = []
  for _ in range(6000):
    noun = rng.choice(CLASSES)
    ident = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 3)))
    ctx = rng.choice(CONTEXTS)
    form = rng.random()
    if form < 0.4:
      lines.append(f"a {ident} {noun} {ctx}")
    elif form < 0.7:
      lines.append(f"a photo of {ident} {noun} {ctx}")
    else:
      lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))))
  return lines


def main():
  OUT.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    text = pathlib.Path(tmp) / "corpus.txt"
    text.write_text("\n".join(corpus(random.Random(0))), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(pathlib.Path(tmp) / "spiece"), vocab_size=768,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        minloglevel=2)
    (OUT / "spiece.model").write_bytes((pathlib.Path(tmp) / "spiece.model").read_bytes())
  print(f"wrote {OUT / 'spiece.model'}")


if __name__ == "__main__":
  main()
