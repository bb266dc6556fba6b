"""The Colab notebooks run top to bottom on CPU, and the tiny random encoders they fall back on load.

Each notebook is executed with nbclient in a python3 kernel of this interpreter
(it inherits conftest's environment: 8 fake CPU devices, the persistent
compilation cache). Its first cell holds the parameters; the test appends
overrides to it. dreambooth_tpu runs on its default, the pretrained world cascade,
at smoke sizes (`configs/world.py:runlocal`), evaluated by the world protocol.
compare_methods runs on the tiny random config, the DreamBooth protocol and the
benchmark: its workdirs are COPIES of the session's tiny finished runs (`full_run`,
`method_runs`), so its train cell resumes them and only re-exports.
"""

import json
import pathlib
import shutil
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
# `full_run` trained train_helpers.tiny_config() ("tiny,runlocal"), the `method_runs`
# "method=M,runlocal": a notebook resumes them when its config is the same up to mesh
# and batch (which a resumed, finished run does not use).
SMOKE_CONFIG = "configs/imagen_dog.py:tiny,runlocal"


def _notebook(name: str):
  import nbformat
  return nbformat.read(NOTEBOOKS / name, as_version=4)


def _execute(nb, overrides: dict, cwd: pathlib.Path, timeout: int = 900):
  """Runs `nb` with `overrides` appended to its parameters cell; fails with the cell's traceback."""
  from nbclient import NotebookClient
  from nbclient.exceptions import CellExecutionError
  lines = ["", "# -- test overrides --"]
  lines += [f"{k} = {v!r}" for k, v in overrides.items()]
  # The kernel must be this interpreter (CI installs everything into one fresh venv).
  lines.append(f"import sys as _sys; assert _sys.prefix == {sys.prefix!r}, _sys.executable")
  nb.cells[0].source += "\n".join(lines) + "\n"
  client = NotebookClient(nb, kernel_name="python3", timeout=timeout,
                          resources={"metadata": {"path": str(cwd)}})
  try:
    client.execute()
  except CellExecutionError as e:
    pytest.fail(f"notebook cell failed:\n{e}", pytrace=False)
  return nb


def _text(nb) -> str:
  out = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      out.append(o.get("text", "") or "".join(o.get("data", {}).get("text/plain", "")))
      out.append("".join(o.get("data", {}).get("text/markdown", "")))
  return "\n".join(out)


def _images(nb) -> int:
  return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.parametrize("name", ["dreambooth_tpu.ipynb", "compare_methods.ipynb"])
def test_notebook_is_committed_clean(name):
  import nbformat
  nb = _notebook(name)
  nbformat.validate(nb)
  assert nb.nbformat == 4 and nb.metadata.kernelspec.name == "python3"
  first = nb.cells[0]
  assert first.cell_type == "code" and ("WORKDIR" in first.source or "BASE_DIR" in first.source)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def test_tiny_encoders_load_with_our_loaders_and_transformers(tmp_path):
  from dreambooth_jax.evaluation import metrics, tiny_encoders
  from dreambooth_jax.weights.encoders import load_clip, load_dino
  from dreambooth_jax.weights.lpips import load_lpips
  paths = tiny_encoders.write_tiny_encoders(str(tmp_path / "enc"))
  assert tiny_encoders.write_tiny_encoders(str(tmp_path / "enc")) == paths  # reused, not rewritten
  metrics.check_encoder_paths(paths["dino"], paths["clip"], paths["lpips"])
  dino, clip, lpips = load_dino(paths["dino"]), load_clip(paths["clip"]), load_lpips(paths["lpips"])
  tok = metrics.load_clip_tokenizer(paths["clip"])
  assert dino.cfg.image_size == (224, 224) and clip.cfg.vision.image_size == 224
  assert len(tok) == clip.cfg.text.vocab_size
  enc = metrics.Encoders(dino, clip, tok, lpips)
  images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
  text = enc.clip_text(["a sks dog on the beach", "a dog"])
  assert enc.dino(images).shape == (3, 32) and enc.clip_image(images).shape == (3, 16)
  assert text.shape == (2, 16) and np.all(np.isfinite(text))
  d = enc.lpips(images[:2], images[1:])
  assert d.shape == (2,) and np.all(d > 0) and np.allclose(enc.lpips(images, images), 0, atol=1e-6)
  # Transformers' names and layouts: its classes load the folders with nothing missing.
  from transformers import CLIPModel, ViTModel
  for cls, folder in ((ViTModel, paths["dino"]), (CLIPModel, paths["clip"])):
    _, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], (folder, info)
    assert not info["mismatched_keys"], (folder, info)


def _copy(src, dst: pathlib.Path) -> str:
  shutil.copytree(src, dst)
  return str(dst)


def test_dreambooth_notebook_runs_top_to_bottom(tmp_path):
  # Its defaults: the pretrained world cascade learns zigzag_ball, scored by the world
  # protocol. At smoke sizes (runlocal: 4 steps, 2-step samplers) it trains from scratch,
  # on one of the 8 fake devices (sharding the toy arrays 8 ways only slows the CPU).
  workdir = str(tmp_path / "world")
  nb = _execute(_notebook("dreambooth_tpu.ipynb"), dict(
      WORKDIR=workdir, CONFIG="configs/world.py:runlocal", NUM_IMAGES=2,
      MESH={"data": 1, "fsdp": 1, "tensor": 1}), cwd=NOTEBOOKS)
  out = _text(nb)
  assert "already importable" in out and "re-running this cell resumes" in out
  assert "weights: the config's own" in out and "world_cascade/IF-I" in out
  assert "the subject is a ball" in out and "5 photos in" in out and "zigzag_ball" in out
  assert "| Real (world renders) |" in out and "| dreambooth (world) |" in out
  assert "dreambooth.json" in out
  assert _images(nb) >= 5  # photos, training grid, samples, two evaluation grids
  info = json.loads((tmp_path / "world" / "export" / "dreambooth.json").read_text())
  assert (tmp_path / "world" / "export" / "base" / "config.json").is_file()
  assert info["method"] == "dreambooth" and info["identifier"] in out
  report = json.loads((tmp_path / "world" / "eval" / "report.json").read_text())
  assert [r["method"] for r in report["rows"]] == ["real", "dreambooth"]
  assert report["settings"]["protocol"] == "world"


def test_compare_methods_notebook_runs_top_to_bottom(full_run, method_runs, dataset_dir, tmp_path):
  workdirs = {"dreambooth": _copy(full_run[0], tmp_path / "dreambooth")}
  workdirs.update({m: _copy(w, tmp_path / m) for m, w in method_runs.items()})
  nb = _execute(_notebook("compare_methods.ipynb"), dict(
      BASE_DIR=str(tmp_path), WORKDIRS=workdirs, CONFIG=SMOKE_CONFIG, EVAL_SUBJECT="dog",
      DATASET_DIR=str(dataset_dir), NUM_PROMPTS=1, NUM_IMAGES=2, GRID_PROMPTS=["a [V] dog on the beach", "a dog on the beach"]),
      cwd=NOTEBOOKS)
  out = _text(nb)
  assert out.count("resumed from") == 3
  assert "TINY RANDOM" in out and "SCORES ARE MEANINGLESS" in out
  for m in ("dreambooth", "textual_inversion", "ti_then_finetune"):
    assert f"| {m} ({m}) |" in out
  assert (tmp_path / "side_by_side.png").is_file() and _images(nb) >= 1
  report = json.loads((tmp_path / "eval" / "report.json").read_text())
  assert [r["method"] for r in report["rows"]] == ["real", "dreambooth", "textual_inversion",
                                                   "ti_then_finetune"]
