"""Textual inversion and the two-stage method (Zeng et al.) through the same trainer.

Each method's tiny default is trained once through the training CLI (module
fixture); the tests then read its workdir: what learned, what stayed frozen,
which loss terms ran, and that a run resumed at the stage boundary of the
two-stage method ends bitwise where the uninterrupted run ended.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from dreambooth_jax import checkpoint, config_lib, finetuned, methods, pipeline
from dreambooth_jax import train as train_lib

from conftest import run_cli
from train_helpers import LEARNED_METHODS as LEARNED




@pytest.fixture(scope="module")
def runs(method_runs):
  return method_runs


def _restore(workdir, step=None):
  config = config_lib.load(os.path.join(workdir, "config.json"))
  models = pipeline.build(config)
  params, _ = finetuned.restore_params(config, models, workdir, step)
  return config, models, params


def _initial_rows(config, models):
  return np.asarray(methods.initial_token_rows(models.load_t5(), models.tokenizer,
                                               [config.learned_token.init_word]))


def _metrics(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_textual_inversion_learns_only_the_token_rows(runs):
  workdir = runs["textual_inversion"]
  tuned = finetuned.FineTuned.load(workdir)
  assert tuned.identifier.text == "<dog*>" and tuned.identifier.token_ids == (-1,)
  assert tuned.params == {}, "textual inversion checkpointed UNet params"
  init = _initial_rows(tuned.config, tuned.models)
  moved = float(np.abs(tuned.learned_rows - init).max())
  print(f"\ntextual inversion: max |row - init row| = {moved:.3e}")
  assert tuned.learned_rows.shape == (1, tuned.models.t5_width) and moved > 0

  # Everything else is the frozen model, bitwise: a prompt without the token samples
  # exactly as the untouched cascade does.
  plain = "a dog on the beach"
  rng = jax.random.key(3)
  got = tuned.generate(plain, 1, rng)
  want = tuned.models.cascade.sample(tuned.embed([plain]), rng, uncond_embeddings=tuned.embed([""]),
                                     batch_size=1)
  for stage in want:
    np.testing.assert_array_equal(got[stage], want[stage])
  # ...and the learned row reaches the images of prompts that use it.
  assert tuned.fill("a [V] dog on the beach") == "a <dog*> on the beach"
  learned = tuned.embed(["a [V] dog on the beach"])["text"]
  assert not np.allclose(learned, tuned.embed([plain])["text"])

  tokens, rows = checkpoint.load_token_rows(os.path.join(workdir, "export", checkpoint.TOKENS_FILE))
  assert tokens == ["<dog*>"]
  np.testing.assert_array_equal(rows, tuned.learned_rows)
  assert not os.path.exists(os.path.join(workdir, "export", "base"))
  assert not os.path.exists(os.path.join(workdir, "class_priors"))
  assert all("base/prior_loss" not in row for row in _metrics(workdir))


def test_two_stage_freezes_the_rows_and_drops_the_prior_in_stage_2(runs):
  workdir = runs["ti_then_finetune"]
  ckpt = checkpoint.Checkpointer(workdir)
  assert [ckpt.restore_metadata(s)["phase"] for s in (1, 2, 3, 4)] == \
      ["textual_inversion"] * 2 + ["finetune"] * 2
  config, models, stage1 = _restore(workdir, 2)
  _, _, final = _restore(workdir, 4)
  assert set(stage1) == {methods.TOKENS}
  assert set(final) == {methods.TOKENS, "base", "sr256"}
  np.testing.assert_array_equal(np.asarray(final[methods.TOKENS]), np.asarray(stage1[methods.TOKENS]))
  assert float(np.abs(np.asarray(stage1[methods.TOKENS]) - _initial_rows(config, models)).max()) > 0
  built = jax.tree.leaves(models.cascade.by_name["base"].params)
  tuned = jax.tree.leaves(final["base"])
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(built, tuned))
  rows = _metrics(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert not any(k.endswith("prior_loss") for r in rows for k in r)
  assert not os.path.exists(os.path.join(workdir, "class_priors"))
  info = json.load(open(os.path.join(workdir, "export", "dreambooth.json")))
  assert info["method"] == "ti_then_finetune" and info["learned_tokens"] == {"<rare>": "rare"}
  assert os.path.isfile(os.path.join(workdir, "export", "sr256", "config.json"))


def test_two_stage_resumes_across_the_stage_boundary(runs, tmp_path):
  done = runs["ti_then_finetune"]
  workdir = str(tmp_path / "resumed")
  shutil.copytree(done, workdir)
  for name in ("export", "samples", os.path.join("checkpoints", "3"), os.path.join("checkpoints", "4")):
    shutil.rmtree(os.path.join(workdir, name))
  config = config_lib.load(os.path.join(workdir, "config.json"))
  state = train_lib.run(config, workdir)  # resumes at step 2: stage 1 done, stage 2 not begun
  _, _, want = _restore(done, 4)
  got = {**state["fixed"], **state["params"]}
  assert set(got) == set(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("method", LEARNED)
def test_sample_cli_uses_the_learned_token(runs, method, tmp_path):
  out = tmp_path / "grid.png"
  r = run_cli("dreambooth_jax.sample", f"--workdir={runs[method]}",
              "--prompt=a [V] dog on the beach", "--num=1", f"--out={out}", ok=True)
  assert "<" in r.stdout and out.stat().st_size > 0
