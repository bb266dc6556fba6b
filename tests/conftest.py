"""Shared test setup: 8 fake CPU devices, float32 matmuls, session-scoped fixtures."""

import json
import logging
import os

# Must be set before jax is imported anywhere: sharding tests use 8 fake devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Environment, not jax.config: subprocesses (CLI tests) inherit it, so they compile the
# same programs as the tests in this process and hit the same persistent cache entries.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# Every program is cached, the sub-second ones too: a training run compiles dozens of
# small ones (init, placement, export), and the tests run many such runs.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

# Parity tests compare against PyTorch float32; XLA's default CPU matmul precision is
# already float32, but make it explicit so a changed default cannot loosen the tests.
jax.config.update("jax_default_matmul_precision", "highest")

# Tests that run whole training jobs compile the same tiny programs in several
# runs (and subprocesses); a persistent cache turns the repeats into lookups.
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

# The trained tiny workdirs (session fixtures below) that several modules read.
SHARED_WORKDIRS = frozenset({"full_run", "method_runs"})


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
  """A test that reads a shared trained workdir joins xdist group "workdirs", so the
  workdirs are trained once, on one worker; every other test, even in the same module,
  is free to run on the other worker (the group is the suite's longest chain)."""
  for item in items:
    if SHARED_WORKDIRS & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.xdist_group("workdirs"))


# The repository root, for tests that name its files or run its CLIs (`from conftest import REPO`).
REPO = pathlib.Path(__file__).resolve().parent.parent


def subprocess_env(*, drop=(), **extra) -> dict:
  """os.environ for a child Python: on CPU, with the repo root on PYTHONPATH (so `configs`
  imports, as pytest.ini's `pythonpath` makes it import here), minus the `drop` names,
  plus `extra`. The XLA/JAX settings above are inherited, so the child compiles the same
  programs and hits the same persistent cache."""
  env = {k: v for k, v in os.environ.items() if k not in drop}
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  env["JAX_PLATFORMS"] = "cpu"
  env.update(extra)
  return env


def run_cli(module: str, *args: str, timeout: float = 600, ok: bool = False,
            env: dict | None = None) -> subprocess.CompletedProcess:
  """`python -m module *args` from the repo root (the configs' relative paths resolve), its
  output captured as text; `env` defaults to `subprocess_env()`.

  `ok=True` asserts exit code 0 with the output tails in the message; error-path tests
  leave it False and check the code and stderr themselves.
  """
  r = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                     text=True, timeout=timeout, env=subprocess_env() if env is None else env)
  if ok:
    assert r.returncode == 0, (f"{module} {list(args)} exited {r.returncode}:\n"
                               f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
  return r


def _shared_dir(env_var: str, sibling: str, what: str) -> pathlib.Path:
  """A directory of ../shared: from `env_var`, else beside the repo, else skip.

  Under CI=true a missing directory fails instead: CI always has ../shared.
  """
  value = os.environ.get(env_var)
  path = pathlib.Path(value) if value else REPO.parent / "shared" / sibling
  if path.is_dir():
    return path
  msg = f"{what} not found (set {env_var} to its folder; looked at {path})"
  if os.environ.get("CI", "").lower() == "true":
    pytest.fail(msg)
  pytest.skip(msg)


@pytest.fixture(scope="session")
def reference_configs_dir() -> pathlib.Path:
  """Full-size model configs (IF-I-XL, IF-II-L, T5 v1.1 XXL, CLIP, DINO)."""
  return _shared_dir("DREAMBOOTH_REFERENCE_CONFIGS", "reference_configs", "reference configs")


@pytest.fixture(scope="session")
def dataset_dir() -> pathlib.Path:
  """The DreamBooth benchmark (30 subjects)."""
  return _shared_dir("DREAMBOOTH_DATASET", "dreambooth_dataset", "DreamBooth dataset")


@pytest.fixture(scope="session")
def spiece_dir(tmp_path_factory) -> str:
  """A trained ~800-piece unigram spiece.model with T5's special ids (text_helpers.train_spiece)."""
  from text_helpers import train_spiece
  return train_spiece(tmp_path_factory.mktemp("spiece"))


class CompileLog(logging.Handler):
  """Collects the names of the programs JAX compiles while it is installed (with
  `jax.log_compiles()`, JAX logs "Compiling <name> with global shapes ..." once per
  lowering, persistent-cache hits included)."""

  def __init__(self):
    super().__init__(logging.WARNING)
    self.names: list[str] = []

  def emit(self, record):
    message = record.getMessage()
    if message.startswith("Compiling "):
      self.names.append(message.split(" ", 2)[1])


@pytest.fixture(scope="session")
def full_run(tmp_path_factory):
  """One tiny DreamBooth run (train_helpers.tiny_config, 4 steps, base+sr256 tuned, sample grids
  at steps 2 and 4), shared by the train, sample and evaluate tests: (workdir, final state).
  The programs it compiled are listed in <workdir>/compiled.json."""
  from train_helpers import tiny_config
  from dreambooth_jax import train as train_lib
  workdir = str(tmp_path_factory.mktemp("full"))
  log, logger = CompileLog(), logging.getLogger("jax._src.interpreters.pxla")
  logger.addHandler(log)
  try:
    with jax.log_compiles():
      state = train_lib.run(tiny_config(**{"log.sample_every": 2}), workdir)
  finally:
    logger.removeHandler(log)
  (pathlib.Path(workdir) / "compiled.json").write_text(json.dumps(log.names))
  return workdir, state


@pytest.fixture(scope="session")
def method_runs(tmp_path_factory):
  """{method: workdir} of tiny textual-inversion and two-stage runs through the training CLI
  (train_helpers.train_cli), shared by the method, evaluate and notebook tests."""
  from train_helpers import LEARNED_METHODS, train_cli
  out = {}
  for method in LEARNED_METHODS:
    out[method] = str(tmp_path_factory.mktemp(method))
    train_cli(out[method], method)
  return out


@pytest.fixture(scope="session")
def if_repos(tmp_path_factory, spiece_dir) -> dict:
  """{"stage_1": IF-I repo, "stage_2": IF-II repo}: tiny DeepFloyd IF downloads in the Hub
  layout, fp16 variant only, sharded, written by diffusers (if_repos.build_if_repo)."""
  from if_repos import build_if_repo
  root = tmp_path_factory.mktemp("if_repos")
  return {"stage_1": build_if_repo(root / "IF-I", "I", spiece_dir, seed=0),
          "stage_2": build_if_repo(root / "IF-II", "II", spiece_dir, seed=10)}
