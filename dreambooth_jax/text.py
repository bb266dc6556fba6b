"""Text side of the cascade: the T5 tokenizer, DreamBooth identifiers and prompts.

Sections of this module, each self-contained:

1. Tokenizer: T5's SentencePiece tokenizer with DeepFloyd IF's conventions,
   on the `sentencepiece` library alone, including IF's prompt preprocessing
   (`dreambooth_jax.captions`).
2. Rare-token identifiers: DreamBooth's "[V]" strings, tokens sampled from
   the T5 vocabulary ids 5000..10000 whose text is <= 3 characters without
   spaces (`rare_token_identifier`), or given by the user ("sks");
   `resolve_identifier` returns either as an `Identifier` stored with the run,
   and `instance_prompt`/`class_prompt` write "a sks dog" / "a dog". Only
   identifiers that IF's prompt preprocessing leaves unchanged are chosen or
   accepted.
3. The prompt-embedding cache lives in `dreambooth_jax.embeddings`: T5 is run
   once per distinct prompt and its [77, 4096] embeddings are stored, so T5
   never sits on the accelerators during training.

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

import dataclasses
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

from dreambooth_jax import captions

# ---------------------------------------------------------------------------------------------
# 1. Tokenizer
# ---------------------------------------------------------------------------------------------

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
IF_MAX_LENGTH = 77  # DeepFloyd IF's IFPipeline.encode_prompt
_SPIECE = "spiece.model"
_METASPACE = "\u2581"  # SentencePiece's visible word-boundary marker


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
    text = [" " + t if t in learned else t.replace(_METASPACE, " ") for t in tokens]
    if text and text[0].startswith(" "):
      text[0] = text[0][1:]
    return "".join(text)

  def __repr__(self):
    return (f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, "
            f"max_length={self.max_length}, preprocess={self.preprocess!r})")


# ---------------------------------------------------------------------------------------------
# 2. Rare-token identifiers
# ---------------------------------------------------------------------------------------------

INSTANCE_TEMPLATE = "a {identifier} {class_noun}"  # the DreamBooth paper's "a [V] [class noun]"
CLASS_TEMPLATE = "a {class_noun}"                  # the prior-preservation prompt
T5_RARE_ID_RANGE = (5000, 10000)  # the paper's range for the T5-XXL tokenizer (Imagen)


@dataclasses.dataclass(frozen=True)
class Identifier:
  """The "[V]" of a run: its text, the token ids it must encode to, and how it was chosen.

  `source` is "rare_tokens" (sampled, `seed`/`id_range` say how) or "user" (given
  as text, e.g. "sks"). Stored with the run (`to_json`) so that a resumed run or
  a sampling script uses the same string and can `verify` it against its tokenizer.
  """
  text: str
  token_ids: tuple[int, ...]
  source: str
  seed: int | None = None
  id_range: tuple[int, int] | None = None
  pieces: tuple[str, ...] = ()

  def __str__(self):
    return self.text

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), ensure_ascii=False, sort_keys=True)

  @classmethod
  def from_json(cls, s: str) -> "Identifier":
    d = json.loads(s)
    d["token_ids"] = tuple(int(i) for i in d["token_ids"])
    d["pieces"] = tuple(d.get("pieces", ()))
    if d.get("id_range") is not None:
      d["id_range"] = tuple(int(i) for i in d["id_range"])
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  def verify(self, tokenizer: Tokenizer) -> "Identifier":
    """Raises ValueError unless `text` still encodes to `token_ids` (e.g. another tokenizer)
    and the tokenizer's prompt preprocessing leaves it unchanged (e.g. another mode)."""
    ids = tuple(tokenizer.encode(self.text, add_eos=False))
    if ids != self.token_ids:
      raise ValueError(f"identifier {self.text!r} encodes to {list(ids)} with {tokenizer}, but it "
                       f"was chosen as {list(self.token_ids)}: the tokenizer is not the one the "
                       "identifier was made with.")
    seen = tokenizer.preprocessed(self.text)
    if seen != self.text:
      raise ValueError(f"identifier {self.text!r} becomes {seen!r} under the tokenizer's prompt "
                       f"preprocessing (mode {tokenizer.preprocess!r}), so prompts would not "
                       "contain it: it was made with another preprocessing mode. Use that mode, "
                       "or a new run and identifier.")
    return self


