"""DreamBooth identifiers: the "[V]" of "a [V] dog", and the prompts that hold it.

The paper's identifier is 1 to 3 rare tokens sampled from the T5 vocabulary
ids 5000..10000 whose text is <= 3 characters without spaces
(`rare_token_identifier`); a user may give one instead ("sks").
`resolve_identifier` returns either as an `Identifier`, stored with the run so
a resumed run or a sampling script uses the same string and can `verify` it.
`instance_prompt`/`class_prompt` write "a sks dog" / "a dog".

IFPipeline preprocesses every prompt (lowercase, strip and, by default, IF's
caption cleaner; `dreambooth_jax.captions`), so only identifiers that this
preprocessing leaves unchanged, alone and inside the instance prompt, are
chosen or accepted: otherwise the model would be taught a token that the
exported model never receives in diffusers.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import numpy as np

from dreambooth_jax import captions
from dreambooth_jax.tokenizer import METASPACE, UNK_ID, Tokenizer

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
  return piece[1:] if piece.startswith(METASPACE) else piece


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
    if (0 < len(text) <= max_chars and not any(c.isspace() or c == METASPACE for c in text)
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
  first = np.asarray([i for i in candidates if tokenizer.id_to_piece(i).startswith(METASPACE)],
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
      raise ValueError(f"single_word: no continuation pieces (without '{METASPACE}') among the "
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


def from_settings(tokenizer: Tokenizer, identifier: str, *, class_noun: str, template: str,
                  num_tokens: int, seed: int, id_range: tuple[int, int]) -> Identifier:
  """config.subject's identifier: the user's word when one is given (the rare-token
  settings, which every config carries, then do not apply), else rare tokens sampled
  with them."""
  if identifier:
    return resolve_identifier(tokenizer, identifier, class_noun=class_noun, template=template)
  return resolve_identifier(tokenizer, None, class_noun=class_noun, template=template,
                            num_tokens=num_tokens, seed=seed, id_range=tuple(id_range))


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
