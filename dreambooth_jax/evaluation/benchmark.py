"""The DreamBooth benchmark: subjects, class nouns and prompt templates.

Layout (google/dreambooth's `dataset/`, or any folder shaped like it):

  <root>/prompts_and_classes.txt
  <root>/<subject>/*.jpg          one folder per subject of the class table

`<root>` may also be the folder above it that holds `dataset/`.

prompts_and_classes.txt is half text, half Python. A "Classes" section holds a
CSV table headed `subject_name,class`; an "Object Prompts" and a "Live Subject
Prompts" section each hold a Python assignment

  prompt_list = [
  'a {0} {1} in the jungle'.format(unique_token, class_token),
  ...]

We parse that Python with `ast` and accept only string literals and
`'...'.format(<names>)` calls: the file is data and is never executed. The
templates are stored with {0} = the unique identifier and {1} = the class noun
(remapped if a file passes `.format(class_token, unique_token)`), so
`'a {0} {1} in the jungle'` gives "a sks dog in the jungle", as in the paper.

Live vs object: the original file does not mark subjects; the DreamBooth paper
counts the cats and dogs (9 subjects) as live. A table may carry a third column
(`live`, `category` or `type`: live/object, yes/no, true/false, 1/0), which
then decides; otherwise a subject is live when its class noun is in
`live_classes` (default: dog, cat).
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import string
from pathlib import Path
from typing import Iterable, Sequence

from dreambooth_jax import data, utils

PROMPTS_FILE = "prompts_and_classes.txt"
LIVE_CLASSES = frozenset({"dog", "cat"})
_TOKEN_NAMES = ("unique_token", "class_token")
_LIVE_COLUMNS = ("live", "category", "type")
_LIVE_VALUES = {"live": True, "yes": True, "true": True, "1": True,
                "object": False, "no": False, "false": False, "0": False}
_OBJECT_HEADING = re.compile(r"^\s*object(\s+subject)?\s+prompts\s*:?\s*$", re.IGNORECASE)
_LIVE_HEADING = re.compile(r"^\s*live(\s+subject)?\s+prompts\s*:?\s*$", re.IGNORECASE)


class BenchmarkError(utils.UserError):
  """A malformed benchmark folder or prompts file; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Subject:
  """One benchmark subject: its name, class noun, category and real photos."""
  name: str
  class_noun: str
  live: bool
  image_paths: tuple[Path, ...]

  @property
  def category(self) -> str:
    return "live" if self.live else "object"


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """The parsed benchmark. Templates use {0} = identifier, {1} = class noun."""
  root: Path
  subjects: tuple[Subject, ...]
  object_prompts: tuple[str, ...]
  live_prompts: tuple[str, ...]

  def subject(self, name: str) -> Subject:
    for s in self.subjects:
      if s.name == name:
        return s
    raise KeyError(f"no subject {name!r} in {self.root}; subjects: "
                   f"{', '.join(s.name for s in self.subjects)}")

  @property
  def live_subjects(self) -> tuple[Subject, ...]:
    return tuple(s for s in self.subjects if s.live)

  @property
  def object_subjects(self) -> tuple[Subject, ...]:
    return tuple(s for s in self.subjects if not s.live)

  @property
  def num_images(self) -> int:
    return sum(len(s.image_paths) for s in self.subjects)

  def _as_subject(self, subject: str | Subject) -> Subject:
    return subject if isinstance(subject, Subject) else self.subject(subject)

  def templates_for(self, subject: str | Subject) -> tuple[str, ...]:
    """The live or object templates, by the subject's category."""
    return self.live_prompts if self._as_subject(subject).live else self.object_prompts

  def prompts_for(self, subject: str | Subject, identifier: str) -> list[str]:
    """The evaluation prompts of a subject, e.g. "a sks dog in the jungle".

    An empty identifier gives the class-only prompts ("a dog in the jungle"),
    the baseline without the subject; spaces are then collapsed.
    """
    s = self._as_subject(subject)
    prompts = [t.format(identifier, s.class_noun) for t in self.templates_for(s)]
    return prompts if identifier else [" ".join(p.split()) for p in prompts]

  def class_prompt(self, subject: str | Subject) -> str:
    """"a [class noun]": the prompt whose generations PRES compares to the subject."""
    return f"a {self._as_subject(subject).class_noun}"

  def load_images(self, subject: str | Subject, *, min_size: int = 0) -> data.SubjectImages:
    """Decodes a subject's real photos (validated by `data.load_subject_images`)."""
    s = self._as_subject(subject)
    return data.load_subject_images(self.root / s.name, min_size=min_size)


