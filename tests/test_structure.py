"""Guards on the package structure, read with `ast` (nothing is imported or run).

1. No module under dreambooth_jax/ or experiments/ uses a private name (`_x`,
   not a dunder) of another project module: `train._encode_all`,
   `from dreambooth_jax.pipeline import _tokenizer`, `dreambooth_jax.identifiers._format`.
   A name another module needs is part of its owner's API: public, with a
   docstring. Private attributes of objects (`tok._sp`) are beyond what `ast`
   can resolve and are not checked.
2. Nothing under dreambooth_jax/ imports from experiments/ or tests/: the
   library must install and import without them.

Each finding is printed as `path:line: what`, and the test fails naming them all.
The checkers are plain functions of source text, so the tests below also show
that they can fail.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from conftest import REPO

LIBRARY = "dreambooth_jax"
SCANNED = (LIBRARY, "experiments")  # the trees whose modules may not use others' private names
OUTSIDE_LIBRARY = ("experiments", "tests")  # the trees the library may not import from


def _is_private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _py_files(tree: str) -> list[pathlib.Path]:
  return sorted(p for p in (REPO / tree).rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: pathlib.Path) -> str:
  """The name a file imports as: dreambooth_jax/weights/unet.py -> dreambooth_jax.weights.unet;
  experiments/ and configs/ scripts by their path from the repo root ("plan_tpu",
  "configs.imagen_dog"), as pytest.ini's `pythonpath` and the scripts' own path set-up
  make them import."""
  parts = list(path.relative_to(REPO).with_suffix("").parts)
  if parts[0] == "experiments":
    parts = parts[1:]
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def project_modules() -> set[str]:
  """Every importable module (and package) name of the library, experiments and configs."""
  return {module_name(p) for tree in (*SCANNED, "configs") for p in _py_files(tree)}


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
  """The absolute module of `from X import ...`, relative imports included."""
  if not node.level:
    return node.module or ""
  package = module.split(".") if is_package else module.split(".")[:-1]
  base = package[:len(package) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def private_uses(source: str, module: str, project: set[str], *,
                 is_package: bool = False) -> list[tuple[int, str]]:
  """(line, message) for each use in `source` (the code of `module`) of a private name of
  another module in `project`: imported by name, or read as an attribute of a name bound
  to that module (`import dreambooth_jax.x as m; m._y`, `from dreambooth_jax import x; x._y`,
  `import dreambooth_jax.x; dreambooth_jax.x._y`)."""
  tree = ast.parse(source)
  found: list[tuple[int, str]] = []
  aliases: dict[str, str] = {}  # local name -> project module it is bound to, anywhere in the file
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.asname:
          aliases[a.asname] = a.name
        else:  # `import a.b.c` binds `a`; the attribute chain names the rest
          aliases[a.name.split(".")[0]] = a.name.split(".")[0]
    elif isinstance(node, ast.ImportFrom):
      source_module = _resolve_from(node, module, is_package)
      for a in node.names:
        full = f"{source_module}.{a.name}"
        if full in project:
          aliases[a.asname or a.name] = full
        if source_module in project and source_module != module and _is_private(a.name):
          found.append((node.lineno, f"imports private {a.name!r} from {source_module}"))
  for node in ast.walk(tree):
    if not isinstance(node, ast.Attribute):
      continue
    chain, value = [node.attr], node.value
    while isinstance(value, ast.Attribute):
      chain.insert(0, value.attr)
      value = value.value
    if not isinstance(value, ast.Name) or value.id not in aliases:
      continue
    parts = aliases[value.id].split(".") + chain
    # The longest prefix that names a module owns the attribute right after it.
    for i in range(len(parts) - 1, 0, -1):
      owner = ".".join(parts[:i])
      if owner in project:
        if owner != module and _is_private(parts[i]) and parts[i] == node.attr:
          found.append((node.lineno, f"uses private {owner}.{parts[i]}"))
        break
  return sorted(set(found))


def outside_imports(source: str, forbidden: set[str]) -> list[tuple[int, str]]:
  """(line, message) for each import in `source` whose top-level name is in `forbidden`."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and not node.level:
      names = [node.module or ""]
    else:
      continue
    found += [(node.lineno, f"imports {n}") for n in names if n.split(".")[0] in forbidden]
  return found


