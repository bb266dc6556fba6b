"""Workdirs on object storage: every workdir path goes through epath, never os.path.

No network: a remote scheme (s3://) is served by an fsspec filesystem registered
here that keeps the bucket in a local folder. epath dispatches s3:// to fsspec
exactly as it would for a real bucket, so any write that bypassed epath (an
`os.path.join` + `open`, an `abspath`) would land in a local `s3:` folder under the
current directory instead of the bucket: the tests check both places.
The orbax checkpoints themselves go through orbax's own gs:// / s3:// handling
(tensorstore's drivers), which needs a real bucket and is not exercised here.
"""

import os

import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

from dreambooth_jax import checkpoint, embeddings, metrics_writer, priors, utils
from conftest import REPO, run_cli


class _BucketFS(LocalFileSystem):
  """s3://bucket/key <-> ROOT/bucket/key on local disk."""
  protocol = ("s3", "s3a")
  root_marker = ""
  ROOT = None

  def __init__(self, *args, **kw):
    super().__init__(*args, auto_mkdir=True, **kw)  # objects need no parent "directories"

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    for prefix in ("s3://", "s3a://"):
      if path.startswith(prefix):
        return os.path.join(cls.ROOT, path[len(prefix):])
    return super()._strip_protocol(path)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  import fsspec
  from etils.epath import backend
  _BucketFS.ROOT = str(tmp_path / "bucket_store")
  os.makedirs(_BucketFS.ROOT)
  fsspec.register_implementation("s3", _BucketFS, clobber=True)
  backend.fsspec_backend._get_filesystem.cache_clear()
  monkeypatch.chdir(tmp_path)  # a stray local write would appear here, as ./s3:
  yield tmp_path
  backend.fsspec_backend._get_filesystem.cache_clear()


def _no_local_copy(where):
  assert not any(name.startswith("s3") for name in os.listdir(where)), os.listdir(where)


def test_workdir_keeps_its_scheme_and_writes_land_in_the_bucket(bucket):
  wd = utils.workdir("s3://runs/dog")
  assert str(wd) == "s3://runs/dog"  # os.path.abspath would give <cwd>/s3:/runs/dog
  utils.write_json(wd / "identifier.json", {"text": "sks"})
  utils.write_png(wd / "samples" / "x.png", np.zeros((4, 4, 3), np.uint8))
  assert utils.read_json(wd / "identifier.json") == {"text": "sks"}
  assert os.path.isfile(os.path.join(_BucketFS.ROOT, "runs", "dog", "samples", "x.png"))
  _no_local_copy(bucket)


def test_caches_logs_and_exports_go_through_epath(bucket):
  wd = utils.workdir("s3://runs/dog")
  cache = embeddings.PromptEmbeddingCache(wd / "prompt_embeddings")
  emb = np.random.RandomState(0).randn(2, 5, 3).astype(np.float32)
  mask = np.ones((2, 5), np.int32)
  first = cache.get_or_compute(["a", "b"], lambda ps: (emb[:len(ps)], mask[:len(ps)]), "fp")
  again = embeddings.PromptEmbeddingCache(wd / "prompt_embeddings").get_or_compute(
      ["a", "b"], lambda ps: pytest.fail("recomputed a cached prompt"), "fp")
  np.testing.assert_array_equal(first["b"].embeddings, again["b"].embeddings)

  writer = metrics_writer.MetricsWriter(wd, tensorboard=False)
  writer.write(1, {"loss": 1.0})
  writer.write(2, {"loss": 0.5})
  lines = (wd / "metrics.jsonl").read_text().splitlines()  # rewritten whole: no append remotely
  assert [int(eval(line)["step"]) for line in lines] == [1, 2]

  tokens = checkpoint.export_token_rows(wd / "export", ["<dog*>"], np.ones((1, 3), np.float32))
  assert tokens == "s3://runs/dog/export/learned_tokens.safetensors"
  names, rows = checkpoint.load_token_rows(tokens)
  assert names == ["<dog*>"] and rows.shape == (1, 3)
  spec = priors.PriorSpec(prompt="a dog", num_images=2, stages=("base",), fingerprint="fp",
                          sampler={"base": dict(num_steps=2, guidance_scale=1.0)})
  with pytest.raises(priors.PriorsError, match="s3://runs/dog/class_priors"):
    priors.load_priors(wd / "class_priors", spec)  # read through epath, named as given
  _no_local_copy(bucket)


def test_missing_backend_fails_before_any_work(tmp_path):
  """gs:// without gcsfs (not installed here): one paragraph, exit code 2, in seconds, and no
  local `gs:` folder (the old os.path.abspath bug)."""
  r = run_cli("dreambooth_jax.train", "--config=configs/imagen_dog.py:runlocal",
              "--workdir=gs://no-bucket/dog", timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "gcsfs" in r.stderr and "Traceback" not in r.stderr
  assert not os.path.exists(os.path.join(REPO, "gs:"))
