"""End-to-end evaluation: tiny fine-tuned workdirs of every method, tiny random encoders.

The DINO, CLIP (+ BPE tokenizer) and LPIPS files are tiny random stand-ins in the
real formats (`dreambooth_jax.evaluation.tiny_encoders`; loader parity is tested in
test_encoders.py and test_lpips.py). The numbers are meaningless; the report's
shape, the resumability and the errors are what is checked.
"""

import json
import math
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMON = ["--subject=dog", "--num_prompts=2", "--num_images=2", "--num_class_images=2"]
METRICS = ("DINO", "CLIP-I", "CLIP-T", "PRES", "DIV")


@pytest.fixture(scope="module")
def encoder_paths(tmp_path_factory):
  """{"dino", "clip", "lpips"}: tiny random encoders at the protocol's 224 px input."""
  from dreambooth_jax.evaluation.tiny_encoders import write_tiny_encoders
  return write_tiny_encoders(str(tmp_path_factory.mktemp("encoders")))


def _cli(args, timeout=600):
  return subprocess.run([sys.executable, "-m", "dreambooth_jax.evaluate", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _workdirs(full_run, method_runs):
  return [full_run[0], method_runs["textual_inversion"], method_runs["ti_then_finetune"]]


@pytest.fixture(scope="module")
def cli_report(full_run, method_runs, encoder_paths, dataset_dir, tmp_path_factory):
  """One CLI run over the three methods side by side, plus the real row: (out folder, stdout)."""
  out = tmp_path_factory.mktemp("eval")
  start = time.time()
  r = _cli([f"--workdir={','.join(_workdirs(full_run, method_runs))}", f"--dataset={dataset_dir}",
            *COMMON, *(f"--{k}={v}" for k, v in encoder_paths.items()), "--real", f"--out={out}"])
  assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
  print(f"\nevaluate CLI, 3 workdirs + real row: {time.time() - start:.1f} s")
  return out, r.stdout


def test_report_compares_every_method_and_the_real_row(cli_report, full_run, method_runs):
  out, stdout = cli_report
  report = json.loads((out / "report.json").read_text())
  rows = report["rows"]
  assert [r["method"] for r in rows] == ["real", "dreambooth", "textual_inversion",
                                         "ti_then_finetune"]
  real, *runs = rows
  assert real["metrics"]["CLIP-T"] is real["metrics"]["PRES"] is real["metrics"]["DIV"] is None
  assert all(-1 <= real["metrics"][m] <= 1 for m in ("DINO", "CLIP-I"))
  for row, workdir in zip(runs, _workdirs(full_run, method_runs)):
    assert row["workdir"] == os.path.abspath(workdir) and row["step"] > 0 and row["identifier"]
    assert row["generated"] == 2 * 2 + 2
    for m in METRICS:
      assert math.isfinite(row["metrics"][m]), (row["label"], m)
    assert len(row["per_prompt"]) == 2
    for p in row["per_prompt"]:
      assert all(math.isfinite(p[m]) for m in ("DINO", "CLIP-I", "CLIP-T", "DIV"))
      assert "[V]" in p["prompt"] and "[V]" not in p["clip_t_text"]
    pngs = sorted(n for n in os.listdir(out / os.path.dirname(row["grid"])) if n != "grid.png"
                  and n.endswith(".png"))
    assert pngs == ["000_0.png", "000_1.png", "001_0.png", "001_1.png", "class_0.png",
                    "class_1.png"]
  for row in rows:
    assert (out / row["grid"]).stat().st_size > 0
  assert report["settings"]["num_prompts"] == 2 and report["settings"]["category"] == "live"
  # textual inversion: the learned token stands for "[V] dog", so the filled prompt drops "dog"
  ti = json.loads((out / os.path.dirname(runs[1]["grid"]) / "manifest.json").read_text())
  assert ti["jobs"]["000"]["prompt"] == f"a {runs[1]['identifier']} in the jungle"
  md = (out / "report.md").read_text()
  table = [l for l in md.splitlines() if l.startswith("| ")]
  assert table[0].startswith("| Method | DINO ↑ | CLIP-I ↑ | CLIP-T ↑ | PRES ↓ | DIV ↑ |")
  for row in rows:
    assert any(l.startswith(f"| {row['label']} |") for l in table)
    assert f"]({row['grid']})" in md
  real_line = next(l for l in table if l.startswith("| Real images |"))
  assert real_line.count("N/A") == 3
  assert "dreambooth (" in stdout and "report.md" in stdout


def test_second_run_resumes_without_regenerating_or_torch(cli_report, full_run, method_runs,
                                                          encoder_paths, dataset_dir):
  out, _ = cli_report
  report = json.loads((out / "report.json").read_text())
  pngs = sorted(out.glob("*/0*_*.png"))
  mtimes = [p.stat().st_mtime_ns for p in pngs]
  code = f"""
import json, sys
from dreambooth_jax.evaluation import protocol
r = protocol.run({_workdirs(full_run, method_runs)!r}, {str(dataset_dir)!r}, "dog",
                 {encoder_paths['dino']!r}, {encoder_paths['clip']!r}, {encoder_paths['lpips']!r},
                 num_images=2, num_prompts=2, num_class_images=2, real=True, out={str(out)!r})
print(json.dumps({{"generated": [row["generated"] for row in r["rows"]],
                   "torch": "torch" in sys.modules}}))
"""
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                     timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-4000:]
  got = json.loads(r.stdout.strip().splitlines()[-1])
  assert got == {"generated": [0, 0, 0, 0], "torch": False}
  assert [p.stat().st_mtime_ns for p in pngs] == mtimes
  again = json.loads((out / "report.json").read_text())
  for a, b in zip(report["rows"], again["rows"]):  # same images, same scores
    assert b["metrics"] == pytest.approx(a["metrics"], abs=1e-6)


def test_manifest_regenerates_missing_and_stale_images(tmp_path):
  """The manifest logic without a cascade: a changed entry drops that prompt's PNGs."""
  from dreambooth_jax.evaluation import protocol

  stage = lambda name: type("S", (), {"name": name})()

  class FakeTuned:
    workdir, step = str(tmp_path), 3
    models = type("M", (), {"cascade": type("C", (), {"stages": [stage("base"), stage("sr256")]})()})()
    calls = []

    def fill(self, p):
      return p.replace("[V]", "sks")

    def embed(self, prompts):
      pass

    def generate(self, prompt, n, rng, upto=None, mesh=None):  # stops at `upto`, as Cascade.sample
      self.calls.append((prompt, n))
      out = {"base": np.full((n, 4, 4, 3), len(self.calls), np.uint8)}
      if upto != "base":
        out["sr256"] = np.full((n, 16, 16, 3), len(self.calls), np.uint8)
      return out

  jobs = [protocol.Job("000", "a [V] dog", "a dog", 3, 0),
          protocol.Job("class", "a dog", "a dog", 2, 1)]
  tuned = FakeTuned()
  images, n = protocol.generate_jobs(tuned, str(tmp_path / "row"), jobs, seed=0, batch_size=2)
  assert n == 5 and tuned.calls == [("a [V] dog", 2), ("a [V] dog", 1), ("a dog", 2)]
  assert images["000"].shape == (3, 16, 16, 3)  # the last stage's, by default
  (tmp_path / "row" / "000_2.png").unlink()  # an interrupted run: only the missing chunk again
  _, n = protocol.generate_jobs(tuned, str(tmp_path / "row"), jobs, seed=0, batch_size=2)
  assert n == 1 and tuned.calls[-1] == ("a [V] dog", 1)
  tuned.step = 4  # a newer checkpoint: every prompt is stale
  _, n = protocol.generate_jobs(tuned, str(tmp_path / "row"), jobs, seed=0, batch_size=2)
  assert n == 5
  # Scoring another stage: its images, the cascade stopped there, every prompt stale.
  images, n = protocol.generate_jobs(tuned, str(tmp_path / "row"), jobs, seed=0, batch_size=2,
                                     stage="base")
  assert n == 5 and images["000"].shape == (3, 4, 4, 3)
  with pytest.raises(protocol.EvalError, match="--stage=sr1024: the cascade of .* base, sr256"):
    protocol.generate_jobs(tuned, str(tmp_path / "row"), jobs, seed=0, batch_size=2,
                           stage="sr1024")


def test_stage_is_checked_from_the_workdir_config_alone(tmp_path):
  """--stage names a stage every workdir's cascade has, checked from config.json before any
  model is built; sr1024 on a cascade without one points at --stage_3, which a tiny cascade
  cannot take; the default output folder is per stage."""
  from configs import imagen_dog
  from dreambooth_jax import config_lib
  from dreambooth_jax.evaluation import protocol
  workdir = tmp_path / "run"
  workdir.mkdir()
  config_lib.save(imagen_dog.get_config("tiny"), workdir / "config.json")
  protocol.check_stage([str(workdir)], None)
  protocol.check_stage([str(workdir)], "base")
  with pytest.raises(protocol.EvalError, match="--stage=sr512: name a cascade stage"):
    protocol.check_stage([str(workdir)], "sr512")
  with pytest.raises(protocol.EvalError, match="has stages base, sr256 .*--stage_3="):
    protocol.check_stage([str(workdir)], "sr1024")
  with pytest.raises(config_lib.ConfigError, match="tiny random cascade .*imagen_dog.py:stage3"):
    protocol.check_stage([str(workdir)], "sr1024", stage_3=str(tmp_path))
  assert protocol.default_out([str(workdir)], "eval", None) == workdir / "eval"
  assert protocol.default_out([str(workdir)], "eval", "base") == workdir / "eval_base"


def test_missing_encoder_folder_exits_2_before_generating(full_run, encoder_paths, dataset_dir,
                                                          tmp_path):
  out = tmp_path / "eval"
  r = _cli([f"--workdir={full_run[0]}", f"--dataset={dataset_dir}", *COMMON,
            f"--dino={tmp_path / 'no_dino'}", f"--clip={encoder_paths['clip']}",
            f"--lpips={encoder_paths['lpips']}", f"--out={out}"])
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr
  assert f"--dino={tmp_path / 'no_dino'} has no config.json + model.safetensors" in r.stderr
  assert "facebook/dino-vits16" in r.stderr
  assert not list(tmp_path.rglob("*.png"))


def test_api_errors_name_the_flag(full_run, dataset_dir, encoder_paths, tmp_path):
  from dreambooth_jax.evaluation import protocol
  args = (dataset_dir, "dog", encoder_paths["dino"], encoder_paths["clip"], encoder_paths["lpips"])
  with pytest.raises(protocol.EvalError, match="--subject=unicorn .* choose one of: .*dog"):
    protocol.run([full_run[0]], dataset_dir, "unicorn", *args[2:], out=str(tmp_path))
  with pytest.raises(protocol.EvalError, match="--num_prompts=99"):
    protocol.run([full_run[0]], *args, num_prompts=99, out=str(tmp_path))
  with pytest.raises(protocol.EvalError, match="--workdir=.* has no config.json"):
    protocol.run([str(tmp_path)], *args)
  with pytest.raises(protocol.EvalError, match="at least 2"):
    protocol.run([full_run[0]], *args, num_images=1, out=str(tmp_path))