def _format(template: str, **fields) -> str:
  # Whitespace is normalised so that an empty class noun ("a {identifier} {class_noun}" with
  # "") gives "a sks", the paper's no-class-noun ablation, and cache keys stay canonical.
  return " ".join(template.format(**fields).split())


def instance_prompt(identifier: Identifier | str, class_noun: str, *,
                    template: str = INSTANCE_TEMPLATE) -> str:
  """The caption of every subject image, e.g. "a sks dog"."""
  return _format(template, identifier=str(identifier), class_noun=class_noun)


def class_prompt(class_noun: str, *, template: str = CLASS_TEMPLATE) -> str:
  """The prompt of the prior-preservation (class) images, e.g. "a dog"."""
  return _format(template, class_noun=class_noun)


def _piece_text(piece: str) -> str:
  """What a piece reads as inside a word: '▁' (the word-boundary marker) dropped at its start."""
  return piece[1:] if piece.startswith(_METASPACE) else piece


def rare_token_candidates(tokenizer: Tokenizer, *, id_range: tuple[int, int] = T5_RARE_ID_RANGE,
                          max_chars: int = 3, allow_punctuation: bool = False) -> np.ndarray:
  """Sorted ids in `id_range` that may appear in an identifier (the paper's rule, plus ours).

  Kept: SentencePiece pieces whose text (the '▁' marker dropped) is 1..`max_chars`
  characters with no whitespace. Our additions: special tokens and sentinels
  are never kept; unless `allow_punctuation`, a piece needs a letter or digit
  (a ")." identifier would read as punctuation, not as a word, to the encoder);
  and the piece's text must come through the tokenizer's prompt preprocessing
  unchanged (`captions.survives`): in modes "clean" and "lower" no capitals,
  and in "clean" nothing the cleaner drops or splits ("eps", "/", "#1"). A
  prompt holding such a piece would never reach T5 with it (IFPipeline
  preprocesses every prompt). `id_range` is clipped to the SentencePiece pieces
  [3, sp_size); a range outside them raises, as T5's default (5000, 10000) does
  on a small vocabulary.
  """
  lo, hi = int(id_range[0]), int(id_range[1])
  lo_c, hi_c = max(lo, UNK_ID + 1), min(hi, tokenizer.sp_size)
  if lo_c >= hi_c:
    raise ValueError(
        f"id_range {(lo, hi)} has no SentencePiece pieces in this tokenizer ({tokenizer.sp_size} "
        f"pieces, ids 3..{tokenizer.sp_size - 1} are usable; T5 has 32000). Pass "
        f"id_range=(lo, hi) inside that range: the paper's {T5_RARE_ID_RANGE} is for T5's vocabulary.")
  keep = []
  for i in range(lo_c, hi_c):
    if tokenizer.is_special(i):
      continue
    text = _piece_text(tokenizer.id_to_piece(i))
    if (0 < len(text) <= max_chars and not any(c.isspace() or c == _METASPACE for c in text)
        and (allow_punctuation or any(c.isalnum() for c in text))
        and captions.survives(text, tokenizer.preprocess)):
      keep.append(i)
  return np.asarray(keep, np.int64)


def _contains(seq: Sequence[int], sub: Sequence[int]) -> bool:
  n = len(sub)
  return any(list(seq[i:i + n]) == list(sub) for i in range(len(seq) - n + 1))


