"""Multi-host training: two processes (4 CPU devices each, gloo collectives) train together.

Its own module, outside the group that shares the tiny trained workdirs, so it runs
on the other xdist worker in parallel with them (it trains a workdir of its own).
"""

import json
import socket
import subprocess
import sys

from conftest import REPO, subprocess_env


def test_two_processes_agree(tmp_path):
  """Two 'hosts' train 2 steps of the base stage together; both end with the same params
  (one sha256 over every leaf) on an 8-device global mesh, 4 devices each."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  env = subprocess_env(drop=("XLA_FLAGS",))  # the worker sets its own 4 devices
  procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "multihost_worker.py"), str(i), port,
                             str(tmp_path / "wd"), str(tmp_path / f"out{i}.json")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  a, b = (json.load(open(tmp_path / f"out{i}.json")) for i in range(2))
  print(f"\nprocess digests: {a['digest'][:16]} {b['digest'][:16]} ({a['devices']} devices, {a['local']} local)")
  assert a["devices"] == 8 and a["local"] == 4 and a["step"] == b["step"] == 2
  assert a["digest"] == b["digest"]
