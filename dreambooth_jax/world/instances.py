"""Named instances: pretraining objects that captions call by a name instead of describing.

Real captions name things ("a corgi", "a Vespa"), so a model pretrained on them
has learned that an unfamiliar word can stand for a whole look; DreamBooth's
identifier leans on that skill. The world's captions only ever described looks
with attribute words, and on a cascade pretrained on them DreamBooth with prior
preservation fitted a subject's photos through the image, not the identifier
(experiments/README.md: the identifier bought 8% of the fit at t=600, nothing at
t=950). A named instance puts the skill into pretraining: an ordinary object (one
colour, a pretraining pattern, a size) that always looks the same and is captioned
by its name in place of its attribute words, in the DreamBooth prompt's shape:
"a zm box on the beach", "a photo of a zm box".

The names are single rare tokens of the world's tokenizer (`assets/tiny_t5`)
from `NAME_ID_RANGE`, chosen by the identifier rule (`identifiers.
rare_token_identifier`, seeds 1000 on). DreamBooth on the world draws its
identifiers from `IDENTIFIER_ID_RANGE`, the other half of the range, so a
subject's identifier is never a word pretraining gave a meaning. The looks are
pretraining looks, never a subject's (no two tones, no subject pattern), so a
named instance teaches the routing from a word to a look, not the subjects.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dreambooth_jax.world import vocab

NAME_ID_RANGE = (100, 434)
IDENTIFIER_ID_RANGE = (434, 768)
NAMES = ("uo", "zm", "ze", "jf", "jy", "zr", "bi", "dt", "qm", "gl", "ho", "dy")
_SEED = 20260127  # the instances' looks: changing it changes what every name means

# Caption styles of a named example and their shares: DreamBooth's prompt shapes.
NAMED_STYLES = {
    "name_context": 0.5,  # a zm box on the beach
    "name": 0.25,         # a zm box
    "name_photo": 0.25,   # a photo of a zm box
}


@dataclasses.dataclass(frozen=True)
class Instance:
  """One named object: its name and its fixed look."""
  name: str
  cls: str
  colour: str
  pattern: str
  size: str


def _instances() -> tuple[Instance, ...]:
  rng = np.random.default_rng(_SEED)
  looks, out = set(), []
  for i, name in enumerate(NAMES):
    cls = vocab.CLASSES[i % len(vocab.CLASSES)]  # every class gets names
    while True:  # distinct looks: a name must not be another name's synonym
      look = (vocab.COLOUR_NAMES[rng.integers(len(vocab.COLOUR_NAMES))],
              vocab.PRETRAIN_PATTERNS[rng.integers(len(vocab.PRETRAIN_PATTERNS))],
              vocab.SIZES[rng.integers(len(vocab.SIZES))])
      if (cls,) + look not in looks:
        break
    looks.add((cls,) + look)
    out.append(Instance(name, cls, *look))
  return tuple(out)


INSTANCES = _instances()


def get(name: str) -> Instance:
  """The instance called `name`; a KeyError lists the names."""
  for inst in INSTANCES:
    if inst.name == name:
      return inst
  raise KeyError(f"unknown instance name {name!r}; known: {', '.join(NAMES)}")
