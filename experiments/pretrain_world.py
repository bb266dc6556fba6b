r"""Pretrains the tiny world cascade on `dreambooth_jax.world`, on a CPU, resumably.

  XLA_FLAGS=--xla_force_host_platform_device_count=2 \
    python experiments/pretrain_world.py --workdir=workdirs/world_pretrain --hours=1.5
  python experiments/pretrain_world.py --workdir=workdirs/world_pretrain --export_only \
    --export=dreambooth_jax/assets/world_cascade

A text-to-image cascade of this library's own models, trained as Imagen and IF
were: a 32 px base UNet and a 32 -> 64 px super-resolution UNet with Imagen's
noise-conditioning augmentation (the low-res input noised at a random level in
[0, 0.5], the level given to the UNet as its class label), both conditioned on
a tiny T5 encoder. By default T5 stays frozen at its random init, as IF's T5-XXL
stays frozen: its features tell captions apart and the UNets learn what they mean.
`--text_lr` trains it with the UNets instead (its own Adam, its own EMA), for a
UNet whose samples follow their captions more than random features teach it to;
`--init_from` starts such a run from a frozen-T5 run's checkpoint, `--init_export` any
run from an exported cascade. `--named=0.3` makes that share of the examples named
instances captioned by name ("a zm box on the beach"; dreambooth_jax/world/instances.py),
so pretraining rewards reading an unseen word as a look, as DreamBooth's identifier
needs. Epsilon loss on
the first half of IF's 6-channel output; captions are dropped 10% of the time
so classifier-free guidance works; an EMA of the weights, its random start taken
out (`averaged`), is what is sampled and exported.

The batch is split over the devices (two fake CPU devices run in parallel on a
2-core machine: 1.2x faster than one at 64 px). Every `--ckpt_every` steps the
state is checkpointed with orbax (a rerun resumes); every `--sample_every` steps
a grid of the EMA cascade's samples is written to <workdir>/samples/. The
export writes the cascade in DeepFloyd IF's published layout (model_index.json,
unet/, scheduler/, text_encoder/, tokenizer/; fp16 variant files), loaded by the
same `weights` loaders as IF itself. The schedulers are IF's with
variance_type fixed_small: the learned-variance half of the output is never
trained here, as in diffusers' IF DreamBooth.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import pathlib
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dreambooth_jax import cascade as cascade_lib
from dreambooth_jax import checkpoint as checkpoint_lib
from dreambooth_jax import embeddings, grids, sharding, utils
from dreambooth_jax.models import t5 as t5_lib
from dreambooth_jax.models.layers import KeyGen, random_init
from dreambooth_jax.models.unet import UNetConfig, abstract_unet
from dreambooth_jax.tokenizer import Tokenizer
from dreambooth_jax.weights.t5 import load_t5_encoder, save_t5_encoder
from dreambooth_jax.weights.unet import load_unet, save_unet_diffusers
from dreambooth_jax.world import instances, scene as world

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "dreambooth_jax" / "assets"
TOKENIZER = ASSETS / "tiny_t5" / "spiece.model"
T5_WIDTH = 64


def unet_configs(base_channels: int, sr_channels: int) -> dict[str, dict]:
  """diffusers UNet2DConditionModel configs with every IF feature on, at toy width."""
  common = dict(layers_per_block=1, attention_head_dim=16, encoder_hid_dim=T5_WIDTH,
                encoder_hid_dim_type="text_proj", addition_embed_type="text",
                addition_embed_type_num_heads=4, act_fn="gelu", norm_num_groups=8,
                resnet_time_scale_shift="scale_shift", cross_attention_norm="group_norm",
                mid_block_type="UNetMidBlock2DSimpleCrossAttn")
  c, s = base_channels, sr_channels
  base = dict(common, sample_size=32, in_channels=3, out_channels=6, block_out_channels=[c, 2 * c],
              down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
              up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
              cross_attention_dim=2 * c)
  sr = dict(common, sample_size=64, in_channels=6, out_channels=6, block_out_channels=[s, 2 * s, 4 * s],
            down_block_types=["ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D",
                              "SimpleCrossAttnDownBlock2D"],
            up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"],
            cross_attention_dim=4 * s, class_embed_type="timestep", time_embedding_dim=8 * s,
            time_embedding_act_fn="gelu", resnet_skip_time_act=True,
            resnet_out_scale_factor=1.4142271248762552, mid_block_scale_factor=1.4142271248762552)
  return {"base": base, "sr": sr}


SCHEDULERS = {"base": dict(cascade_lib.IF_STAGE_I_SCHEDULER, variance_type="fixed_small"),
              "sr": dict(cascade_lib.IF_STAGE_II_SCHEDULER, variance_type="fixed_small")}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--hours", type=float, default=1.5, help="stop after this much wall time")
  p.add_argument("--steps", type=int, default=100_000, help="or after this many steps (the schedule's length)")
  p.add_argument("--until", type=int, default=0,
                 help="stop at this step, the schedule still set by --steps (a lever's short leg)")
  p.add_argument("--batch", type=int, default=16, help="images per step (split over devices)")
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--warmup", type=int, default=300)
  p.add_argument("--ema", type=float, default=0.999)
  p.add_argument("--base_channels", type=int, default=48)
  p.add_argument("--sr_channels", type=int, default=16)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--ckpt_every", type=int, default=500)
  p.add_argument("--sample_every", type=int, default=2000, help="0: no sample grids at all")
  p.add_argument("--text_mask", action="store_true",
                 help="mask padded caption tokens out of the UNets' text attention (IF does not; "
                      "the export records it and configs/world.py follows)")
  p.add_argument("--weighting", default="uniform", choices=("uniform", "min_snr", "v"),
                 help="the loss weighting over noise levels (min_snr: Hang et al.; v: v-prediction's "
                      "loss on the epsilon output, the high-noise steps raised up to ~gamma)")
  p.add_argument("--gamma", type=float, default=5.0, help="the weighting's gamma")
  p.add_argument("--train", default="base+sr", choices=("base+sr", "base", "sr"),
                 help="the UNets this run trains; the other keeps its weights (its EMA settles on them). "
                      "The base decides what the cascade draws and costs most of a step's learning")
  p.add_argument("--text_lr", type=float, default=0.0,
                 help="train the tiny T5 with the UNets at this peak learning rate (0: frozen, as IF's). "
                      "The export then carries the trained encoder")
  p.add_argument("--init_from", default=None,
                 help="a workdir of a frozen-T5 run: its latest state starts this one (a new workdir), "
                      "and the T5 starts from the frozen init that run trained its UNets against")
  p.add_argument("--init_export", default=None,
                 help="an exported cascade (IF-I/, IF-II/) whose UNets and T5 start this run (a new "
                      "workdir; fresh optimiser, the EMA started at the loaded weights)")
  p.add_argument("--named", type=float, default=0.0,
                 help="share of examples that are named instances, captioned by name "
                      "(dreambooth_jax/world/instances.py)")
  p.add_argument("--export", default=None, help="write the IF-layout cascade here at the end")
  p.add_argument("--export_only", action="store_true", help="export the latest checkpoint and stop")
  return p.parse_args(argv)


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------

def build(args):
  """(stages {name: Stage}, initial params {name: State}, T5, tokenizer)."""
  tok = Tokenizer.from_pretrained(str(TOKENIZER))
  t5_cfg = t5_lib.T5Config(vocab_size=-(-tok.vocab_size // 128) * 128, d_model=T5_WIDTH, d_kv=16,
                           d_ff=128, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")
  if args.init_export:  # the export's T5 (fp16-rounded), which its users encode with
    t5 = load_t5_encoder(str(pathlib.Path(args.init_export) / "IF-I" / "text_encoder"), jnp.float32,
                         variant="fp16")
  else:
    t5 = random_init(nnx.eval_shape(lambda: t5_lib.T5EncoderModel(t5_cfg, rngs=KeyGen(0))), args.seed + 7)
  stages, params = {}, {}
  for i, (name, d) in enumerate(unet_configs(args.base_channels, args.sr_channels).items()):
    cfg = UNetConfig.from_diffusers(d, source=f"world {name}")
    if args.init_export:
      folder = pathlib.Path(args.init_export) / ("IF-I" if name == "base" else "IF-II") / "unet"
      unet = load_unet(str(folder), jnp.float32, variant="fp16")
      if unet.cfg != cfg:
        raise SystemExit(f"--init_export: {folder} is not a UNet of --base_channels="
                         f"{args.base_channels} --sr_channels={args.sr_channels}")
    else:
      unet = random_init(abstract_unet(cfg), args.seed * 100 + i)
    settings = cascade_lib.StageSettings(resolution=cfg.sample_size, guidance_scale=4.0, num_steps=25,
                                         text_mask=args.text_mask, weighting=args.weighting,
                                         min_snr_gamma=args.gamma)
    stages[name] = cascade_lib.Stage(name, unet, settings, scheduler_config=SCHEDULERS[name],
                                     lowres_resolution=32 if name == "sr" else None)
    params[name] = stages[name].params
  return stages, params, t5, tok


# ----------------------------------------------------------------------------
# Data: world images and captions, prefetched in a thread
# ----------------------------------------------------------------------------

def host_batch(args, step: int) -> dict:
  """Images (64 px and its 32 px reduction) and captions of step `step`; example k of the
  run is `world.example_at(seed, k, named=args.named)`, so a resumed run continues the same stream."""
  first = step * args.batch
  rows = [world.example_at(args.seed, first + k, 64, args.named) for k in range(args.batch)]
  x64 = np.stack([r[0] for r in rows]).astype(np.float32) / 127.5 - 1
  x32 = x64.reshape(args.batch, 32, 2, 32, 2, 3).mean(axis=(2, 4))  # the 32 px image, exactly
  rng = np.random.default_rng([args.seed, step, 1])
  captions = [("" if rng.random() < 0.1 else r[1]) for r in rows]  # dropped: for guidance
  return {"x32": x32, "x64": x64, "captions": captions,
          "aug": rng.uniform(0.0, 0.5, args.batch).astype(np.float32)}


# ----------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------

def make_step(stages, tx, ema_decay: float, train=("base", "sr"), text=None):
  """The jitted step's function. `text` = (T5 graphdef, its optax transform) trains T5:
  the batch then holds token ids and the state T5's params, EMA and optimiser state."""
  def loss_fn(params, batch, rng, t5_params=None):
    r1, r2 = jax.random.split(rng)
    mask = batch.get("mask")  # only with --text_mask
    if t5_params is not None:  # encoded inside the step, so the loss reaches T5
      t5 = nnx.merge(text[0], t5_params)
      batch = dict(batch, text=embeddings.encode_with_learned(t5, None, batch["ids"], batch["attention"]))
    parts = {}
    if "base" in train:
      parts["base"] = stages["base"].loss(params["base"], batch["x32"], batch["text"], mask, r1)[0].mean()
    if "sr" in train:
      parts["sr"] = stages["sr"].loss(params["sr"], batch["x64"], batch["text"], mask, r2,
                                      aug_level=batch["aug"])[0].mean()
    return sum(parts.values()), parts

  def step(state, batch):
    rng = jax.random.fold_in(state["rng"], state["step"])
    if text is not None:
      (loss, parts), (grads, t5_grads) = jax.value_and_grad(loss_fn, argnums=(0, 3), has_aux=True)(
          state["params"], batch, rng, state["t5"]["params"])
      t5_updates, t5_opt = text[1].update(t5_grads, state["t5"]["opt_state"], state["t5"]["params"])
      t5_params = optax.apply_updates(state["t5"]["params"], t5_updates)
      t5_ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state["t5"]["ema"], t5_params)
      state = dict(state, t5=dict(params=t5_params, ema=t5_ema, opt_state=t5_opt))
      parts = dict(parts, t5_grad_norm=optax.tree.norm(t5_grads))
    else:
      (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, rng)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    # A stage not trained has zero gradients, but Adam's decaying moments would still move it.
    # Zeroed here rather than optax.masked: the optimiser state keeps one structure, so a
    # checkpoint of a both-stage run resumes into a base-only one (as step 7750 did).
    updates = {k: u if k in train else jax.tree.map(jnp.zeros_like, u) for k, u in updates.items()}
    params = optax.apply_updates(state["params"], updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state["ema"], params)
    return (dict(state, params=params, ema=ema, opt_state=opt_state, step=state["step"] + 1),
            dict(parts, loss=loss, grad_norm=optax.tree.norm(grads)))
  return step


