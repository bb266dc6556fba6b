"""The procedural world: determinism, drawing, captions, subjects, TFDS without TensorFlow.

Checks on pixels use the world's own ground truth: rendering one scene twice
with only the object's colour changed isolates exactly the object's pixels,
so a test can ask whether the drawn object has the colour and shape its
caption names, without a trained classifier.
"""

import dataclasses
import importlib.util
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, subprocess_env
from dreambooth_jax.world import scene as world
from dreambooth_jax.world import instances, subjects, vocab


def _object_mask(s: world.Scene, size: int = 64, threshold: float = 24.0) -> np.ndarray:
  """Pixels the object covers (mostly): where recolouring the object changes the image."""
  other = "blue" if s.colour != "blue" else "yellow"
  a = world.render(s, size).astype(np.float32)
  b = world.render(dataclasses.replace(s, colour=other), size).astype(np.float32)
  return np.abs(a - b).sum(-1) > threshold


def _scenes(seed: int, n: int, **fixed) -> list[world.Scene]:
  rng = np.random.default_rng(seed)
  return [dataclasses.replace(world.sample_scene(rng), **fixed) for _ in range(n)]


# -- determinism and formats -------------------------------------------------------------------


def test_examples_are_deterministic_per_seed_and_index():
  it = world.pretraining_examples(seed=7)
  first = [next(it) for _ in range(3)]
  again = [world.example_at(7, i) for i in range(3)]
  for (im1, cap1, s1), (im2, cap2, s2) in zip(first, again):
    np.testing.assert_array_equal(im1, im2)
    assert cap1 == cap2 and s1 == s2
  resumed = next(world.pretraining_examples(seed=7, start=2))
  np.testing.assert_array_equal(resumed[0], first[2][0])
  other = [world.example_at(8, i) for i in range(3)]
  assert [s for _, _, s in other] != [s for _, _, s in first]
  assert not np.array_equal(other[0][0], first[0][0])


@pytest.mark.parametrize("size", [32, 64, 96, 256])
def test_render_is_uint8_hw3_at_each_size(size):
  s = world.scene_at(0, 3)[0]
  image = world.render(s, size)
  assert image.dtype == np.uint8 and image.shape == (size, size, 3)
  assert image.std() > 5  # a picture, not a blank


def test_32px_is_the_64px_drawing_reduced():
  s = world.scene_at(0, 5)[0]
  reduced = Image.fromarray(world.render(s, 64)).resize((32, 32), Image.Resampling.BOX)
  np.testing.assert_array_equal(world.render(s, 32), np.asarray(reduced))


def test_edges_are_antialiased():
  # Where the object covers part of a pixel, recolouring it changes the pixel by a
  # fraction of what it changes a covered neighbour. Drawn at 1x (no supersampling)
  # that fraction is ~0 or ~1; drawn at 4x and reduced, a whole band of edge pixels
  # has it in between.
  def partial_pixels(supersample):
    count = 0
    for s in _scenes(11, 4, cls="ball", pattern="plain", context="grass", colour="red"):
      a = np.asarray(world.render_image(s, 64, supersample=supersample), np.float32)
      b = np.asarray(world.render_image(dataclasses.replace(s, colour="blue"), 64,
                                        supersample=supersample), np.float32)
      d = np.abs(a - b).sum(-1)
      neighbours = np.max([np.roll(d, (dy, dx), (0, 1)) for dy in (-1, 0, 1)
                           for dx in (-1, 0, 1)], axis=0)
      ratio = d / np.maximum(neighbours, 1e-6)
      count += int(((neighbours > 60) & (ratio > 0.15) & (ratio < 0.7)).sum())
    return count
  smooth, hard = partial_pixels(4), partial_pixels(1)
  print(f"edge pixels with partial coverage: {smooth} anti-aliased, {hard} aliased")
  assert smooth > 60 and smooth > 4 * hard


# -- captions and what is drawn ----------------------------------------------------------------


def test_captions_name_the_scene():
  for s in _scenes(3, 200):
    full = world.caption(s, "full")
    words = full.split()
    assert s.cls in words and s.colour in words and s.size in words
    assert full.endswith(f"{s.cls} {vocab.CONTEXTS[s.context]}")
    if s.pattern != "plain":
      assert vocab.PATTERN_WORDS[s.pattern] in words
    assert world.caption(s, "class") == f"{vocab.article(s.cls)} {s.cls}"
    assert world.caption(s, "photo") == f"a photo of {vocab.article(s.cls)} {s.cls}"
    assert world.caption(s, "context") == f"a {s.cls} {vocab.CONTEXTS[s.context]}"
    assert s.caption == full
  s = _scenes(0, 1, colour="orange", size="large", pattern="striped", cls="box",
              context="beach")[0]
  assert world.caption(s) == "a large orange striped box on the beach"
  assert world.caption(dataclasses.replace(s, size="small", pattern="plain"), "colour") == (
      "an orange box")
  with pytest.raises(ValueError, match="unknown caption style"):
    world.caption(s, "poem")


