"""T5's SentencePiece tokenizer with DeepFloyd IF's conventions, on `sentencepiece` alone
(and CLIP's BPE, `ClipTokenizer`, for the SD x4 upscaler that DeepFloyd publish as stage III).

DreamBooth identifiers built on it ("[V]", rare tokens) live in
`dreambooth_jax.identifiers`; the prompt-embedding cache (T5 run once per
distinct prompt, so T5 never sits on the accelerators during training) in
`dreambooth_jax.embeddings`.

The tokenizer reproduces, id for id, what `transformers.T5Tokenizer.from_pretrained(dir)`
(transformers 5) returns for a folder holding `spiece.model`:

- ids 0/1/2 are <pad>/</s>/<unk> and every SentencePiece piece keeps its id;
- 100 sentinels follow the pieces in reverse order: `<extra_id_N>` has id
  `sp_size + 99 - N`, so `vocab_size` is `sp_size + 100` (32100 for T5; the
  model's embedding has 32128 rows, the rest are padding);
- the special strings (<pad>, </s>, <unk>, <extra_id_N>) typed inside a prompt
  are matched as whole tokens before SentencePiece sees the text, as
  transformers' added tokens are; everything between them is SentencePiece's;
- `</s>` is appended, the result is truncated to `max_length` (77 for IF,
  keeping the final `</s>`) and padded with <pad> to `max_length`.

transformers 5 converts spiece.model to a `tokenizers` Unigram model; our
parity tests pin the two to the same ids on punctuation, whitespace runs,
unicode and sentinel strings.

Prompt preprocessing: IFPipeline lowercases and strips every prompt and, by
default (`clean_caption=True`), cleans it as IF's training captions were
(bs4, ftfy, regexes; `captions.clean_caption`). `Tokenizer(preprocess=...)`
does the same in `__call__`, the batch encoding every T5 path uses: "clean"
(the default, as IFPipeline), "lower" (`clean_caption=False`) or "none" (for
encoders trained on raw text). A model trained here on "a SKS dog" would
otherwise be conditioned on ids that the exported model never gets in
diffusers. Learned tokens are kept verbatim through it (`captions.preprocess`).
`encode` stays raw: it gives the ids of exactly the text it is given.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Sequence

import numpy as np

from dreambooth_jax import captions

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
IF_MAX_LENGTH = 77  # DeepFloyd IF's IFPipeline.encode_prompt
_SPIECE = "spiece.model"
METASPACE = "\u2581"  # SentencePiece's word-boundary marker; identifiers test pieces for it


class Tokenizer:
  """T5 SentencePiece tokenizer: `tok(prompts) -> {"input_ids", "attention_mask"}` [B, max_length].

  Build it with `Tokenizer.from_pretrained(folder)` on a folder (or file path)
  with `spiece.model`, e.g. DeepFloyd IF's `tokenizer/` or `google/t5-v1_1-xxl`.
  `preprocess` ("clean", "lower" or "none"; see `captions.preprocess`) is
  applied to every prompt `__call__` encodes; "clean" is IFPipeline's default.
  """

  def __init__(self, sp_model_file: str, *, max_length: int = IF_MAX_LENGTH, extra_ids: int = 100,
               learned_tokens: Sequence[str] = (), preprocess: str = captions.DEFAULT_MODE):
    import sentencepiece  # deferred: only the tokenizer needs it, not the models

    self.preprocess = captions.check_mode(preprocess)
    if self.preprocess == "clean":
      captions.require_cleaner()  # fail at construction, not at the first prompt of a run
    self.path = sp_model_file
    self._sp = sentencepiece.SentencePieceProcessor(model_file=sp_model_file)
    self.sp_size = self._sp.get_piece_size()
    self.max_length = int(max_length)
    self.extra_ids = int(extra_ids)
    if self.max_length < 1:
      raise ValueError(f"max_length must be >= 1, got {max_length}")
    ids = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id())
    if ids != (PAD_ID, EOS_ID, UNK_ID):
      raise ValueError(f"{sp_model_file}: not a T5 SentencePiece model (pad/eos/unk ids must be "
                       f"0/1/2, got {ids[0]}/{ids[1]}/{ids[2]})")
    # The special strings transformers registers as added tokens, matched whole inside text.
    self._special_ids = {"<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": UNK_ID}
    self._special_ids.update({f"<extra_id_{n}>": self.sp_size + self.extra_ids - 1 - n
                              for n in range(self.extra_ids)})
    # Learned tokens (textual inversion) get negative ids, -1 - k for the k-th: they index
    # the learned embedding rows, never T5's table, and an encoder without the rows
    # rejects them (embeddings.encode_prompts) instead of reading a wrong row.
    self.learned_tokens = tuple(learned_tokens)
    for k, token in enumerate(self.learned_tokens):
      if not token or token.strip() != token or " " in token or token in self._special_ids:
        raise ValueError(f"learned token {token!r}: use one word that is not a special token, "
                         "e.g. '<rare>'")
      self._special_ids[token] = -1 - k
    alternatives = sorted(self._special_ids, key=len, reverse=True)  # leftmost-longest
    self._special_re = re.compile("|".join(map(re.escape, alternatives)))

  @classmethod
  def from_pretrained(cls, path: str, **kwargs) -> "Tokenizer":
    """From a folder holding `spiece.model` (or the path of the .model file itself).

    `kwargs` go to the constructor: max_length, extra_ids, learned_tokens, preprocess.
    """
    file = os.path.join(path, _SPIECE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
      raise FileNotFoundError(
          f"no SentencePiece model at {file!r}. Point at the tokenizer folder of the model "
          f"(the one with {_SPIECE}, e.g. DeepFloyd IF's tokenizer/ or google/t5-v1_1-xxl).")
    return cls(file, **kwargs)

  def with_learned_tokens(self, tokens: Sequence[str]) -> "Tokenizer":
    """This tokenizer plus learned tokens, each matched whole in text (like `<extra_id_0>`)."""
    return Tokenizer(self.path, max_length=self.max_length, extra_ids=self.extra_ids,
                     learned_tokens=tuple(self.learned_tokens) + tuple(tokens),
                     preprocess=self.preprocess)

  @property
  def vocab_size(self) -> int:
    """SentencePiece pieces plus sentinels (32100 for T5), like `len(T5Tokenizer)`."""
    return self.sp_size + self.extra_ids

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def eos_id(self) -> int:
    return EOS_ID

  @property
  def unk_id(self) -> int:
    return UNK_ID

  def is_special(self, token_id: int) -> bool:
    """True for <pad>, </s>, <unk> and the sentinels: what `skip_special_tokens` drops."""
    return token_id in (PAD_ID, EOS_ID, UNK_ID) or self.sp_size <= token_id < self.vocab_size

  def id_to_piece(self, token_id: int) -> str:
    """The vocabulary entry of an id, e.g. '▁dog' (word-initial pieces start with '▁')."""
    token_id = int(token_id)
    if -len(self.learned_tokens) <= token_id < 0:
      return self.learned_tokens[-1 - token_id]
    if 0 <= token_id < self.sp_size:
      return self._sp.id_to_piece(token_id)
    if self.sp_size <= token_id < self.vocab_size:
      return f"<extra_id_{self.vocab_size - 1 - token_id}>"
    raise IndexError(f"token id {token_id} out of range [0, {self.vocab_size})")

  def piece_to_id(self, piece: str) -> int:
    """Inverse of `id_to_piece`; unknown pieces give the <unk> id, as in transformers."""
    if piece in self._special_ids:
      return self._special_ids[piece]
    return self._sp.piece_to_id(piece)

  def encode(self, text: str, *, add_eos: bool = True) -> list[int]:
    """Ids of one string, neither truncated nor padded; `</s>` appended by default."""
    if not isinstance(text, str):
      raise TypeError(f"encode expects a str, got {type(text).__name__}")
    ids: list[int] = []
    start = 0
    for match in self._special_re.finditer(text):
      ids += self._sp.encode(text[start:match.start()])
      ids.append(self._special_ids[match.group()])
      start = match.end()
    ids += self._sp.encode(text[start:])
    return ids + [EOS_ID] if add_eos else ids

  def preprocessed(self, prompt: str) -> str:
    """The text `__call__` tokenizes for `prompt`: IF's preprocessing in this tokenizer's
    mode, learned tokens kept verbatim."""
    return captions.preprocess(prompt, self.preprocess, protected=self.learned_tokens)

  def __call__(self, prompts: str | Sequence[str]) -> dict[str, np.ndarray]:
    """IF's batch encoding: int32 `input_ids` and `attention_mask`, both [B, max_length].

    Each prompt is first preprocessed (`preprocessed`) as IFPipeline.encode_prompt
    does. Longer prompts are truncated to `max_length - 1` tokens plus `</s>`, as
    transformers does with `truncation=True, max_length=77`.
    """
    if isinstance(prompts, str):
      prompts = [prompts]
    prompts = list(prompts)
    input_ids = np.full((len(prompts), self.max_length), PAD_ID, np.int32)
    attention_mask = np.zeros((len(prompts), self.max_length), np.int32)
    for row, prompt in enumerate(prompts):
      ids = self.encode(self.preprocessed(prompt), add_eos=False)[:self.max_length - 1] + [EOS_ID]
      input_ids[row, :len(ids)] = ids
      attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}

  def decode(self, ids: Iterable[int] | np.ndarray, *, skip_special_tokens: bool = False) -> str:
    """Text of ids, identical to `T5Tokenizer.decode` (specials as their strings unless skipped).

    Pieces are joined, '▁' becomes a space and the first token's leading space
    is dropped; <unk> decodes to '<unk>' (SentencePiece's own decoder would
    write ' ⁇ ').
    """
    tokens = [self.id_to_piece(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)
              if not (skip_special_tokens and self.is_special(int(i)))]
    learned = set(self.learned_tokens)
    text = [" " + t if t in learned else t.replace(METASPACE, " ") for t in tokens]
    if text and text[0].startswith(" "):
      text[0] = text[0][1:]
    return "".join(text)

  def __repr__(self):
    return (f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, "
            f"max_length={self.max_length}, preprocess={self.preprocess!r})")


CLIP_MAX_LENGTH = 77  # CLIP's text positions; Stable Diffusion pads every prompt to them
CLIP_FILES = ("vocab.json", "merges.txt")


class ClipTokenizer:
  """CLIP's byte-level BPE with the batch encoding of Stable Diffusion pipelines (the x4
  upscaler's `encode_prompt`): `tok(prompts) -> {"input_ids", "attention_mask"}` [B, 77].

  It wraps transformers' `CLIPTokenizer`, which runs on the `tokenizers` library
  without torch: the BPE, CLIP's text cleanup (whitespace, lowercase) and the
  start/end-of-text tokens are exactly the reference's. Prompts are padded to
  `max_length` with the folder's pad token (OpenCLIP-H's "!" for the upscaler)
  and truncated keeping the end-of-text token; no IF-style preprocessing.
  """

  def __init__(self, hf_tokenizer, *, max_length: int | None = None):
    self.hf = hf_tokenizer
    declared = int(getattr(hf_tokenizer, "model_max_length", 0) or 0)
    # A folder without tokenizer_config.json declares a huge sentinel length.
    self.max_length = int(max_length or (declared if 0 < declared <= 4096 else CLIP_MAX_LENGTH))

  @classmethod
  def from_pretrained(cls, folder: str, **kwargs) -> "ClipTokenizer":
    """From a folder holding vocab.json and merges.txt (a diffusers pipeline's tokenizer/)."""
    missing = [n for n in CLIP_FILES if not os.path.isfile(os.path.join(folder, n))]
    if missing:
      raise FileNotFoundError(
          f"{folder!r} has no {' or '.join(missing)}: not a CLIP tokenizer folder. Point at the "
          "tokenizer/ of a Stable Diffusion download (vocab.json + merges.txt).")
    from transformers import CLIPTokenizer  # deferred: only CLIP-conditioned models need it
    return cls(CLIPTokenizer.from_pretrained(folder), **kwargs)

  @property
  def vocab_size(self) -> int:
    return len(self.hf)

  @property
  def pad_id(self) -> int:
    return int(self.hf.pad_token_id)

  @property
  def eos_id(self) -> int:
    return int(self.hf.eos_token_id)

  def encode(self, text: str) -> list[int]:
    """Ids of one string with start- and end-of-text, neither truncated nor padded."""
    return list(self.hf(text)["input_ids"])

  def __call__(self, prompts: str | Sequence[str]) -> dict[str, np.ndarray]:
    """int32 `input_ids` and `attention_mask` [B, max_length], as the pipeline tokenizes."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    out = self.hf(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                  return_tensors="np")
    return {k: np.asarray(out[k], np.int32) for k in ("input_ids", "attention_mask")}

  def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
    return self.hf.decode(np.asarray(ids).reshape(-1).tolist(), skip_special_tokens=skip_special_tokens)

  def __repr__(self):
    return f"ClipTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length})"