def _report(findings: list[str], what: str):
  for line in findings:
    print(line)
  assert not findings, f"{len(findings)} {what}:\n" + "\n".join(findings)


# -- the repository ----------------------------------------------------------------------------


def test_no_module_uses_another_modules_private_names():
  project = project_modules()
  findings = []
  for tree in SCANNED:
    for path in _py_files(tree):
      hits = private_uses(path.read_text(encoding="utf-8"), module_name(path), project,
                          is_package=path.name == "__init__.py")
      findings += [f"{path.relative_to(REPO)}:{line}: {msg}" for line, msg in hits]
  _report(findings, "uses of another module's private name (make the name public, with a "
                    "docstring, in the module that owns it)")


def test_library_does_not_import_experiments_or_tests():
  forbidden = set(OUTSIDE_LIBRARY)
  for tree in OUTSIDE_LIBRARY:
    forbidden |= {p.stem for p in (REPO / tree).glob("*.py")}
  findings = []
  for path in _py_files(LIBRARY):
    findings += [f"{path.relative_to(REPO)}:{line}: {msg}"
                 for line, msg in outside_imports(path.read_text(encoding="utf-8"), forbidden)]
  _report(findings, "imports of experiments/ or tests/ from the library")


# -- the checkers can fail ---------------------------------------------------------------------

PROJECT = {"dreambooth_jax", "dreambooth_jax.train", "dreambooth_jax.pipeline",
           "dreambooth_jax.weights", "dreambooth_jax.weights.unet", "plan_tpu"}


@pytest.mark.parametrize("source,line,message", [
    ("from dreambooth_jax import train\nx = train._encode_all(1)\n", 2,
     "uses private dreambooth_jax.train._encode_all"),
    ("import dreambooth_jax.pipeline as p\n\np._tokenizer\n", 3,
     "uses private dreambooth_jax.pipeline._tokenizer"),
    ("import dreambooth_jax.weights.unet\ndreambooth_jax.weights.unet._blocks()\n", 2,
     "uses private dreambooth_jax.weights.unet._blocks"),
    ("from dreambooth_jax.pipeline import make_tokenizer, _tokenizer\n", 1,
     "imports private '_tokenizer' from dreambooth_jax.pipeline"),
    ("def f():\n  from ..pipeline import _tokenizer\n", 2,
     "imports private '_tokenizer' from dreambooth_jax.pipeline"),
    ("import plan_tpu\nplan_tpu._rows\n", 2, "uses private plan_tpu._rows"),
])
def test_private_uses_are_found(source, line, message):
  assert private_uses(source, "dreambooth_jax.weights.t5", PROJECT) == [(line, message)]


def test_public_dunder_own_and_object_names_pass():
  source = ("from dreambooth_jax import train, weights\n"
            "import numpy as np\n"
            "train.run, train.__name__, weights.unet.load\n"  # public, dunder
            "train.TrainState(1)._replace(step=2)\n"            # an object's attribute
            "np._NoValue\n"                                    # not a project module
            "def _own(): pass\n_own()\n")
  assert private_uses(source, "dreambooth_jax.sample", PROJECT) == []
  # A module may use its own private names, whatever it calls itself.
  assert private_uses("import dreambooth_jax.train as t\nt._x\n", "dreambooth_jax.train",
                      PROJECT) == []


def test_outside_imports_are_found():
  source = ("import os\nfrom experiments import plan_tpu\nimport train_helpers\n"
            "from dreambooth_jax import train\n")
  assert outside_imports(source, {"experiments", "train_helpers"}) == [
      (2, "imports experiments"), (3, "imports train_helpers")]


def test_report_fails_naming_each_finding(capsys):
  with pytest.raises(AssertionError, match=r"dreambooth_jax/x.py:3: uses private a._b"):
    _report(["dreambooth_jax/x.py:3: uses private a._b"], "findings")
  assert "dreambooth_jax/x.py:3" in capsys.readouterr().out
