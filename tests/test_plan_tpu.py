"""experiments/plan_tpu.py in its reduced mode: real AOT compiles of the trainer's step, tiny models.

The per-device parameter bytes the plan reports (read from the compiled
program's input shardings) must equal the arithmetic from the parameter shapes
and the logical sharding rules: each tensor's bytes divided by the sizes of
the mesh axes it is split over, replicated tensors counted whole.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import plan_tpu  # experiments/, on the path through pytest.ini

from dreambooth_jax import sharding


def _expected_bytes(params, mesh, rules) -> tuple[int, int]:
  """(bytes on one device, bytes in all) from shapes and the logical rules alone."""
  specs = jax.tree.leaves(sharding.param_specs(params, mesh, rules),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  per_device = total = 0
  for x, spec in zip(jax.tree.leaves(params), specs):
    nbytes = math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
    axes = [a for entry in spec if entry is not None
            for a in (entry if isinstance(entry, tuple) else (entry,))]
    split = math.prod(mesh.shape[a] for a in axes)
    assert nbytes % split == 0
    per_device += nbytes // split
    total += nbytes
  return per_device, total


def test_train_plan_param_bytes_match_the_arithmetic(capsys):
  # 4+4 images on 4 fsdp devices: the batch is split, one of each per device.
  args = plan_tpu.parse_args(["--tiny", "--model=if-i-xl", "--what=train", "--batch=4",
                              "--prior_batch=4"])
  config = plan_tpu.make_config(args)
  mesh = sharding.make_mesh(plan_tpu.mesh_shape("fsdp"), devices=jax.devices()[:args.devices])
  rules = plan_tpu.pipeline.rules_of(config)
  lowered, params, desc = plan_tpu.lower("train", args, config, mesh, rules)
  row = plan_tpu.analyse("train", lowered, params, desc, args, mesh, config)
  print(plan_tpu.format_row(row))
  per_device, total = _expected_bytes(params, mesh, rules)
  print(f"param bytes/device: plan {row['param_bytes_per_device']}, arithmetic {per_device} "
        f"(of {total} in all, {mesh.devices.size} devices)")
  assert row["param_bytes_per_device"] == per_device
  assert per_device < total  # something is sharded over fsdp
  assert row["params"] * np.dtype(config.model.param_dtype).itemsize == total
  for key in ("argument_bytes", "temp_bytes", "peak_bytes_per_device", "flops_per_device"):
    assert row[key] > 0, key
  assert row["peak_bytes_per_device"] >= row["param_bytes_per_device"]
  # Arguments hold at least params + Adam's two moments, all sharded like the params.
  assert row["argument_bytes"] >= 3 * per_device
  # FSDP proper: weights are gathered, activations stay batch-sharded, so nothing larger
  # than a parameter is ever all-reduced (unpinned, the attention scores were: 9.0M
  # elements against the largest parameter's 18k, and twice the temp memory).
  print(f"largest all-reduce {row['largest_reduction']} elements, largest param "
        f"{row['largest_param']}")
  assert 0 < row["largest_reduction"] <= row["largest_param"]


def test_lora_plan_holds_adapters_in_the_state_and_the_base_as_an_argument():
  """LoRA's step compiled as the trainer runs it: the state (adapters + Adam) is a small
  fraction of the full state, the frozen UNet is an argument (in the peak), and the
  one-device topologies plan on one device of their own memory."""
  args = plan_tpu.parse_args(["--tiny", "--model=if-i-xl", "--what=train", "--lora=4",
                              "--topology=gpu-24", "--devices=1", "--no-phases"])
  config = plan_tpu.make_config(args)
  mesh = sharding.make_mesh(plan_tpu.mesh_shape("fsdp"), devices=jax.devices()[:1])
  rules = plan_tpu.pipeline.rules_of(config)
  lowered, params, desc = plan_tpu.lower("train", args, config, mesh, rules)
  lora = plan_tpu.analyse("train", lowered, params, desc, args, mesh, config)
  print(plan_tpu.format_row(lora))
  unet = sum(math.prod(x.shape) for x in jax.tree.leaves(
      plan_tpu.abstract_stage(args, config, "base").abstract_params))
  assert lora["lora_rank"] == 4 and lora["hbm_gib"] == 24.0 and "LoRA r=4" in lora["desc"]
  assert lora["params"] < 0.2 * unet
  # Full fine-tuning's state would hold the UNet and Adam's two moments: 12 bytes a param.
  assert lora["state_bytes_per_device"] < 0.2 * 12 * unet
  # The frozen UNet (float32 here) is an argument of the LoRA step.
  assert lora["argument_bytes"] >= 4 * unet
  phases = plan_tpu.run_phases(args, config, mesh, rules, {"train": lora})
  assert [r["phase"] for r in phases] == ["load", "train", "checkpoint", "export"]


# The head of XLA:CPU's buffer report for IF-I-XL's LoRA step on one device (bf16 frozen
# UNet), as `--xla_dump_to` writes it; the shape lists are cut short.
_XLA_REPORT = """Memory Space: default (color=0)
Total bytes: 20652518080 (19.23GiB)
  cumulative_size;       size;       offset; used_by_n_values; shapes_list
  ------------------------------------------------------------
  544.50MiB(  4%);  544.50MiB;   1141899264;                4; f32[3,3,2816,5632], f32[3,3,5632,2816], 2×f32[3,3,2816,2816]
    1.06GiB(  8%);  544.50MiB;    570949632;                2; f32[3,3,2816,5632], f32[2,64,64,704]
    1.33GiB( 10%);  272.25MiB;   3229433856;                1; f32[3,3,2816,2816]
    1.36GiB( 10%);   30.25MiB;   8694185984;                1; bf16[2816,2816]