def _preprocessing_name(tokenizer: Tokenizer) -> str:
  return (f"the tokenizer's prompt preprocessing (mode {tokenizer.preprocess!r}; IFPipeline "
          f"applies 'clean' to every prompt by default)")


def _check_in_prompt(tokenizer: Tokenizer, text: str, ids: Sequence[int], template: str,
                     class_noun: str) -> str | None:
  """Why `text` does not come through preprocessing unchanged and re-tokenise to `ids`, on its
  own and inside the instance prompt, or None."""
  seen = tokenizer.preprocessed(text)
  if seen != text:
    return f"{text!r} becomes {seen!r} after {_preprocessing_name(tokenizer)}"
  alone = tokenizer.encode(text, add_eos=False)
  if list(alone) != list(ids):
    return f"{text!r} encodes to {alone}, not {list(ids)}"
  prompt = instance_prompt(text, class_noun, template=template)
  if not captions.survives(text, tokenizer.preprocess, context=prompt,
                           protected=tokenizer.learned_tokens):
    return (f"the instance prompt {prompt!r} becomes {tokenizer.preprocessed(prompt)!r} after "
            f"{_preprocessing_name(tokenizer)}, without {text!r}")
  in_prompt = tokenizer(prompt)["input_ids"][0]
  if not _contains(in_prompt.tolist(), ids):
    return (f"the instance prompt {prompt!r} encodes to "
            f"{tokenizer.encode(tokenizer.preprocessed(prompt))}, without {list(ids)}")
  return None


def rare_token_identifier(tokenizer: Tokenizer, *, num_tokens: int = 1, seed: int = 0,
                          id_range: tuple[int, int] = T5_RARE_ID_RANGE, max_chars: int = 3,
                          allow_punctuation: bool = False, single_word: bool = False,
                          class_noun: str = "dog", template: str = INSTANCE_TEMPLATE,
                          max_tries: int = 1000) -> Identifier:
  """The DreamBooth paper's identifier: `num_tokens` (1..3) rare tokens, detokenised.

  Each token is drawn uniformly (numpy Generator seeded by `seed`) from
  `rare_token_candidates`. The tokens are joined by SentencePiece
  detokenisation (`Tokenizer.decode`), the only join that can give the chosen
  ids back: a word-initial piece ('▁ab') starts a new word, a continuation
  piece ('cd') glues on, so [▁ab, cd] -> "abcd" and [▁ab, ▁cd] -> "ab cd".
  Every token then has <= `max_chars` characters and no space, as the paper
  asks; a multi-token identifier may be several short words. `single_word=True`
  draws the tokens after the first from continuation pieces only, for a
  one-word identifier ("87vi"); the paper's uniform draw is the default.

  A draw is kept only if the identifier comes through the tokenizer's prompt
  preprocessing unchanged and re-tokenises to exactly the chosen ids, alone
  and inside `template` ("a {identifier} dog"; the prompt is preprocessed as
  `Tokenizer.__call__` does); otherwise it is redrawn, so the result is uniform
  over the draws that survive. (Pieces that survive alone can fail joined:
  "ab" + "123" is "ab123", which IF's cleaner deletes.) The first token must
  hence be word-initial (it follows a space), and is drawn from those pieces
  only, which changes nothing but the number of redraws.
  """
  if not 1 <= num_tokens <= 3:
    raise ValueError(f"num_tokens must be 1, 2 or 3 (the paper's identifiers), got {num_tokens}")
  candidates = rare_token_candidates(tokenizer, id_range=id_range, max_chars=max_chars,
                                     allow_punctuation=allow_punctuation)
  first = np.asarray([i for i in candidates if tokenizer.id_to_piece(i).startswith(_METASPACE)],
                     np.int64)
  if first.size == 0:
    raise ValueError(
        f"no identifier tokens in id_range {tuple(id_range)}: none of the {tokenizer.sp_size} "
        f"pieces there is a word-initial piece of 1..{max_chars} characters without spaces"
        f"{'' if allow_punctuation else ' with a letter or digit'}. Widen id_range or max_chars.")
  rest = candidates
  if single_word:
    rest = np.setdiff1d(candidates, first)
    if rest.size == 0 and num_tokens > 1:
      raise ValueError(f"single_word: no continuation pieces (without '{_METASPACE}') among the "
                       f"{len(candidates)} candidates in id_range {tuple(id_range)}")
  rng = np.random.default_rng(seed)
  last_reason = None
  for _ in range(max_tries):
    ids = [int(rng.choice(first))] + [int(i) for i in rng.choice(rest, num_tokens - 1)]
    text = tokenizer.decode(ids)
    last_reason = _check_in_prompt(tokenizer, text, ids, template, class_noun)
    if last_reason is None:
      return Identifier(text=text, token_ids=tuple(ids), source="rare_tokens", seed=int(seed),
                        id_range=(int(id_range[0]), int(id_range[1])),
                        pieces=tuple(tokenizer.id_to_piece(i) for i in ids))
  raise ValueError(
      f"no {num_tokens}-token identifier in id_range {tuple(id_range)} came through the prompt "
      f"preprocessing (mode {tokenizer.preprocess!r}) and re-tokenised to its own ids "
      f"in {max_tries} draws ({len(candidates)} candidate tokens; last failure: {last_reason}). "
      "Use fewer tokens, another id_range, or give an identifier such as 'sks'.")


