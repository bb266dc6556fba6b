"""The DreamBooth benchmark loader: the real dataset, a synthetic copy of its layout, bad files."""

import textwrap

import pytest
from PIL import Image

from dreambooth_jax.evaluation import benchmark
from dreambooth_jax.evaluation.benchmark import BenchmarkError

LIVE = ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]

PROMPTS = textwrap.dedent("""\
    Classes

    subject_name,class
    {rows}

    Prompts

    Object Prompts

    prompt_list = [
    'a {{0}} {{1}} in the jungle'.format(unique_token, class_token),
    'a red {{0}} {{1}}'.format(unique_token, class_token)
    ]

    Live Subject Prompts

    prompt_list = [
    'a {{0}} {{1}} wearing a red hat'.format(unique_token, class_token),
    'a {{1}} named {{0}}'.format(unique_token, class_token),
    'a photo of {{0}}'.format(unique_token),
    ]
    """)


def test_real_dataset(dataset_dir):
  bm = benchmark.load_benchmark(dataset_dir)
  assert len(bm.subjects) == 30
  assert [s.name for s in bm.live_subjects] == LIVE
  assert len(bm.object_subjects) == 21
  assert len(bm.object_prompts) == 25 and len(bm.live_prompts) == 25
  assert bm.num_images == 158
  dog, plush = bm.subject("dog"), bm.subject("bear_plushie")
  assert dog.live and dog.class_noun == "dog" and dog.category == "live"
  assert [p.name for p in dog.image_paths] == [f"0{i}.jpg" for i in range(5)]
  assert not plush.live and plush.class_noun == "stuffed animal"
  prompts = bm.prompts_for("dog", "sks")
  assert len(prompts) == 25
  assert prompts[0] == "a sks dog in the jungle"
  assert "a sks dog wearing a santa hat" in prompts
  assert prompts[-1] == "a cube shaped sks dog"
  assert bm.prompts_for(plush, "sks")[13] == "a sks stuffed animal floating on top of water"
  assert bm.prompts_for(plush, "")[0] == "a stuffed animal in the jungle"  # no double space
  assert bm.class_prompt("bear_plushie") == "a stuffed animal"
  # The top folder and dataset/ itself are both accepted.
  assert benchmark.load_benchmark(dataset_dir / "dataset").root == bm.root
  with pytest.raises(KeyError, match="dog4"):
    bm.subject("dog4")


def _make(root, rows="toy_a,toy\nmy_cat,cat", images=None):
  (root / "prompts_and_classes.txt").write_text(PROMPTS.format(rows=rows))
  images = images if images is not None else {"toy_a": 2, "my_cat": 1}
  for name, n in images.items():
    (root / name).mkdir()
    for i in range(n):
      Image.new("RGB", (8, 8)).save(root / name / f"{i:02d}.png")


def test_synthetic_layout(tmp_path):
  _make(tmp_path)
  bm = benchmark.load_benchmark(tmp_path)
  assert [(s.name, s.class_noun, s.live, len(s.image_paths)) for s in bm.subjects] == [
      ("toy_a", "toy", False, 2), ("my_cat", "cat", True, 1)]
  assert bm.object_prompts == ("a {0} {1} in the jungle", "a red {0} {1}")
  assert bm.prompts_for("my_cat", "zwx") == [
      "a zwx cat wearing a red hat", "a cat named zwx", "a photo of zwx"]
  assert len(bm.load_images("toy_a").images) == 2
  # live_classes overrides the dog/cat rule.
  bm = benchmark.load_benchmark(tmp_path, live_classes=["toy"])
  assert [s.live for s in bm.subjects] == [True, False]


def test_live_column_decides(tmp_path):
  _make(tmp_path, rows="toy_a,toy,live\nmy_cat,cat,object")
  text = (tmp_path / "prompts_and_classes.txt").read_text()
  (tmp_path / "prompts_and_classes.txt").write_text(
      text.replace("subject_name,class", "subject_name,class,category"))
  bm = benchmark.load_benchmark(tmp_path)
  assert [s.live for s in bm.subjects] == [True, False]


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.replace("subject_name,class", "name;class"), "no class table"),
    (lambda t: t.replace("toy_a,toy", "toy_a,toy,extra"), r"line 4: expected 2"),
    (lambda t: t.replace("my_cat,cat", "toy_a,cat"), "listed twice"),
    (lambda t: t.replace("Live Subject Prompts", "Living"), "missing section"),
    (lambda t: t.replace("'a red {0} {1}'.format(unique_token, class_token)",
                         "__import__('os').system('echo pwned')"), r"line 13: each prompt"),
    (lambda t: t.replace("'a red {0} {1}'.format", "'a red {2}'.format"), "placeholder"),
    (lambda t: t.replace("'a red {0} {1}'.format(unique_token, class_token)", "'a red {0}'"
                         ".format(class_token)"), "never places unique_token"),
    (lambda t: t.replace("prompt_list = [\n'a {0} {1} in", "prompt_list = (\n'a {0} {1} in"),
     "not valid Python"),
])
def test_malformed_prompts_file(tmp_path, edit, match):
  _make(tmp_path)
  path = tmp_path / "prompts_and_classes.txt"
  path.write_text(edit(path.read_text()))
  with pytest.raises(BenchmarkError, match=match) as e:
    benchmark.load_benchmark(tmp_path)
  assert "prompts_and_classes.txt" in str(e.value)


def test_reversed_format_arguments_are_remapped():
  text = PROMPTS.format(rows="a,toy").replace(
      "'a red {0} {1}'.format(unique_token, class_token)",
      "'a {0} called {1}'.format(class_token, unique_token)")
  _, objects, _ = benchmark.parse_prompts_and_classes(text)
  assert objects[1] == "a {1} called {0}"


def test_folder_problems_reported_together(tmp_path):
  _make(tmp_path, rows="toy_a,toy\nmy_cat,cat\nghost,dog", images={"toy_a": 0, "my_cat": 1,
                                                                   "ghost_typo": 1})
  (tmp_path / "my_cat" / "notes.txt").write_text("x")
  with pytest.raises(BenchmarkError) as e:
    benchmark.load_benchmark(tmp_path)
  msg = str(e.value)
  assert "3 problem(s)" in msg and "toy_a" in msg and "notes.txt" in msg and "ghost" in msg
  assert "ghost_typo" in msg  # unlisted folders are hinted at
  with pytest.raises(BenchmarkError, match="does not exist"):
    benchmark.load_benchmark(tmp_path / "missing")
  with pytest.raises(BenchmarkError, match="no prompts_and_classes.txt"):
    benchmark.load_benchmark(tmp_path / "my_cat")
