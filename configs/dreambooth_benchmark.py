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
`lora=RANK` (default 4), `steps=N`, `runlocal` (smoke sizes), `dataset=DIR`,
`eval_every=N` (in-loop evaluation every N steps; 0 = none), `hour` (the `if`
variant's settings under which experiments/plan_tpu.py --what=many plans the
whole benchmark of one method in under an hour on a v4-8: 32 class priors per
class noun sampled with DPM-Solver++ at 15 steps a stage, no in-loop evaluation,
the benchmark's images at 15 steps 20 a call, and `train.subject_chunk=1` so the
joint step fits a chip; the paper samples ~1000 priors with the ancestral sampler).
Per-subject overrides: `--config.subjects.dog.identifier=sks`.

In-loop evaluation (`config.eval`, dreambooth_jax/evaluation/in_loop.py): the `if`
variant scores the DreamBooth protocol (DINO, CLIP-I, CLIP-T) and needs the two
encoders, `--config.eval.dino=dino-vits16 --config.eval.clip=clip-vit-base-patch32`
(or `eval_every=0`); `world` and `tiny` score the world protocol with the packaged
world evaluator. `config.eval.select` is the rule that picks each subject's step
(dreambooth_jax/evaluation/selection.py), e.g. "max dino if clip_t >= first".

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


def _dataset_root(root: str) -> pathlib.Path:
  """The folder holding prompts_and_classes.txt: `root`, else $DREAMBOOTH_DATASET (or its
  dataset/ subfolder)."""
  from dreambooth_jax.evaluation import benchmark
  root = pathlib.Path(root or os.environ.get("DREAMBOOTH_DATASET", "")).expanduser()
  if not str(root) or str(root) == ".":
    raise config_lib.ConfigError("the benchmark variant needs the DreamBooth dataset: set "
                                 "DREAMBOOTH_DATASET or pass dataset=DIR (the folder with "
                                 "prompts_and_classes.txt), or use the world or tiny variant")
  return root / "dataset" if (root / "dataset" / benchmark.PROMPTS_FILE).is_file() else root


def _benchmark_subjects(root: str) -> dict[str, tuple[str, str]]:
  """{name: (folder, class noun)} from the dataset's class table (folders are checked by
  the job, which reports every bad one before building anything)."""
  from dreambooth_jax.evaluation import benchmark
  root = _dataset_root(root)
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
                             dataset="", eval_every=-1, hour=False)
  if arg.variant not in ("if", "world", "tiny"):
    raise config_lib.ConfigError(f"variant {arg.variant!r}: use 'if', 'world' or 'tiny'")
  if arg.hour and arg.variant != "if":
    raise config_lib.ConfigError("`hour` is the `if` variant's setting (the v4-8 plan's)")
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
  # Subjects each device trains at a time: the step loops over chunks of this many per
  # device (one chunk's activations live, the same FLOPs and numbers); 0 = all at once.
  c.train.subject_chunk = 0
  c.log.sample_every = 0  # the job draws no sample grids (sample a subject's workdir instead)
  c.subjects = ml_collections.ConfigDict(
      {n: dict(dir=table[n][0], class_noun=table[n][1], identifier="") for n in names})

  # -- in-loop evaluation: learning curves, each subject's step, the final report ------
  # The protocol's first num_prompts prompts x num_images per subject, drawn with
  # DPM-Solver++(2M) (the fastest sampler here) at every IF stage; `select` picks each
  # subject's step among the evaluations. Off (every=0) in the tiny smoke variant:
  # random weights have nothing to measure.
  if arg.variant == "if":
    every, protocol, select = 200, "dreambooth", "max dino if clip_t >= first"
  else:
    every = 0 if arg.variant == "tiny" else 50
    # A margin: the world protocol's context over 4 prompts x 4 images moves by a few
    # hundredths between evaluations of one quality, and without one a step scoring 0.996
    # against a first 0.998 was ruled out (experiments/README.md, the two-ball job).
    protocol, select = "world", "max subject if context >= first - 0.05"
  every = arg.eval_every if arg.eval_every >= 0 else every
  c.eval = dict(
      every=every,
      at_start=False,           # also evaluate step 0 (the pretrained model: a baseline)
      protocol=protocol,        # 'dreambooth' (the benchmark's prompts) or 'world'
      num_prompts=4, num_images=4,
      num_class_images=0,       # images of "a [class noun]" per subject for PRES; 0 = no PRES
      sampler="dpmpp_2m",
      num_steps=2 if arg.runlocal else (25 if arg.variant == "if" else 20),
      batch_size=c.prior.batch_size,
      stage="",                 # the stage whose images are scored; "" = the last (the protocol's)
      seed=0,                   # the same noise at every evaluation and for every subject
      select=select,
      dataset=str(_dataset_root(arg.dataset)) if arg.variant == "if" else "",
      dino="", clip="", lpips="",  # the protocol's encoders (lpips: DIV, optional)
      evaluator="",             # world: the evaluator file ("" = the packaged one)
  )
  if arg.variant == "world":  # the world cascade draws worse with DPM-Solver++ (configs/world.py)
    c.eval.update(sampler=c.cascade.base.sampler, num_steps=c.cascade.base.num_steps)
  if arg.runlocal:
    c.eval.update(num_prompts=1, num_images=2)
  if arg.hour:
    c.prior.num_images = 32
    for name in ("base", "sr256"):
      c.cascade[name].update(sampler="dpmpp_2m", num_steps=15)
    c.eval.update(every=0 if arg.eval_every < 0 else arg.eval_every, num_steps=15,
                  batch_size=20)
    c.train.subject_chunk = 1
  return c