# ----------------------------------------------------------------------------
# Samples and export
# ----------------------------------------------------------------------------

PREVIEWS = ("a red ball on the beach", "a large blue striped box in the snow", "a green cone at night",
            "a yellow dotted cup on a wooden table", "a ring with a city in the background",
            "a ball", "a photo of a box", "a pink checkered ring on the grass")


def averaged(state, init, decay: float):
  """The EMA with its initial value taken out: (ema - d^n init) / (1 - d^n) after n steps.

  The EMA starts at the random init and keeps d^n of it (37% after 1000 steps at
  d = 0.999), which a short CPU run never averages away; without that share it is the
  exact decay-weighted mean of the trained weights (Adam's bias correction). `init` is
  the seeded init, so a resumed run rebuilds it and needs nothing extra."""
  n = int(state["step"])
  if n == 0:
    return state["params"]
  w = decay ** n
  return jax.tree.map(lambda e, p0: (e - w * p0) / (1 - w), state["ema"], init)


def write_samples(stages, ema, encode, path, seed: int = 0):
  cascade = cascade_lib.Cascade([stages["base"], stages["sr"]])
  cond, uncond = encode(list(PREVIEWS)), encode([""] * len(PREVIEWS))
  out = cascade.sample(cond, jax.random.key(seed), uncond_embeddings=uncond, params=ema,
                       batch_size=len(PREVIEWS))
  rows = [(p, {k: v[i:i + 1] for k, v in out.items()}) for i, p in enumerate(PREVIEWS)]
  grids.save_grid(path, rows)


