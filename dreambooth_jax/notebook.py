"""The setup the Colab notebooks share: accelerator and mesh, subject photos, config, display.

`notebooks/dreambooth_tpu.ipynb` and `notebooks/compare_methods.ipynb` keep
their parameters in their first cell and call these functions with them, so
the two stay in step and a fix lands in both. Everything here is importable
after `pip install`; only the notebooks' install cell is not here, since it
runs before the package can be imported.

The scoring itself lives with the evaluation (`evaluation.world_protocol`,
`evaluation.protocol`); `evaluate` picks the protocol for the subject and
imports it when called, since this module serves the training half of a
notebook as much as the evaluation half and training never imports
`evaluation`. IPython is imported inside the functions that display, so the
rest works in a plain interpreter.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from typing import Any, Mapping

import numpy as np

from dreambooth_jax import config_lib, data, sharding

# google/dreambooth's repository: the 30 subjects + prompts_and_classes.txt.
BENCHMARK_URL = "https://github.com/google/dreambooth"
COLAB_BENCHMARK_DIR = "/content/dreambooth_benchmark"


def in_colab() -> bool:
  return "google.colab" in sys.modules


def show(path: str) -> None:
  """Displays a PNG in the notebook."""
  from IPython.display import Image, display
  display(Image(filename=path))


# ----------------------------------------------------------------------------
# Accelerator and mesh.
# ----------------------------------------------------------------------------


def accelerator_mesh(axes: Mapping[str, int]):
  """Says what is attached (TPU, GPU or CPU) and returns the `(data, fsdp, tensor)` mesh.

  `axes` entries of -1 take the remaining devices. Also quiets absl logging to
  warnings: orbax logs every checkpoint at INFO, which would bury the cell outputs.
  """
  import jax
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  devices = jax.devices()
  kind = {"tpu": "TPU", "gpu": "GPU", "cpu": "CPU"}.get(jax.default_backend(),
                                                        jax.default_backend())
  print(f"{kind}: {len(devices)} device(s) of kind {devices[0].device_kind!r}, "
        f"{jax.process_count()} process(es)")
  if kind == "CPU":
    print("No accelerator: fine for the tiny default (minutes). For real weights pick "
          "Runtime > Change runtime type > TPU in Colab.")
  mesh = sharding.make_mesh(dict(axes))
  print("mesh:", dict(mesh.shape))
  return mesh


# ----------------------------------------------------------------------------
# Subject photos.
# ----------------------------------------------------------------------------


def subject_folder(subject_dir: str, *, upload_to: str | None = None) -> str:
  """`subject_dir`; if empty, in Colab with `upload_to`, an upload of photos saved there;
  else "": the config's own subject (`load_config` keeps it)."""
  if not subject_dir and upload_to and in_colab():
    from google.colab import files
    print("Upload 3-5 photos of your subject (cancel to use the config's own subject):")
    uploaded = files.upload()
    if uploaded:
      subject_dir = os.path.abspath(upload_to)
      os.makedirs(subject_dir, exist_ok=True)
      for name, content in uploaded.items():
        with open(os.path.join(subject_dir, os.path.basename(name)), "wb") as f:
          f.write(content)
  return subject_dir


def show_subject(subject_dir: str, size: int = 128) -> data.SubjectImages:
  """Loads the photos (every bad file named, all at once, as training would) and shows them;
  "" is the packaged dog, as a config's empty `subject.dir`."""
  from IPython.display import display
  from PIL import Image
  subject_dir = subject_dir or str(data.default_subject_dir())
  photos = data.load_subject_images(subject_dir, min_size=0)
  print(f"{len(photos.paths)} photos in {subject_dir}")
  row = np.concatenate([np.asarray(im.resize((size, size))) for im in photos.images], axis=1)
  display(Image.fromarray(row))
  return photos


# ----------------------------------------------------------------------------
# The config.
# ----------------------------------------------------------------------------


def describe_weights(config, pretrained_dir: str) -> None:
  """Says which weights the run uses: the tiny random default is not the user's subject."""
  if pretrained_dir:
    print(f"weights: DeepFloyd IF from {pretrained_dir}: {config.pretrained.stage_1}, "
          f"{config.pretrained.stage_2}; T5 and tokenizer from the first")
  elif config.model.kind == "tiny":
    print("weights: this CONFIG is the TINY RANDOM default cascade and T5 (proves the "
          "pipeline; its images are noise, not your subject)")
  else:
    print(f"weights: the config's own, {config.pretrained.stage_1} and "
          f"{config.pretrained.stage_2}")


