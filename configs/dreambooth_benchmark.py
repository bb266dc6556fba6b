r"""Many subjects, one job: a LoRA adapter per subject on one frozen, sharded cascade.

The 30 subjects of the DreamBooth benchmark (their folders and class nouns from
the dataset's prompts_and_classes.txt; the folder from $DREAMBOOTH_DATASET or
`dataset=DIR`) on real IF weights, downloaded as for configs/imagen_dog.py:

  python -m dreambooth_jax.train_many --config=configs/dreambooth_benchmark.py \
    --workdir=gs://bucket/benchmark \
    --config.pretrained.stage_1=IF-I-XL-v1.0 --config.pretrained.stage_2=IF-II-L-v1.0 \
    --config.pretrained.t5=IF-I-XL-v1.0/text_encoder --config.pretrained.tokenizer=IF-I-XL-v1.0/tokenizer

The procedural world's subjects on its pretrained tiny cascade (configs/world.py),
and the tiny random cascade on the world's photos (a CPU smoke run):

  python -m dreambooth_jax.train_many --config=configs/dreambooth_benchmark.py:world --workdir=workdirs/world_all
  python -m dreambooth_jax.train_many --config=configs/dreambooth_benchmark.py:tiny,runlocal --workdir=workdirs/tiny_all

Arguments after ':' (comma-separated): a variant (`if`, `world` or `tiny`),
`subjects=dog+cat2` (a subset, '+'-joined; default all of the variant's),
`lora=RANK` (default 4), `steps=N`, `runlocal` (smoke sizes), `dataset=DIR`.
Per-subject overrides: `--config.subjects.dog.identifier=sks`.

The method's settings are configs/imagen_dog.py's (`if`, `tiny`) or
configs/world.py's (`world`), read from those files, never restated here; a
job only adds its subject table and asks AdamW (Adafactor's factored moments
would mix subjects). One job then equals one lone `dreambooth_jax.train` run per
subject with the lone config that `subjects.lone_config` gives (see
dreambooth_jax/subjects.py); `workdir/subjects/<name>/` is such a workdir.
"""

import os
import pathlib

import ml_collections

from dreambooth_jax import config_lib

HERE = pathlib.Path(__file__).resolve().parent


def _benchmark_subjects(root: str) -> dict[str, tuple[str, str]]:
  """{name: (folder, class noun)} from the dataset's class table (folders are checked by
  the job, which reports every bad one before building anything)."""
  from dreambooth_jax.evaluation import benchmark
  root = pathlib.Path(root or os.environ.get("DREAMBOOTH_DATASET", "")).expanduser()
  if not str(root) or str(root) == ".":
    raise config_lib.ConfigError("the benchmark variant needs the DreamBooth dataset: set "
                                 "DREAMBOOTH_DATASET or pass dataset=DIR (the folder with "
                                 "prompts_and_classes.txt), or use the world or tiny variant")
  if (root / "dataset" / benchmark.PROMPTS_FILE).is_file():
    root = root / "dataset"
  prompts_file = root / benchmark.PROMPTS_FILE
  if not prompts_file.is_file():
    raise config_lib.ConfigError(f"no {benchmark.PROMPTS_FILE} in {root} (from DREAMBOOTH_DATASET "
                                 "or dataset=): pass the DreamBooth dataset folder")
  rows, _, _ = benchmark.parse_prompts_and_classes(prompts_file.read_text(), str(prompts_file))
  return {r.name: (str(root / r.name), r.class_noun) for r in rows}


def _world_subjects() -> dict[str, tuple[str, str]]:
  world = config_lib.load_module(HERE / "world.py")
  return {name: (str(world.SUBJECTS / name), noun) for name, noun in world.CLASS_NOUNS.items()}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="if", subjects="", lora=4, steps=-1, runlocal=False,
                             dataset="")
  if arg.variant not in ("if", "world", "tiny"):
    raise config_lib.ConfigError(f"variant {arg.variant!r}: use 'if', 'world' or 'tiny'")
  table = _benchmark_subjects(arg.dataset) if arg.variant == "if" else _world_subjects()
  names = [n for n in arg.subjects.split("+") if n] if arg.subjects else sorted(table)
  unknown = [n for n in names if n not in table]
  if unknown:
    raise config_lib.ConfigError(f"subjects {unknown} are not {arg.variant} subjects; use "
                                 f"'+'-joined names from {', '.join(sorted(table))}")

  # The method's settings come from the single-subject configs, as configs/world.py does.
  forwarded = f"lora={arg.lora},steps={arg.steps}" + (",runlocal" if arg.runlocal else "")
  if arg.variant == "world":
    c = config_lib.from_file(f"{HERE / 'world.py'}:subject={names[0]},{forwarded}")
  else:
    c = config_lib.from_file(f"{HERE / 'imagen_dog.py'}:{arg.variant},{forwarded}")
  if arg.variant == "tiny":
    c.subject.min_size = 64  # the world's photos are 64 px, the tiny SR stage's size
  c.subject.update(dir="", class_noun="", identifier="")  # per subject, below
  c.train.optimizer = "adamw"
  c.log.sample_every = 0  # the job draws no sample grids (sample a subject's workdir instead)
  c.subjects = ml_collections.ConfigDict(
      {n: dict(dir=table[n][0], class_noun=table[n][1], identifier="") for n in names})
  return c