# ----------------------------------------------------------------------------
# Parsing prompts_and_classes.txt.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClassRow:
  name: str
  class_noun: str
  live: bool | None  # None: the table has no live column


def _parse_class_table(lines: Sequence[str], source: str) -> list[ClassRow]:
  header_at = next((i for i, l in enumerate(lines)
                    if l.strip().lower().replace(" ", "").startswith("subject_name,")), None)
  if header_at is None:
    raise BenchmarkError(f"{source}: no class table found: expected a line 'subject_name,class' "
                         f"followed by one 'subject,class noun' line per subject")
  columns = [c.strip().lower() for c in lines[header_at].split(",")]
  live_col = next((i for i, c in enumerate(columns) if c in _LIVE_COLUMNS), None)
  rows: list[ClassRow] = []
  seen: set[str] = set()
  for i in range(header_at + 1, len(lines)):
    line = lines[i].strip()
    if "," not in line:  # a blank line or the next heading ends the table
      break
    cells = [c.strip() for c in line.split(",")]
    where = f"{source}, line {i + 1}"
    if len(cells) != len(columns) or not cells[0] or not cells[1]:
      raise BenchmarkError(f"{where}: expected {len(columns)} non-empty comma-separated cells "
                           f"({', '.join(columns)}), got {line!r}")
    if cells[0] in seen:
      raise BenchmarkError(f"{where}: subject {cells[0]!r} is listed twice; remove one row")
    seen.add(cells[0])
    live = None
    if live_col is not None:
      value = cells[live_col].lower()
      if value not in _LIVE_VALUES:
        raise BenchmarkError(f"{where}: column {columns[live_col]!r} must be one of "
                             f"{', '.join(_LIVE_VALUES)}, got {cells[live_col]!r}")
      live = _LIVE_VALUES[value]
    rows.append(ClassRow(cells[0], cells[1], live))
  if not rows:
    raise BenchmarkError(f"{source}, line {header_at + 1}: the class table has a header but no "
                         f"rows; add one 'subject,class noun' line per subject below it")
  return rows


def _canonical_template(template: str, args: Sequence[str], where: str) -> str:
  """Rewrites `template.format(*args)` so that {0} = unique token and {1} = class noun."""
  out, auto = [], 0
  try:
    parsed = list(string.Formatter().parse(template))
  except ValueError as e:
    raise BenchmarkError(f"{where}: bad format string {template!r}: {e}") from None
  uses_identifier = False
  for literal, field, spec, conversion in parsed:
    out.append(literal.replace("{", "{{").replace("}", "}}"))
    if field is None:
      continue
    if field == "":
      field, auto = str(auto), auto + 1
    if not field.isdigit() or int(field) >= len(args) or spec or conversion:
      raise BenchmarkError(f"{where}: placeholder {{{field}}} in {template!r} must be a plain "
                           f"positional index into .format({', '.join(args)})")
    name = args[int(field)]
    uses_identifier |= name == "unique_token"
    out.append("{%d}" % _TOKEN_NAMES.index(name))
  if not uses_identifier:
    raise BenchmarkError(f"{where}: template {template!r} never places unique_token, so its "
                         f"prompts could not name the subject")
  return "".join(out)


def _parse_prompt_list(code: str, source: str, first_line: int) -> tuple[str, ...]:
  """Templates from `prompt_list = ['...'.format(unique_token, class_token), ...]`, via ast."""
  try:
    module = ast.parse(code)
  except SyntaxError as e:
    raise BenchmarkError(f"{source}, line {first_line + (e.lineno or 1) - 1}: the prompt list "
                         f"is not valid Python ({e.msg})") from None
  if (len(module.body) != 1 or not isinstance(module.body[0], ast.Assign)
      or not isinstance(module.body[0].value, (ast.List, ast.Tuple))):
    raise BenchmarkError(f"{source}, line {first_line}: expected exactly one assignment "
                         f"'prompt_list = [...]' under the heading")
  templates = []
  for node in module.body[0].value.elts:
    where = f"{source}, line {first_line + node.lineno - 1}"
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
      template, args = node.value, _TOKEN_NAMES
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "format" and isinstance(node.func.value, ast.Constant)
          and isinstance(node.func.value.value, str) and not node.keywords
          and all(isinstance(a, ast.Name) and a.id in _TOKEN_NAMES for a in node.args)):
      template, args = node.func.value.value, [a.id for a in node.args]
    else:
      raise BenchmarkError(f"{where}: each prompt must be a string literal or "
                           f"'...'.format(unique_token, class_token); got "
                           f"{ast.unparse(node)!r}")
    templates.append(_canonical_template(template, args, where))
  if not templates:
    raise BenchmarkError(f"{source}, line {first_line}: the prompt list is empty")
  return tuple(templates)


