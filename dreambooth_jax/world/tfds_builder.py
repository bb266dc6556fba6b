"""The world as a TensorFlow Datasets builder, prepared and read without TensorFlow.

tensorflow-datasets (the optional extra `world`: `pip install -e .[world]`)
does not need TensorFlow when a dataset is written as ArrayRecord and read as a
random-access data source. Two of its defaults do need it, and this builder
avoids both:

- the default file format, TFRecord, is written through `tf.io`: the builder
  defaults to `file_format="array_record"` instead;
- `tfds.features.Image` encodes numpy images with `tf.image.encode_png`: we
  hand it PNG bytes encoded by PIL, which it stores as they are (decoding goes
  through PIL too, in `decode_example_np`).

Reading is through `tfds.data_source` / `builder.as_data_source(split)` (numpy,
random access, what grain loaders take); `tfds.load` / `as_dataset` build a
tf.data pipeline and do need TensorFlow.

    from dreambooth_jax.world import tfds_builder
    builder = tfds_builder.DreamboothWorld(config="64px", data_dir="~/tfds")
    builder.download_and_prepare()
    train = builder.as_data_source("train")   # train[i]["image"], ["caption"], labels

Example i of `train` is `scene.example_at(config.seed, i, config.size)`: the
same image, caption and labels as the plain iterator `pretraining_examples`,
in the same order (shuffling at write time is off). `subjects` holds every
subject's photos at the config's size, captioned without an identifier
("a ball on a wooden table"); the trainer adds its own.

This module imports tensorflow_datasets on import; `dreambooth_jax.world`
itself never imports this module, so the core package works without the extra.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
from PIL import Image

try:
  import tensorflow_datasets as tfds
except ImportError as e:  # pragma: no cover - exercised only without the extra
  raise ImportError("dreambooth_jax.world.tfds_builder needs tensorflow-datasets and "
                    "array_record: pip install -e '.[world]' (TensorFlow is not needed)") from e

from dreambooth_jax.world import scene, subjects, vocab


@dataclasses.dataclass(eq=False)
class WorldConfig(tfds.core.BuilderConfig):
  """Image size, number of training examples, sampler seed and photos per subject."""
  size: int = 64
  num_train: int = 50_000
  seed: int = 0
  photos_per_subject: int = 5


def png_bytes(image: np.ndarray) -> bytes:
  """PNG-encodes a uint8 image with PIL (TFDS would call TensorFlow to do it)."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def scene_json(s: scene.Scene) -> str:
  """The scene as JSON (`scene_from_json` rebuilds it): exact ground truth for an evaluator."""
  return json.dumps(dataclasses.asdict(s), sort_keys=True)


def scene_from_json(text: str | bytes) -> scene.Scene:
  fields = json.loads(text)
  fields["pose"] = scene.Pose(**fields["pose"])
  return scene.Scene(**fields)


class DreamboothWorld(tfds.core.GeneratorBasedBuilder):
  """Captioned images of the dreambooth_jax procedural world, and its subjects' photos."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Five classes, eight colours, six contexts, six subjects."}
  BUILDER_CONFIGS = [
      WorldConfig(name="64px", description="64 px images (base stage, or 32 px by reduce(2))",
                  size=64, num_train=50_000),
      WorldConfig(name="256px", description="256 px images (for a 64 -> 256 SR stage)",
                  size=256, num_train=20_000),
  ]

  def __init__(self, *, file_format=None, **kwargs):
    # ArrayRecord, not TFDS's TFRecord default: writing TFRecords needs TensorFlow.
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.size
    label = tfds.features.ClassLabel
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "index": np.int64,
            "class": label(names=vocab.CLASSES),
            "colour": label(names=vocab.COLOUR_NAMES),
            "colour2": np.int64,          # -1: one colour
            "pattern": label(names=vocab.PATTERNS),
            "size": label(names=vocab.SIZES),
            "context": label(names=vocab.CONTEXT_NAMES),
            "subject_look": np.int64,     # 1: a look pretraining never draws
            "subject": tfds.features.Text(),  # "" outside the subjects split
            "scene": tfds.features.Text(),    # scene_json: everything render() needs
        }),
        supervised_keys=("image", "caption"),
        disable_shuffling=True,  # example i is example_at(seed, i): keep that order on disk
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded: the world is drawn
    return {"train": self._generate_examples("train"),
            "subjects": self._generate_examples("subjects")}

  def _example(self, index: int, image: np.ndarray, text: str, s: scene.Scene) -> dict:
    lab = scene.labels(s)
    return {
        "image": png_bytes(image), "caption": text, "index": index,
        "class": lab["class"], "colour": lab["colour"], "colour2": lab["colour2"],
        "pattern": lab["pattern"], "size": lab["size"], "context": lab["context"],
        "subject_look": lab["subject_look"], "subject": s.subject or "", "scene": scene_json(s),
    }

  def _generate_examples(self, split: str):
    c = self.builder_config
    if split == "train":  # the plain iterator's examples, by index
      for index in range(c.num_train):
        image, text, s = scene.example_at(c.seed, index, c.size)
        yield index, self._example(index, image, text, s)
      return
    index = 0
    for subject in subjects.subjects():
      for s in subjects.subject_scenes(subject.name, c.photos_per_subject):
        yield index, self._example(index, scene.render(s, c.size), scene.caption(s, "context"), s)
        index += 1
