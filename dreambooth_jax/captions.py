"""DeepFloyd IF's prompt preprocessing, ported exactly from diffusers' IFPipeline.

IFPipeline lowercases and strips every prompt before T5 sees it, and with its
default `clean_caption=True` first cleans it the way IF's training captions
were cleaned (URLs, HTML, @handles, CJK, ids, punctuation runs, bs4, ftfy),
twice. A model fine-tuned on prompts that skipped this step is conditioned on
token ids that diffusers never produces: "a SKS dog" is tokenized as "a sks
dog" once the exported model runs in IFPipeline. So every prompt we encode goes
through `preprocess` first, in one of three modes:

  "clean"  IFPipeline's default (`clean_caption=True`): `_clean_caption` twice.
  "lower"  `clean_caption=False`: `prompt.lower().strip()`.
  "none"   the prompt as given, for encoders trained without IF's preprocessing.

`IFPipeline._text_preprocessing` and `_clean_caption` are identical in all six
deepfloyd_if pipelines of diffusers 0.42 (stage I, super-resolution, img2img,
inpainting and their SR variants); tests/test_captions.py compares ours with
them on a corpus. bs4 and ftfy are imported on first use of "clean" only.

diffusers has no learned (textual-inversion) tokens; we do, and the cleaner
would mangle them ("<rare>" is an HTML tag to bs4, "<dog*>" loses its "*").
`protected` strings are therefore kept verbatim: see `preprocess`.
"""

from __future__ import annotations

import functools
import html
import re
import urllib.parse as ul
from typing import Sequence

__all__ = ["MODES", "DEFAULT_MODE", "check_mode", "require_cleaner", "clean_caption",
           "text_preprocessing", "preprocess", "survives"]

MODES = ("clean", "lower", "none")
DEFAULT_MODE = "clean"  # IFPipeline.__call__(clean_caption=True)

_PIP = "pip install beautifulsoup4 ftfy"


def check_mode(mode: str) -> str:
  """`mode` if it is one of MODES, else a ValueError naming them."""
  if mode not in MODES:
    raise ValueError(f"prompt preprocessing mode {mode!r}: use one of "
                     f"{', '.join(map(repr, MODES))} ({DEFAULT_MODE!r} is what IFPipeline does "
                     "by default)")
  return mode


def _cleaner_modules():
  try:
    import bs4
    import ftfy
  except ImportError as e:
    raise ImportError(
        f"IF's caption cleaning (prompt preprocessing mode 'clean', IFPipeline's default) needs "
        f"the packages beautifulsoup4 and ftfy ({e}). Install them with `{_PIP}`, or choose "
        f"mode 'lower' (IFPipeline with clean_caption=False).") from e
  return bs4, ftfy


def require_cleaner() -> None:
  """Raises ImportError naming the pip packages unless bs4 and ftfy import."""
  _cleaner_modules()


# ---------------------------------------------------------------------------------------------
# The port: IFPipeline.bad_punct_regex, _clean_caption and _text_preprocessing, same regexes in
# the same order (diffusers/pipelines/deepfloyd_if/pipeline_if.py, 0.42).
# ---------------------------------------------------------------------------------------------

BAD_PUNCT_REGEX = re.compile(
    r"["
    + "#®•©™&@·º½¾¿¡§~"
    + r"\)"
    + r"\("
    + r"\]"
    + r"\["
    + r"\}"
    + r"\{"
    + r"\|"
    + "\\"
    + r"\/"
    + r"\*"
    + r"]{1,}"
)


