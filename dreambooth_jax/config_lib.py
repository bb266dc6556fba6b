"""Config helpers in big_vision's style: `get_config(arg)` with typed string variants.

`configs/imagen_dog.py:if,stages=base+sr256` hands `"if,stages=base+sr256"`
to `get_config`, which calls `parse_arg(arg, variant="tiny", stages="base", ...)`:
bare words set booleans or the first positional field, `k=v` pairs are cast to
the type of their default. Configs are locked after building, so a typo in
`--config.trian.lr=...` fails instead of being silently ignored.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import ml_collections

from dreambooth_jax import utils

STAGES = ("base", "sr256", "sr1024")


class ConfigError(utils.UserError):
  """A config value that cannot work; the message names the key and how to fix it."""


def parse_arg(arg: str | None, *, lazy: bool = False, **spec) -> ml_collections.ConfigDict:
  """big_vision's `parse_arg`: "a,k=v,flag" -> ConfigDict typed by `spec`'s defaults.

  A bare word that is not a boolean field of `spec` sets the first field
  (e.g. the variant name). Unknown keys raise unless `lazy`.
  """
  out = ml_collections.ConfigDict(spec)
  if not arg:
    return out
  first = next(iter(spec), None)
  for part in (p.strip() for p in arg.split(",")):
    if not part:
      continue
    key, eq, value = part.partition("=")
    if not eq:
      if key in spec and isinstance(spec[key], bool):
        out[key] = True
        continue
      key, value = first, part
    if key not in spec:
      if lazy:
        out[key] = value
        continue
      raise ConfigError(f"config argument {key!r} is unknown; known: {sorted(spec)}")
    default = spec[key]
    if isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes", "y")
    elif default is None:
      out[key] = value
    else:
      out[key] = type(default)(value)
  return out


def parse_stages(stages: str | tuple | list) -> tuple[str, ...]:
  """'base+sr256' -> ('base', 'sr256'), validated and in cascade order."""
  names = [s.strip() for s in (stages.split("+") if isinstance(stages, str) else stages) if s.strip()]
  bad = [s for s in names if s not in STAGES]
  if bad or not names:
    raise ConfigError(f"config.stages={stages!r}: use '+'-joined names from {STAGES}, "
                      "e.g. 'base+sr256'")
  return tuple(s for s in STAGES if s in names)


def to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def save(config: ml_collections.ConfigDict, path):
  utils.write_text(path, to_json(config))


def load(path) -> ml_collections.ConfigDict:
  """A config saved by `save` (the workdir's config.json), locked."""
  config = ml_collections.ConfigDict(utils.read_json(path))
  config.lock()
  return config


def from_file(spec: str, *, relative_to: str | None = None) -> ml_collections.ConfigDict:
  """The config of a config file and its argument, "configs/world.py:subject=star_box", as
  `--config=` builds it (relative paths from `relative_to`, else the working folder)."""
  path, _, arg = spec.partition(":")
  if relative_to and not os.path.isabs(path) and not os.path.isfile(path):
    path = os.path.join(relative_to, path)
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist (from {spec!r})")
  return load_module(path).get_config(arg or None)


def load_module(path):
  """A config file as a module (its tables, e.g. configs/world.py's CLASS_NOUNS), whatever
  the working folder: configs/ is not a package."""
  path = str(path)
  module_spec = importlib.util.spec_from_file_location(
      "config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def get(config: ml_collections.ConfigDict, dotted: str, default: Any = None) -> Any:
  node = config
  for part in dotted.split("."):
    if part not in node:
      return default
    node = node[part]
  return node
