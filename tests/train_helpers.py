"""Configs of the tiny training runs that several test files share."""

from configs import imagen_dog
from conftest import run_cli

LEARNED_METHODS = ("textual_inversion", "ti_then_finetune")


def set_path(config, key: str, value):
  node = config
  *head, leaf = key.split(".")
  for h in head:
    node = node[h]
  node[leaf] = value


def tiny_config(arg: str = "tiny,runlocal", **overrides):
  """The tiny default at smoke sizes on a 2 (data) x 4 (fsdp) mesh of the 8 fake devices."""
  config = imagen_dog.get_config(arg)
  config.mesh.data, config.mesh.fsdp = 2, 4
  config.train.batch_size = config.train.prior_batch_size = 2
  config.log.tensorboard = False
  for key, value in overrides.items():
    set_path(config, key, value)
  return config


def train_cli(workdir: str, method: str) -> None:
  """A 4-step tiny run of `method` through the training CLI (two-stage: 2 + 2 steps),
  a checkpoint every step."""
  run_cli("dreambooth_jax.train", f"--config=configs/imagen_dog.py:method={method},runlocal",
          f"--workdir={workdir}", "--config.checkpoint.every=1", "--config.checkpoint.keep=10",
          "--config.checkpoint.async_save=False", "--config.log.tensorboard=False",
          timeout=900, ok=True)


def if_config(if_repos: dict, arg: str = "if,runlocal", **overrides):
  """The `if` variant on the tiny IF repositories (conftest's `if_repos`, the Hub layout):
  float32 throughout, no remat, the tiny repos' sizes (16 px base, 32 px SR)."""
  config = imagen_dog.get_config(arg)
  p = config.pretrained
  p.stage_1, p.stage_2 = if_repos["stage_1"], if_repos["stage_2"]
  p.t5 = f"{if_repos['stage_1']}/text_encoder"
  p.tokenizer = f"{if_repos['stage_1']}/tokenizer"
  m = config.model
  m.dtype = m.param_dtype = m.t5_dtype = "float32"
  m.remat = False
  config.cascade.base.resolution, config.cascade.sr256.resolution = 16, 32
  config.subject.identifier_id_range = (100, 768)  # the tiny spiece.model has ~800 pieces
  config.train.optimizer = "adamw"
  config.log.tensorboard = False
  for key, value in overrides.items():
    set_path(config, key, value)
  return config