def test_pretraining_captions_mix_styles():
  captions = [world.caption(s, style) for s, style in (world.scene_at(1, i) for i in range(400))]
  assert captions[:3] == [world.example_at(1, i)[1] for i in range(3)]
  assert sum(c in ("a ball", "a box", "a cone", "a ring", "a cup") for c in captions) > 5
  assert sum(c.startswith("a photo of") for c in captions) > 5
  assert sum(any(p in c for p in vocab.CONTEXTS.values()) for c in captions) > 200


def test_named_instances_are_captioned_by_name_in_a_share_of_examples():
  """`named` turns that share of examples into named instances, each always its own look,
  captioned in DreamBooth's prompt shapes; the rest of the stream is untouched."""
  plain = [world.scene_at(1, i) for i in range(600)]
  named = [world.scene_at(1, i, named=0.3) for i in range(600)]
  assert [world.scene_at(1, i, named=0.0) for i in range(50)] == plain[:50]
  changed = [(n, p) for n, p in zip(named, plain) if n != p]
  assert 0.24 < len(changed) / 600 < 0.36
  assert all(n[0].name is not None for n, _ in changed)
  assert all(n == p for n, p in zip(named, plain) if n[0].name is None)
  seen = set()
  for (s, style), (before, _) in changed:
    inst = instances.get(s.name)
    assert (s.cls, s.colour, s.pattern, s.size) == (inst.cls, inst.colour, inst.pattern, inst.size)
    assert s.context == before.context and not s.is_subject_look
    text = world.caption(s, style)
    assert text in (f"a {s.name} {s.cls} {vocab.CONTEXTS[s.context]}", f"a {s.name} {s.cls}",
                    f"a photo of a {s.name} {s.cls}"), text
    assert world.labels(s)["subject"] == -1
    seen.add((s.name, style))
  assert {n for n, _ in seen} == set(instances.NAMES)
  assert {st for _, st in seen} == set(instances.NAMED_STYLES)
  image, text, s = world.example_at(1, next(i for i, (n, p) in enumerate(zip(named, plain)) if n != p),
                                    32, named=0.3)
  assert image.shape == (32, 32, 3) and s.name in text.split()
  with pytest.raises(ValueError, match="needs a named instance"):
    world.caption(plain[0][0], "name")


def test_instance_names_are_rare_tokens_outside_the_world_identifiers_range():
  """Each name is one piece of the world's tokenizer in NAME_ID_RANGE, and the looks are
  distinct pretraining looks, so a name teaches routing, not a subject; DreamBooth on the
  world draws its identifier from the other half of the range."""
  from dreambooth_jax import identifiers
  from dreambooth_jax.tokenizer import Tokenizer
  tok = Tokenizer.from_pretrained(str(REPO / "dreambooth_jax" / "assets" / "tiny_t5" / "spiece.model"))
  lo, hi = instances.NAME_ID_RANGE
  for name in instances.NAMES:
    ids = [int(i) for i in tok([f"a {name} ball"])["input_ids"][0]]
    plain = [int(i) for i in tok(["a ball"])["input_ids"][0]]
    inserted = [i for i in ids if i not in plain]
    assert len(inserted) == 1 and lo <= inserted[0] < hi, (name, ids)
  looks = [(i.cls, i.colour, i.pattern, i.size) for i in instances.INSTANCES]
  assert len(set(looks)) == len(looks) and {i.cls for i in instances.INSTANCES} == set(vocab.CLASSES)
  assert all(i.pattern in vocab.PRETRAIN_PATTERNS for i in instances.INSTANCES)
  assert instances.IDENTIFIER_ID_RANGE[0] >= hi
  drawn = {str(identifiers.rare_token_identifier(tok, seed=s, id_range=instances.IDENTIFIER_ID_RANGE))
           for s in range(20)}
  assert not drawn & set(instances.NAMES)


def _chroma(rgb):
  rgb = np.asarray(rgb, np.float32)
  return rgb / max(float(rgb.sum()), 1.0)