"""


def test_xla_report_counts_only_allocations_of_weight_copies():
  import xla_memory_report
  allocations = xla_memory_report.allocations(_XLA_REPORT)
  assert [a[0] for a in allocations] == [int(544.5 * 2**20), int(544.5 * 2**20), int(272.25 * 2**20),
                                         int(30.25 * 2**20)]
  assert allocations[0][1][-1] == ("f32", (3, 3, 2816, 2816))  # "2×" lists the shape once
  bf16 = [(3, 3, 2816, 5632), (3, 3, 2816, 2816), (2816, 2816)]
  copies = xla_memory_report.weight_copies(_XLA_REPORT, bf16)
  # The first holds a transposed copy too; the second also an activation (left in); the
  # bf16 argument itself is no copy.
  assert copies.allocations == 2
  assert copies.swapped_bytes == int(544.5 * 2**20) and copies.same_layout_bytes == int(272.25 * 2**20)


def test_three_stage_sampler_plan_sums_its_phases(reference_configs_dir):
  """`--what=cascade` without compiling: stage III is built at full size from the reference
  configs as the loader builds it (parameter counts of the published model, a float32
  VAE), and `sampler_phases` adds the weights each phase finds resident, counts every
  denoising step and scales the VAE decode to the FLOPs of its unrolled attention loop."""
  import plan_sampler
  from flax import nnx
  config = plan_tpu.imagen_dog.get_config("if")
  parts = plan_sampler.x4_upscaler(config, reference_configs_dir)
  count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  assert (count(parts.stage.abstract_params), count(nnx.state(parts.text)),
          count(nnx.state(parts.vae()))) == (473_398_020, 340_387_840, 55_325_927)
  unchunked = parts.vae(chunked=False)  # for its FLOPs; the chunked one is what runs
  assert {x.dtype for x in jax.tree.leaves(nnx.state(unchunked))} == {np.dtype("float32")}
  attention = lambda vae: vae.decoder.mid_block.attentions[0].max_scores
  assert attention(unchunked) is None and attention(parts.vae()) == plan_sampler.vae_lib.MAX_SCORES
  assert (parts.stage.lowres_resolution, parts.stage.settings.resolution) == (256, 1024)

  gib = plan_sampler.GIB
  row = lambda params, peak, step_s: dict(param_bytes_per_device=params * gib,
                                          peak_bytes_per_device=peak * gib, step_s=step_s)
  rows = {"t5": row(2, 3, 0.01), "base": row(4, 6, 0.2), "sr256": row(1, 3, 0.3),
          "clip": row(0.5, 0.6, 0.001), "x4_unet": row(0.5, 5, 0.4),
          "vae": dict(row(0.1, 20, 0.5), flops_per_device=1.0, flops_full_per_device=3.0)}
  steps = {"base": 100, "sr256": 50, "sr1024": 75}
  phases, totals = plan_sampler.sampler_phases(rows, steps, batch=4, hbm_bytes=25 * gib)
  by = {p["key"]: p for p in phases}
  assert [p["key"] for p in phases] == ["t5", "base", "sr256", "clip", "x4_unet", "vae"]
  assert by["t5"]["resident"] == by["base"]["resident"] == 0  # T5 is released before the UNets
  assert by["sr256"]["resident"] == 4 * gib and by["vae"]["resident"] == 6 * gib
  assert by["vae"]["peak"] == 26 * gib and not by["vae"]["fits"] and by["x4_unet"]["fits"]
  assert by["base"]["seconds"] == pytest.approx(20.0) and by["x4_unet"]["calls"] == 75
  assert by["vae"]["seconds"] == pytest.approx(1.5)  # 0.5 s counted the loop once of 3x
  latency = 0.01 + 20 + 15 + 0.001 + 30 + 1.5
  assert totals["latency_s"] == pytest.approx(latency)
  assert totals["per_image_s"] == pytest.approx(latency / 4)
  assert totals["peak_phase"] == "sr1024 VAE decode" and not totals["fits"]
  assert any("DOES NOT FIT" in line for line in plan_sampler.format_phases(phases, totals, 25))


def test_many_subject_benchmark_time_adds_up_the_jobs_programs():
  """`--what=many`'s arithmetic without compiling: the job's subjects and class prompts
  come from its config, evaluations fall where `in_loop.JobEvaluation.due` puts them, and
  each phase is its program's seconds times how often the job runs it."""
  import plan_many
  from configs import dreambooth_benchmark
  config = dreambooth_benchmark.get_config("tiny")  # the world's subjects, no dataset needed
  config.train.steps, config.eval.every, config.eval.at_start = 1000, 200, True
  config.eval.update(num_prompts=4, num_images=4, num_class_images=0, batch_size=16, num_steps=25)
  config.prior.update(num_images=1000, batch_size=16)
  job = plan_many.job_of(config)
  assert job.names == sorted(config.subjects) and job.tuned == ("base", "sr256")
  assert len(job.class_prompts) == len({s.class_noun for s in config.subjects.values()})
  assert job.bench_images == {n: 100 for n in job.names}  # 25 prompts x 4 images
  assert plan_many.evaluation_steps(config) == [0, 200, 400, 600, 800, 1000]
  rows = {"encode": dict(step_s=0.01), "train": dict(step_s=2.0),
          "priors base": dict(step_s=0.2), "priors sr256": dict(step_s=0.25),
          "eval base": dict(step_s=0.21), "eval sr256": dict(step_s=0.26)}
  bench = {r["phase"]: r for r in plan_many.benchmark_rows(config, [job], rows, encode_batch=8,
                                                           data_parallel=4)}
  steps = {n: config.cascade[n].num_steps for n in job.tuned}
  s, c = len(job.names), len(job.class_prompts)
  assert bench["class priors"]["runs"] == c * 63  # 1000 priors in calls of 16
  assert bench["class priors"]["each_s"] == pytest.approx(steps["base"] * 0.2 +
                                                          steps["sr256"] * 0.25)
  assert bench["training"]["seconds"] == pytest.approx(2000.0)
  assert bench["in-loop evaluation"]["runs"] == 6 * s  # 16 images: one call a subject
  assert bench["benchmark evaluation"]["runs"] == 7 * s  # 100 images in calls of 16
  assert bench["benchmark evaluation"]["each_s"] == pytest.approx(25 * (0.21 + 0.26))
  verdict = plan_many.goal(list(bench.values()), minutes=60)
  total = sum(r["seconds"] for r in bench.values())
  assert verdict["total_s"] == pytest.approx(total) and verdict["meets"] == (total < 3600)
  assert verdict["margin_s"] == pytest.approx(3600 - total)
  assert verdict["dominant"] == max(bench.values(), key=lambda r: r["seconds"])["phase"]
  halves = [plan_many.job_of(c) for c in plan_many.job_configs(config, 2)]  # 2 jobs of 3
  assert [h.names for h in halves] == [job.names[:3], job.names[3:]]
  two = {r["phase"]: r for r in plan_many.benchmark_rows(config, halves, rows, encode_batch=8,
                                                         data_parallel=4)}
  assert two["training"]["runs"] == 2000  # each job's steps, each step of half the subjects
  assert two["class priors"]["runs"] == sum(len(h.class_prompts) for h in halves) * 63
  assert two["benchmark evaluation"]["runs"] == bench["benchmark evaluation"]["runs"]
  config.eval.every = 0  # no in-loop evaluation: only the benchmark's
  assert plan_many.evaluation_steps(config) == []
  assert {r["phase"]: r["runs"] for r in plan_many.benchmark_rows(
      config, [job], rows, encode_batch=8, data_parallel=4)}["in-loop evaluation"] == 0
  plan_many.override(config, "prior.num_images=100")
  plan_many.override(config, "model.remat=false")
  assert config.prior.num_images == 100 and config.model.remat is False


