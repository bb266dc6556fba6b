"""The words of the world: class nouns, colours, patterns, sizes and contexts.

Every attribute is a closed, ordered vocabulary, so an evaluator can turn a scene
into integer labels (`scene.labels`) and a caption into words it can check.
The orders below are the label ids: append, never reorder, or saved labels and
trained classifiers silently change meaning.

Two pattern groups: `PRETRAIN_PATTERNS` are drawn by the pretraining sampler;
`SUBJECT_PATTERNS` (and two-tone colour splits) exist only on the subjects, so
a model pretrained on this world has never seen a subject's look and can only
learn it from the subject's photos.
"""

from __future__ import annotations

# Shapes that stay recognisable as 8-16 px silhouettes (a 32 px base stage).
CLASSES = ("ball", "box", "cone", "ring", "cup")

# Saturated and far apart in hue, so a 32 px image still says which one it is.
COLOURS = {
    "red": (205, 38, 38),
    "orange": (240, 128, 24),
    "yellow": (246, 206, 40),
    "green": (40, 165, 80),
    "blue": (38, 88, 210),
    "purple": (128, 58, 182),
    "pink": (244, 120, 172),
    "white": (238, 238, 232),
}
COLOUR_NAMES = tuple(COLOURS)
# Colours a pattern may be drawn in: the palette plus black, which only subjects use.
INKS = {**COLOURS, "black": (28, 28, 34)}

PRETRAIN_PATTERNS = ("plain", "striped", "dotted", "checkered")
SUBJECT_PATTERNS = ("zigzag", "star", "heart", "diamonds", "wavy")
PATTERNS = PRETRAIN_PATTERNS + SUBJECT_PATTERNS

SIZES = ("small", "large")

# Two-tone splits of a subject's surface between its two colours (subjects only).
SPLITS = ("top", "diagonal", "segments")

# Caption phrases follow the DreamBooth benchmark prompts where the benchmark has
# one ("in the snow", "on the beach", "with a city in the background"), so its
# prompt list can be used on a world-trained model word for word.
CONTEXTS = {
    "beach": "on the beach",
    "grass": "on the grass",
    "snow": "in the snow",
    "night": "at night",
    "city": "with a city in the background",
    "table": "on a wooden table",
}
CONTEXT_NAMES = tuple(CONTEXTS)

# Caption styles and the share of pretraining captions each gets. Short styles
# keep "a ball" / "a photo of a ball" meaningful: those are the class prompts
# DreamBooth's prior preservation samples from the frozen model.
CAPTION_STYLES = {
    "full": 0.45,        # a small red striped ball on the beach
    "attributes": 0.15,  # a small red striped ball
    "context": 0.15,     # a ball on the beach
    "colour": 0.1,       # a red ball
    "class": 0.075,      # a ball
    "photo": 0.075,      # a photo of a ball
}


def article(word: str) -> str:
  """'a' or 'an' before `word` (the vocabulary has no silent h or 'uni-' words)."""
  return "an" if word[:1].lower() in "aeiou" else "a"


def with_article(phrase: str) -> str:
  return f"{article(phrase)} {phrase}"

# The word a caption uses for each pattern ("plain" is left unsaid: "a red ball").
PATTERN_WORDS = {
    "plain": "",
    "striped": "striped",
    "dotted": "dotted",
    "checkered": "checkered",
    "zigzag": "zigzag",
    "star": "star-print",
    "heart": "heart-print",
    "diamonds": "diamond-print",
    "wavy": "wavy",
}