def resolve_identifier(tokenizer: Tokenizer, identifier: Identifier | str | None = None, *,
                       class_noun: str = "dog", template: str = INSTANCE_TEMPLATE,
                       **rare_kwargs) -> Identifier:
  """The run's identifier: a user string ("sks"), a stored `Identifier`, or None to sample one.

  None samples with `rare_token_identifier(tokenizer, **rare_kwargs)` (num_tokens,
  seed, id_range, max_chars...). A user string is taken as is, whatever its
  length, and only checked: it must be non-empty, come through the tokenizer's
  prompt preprocessing unchanged ("SKS" becomes "sks" in IFPipeline, so it is
  refused with that suggestion) and keep its own tokens inside the instance
  prompt, or the prompt would not contain what the model is taught.
  """
  if identifier is None:
    return rare_token_identifier(tokenizer, class_noun=class_noun, template=template, **rare_kwargs)
  if isinstance(identifier, Identifier):
    return identifier.verify(tokenizer)
  if rare_kwargs:
    raise TypeError(f"{sorted(rare_kwargs)} only apply when sampling an identifier (identifier=None)")
  text = " ".join(str(identifier).split())
  if not text:
    raise ValueError("the identifier is empty; pass None to sample a rare-token identifier")
  seen = tokenizer.preprocessed(text)
  if seen != text:
    if seen == text.lower() and tokenizer.preprocessed(seen) == seen:
      hint = f"Use the lowercase {seen!r} instead"
    else:
      hint = ("IF's caption cleaner removes or splits it (e.g. URLs, HTML, punctuation runs, "
              "letters followed by 3+ digits, file extensions); choose lowercase letters such "
              "as 'sks'")
    became = f"it becomes {seen!r}" if seen else "it is removed entirely"
    raise ValueError(f"identifier {text!r} does not survive {_preprocessing_name(tokenizer)}: "
                     f"{became}, so prompts would never reach T5 with {text!r}. {hint}.")
  ids = tokenizer.encode(text, add_eos=False)
  reason = _check_in_prompt(tokenizer, text, ids, template, class_noun)
  if reason is not None:
    raise ValueError(f"identifier {text!r} does not survive tokenisation in the instance prompt: "
                     f"{reason}. Change the identifier or the template.")
  return Identifier(text=text, token_ids=tuple(ids), source="user",
                    pieces=tuple(tokenizer.id_to_piece(i) for i in ids))