def test_many_subject_plan_lowers_the_jobs_step_and_sampling_loops():
  """What `--what=many` compiles, lowered only (compiling is the full plan's work): the joint
  step `train_many` jits, on 6 subjects + 2 padding slots, whose subject axis then splits
  over the 4 devices (also as a loop over chunks of subjects, `train.subject_chunk`), and
  the sampling loops of the class priors (frozen UNet) and of the in-loop evaluation (a
  subject's adapters bound to it) with remat on, as the `if` config samples: the priors'
  loop once refused its params there (nnx.remat, another trace)."""
  import plan_many
  args = plan_tpu.parse_args(["--tiny", "--what=many", "--set=model.remat=true",
                              "--set=stages=base"])
  config = plan_many.benchmark_config(args)
  mesh = sharding.make_mesh(dict(config.mesh), devices=jax.devices()[:args.devices])
  slots, extra = plan_many.padded(config, mesh)  # train_many's slots: 6 -> 8 on 4 devices
  job = plan_many.job_of(slots)
  assert extra == 2 and len(job.names) == len(config.subjects) + 2 and job.tuned == ("base",)
  rules = plan_tpu.pipeline.rules_of(config)
  _, params, desc = plan_tpu.as_on_tpu(
      mesh, lambda: plan_many.lower_joint_step(args, slots, mesh, rules, job))
  assert f"x {len(job.names)} subjects" in desc and "subjects split" in desc
  assert all(x.shape[0] == len(job.names) for x in jax.tree.leaves(params))  # a subject axis
  slots.train.subject_chunk = 1  # 2 slots a device: a loop of 2, one slot of each device
  lowered, _, desc = plan_tpu.as_on_tpu(
      mesh, lambda: plan_many.lower_joint_step(args, slots, mesh, rules, job))
  assert "2 x 1 a device" in desc and "while" in lowered.as_text()
  assert plan_many.subject_loop_trips(slots, len(job.names), mesh) == 2
  for adapters in (False, True):
    lowered, _, desc, steps = plan_tpu.as_on_tpu(mesh, lambda: plan_many.lower_stage_sample(
        args, config, mesh, rules, "base", batch=4, adapters=adapters, sampler="dpmpp_2m",
        num_steps=3))
    assert steps == 3 and ("LoRA r=4" in desc) == adapters and "while" in lowered.as_text()