def export(stages, ema, t5, out: pathlib.Path, text_mask: bool = False, named: float = 0.0) -> None:
  """The cascade in DeepFloyd IF's published layout, fp16 variant files only, and
  world_cascade.json: how it was trained where IF's layout has no field for it."""
  if out.exists():
    shutil.rmtree(out)
  trained = {"unet_text_mask": bool(text_mask)}
  if named:  # DreamBooth on it must not draw an identifier that pretraining named something
    trained.update(named_fraction=named, instance_names=list(instances.NAMES),
                   name_id_range=list(instances.NAME_ID_RANGE))
  utils.write_json(out / "world_cascade.json", trained)
  for name, folder in (("base", out / "IF-I"), ("sr", out / "IF-II")):
    unet = nnx.merge(stages[name].graphdef, jax.device_get(ema[name]))
    save_unet_diffusers(unet, folder / "unet", dtype=np.float16, variant="fp16")
    sched = {"_class_name": "DDPMScheduler", **SCHEDULERS[name]}
    utils.write_json(folder / "scheduler" / "scheduler_config.json", sched)
    index = {"_class_name": "IFPipeline" if name == "base" else "IFSuperResolutionPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDPMScheduler"],
             "tokenizer": ["transformers", "T5Tokenizer"],
             "text_encoder": ["transformers", "T5EncoderModel"] if name == "base" else [None, None]}
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    shutil.copy(TOKENIZER, folder / "tokenizer" / "spiece.model")
    if name == "base":
      save_t5_encoder(t5, folder / "text_encoder", dtype=np.float16, variant="fp16")
    else:
      index["image_noising_scheduler"] = ["diffusers", "DDPMScheduler"]
      utils.write_json(folder / "image_noising_scheduler" / "scheduler_config.json",
                       {"_class_name": "DDPMScheduler", **cascade_lib.IF_IMAGE_NOISING_SCHEDULER})
    utils.write_json(folder / "model_index.json", index)
  print(f"exported the world cascade to {out}", flush=True)


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------