@pytest.mark.parametrize("colour", vocab.COLOUR_NAMES)
def test_drawn_colour_is_the_named_one(colour):
  palette = {name: _chroma(rgb) for name, rgb in vocab.COLOURS.items()}
  for s in _scenes(5, 3, colour=colour, pattern="plain", context="grass"):
    mask = _object_mask(s)
    assert mask.sum() > 20, s
    median = np.median(world.render(s)[mask].astype(np.float32), axis=0)
    nearest = min(palette, key=lambda n: np.abs(palette[n] - _chroma(median)).sum())
    assert nearest == colour, (s.cls, median)


def test_drawn_shape_is_the_named_class():
  for cls in ("ball", "ring", "cone"):
    for s in _scenes(9, 3, cls=cls, pattern="plain", size="large", context="snow"):
      mask = _object_mask(s, 128)
      ys, xs = np.nonzero(mask)
      box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
      fill = box.mean()
      if cls == "ball":  # a disc fills pi/4 of its box
        assert abs(fill - np.pi / 4) < 0.06 and 0.85 < box.shape[0] / box.shape[1] < 1.18
      elif cls == "ring":  # a hole in the middle
        assert not box[box.shape[0] // 2, box.shape[1] // 2] and fill < 0.65
      else:  # narrow at the top, wide at the bottom
        q = box.shape[0] // 4
        assert box[:q].sum(1).mean() < 0.5 * box[-q:].sum(1).mean()


def test_contexts_are_told_apart_by_their_colours():
  # Mean colours of the top rows and of the bottom corners, nearest centroid: a model
  # (or an evaluator) can tell the contexts apart from the background alone.
  def features(seed, n):
    rows = []
    for i in range(n):
      image, _, s = world.example_at(seed, i, 32)
      f = image.astype(np.float32)
      rows.append((np.concatenate([f[:4].mean((0, 1)), f[-4:, :5].mean((0, 1)),
                                   f[-4:, -5:].mean((0, 1))]), s.context))
    return rows
  train, test = features(1, 90), features(2, 60)
  centroids = {c: np.mean([f for f, k in train if k == c], 0) for c in vocab.CONTEXT_NAMES}
  correct = sum(min(centroids, key=lambda c: np.abs(centroids[c] - f).sum()) == k
                for f, k in test)
  print(f"context from background colours: {correct}/{len(test)}")
  assert correct >= 0.9 * len(test)


def test_labels_are_ids_in_vocab_order():
  s = _scenes(0, 1, cls="cup", colour="pink", pattern="dotted", size="small", context="city")[0]
  assert world.labels(s) == {"class": 4, "colour": 6, "colour2": -1, "pattern": 2, "size": 0,
                             "context": 4, "subject_look": 0, "subject": -1}
  photo = subjects.subject_scenes("star_box", 1)[0]
  lab = world.labels(photo)
  assert lab["subject"] == subjects.SUBJECT_NAMES.index("star_box") and lab["subject_look"] == 1
  assert lab["colour2"] == vocab.COLOUR_NAMES.index("white")
  assert lab["pattern"] == vocab.PATTERNS.index("star")
  assert set(world.labels(s)) == set(world.LABEL_NAMES)


# -- subjects ----------------------------------------------------------------------------------


def test_subject_looks_never_occur_in_pretraining():
  rng = np.random.default_rng(0)
  drawn = [world.sample_scene(rng) for _ in range(3000)]
  looks = {(s.cls, s.colour, s.colour2, s.pattern) for s in drawn}
  assert not any(s.is_subject_look for s in drawn)
  assert {s.pattern for s in drawn} == set(vocab.PRETRAIN_PATTERNS)
  assert {s.colour2 for s in drawn} == {None}
  # The sampler covers the whole ordinary vocabulary.
  assert {s.cls for s in drawn} == set(vocab.CLASSES)
  assert {s.colour for s in drawn} == set(vocab.COLOUR_NAMES)
  assert {s.context for s in drawn} == set(vocab.CONTEXT_NAMES)
  assert len(subjects.subjects()) >= 4
  for subject in subjects.subjects():
    photo = subject.photo_scene(0)
    assert photo.is_subject_look and subject.pattern in vocab.SUBJECT_PATTERNS
    assert (subject.cls, subject.colour, subject.colour2, subject.pattern) not in looks


def test_subject_photos_are_fixed_varied_and_in_photo_contexts():
  for subject in subjects.subjects():
    scenes = subjects.subject_scenes(subject.name, 5)
    assert scenes == subjects.subject_scenes(subject.name, 5)
    assert len({s.pose for s in scenes}) == 5
    assert {s.context for s in scenes} <= set(subjects.PHOTO_CONTEXTS)
    assert all(s.cls == subject.cls and s.subject == subject.name for s in scenes)
    assert subject.prompt("sks", "snow") == f"a sks {subject.cls} in the snow"
  photos = subjects.subject_photos("zigzag_ball", 64, 3)
  np.testing.assert_array_equal(photos[1], subjects.subject_photos("zigzag_ball", 64, 3)[1])
  assert not np.array_equal(photos[0], photos[1])
  with pytest.raises(KeyError, match="zigzag_ball"):
    subjects.get("zigzag_cube")


@pytest.mark.parametrize("name", subjects.SUBJECT_NAMES)
def test_subject_folder_passes_the_trainers_loader(tmp_path, name):
  from dreambooth_jax.data import SubjectData
  paths = subjects.write_subject_folder(name, tmp_path)
  assert len(paths) == 5 and (tmp_path / "README.md").exists()
  with Image.open(paths[0]) as image:
    assert image.size == (256, 256)
  data = SubjectData.from_folder(tmp_path, {"base": 32, "sr256": 64})
  assert len(data) == 5
  assert data.images["base"].shape == (5, 32, 32, 3)
  assert data.images["sr256"].shape == (5, 64, 64, 3)
  # The trainer's default minimum (256 px on the shorter side) holds too.
  assert len(SubjectData.from_folder(tmp_path, {"base": 64, "sr256": 256})) == 5


# -- speed, packaging, TFDS --------------------------------------------------------------------


def test_throughput():
  rates = {}
  for size, n in ((32, 60), (64, 60), (256, 6)):
    next(world.pretraining_examples(0, size))
    start = time.perf_counter()
    for _, _ in zip(range(n), world.pretraining_examples(1, size)):
      pass
    rates[size] = n / (time.perf_counter() - start)
  print("world images/s (one process): " + ", ".join(f"{k} px {v:.0f}" for k, v in rates.items()))
  # Loose: the CPU is shared. ~200/s at 64 px measured alone; pretraining needs far less.
  assert rates[64] > 25


def test_world_imports_without_tfds():
  code = ("import sys; import dreambooth_jax.world, dreambooth_jax.world.scene, "
          "dreambooth_jax.world.subjects; "
          "bad = [m for m in sys.modules if m.split('.')[0] in "
          "('tensorflow_datasets', 'tensorflow', 'torch', 'jax')]; "
          "assert not bad, bad; print('ok')")
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                     env=subprocess_env(), timeout=120)
  assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_tfds_builder_prepares_without_tensorflow(tmp_path):
  # TensorFlow is not installed here: any tfds path that needs it raises. (Where it is
  # installed, tfds imports it for file access, and the last assert fails.)
  assert "tensorflow" not in sys.modules
  from dreambooth_jax.world import tfds_builder
  config = tfds_builder.WorldConfig(name="test32", size=32, num_train=5, seed=3,
                                    photos_per_subject=2)
  builder = tfds_builder.DreamboothWorld(config=config, data_dir=str(tmp_path))
  builder.download_and_prepare()
  train = builder.as_data_source("train")
  assert len(train) == 5
  for i in range(5):
    ex = train[i]
    image, caption, s = world.example_at(3, i, 32)
    assert ex["index"] == i
    np.testing.assert_array_equal(ex["image"], image)
    assert ex["caption"].decode() == caption
    assert tfds_builder.scene_from_json(ex["scene"]) == s
    labels = world.labels(s)
    assert all(int(ex[k]) == labels[k] for k in ("class", "colour", "pattern", "context"))
  subject_split = builder.as_data_source("subjects")
  assert len(subject_split) == 2 * len(subjects.SUBJECT_NAMES)
  ex = subject_split[2]
  first = subjects.subject_scenes(subjects.SUBJECT_NAMES[1], 1)[0]
  assert ex["subject"].decode() == subjects.SUBJECT_NAMES[1] and ex["subject_look"] == 1
  np.testing.assert_array_equal(ex["image"], world.render(first, 32))
  assert "tensorflow" not in sys.modules  # nothing imported TensorFlow
  if importlib.util.find_spec("tensorflow") is None:
    # The control: tfds's own encoding of a numpy image does need TensorFlow; the builder
    # hands it PIL-encoded PNG bytes instead.
    import tensorflow_datasets as tfds
    with pytest.raises(ImportError, match="tensorflow"):
      tfds.features.Image(shape=(32, 32, 3)).encode_example(np.zeros((32, 32, 3), np.uint8))


def test_preview_script_quick(tmp_path, capsys):
  import world_preview
  out = tmp_path / "preview.png"
  result = world_preview.main(["--n=3", "--cols=3", "--subjects=2", "--photos=2",
                               f"--out={out}"])
  print(capsys.readouterr().out)
  with Image.open(out) as image:
    assert image.size == result["size"] and image.size[0] >= 3 * 128
  assert result["images_per_s"] > 0