def parse_prompts_and_classes(text: str, source: str = PROMPTS_FILE
                              ) -> tuple[list[ClassRow], tuple[str, ...], tuple[str, ...]]:
  """(class rows, object templates, live templates) from the file's text."""
  lines = text.splitlines()
  rows = _parse_class_table(lines, source)
  headings = {}
  for i, line in enumerate(lines):
    for key, pattern in (("object", _OBJECT_HEADING), ("live", _LIVE_HEADING)):
      if pattern.match(line):
        if key in headings:
          raise BenchmarkError(f"{source}, line {i + 1}: a second {line.strip()!r} heading")
        headings[key] = i
  missing = [k for k in ("object", "live") if k not in headings]
  if missing:
    raise BenchmarkError(f"{source}: missing section(s) {', '.join(missing)}: expected headings "
                         f"'Object Prompts' and 'Live Subject Prompts', each followed by "
                         f"'prompt_list = [...]'")
  starts = sorted(headings.values())
  lists = {}
  for key, at in headings.items():
    end = next((s for s in starts if s > at), len(lines))
    lists[key] = _parse_prompt_list("\n".join(lines[at + 1:end]), source, at + 2)
  return rows, lists["object"], lists["live"]


# ----------------------------------------------------------------------------
# Loading a benchmark folder.
# ----------------------------------------------------------------------------


def _find_root(root: Path) -> Path:
  for candidate in (root, root / "dataset"):
    if (candidate / PROMPTS_FILE).is_file():
      return candidate
  if not root.is_dir():
    raise BenchmarkError(f"benchmark folder '{root}' does not exist; pass the DreamBooth "
                         f"dataset folder (google/dreambooth's dataset/ or the folder above it)")
  raise BenchmarkError(f"no {PROMPTS_FILE} in '{root}' or '{root / 'dataset'}'; pass the folder "
                       f"that holds it next to one folder per subject")


def _subject_images(folder: Path) -> tuple[tuple[Path, ...], list[str]]:
  """Image paths of a subject folder, and the names of files that break the folder rules."""
  images, bad = [], []
  for path in sorted(folder.iterdir(), key=lambda p: p.name):
    kind = data.classify_file(path)
    if kind == "image":
      images.append(path)
    elif kind == "bad":
      bad.append(path.name)
  return tuple(images), bad


def load_benchmark(root: str | os.PathLike, *,
                   live_classes: Iterable[str] = LIVE_CLASSES) -> Benchmark:
  """Parses a benchmark folder (see the module docstring). Images are listed, not decoded.

  Raises:
    BenchmarkError: a missing or malformed prompts file, or subject folders that
      are missing, empty or hold non-image files (all such folders in one message).
  """
  root = _find_root(Path(root).expanduser())
  prompts_file = root / PROMPTS_FILE
  try:
    text = prompts_file.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise BenchmarkError(f"cannot read {prompts_file}: {e}") from None
  rows, object_prompts, live_prompts = parse_prompts_and_classes(text, str(prompts_file))

  live_classes = frozenset(c.lower() for c in live_classes)
  problems, subjects = [], []
  for row in rows:
    folder = root / row.name
    if not folder.is_dir():
      problems.append(f"{row.name}: listed in {PROMPTS_FILE} but '{folder}' is not a folder")
      continue
    images, bad = _subject_images(folder)
    if bad:
      problems.append(f"{row.name}: not image files ({', '.join(bad)}); move them out")
    if not images:
      problems.append(f"{row.name}: '{folder}' holds no images ({', '.join(data.IMAGE_EXTS)})")
    live = row.live if row.live is not None else row.class_noun.lower() in live_classes
    subjects.append(Subject(row.name, row.class_noun, live, images))
  if problems:
    listed = {r.name for r in rows}
    unlisted = sorted(p.name for p in root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and p.name not in listed)
    hint = f" Folders not in the table: {', '.join(unlisted)}." if unlisted else ""
    raise BenchmarkError(f"benchmark '{root}' has {len(problems)} problem(s):\n  - "
                         + "\n  - ".join(problems) + hint)
  return Benchmark(root, tuple(subjects), object_prompts, live_prompts)