def load_config(spec: str, extra_arg: str = "", *, repo: str, mesh, subject_dir: str = "",
                class_noun: str = "", stages: str = "", steps: int = 0, pretrained_dir: str = "",
                if_stage_1: str = "", if_stage_2: str = "",
                overrides: Mapping[str, Any] | None = None):
  """The locked config of `spec` ("file:arg", the file relative to `repo`), with the
  notebook's parameters applied.

  `stages`, `steps` and `extra_arg` join the config argument; the subject (when given:
  "" keeps the config's own photos and class noun), the mesh and the IF folders under
  `pretrained_dir` are set on the locked config, then the dotted `overrides`, so that a
  misspelt key fails instead of being ignored.
  """
  path, _, arg = spec.partition(":")
  parts = [p for p in (arg, f"stages={stages}" if stages else "",
                       f"steps={steps}" if steps else "", extra_arg) if p]
  config = config_lib.from_file(f"{path}:{','.join(parts)}", relative_to=repo)
  config.lock()  # from here on an unknown key is an error
  if subject_dir:
    config.subject.dir = subject_dir
  if class_noun:
    config.subject.class_noun = class_noun
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = (
      mesh.shape["data"], mesh.shape["fsdp"], mesh.shape["tensor"])
  if pretrained_dir:
    if config.model.kind == "tiny":
      raise ValueError(f"PRETRAINED_DIR is set but CONFIG={spec!r} is the tiny variant: "
                       "use 'configs/imagen_dog.py:if' (full fine-tuning, a v4-8) or "
                       "'configs/imagen_dog.py:if,lora=16' (LoRA: one 16 GB chip, a v2-8)")
    stage_1 = os.path.join(pretrained_dir, if_stage_1)
    config.pretrained.stage_1 = stage_1
    config.pretrained.stage_2 = os.path.join(pretrained_dir, if_stage_2)
    config.pretrained.t5 = os.path.join(stage_1, "text_encoder")
    config.pretrained.tokenizer = os.path.join(stage_1, "tokenizer")
  elif config.model.kind != "tiny" and not os.path.isdir(config.pretrained.stage_1):
    # configs/world.py names its packaged cascade; the IF variant names the Hub's repos.
    raise ValueError(f"CONFIG={spec!r} needs DeepFloyd IF weights: set PRETRAINED_DIR, or use "
                     "'configs/world.py' (a pretrained tiny cascade) or "
                     "'configs/imagen_dog.py:tiny' (a random one)")
  for key, value in (overrides or {}).items():
    node = config
    *head, leaf = key.split(".")
    for name in head:
      node = node[name]
    node[leaf] = value
  return config


# ----------------------------------------------------------------------------
# What a run left behind.
# ----------------------------------------------------------------------------


def print_losses(workdir: str, last: int = 8) -> None:
  """The last logged steps of metrics.jsonl."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return
  with open(path) as f:
    logged = [json.loads(line) for line in f if line.strip()]
  print("step  loss")
  for row in logged[-last:]:
    print(f"{row['step']:>4}  {row['loss']:.4f}")


def show_training_grids(workdir: str, last: int = 2) -> None:
  """The latest sample grids training wrote to workdir/samples/."""
  paths = sorted(glob.glob(os.path.join(workdir, "samples", "step_*.png")))
  for path in paths[-last:]:
    print(os.path.basename(path))
    show(path)
  if not paths:
    print("no sample grid yet (config.log.sample_every)")


def list_export(workdir: str) -> dict[str, Any]:
  """Prints the files of workdir/export (sizes in MiB) and dreambooth.json; returns the latter."""
  export = os.path.join(workdir, "export")
  for root, _, names in sorted(os.walk(export)):
    for name in sorted(names):
      path = os.path.join(root, name)
      print(f"{os.path.relpath(path, export):60s} {os.path.getsize(path) / 2**20:9.2f} MiB")
  with open(os.path.join(export, "dreambooth.json")) as f:
    info = json.load(f)
  print(json.dumps({k: v for k, v in info.items() if k != "config"}, indent=2))
  return info


def benchmark_dataset(dataset_dir: str) -> str | None:
  """The DreamBooth benchmark folder: `dataset_dir`, or in Colab a clone of google/dreambooth;
  None (and why) when there is none, so the notebook skips its evaluation."""
  dataset = dataset_dir
  if not dataset and in_colab():
    dataset = COLAB_BENCHMARK_DIR
    if not os.path.isdir(dataset):
      subprocess.run(["git", "clone", "--depth", "1", BENCHMARK_URL, dataset], check=True)
  if dataset and os.path.isdir(dataset):
    return dataset
  print(f"evaluation skipped: DATASET_DIR={dataset_dir!r} is not a folder. Point it at the "
        f"DreamBooth benchmark (git clone {BENCHMARK_URL}).")
  return None


def evaluate(workdirs: list[str], subject: str, out: str, *, num_images: int, seed: int,
             num_prompts: int, dataset_dir: str = "", dino_dir: str = "", clip_dir: str = "",
             lpips_file: str = "") -> dict[str, Any] | None:
  """Scores `workdirs` (one row each, common random numbers) and shows the table and grids.

  A world subject (`dreambooth_jax.world.subjects`, e.g. zigzag_ball) is scored by the
  world protocol: its held-out contexts, judged by the packaged world evaluator, nothing
  to download. Any other subject by the DreamBooth protocol on the benchmark
  (`dataset_dir`, in Colab a clone) with DINO / CLIP / LPIPS, or tiny random stand-ins
  when one of them is missing. Returns the report, or None when there is no benchmark.
  """
  from IPython.display import Markdown, display

  from dreambooth_jax.evaluation import protocol, tiny_encoders, world_protocol
  from dreambooth_jax.world import subjects as world_subjects
  if subject in world_subjects.SUBJECT_NAMES:
    report = world_protocol.run(workdirs, subject, num_images=num_images,
                                num_class_images=num_images, batch_size=num_images, out=out,
                                seed=seed)
    table = "\n".join(world_protocol.table(report["rows"]))
  else:
    dataset = benchmark_dataset(dataset_dir)
    if not dataset:
      return None
    encoders = tiny_encoders.encoders_or_stand_ins(dino_dir, clip_dir, lpips_file,
                                                   os.path.join(out, "tiny_random_encoders"))
    report = protocol.run(workdirs, dataset, subject, encoders["dino"], encoders["clip"],
                          encoders["lpips"], num_images=num_images, num_prompts=num_prompts,
                          num_class_images=num_images, batch_size=num_images, real=True,
                          out=out, seed=seed)
    table = protocol.report_table(report)
  display(Markdown(table))
  for row in report["rows"]:
    print(row["label"])
    show(os.path.join(out, row["grid"]))
  print("full report (per-prompt scores, grids):", os.path.join(out, "report.md"))
  return report
