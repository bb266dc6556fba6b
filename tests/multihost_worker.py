"""One process of the two-process training test (see test_train.test_two_processes_agree).

  PYTHONPATH=. python tests/multihost_worker.py PROCESS_ID PORT WORKDIR OUT_JSON

(the repo root on PYTHONPATH, for `configs`: conftest.subprocess_env gives it.)

Each process has 4 fake CPU devices; together they form the 2 (data) x 4 (fsdp)
mesh, talking over gloo on localhost like two hosts of a TPU pod slice.
"""

import hashlib
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")

from configs import imagen_dog  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from dreambooth_jax import train  # noqa: E402


def main():
  process_id, port, workdir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
  # The base stage alone: the collectives are what is under test, and one UNet compiles
  # in half the time of two.
  config = imagen_dog.get_config("tiny,runlocal,stages=base")
  config.mesh.data, config.mesh.fsdp = 2, 4
  config.train.steps = 2
  config.train.batch_size = config.train.prior_batch_size = 2
  config.log.sample_every = 0
  config.log.tensorboard = False
  config.distributed.initialize = True
  config.distributed.coordinator_address = f"127.0.0.1:{port}"
  config.distributed.num_processes = 2
  config.distributed.process_id = process_id
  state = train.run(config, workdir)
  params = multihost_utils.process_allgather(state["params"], tiled=True)
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    h.update(leaf.tobytes())
  with open(out, "w") as f:
    json.dump({"process": process_id, "devices": jax.device_count(), "local": jax.local_device_count(),
               "step": int(state["step"]), "digest": h.hexdigest()}, f)


if __name__ == "__main__":
  main()