def clean_caption(caption: str) -> str:
  """One pass of `IFPipeline._clean_caption` (IFPipeline applies it twice; see `preprocess`)."""
  bs4, ftfy = _cleaner_modules()
  caption = str(caption)
  caption = ul.unquote_plus(caption)
  caption = caption.strip().lower()
  caption = re.sub("<person>", "person", caption)
  # urls:
  caption = re.sub(
      r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))",  # noqa
      "",
      caption,
  )
  caption = re.sub(
      r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))",  # noqa
      "",
      caption,
  )
  # html:
  caption = bs4.BeautifulSoup(caption, features="html.parser").text

  # @<nickname>
  caption = re.sub(r"@[\w\d]+\b", "", caption)

  # CJK strokes, katakana phonetic extensions, enclosed CJK, CJK compatibility,
  # CJK ideographs extension A, Yijing hexagrams, CJK unified ideographs:
  caption = re.sub(r"[\u31c0-\u31ef]+", "", caption)
  caption = re.sub(r"[\u31f0-\u31ff]+", "", caption)
  caption = re.sub(r"[\u3200-\u32ff]+", "", caption)
  caption = re.sub(r"[\u3300-\u33ff]+", "", caption)
  caption = re.sub(r"[\u3400-\u4dbf]+", "", caption)
  caption = re.sub(r"[\u4dc0-\u4dff]+", "", caption)
  caption = re.sub(r"[\u4e00-\u9fff]+", "", caption)

  # all kinds of dash --> "-"
  caption = re.sub(
      r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0\uFE31\uFE32\uFE58\uFE63\uFF0D]+",  # noqa
      "-",
      caption,
  )

  # quotes to one standard
  caption = re.sub(r"[`´«»“”¨]", '"', caption)
  caption = re.sub(r"[‘’]", "'", caption)

  # &quot;
  caption = re.sub(r"&quot;?", "", caption)
  # &amp
  caption = re.sub(r"&amp", "", caption)

  # ip addresses:
  caption = re.sub(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " ", caption)

  # article ids:
  caption = re.sub(r"\d:\d\d\s+$", "", caption)

  # \n
  caption = re.sub(r"\\n", " ", caption)

  # "#123"
  caption = re.sub(r"#\d{1,3}\b", "", caption)
  # "#12345.."
  caption = re.sub(r"#\d{5,}\b", "", caption)
  # "123456.."
  caption = re.sub(r"\b\d{6,}\b", "", caption)
  # filenames:
  caption = re.sub(r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", "", caption)

  caption = re.sub(r"[\"\']{2,}", r'"', caption)  # """AUSVERKAUFT"""
  caption = re.sub(r"[\.]{2,}", r" ", caption)  # """AUSVERKAUFT"""

  caption = re.sub(BAD_PUNCT_REGEX, r" ", caption)  # ***AUSVERKAUFT***, #AUSVERKAUFT
  caption = re.sub(r"\s+\.\s+", r" ", caption)  # " . "

  # this-is-my-cute-cat / this_is_my_cute_cat
  regex2 = re.compile(r"(?:\-|\_)")
  if len(re.findall(regex2, caption)) > 3:
    caption = re.sub(regex2, " ", caption)

  caption = ftfy.fix_text(caption)
  caption = html.unescape(html.unescape(caption))

  caption = re.sub(r"\b[a-zA-Z]{1,3}\d{3,15}\b", "", caption)  # jc6640
  caption = re.sub(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", "", caption)  # jc6640vc
  caption = re.sub(r"\b\d+[a-zA-Z]+\d+\b", "", caption)  # 6640vc231

  caption = re.sub(r"(worldwide\s+)?(free\s+)?shipping", "", caption)
  caption = re.sub(r"(free\s)?download(\sfree)?", "", caption)
  caption = re.sub(r"\bclick\b\s(?:for|on)\s\w+", "", caption)
  caption = re.sub(r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", "", caption)
  caption = re.sub(r"\bpage\s+\d+\b", "", caption)

  caption = re.sub(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", r" ", caption)  # j2d1a2a...

  caption = re.sub(r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", "", caption)

  caption = re.sub(r"\b\s+\:\s+", r": ", caption)
  caption = re.sub(r"(\D[,\./])\b", r"\1 ", caption)
  caption = re.sub(r"\s+", " ", caption)

  caption.strip()  # sic: diffusers discards this result; the final strip below does the work

  caption = re.sub(r"^[\"\']([\w\W]+)[\"\']$", r"\1", caption)
  caption = re.sub(r"^[\'\_,\-\:;]", r"", caption)
  caption = re.sub(r"[\'\_,\-\:\-\+]$", r"", caption)
  caption = re.sub(r"^\.\S+$", "", caption)

  return caption.strip()


@functools.lru_cache(maxsize=1 << 16)
def _clean_twice(text: str) -> str:
  # A pure function of the string, cached: a run encodes the same few prompts again and
  # again, and identifier sampling checks every candidate piece of the vocabulary range.
  return clean_caption(clean_caption(text))


def text_preprocessing(text: str, clean_caption: bool) -> str:
  """`IFPipeline._text_preprocessing` on one string (diffusers maps it over a list).

  Unlike diffusers, a missing bs4/ftfy raises instead of logging a warning and
  silently falling back to `clean_caption=False`: that fallback would change the
  token ids a model is trained on with the installed packages.
  """
  if clean_caption:
    return _clean_twice(text)
  return text.lower().strip()


# ---------------------------------------------------------------------------------------------
# Our API: modes and protected (learned) tokens
# ---------------------------------------------------------------------------------------------


def _protected_re(protected: Sequence[str]) -> re.Pattern | None:
  tokens = sorted({t for t in protected if t}, key=len, reverse=True)  # leftmost-longest
  return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def preprocess(prompt: str, mode: str = DEFAULT_MODE, protected: Sequence[str] = ()) -> str:
  """The text IF's encoder sees for `prompt` under `mode` ("clean", "lower" or "none").

  With no `protected` string in the prompt this is exactly
  `IFPipeline._text_preprocessing([prompt], clean_caption=mode == "clean")[0]`
  ("none" returns the prompt unchanged).

  `protected` strings (learned tokens such as "<rare>" or "<dog*>") are kept
  verbatim wherever they occur, matched as `tokenizer.Tokenizer` matches them
  (anywhere, leftmost-longest). The prompt is split around them and only the
  text between them is preprocessed: in "lower" each piece is lowercased and
  the separators are kept, then the whole is stripped (identical to diffusers
  on the other text); in "clean" each piece is cleaned on its own (twice, as
  diffusers does), and the non-empty pieces and the tokens are joined with
  single spaces, since the cleaner normalises whitespace anyway. diffusers has
  no such tokens, so there is nothing of theirs to match; a learned token only
  exists inside our textual-inversion runs and their exports.
  """
  if not isinstance(prompt, str):
    raise TypeError(f"preprocess expects a str prompt, got {type(prompt).__name__}")
  check_mode(mode)
  if mode == "none":
    return prompt
  pattern = _protected_re(protected)
  parts = pattern.split(prompt) if pattern is not None else [prompt]
  tokens = pattern.findall(prompt) if pattern is not None else []
  if mode == "lower":
    out = parts[0].lower()
    for token, part in zip(tokens, parts[1:]):
      out += token + part.lower()
    return out.strip()
  pieces = [text_preprocessing(parts[0], True)]
  for token, part in zip(tokens, parts[1:]):
    pieces += [token, text_preprocessing(part, True)]
  return " ".join(p for p in pieces if p)


def survives(text: str, mode: str = DEFAULT_MODE, *, context: str | None = None,
             protected: Sequence[str] = ()) -> bool:
  """Whether `text` comes through `preprocess` unchanged, alone and inside `context`.

  `context` is a whole prompt holding `text` (e.g. "a sks dog" for "sks"): the
  cleaner's rules depend on the neighbours ("click on the" is dropped, "page 3"
  too), so an identifier must also appear, as whole words, in the preprocessed
  prompt. Mode "none" changes nothing, so everything survives it.
  """
  check_mode(mode)
  if mode == "none":
    return True
  if not text or preprocess(text, mode, protected) != text:
    return False
  if context is None:
    return True
  word = re.compile(r"(?<!\w)" + re.escape(text) + r"(?!\w)")
  return word.search(preprocess(context, mode, protected)) is not None