def main(argv=None):
  args = parse_args(argv)
  started = time.time()
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  utils.compilation_cache("")
  stages, params, t5, tok = build(args)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  replicated = NamedSharding(mesh, P())
  def adam(lr):  # warmup, cosine to 10% over --steps, clipped: the UNets' and T5's alike
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, args.warmup, max(args.steps, args.warmup + 1),
                                                  end_value=lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
  tx = adam(args.lr)
  state = dict(params=params, ema=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
               step=jnp.int32(0),
               rng=jax.random.key(args.seed))
  t5_graphdef, t5_params = nnx.split(t5)
  text = None
  if args.text_lr > 0:
    text = (t5_graphdef, adam(args.text_lr))
  state = jax.device_put(state, replicated)
  # The EMA's start (the random init), taken out of it on use; a copy, as the state is donated.
  init = jax.tree.map(jnp.copy, state["params"])
  t5_params = jax.device_put(t5_params, replicated)
  ckpt = checkpoint_lib.Checkpointer(str(workdir), keep=2)
  if ckpt.latest_step() is None and args.init_from:
    with checkpoint_lib.Checkpointer(args.init_from, keep=2, async_save=False) as source:
      if source.latest_step() is None:
        raise SystemExit(f"--init_from={args.init_from}: no checkpoint in {source.directory}")
      state = source.restore(source.latest_step(), state)
    print(f"started from {args.init_from} at step {int(state['step'])}", flush=True)
  if text is not None:  # T5's own state; its EMA starts at the encoder the UNets were trained with
    # Copies: the state is donated to the step, and `t5_params` stays the init the EMA leaves out.
    state["t5"] = dict(params=jax.tree.map(jnp.copy, t5_params), ema=jax.tree.map(jnp.copy, t5_params),
                       opt_state=jax.device_put(text[1].init(t5_params), replicated))
  if ckpt.latest_step() is not None:
    state = ckpt.restore(ckpt.latest_step(), state)
    print(f"resumed at step {int(state['step'])}", flush=True)

  def encoder(state):
    """T5's params for encoding: the frozen init, or the trained encoder's averaged EMA."""
    if text is None:
      return t5_params
    return averaged(dict(state["t5"], step=state["step"]), t5_params, args.ema)

  def encode(captions, params=None):
    ids = tok(captions)
    return {"text": embeddings.encode_batch(t5_params if params is None else params, None,
                                            ids["input_ids"], ids["attention_mask"],
                                            graphdef=t5_graphdef, mesh=None),
            "mask": ids["attention_mask"]}

  def finish(state, export_to=None, samples=bool(args.sample_every)):
    """Sample grids and the export from the averaged weights, T5's included."""
    ema, t5_ema = averaged(state, init, args.ema), encoder(state)
    if samples:
      write_samples(stages, ema, lambda c: encode(c, t5_ema),
                    workdir / "samples" / f"step_{int(state['step']):06d}.png")
    if export_to:
      export(stages, ema, nnx.merge(t5_graphdef, jax.device_get(t5_ema)), pathlib.Path(export_to),
             args.text_mask, args.named)

  if args.export_only:
    finish(state, args.export or workdir / "export", samples=False)
    return
  step_fn = jax.jit(make_step(stages, tx, args.ema, tuple(args.train.split("+")), text), donate_argnums=(0,))
  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.shape))
  pool = concurrent.futures.ThreadPoolExecutor(1)
  start = int(state["step"])
  pending = pool.submit(host_batch, args, start)
  log = open(workdir / "metrics.jsonl", "a")
  t_last, done = time.time(), start
  for step in range(start, min(args.steps, args.until or args.steps)):
    host = pending.result()
    pending = pool.submit(host_batch, args, step + 1)
    batch = {"x32": put(host["x32"]), "x64": put(host["x64"]), "aug": put(host["aug"])}
    if text is None:  # the frozen encoder's features, computed outside the step
      emb = encode(host["captions"])
      batch["text"], mask = put(np.asarray(emb["text"])), emb["mask"]
    else:
      ids = tok(host["captions"])
      batch["ids"], batch["attention"] = put(ids["input_ids"]), put(ids["attention_mask"])
      mask = ids["attention_mask"]
    if args.text_mask:
      batch["mask"] = put(np.asarray(mask))
    with jax.set_mesh(mesh):
      state, metrics = step_fn(state, batch)
    done = step + 1
    if done % 50 == 0:
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      rate = 50 / (time.time() - t_last)
      t_last = time.time()
      parts = " ".join(f"{k} {m[k]:.4f}" for k in ("base", "sr", "t5_grad_norm") if k in m)
      print(f"step {done} loss {m['loss']:.4f} ({parts}) {rate:.2f} steps/s", flush=True)
      log.write(json.dumps(dict(step=done, time=time.time() - started, **m)) + "\n")
      log.flush()
    if done % args.ckpt_every == 0:
      ckpt.save(done, state)
    if args.sample_every and done % args.sample_every == 0:
      finish(state)
    if time.time() - started > args.hours * 3600:
      print(f"time budget of {args.hours} h reached at step {done}", flush=True)
      break
  ckpt.wait()
  if ckpt.latest_step() != done:
    ckpt.save(done, state, force=True)
    ckpt.wait()
  finish(state, args.export)
  print(f"done: {done} steps in {(time.time() - started) / 60:.1f} min", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
