r"""DreamBooth on the `dog` subject with an Imagen-style cascade (DeepFloyd IF).

Tiny CPU default (random tiny cascade and T5, the packaged dog photos; proves
the pipeline end to end in minutes, not image quality):

  python -m dreambooth_jax.train --config=configs/imagen_dog.py --workdir=workdirs/dog

The paper's setting on real weights (download IF-I-XL, IF-II-L and T5 v1.1
XXL first; see the README):

  python -m dreambooth_jax.train --config=configs/imagen_dog.py:if,stages=base+sr256 \
    --workdir=gs://bucket/dog \
    --config.pretrained.stage_1=IF-I-XL-v1.0 --config.pretrained.stage_2=IF-II-L-v1.0 \
    --config.pretrained.t5=IF-I-XL-v1.0/text_encoder --config.pretrained.tokenizer=IF-I-XL-v1.0/tokenizer

Add `--config.pretrained.stage_3=stable-diffusion-x4-upscaler` (the download folder) for
1024 px samples: DeepFloyd's public stage III, run frozen after the tuned stages, or
fine-tuned too with `stages=base+sr256+sr1024` (latent space, at 1024 px; class priors
are then sampled up to 1024 px).

Arguments after ':' (comma-separated): a variant (`tiny` or `if`),
`method=dreambooth|textual_inversion|ti_then_finetune` (each with its paper's
schedule), `stages=base+sr256` (which stages to fine-tune, or whose loss
textual inversion uses; the others run frozen), `steps=N`, `runlocal` (tiny
sizes for a smoke run of any variant), `stage3` (the tiny cascade gets a tiny x4 upscaler
as its third stage). E.g. the two-stage method of Zeng et al.:

  python -m dreambooth_jax.train --config=configs/imagen_dog.py:method=ti_then_finetune \
    --workdir=workdirs/dog_two_stage

Any leaf can be overridden with `--config.x.y=value`; unknown keys fail.
"""

import ml_collections

from dreambooth_jax import config_lib


def _stage(resolution, guidance, steps, *, sample_aug=0.25, train_aug=1e-5):
  # weighting: the fine-tuning loss over noise levels, as the UNet was pretrained
  # ('uniform' epsilon MSE for IF; see diffusion.loss_weight for 'min_snr' and 'v').
  # colour_fix (SR stages): keep the low-res input's colours (cascade.keep_lowres_colours);
  # off, as IF's pipeline samples.
  return ml_collections.ConfigDict(dict(
      resolution=resolution, guidance_scale=guidance, num_steps=steps, sampler="ddpm",
      sample_aug_level=sample_aug, train_aug_level=train_aug, weighting="uniform",
      min_snr_gamma=5.0, colour_fix=False))


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="tiny", method="dreambooth", stages="base+sr256",
                             steps=-1, lora=0, runlocal=False, stage3=False)
  if arg.variant not in ("tiny", "if"):
    raise config_lib.ConfigError(f"variant {arg.variant!r}: use 'tiny' or 'if'")
  methods = ("dreambooth", "textual_inversion", "ti_then_finetune")
  if arg.method not in methods:
    raise config_lib.ConfigError(f"method {arg.method!r}: use one of {', '.join(methods)}")
  tiny, method = arg.variant == "tiny", arg.method
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = method
  c.stages = arg.stages  # stages to fine-tune, '+'-joined; the cascade runs every stage

  # -- the subject ------------------------------------------------------------
  c.subject = dict(
      dir="",                  # folder of 3-5 photos; "" = the packaged dog subject
      class_noun="dog",
      identifier="",           # "" = sample a rare-token identifier, or e.g. "sks"
      identifier_tokens=1,     # 1 to 3 rare tokens
      # T5 ids 5000..10000 as in the paper; the tiny tokenizer only has 868 ids.
      identifier_id_range=(100, 768) if tiny else (5000, 10000),
      min_size=256,
      flip=False,              # mirrors text and logos; the paper does not flip
      instance_template="a {identifier} {class_noun}",
      class_template="a {class_noun}",
  )
  # A new token whose T5 embedding row is learned (textual_inversion, ti_then_finetune).
  # Textual inversion's token is a noun that starts as the class word ("a photo of
  # <dog*>"); Zeng et al.'s "<rare>" is an adjective that starts as "rare" ("a photo
  # of <rare> dog"). A template without {class_noun} makes the token the whole subject.
  c.learned_token = dict(text="", init_word="")
  if method == "textual_inversion":
    c.learned_token = dict(text="<dog*>", init_word="dog")
    c.subject.instance_template = "a photo of {identifier}"
  elif method == "ti_then_finetune":
    c.learned_token = dict(text="<rare>", init_word="rare")
    c.subject.instance_template = "a photo of {identifier} {class_noun}"
  # Zeng et al.: stage 1 about 100 steps at 5e-4 on the embedding alone, then the
  # UNets 200-400 steps at 5e-6 (config.train.lr) with the embedding and T5 frozen.
  c.two_stage = dict(ti_steps=100, ti_lr=5e-4)

  # -- models ------------------------------------------------------------------
  c.model = dict(
      kind="tiny" if tiny else "pretrained",
      param_dtype="float32",   # master weights
      dtype="float32" if tiny else "bfloat16",  # compute
      remat=not tiny,
      t5_dtype="float32" if tiny else "bfloat16",
      # IFPipeline's prompt handling, so an exported model reads prompts as in training:
      # 'clean' (its default clean_caption=True: lowercase, URLs/HTML/punctuation runs
      # removed, ftfy), 'lower' (clean_caption=False) or 'none' (as typed).
      prompt_preprocessing="clean",
      # IF's UNets attend to all 77 T5 positions, padding included (IFPipeline never
      # gives them the mask); True masks padding out, for models trained that way.
      unet_text_mask=False,
  )
  c.pretrained = dict(
      stage_1="",   # IF-I folder (with unet/ [+ scheduler/]) or its unet/ folder
      stage_2="",   # IF-II folder (with unet/ [+ scheduler/])
      stage_3="",   # stabilityai/stable-diffusion-x4-upscaler download (or an IF-style SR UNet)
      t5="",        # T5 v1.1 XXL encoder folder (config.json + safetensors)
      tokenizer="",  # folder with spiece.model
  )
  # Tiny random models of the same architecture, for CPU runs and tests.
  c.tiny = dict(seed=0, t5_d_model=64, t5_layers=2, t5_heads=4, t5_d_ff=128,
                unet_channels=32, sr_channels=16, tokenizer="")  # "" = packaged tiny spiece.model

  # -- the cascade: per-stage sampling and SR noise augmentation ----------------
  # sampler: 'ddpm' (IF's ancestral sampler; the paper's class priors), 'ddim', or
  # 'dpmpp_2m' (DPM-Solver++(2M), as diffusers offers for IF: similar images in ~25 steps).
  c.cascade = dict(
      base=_stage(32 if tiny else 64, 7.0, 10 if tiny else 100),
      sr256=_stage(64 if tiny else 256, 4.0, 10 if tiny else 50),
      sr1024=_stage(128 if tiny else 1024, 4.0, 10 if tiny else 50),
  )
  # Stage III, 256 -> 1024: DeepFloyd's public one is Stable Diffusion's x4 latent upscaler
  # (pretrained.stage_3), sampled as its pipeline does (DDIM, 75 steps, guidance 9) at
  # noise_level 100 (aug 0.1), as IF's docs call it. `:stage3` gives the tiny cascade a tiny
  # random one (64 -> 256 px). It is opt-in: a third stage to compile would slow every tiny
  # run and test. (Tiny `stages=...+sr1024` without it tunes a 128 px IF-style pixel stage.)
  # Fine-tuning it (`stages=...+sr1024`, off by default): its low-res input is noised at
  # one integer noise_level = train_aug_level * 1000 (at most 350). Pretraining drew levels
  # uniformly from 0..349; lowered as DreamBooth lowers SR augmentation, the default is the
  # lowest, 0 (its low-res scheduler's sigma 0.01).
  c.tiny.x4_upscaler = tiny and arg.stage3
  if not tiny or arg.stage3:
    c.cascade.sr1024 = _stage(256 if tiny else 1024, 9.0, 10 if tiny else 75, sample_aug=0.1,
                              train_aug=0.0)
    c.cascade.sr1024.sampler = "ddim"

  # -- LoRA: low-rank adapters as the only trainable UNet state (rank 0 = full fine-tuning) --
  # `:lora=16` turns it on; attention projections as diffusers' IF LoRA recipe; the frozen
  # UNets stored in bfloat16 on real weights. `text_encoder` also adapts T5's attention
  # (q, k, v, o): T5 then stays on the devices while training. See dreambooth_jax/lora.py.
  c.lora = dict(rank=arg.lora, alpha=0.0, dropout=0.0, targets="attention",
                base_dtype="" if tiny else "bfloat16", init_seed=0, merged_export=False,
                text_encoder=False)

  # -- class-prior preservation (eq. 2) -----------------------------------------
  c.prior = dict(
      enabled=method == "dreambooth",  # neither TI nor Zeng et al.'s stage 2 use it
      weight=1.0,               # lambda
      num_images=8 if tiny else 1000,
      batch_size=4 if tiny else 16,
      seed=1,
  )

  # -- optimisation --------------------------------------------------------------
  # Paper schedules: DreamBooth 1000 steps at 1e-5 (Imagen); textual inversion 3000-5000
  # steps at 5e-3; two-stage 100 + 300 steps, stage 2 at 5e-6. The tiny default
  # keeps the learning rates and shortens the runs.
  steps, lr = dict(dreambooth=(1000, 1e-5), textual_inversion=(3000, 5e-3),
                   ti_then_finetune=(400, 5e-6))[method]
  if tiny:
    steps, lr = 40, (1e-4 if method == "dreambooth" else lr)
    c.two_stage.ti_steps = 20
  c.train = dict(
      steps=arg.steps if arg.steps > 0 else steps,
      batch_size=1,             # instance images per step
      prior_batch_size=1,       # class-prior images per step
      lr=lr,
      warmup_steps=0,
      schedule="constant",      # or 'cosine'
      # 'adamw', 'adafactor' (factored 2nd moments, no 1st: ~no state memory), or per
      # stage. The `if` default is Imagen's: Adafactor for the base, Adam for SR; with
      # AdamW on both, the plan estimates 35.5 GiB/chip on v4-8 (experiments/plan_tpu.py).
      optimizer="adamw" if tiny else "base=adafactor,sr256=adamw,sr1024=adamw",
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
      mu_dtype="",              # AdamW's first moment: "" = the param dtype, or 'bfloat16'
      grad_clip=1.0,
      grad_accum=1,
      trainable="all",          # regex over param paths ('all' = every UNet param)
  )

  # -- sharding ------------------------------------------------------------------
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  # (logical axis, mesh axes) pairs as in big_vision / MaxText, tried in order; () = the
  # defaults (dreambooth_jax.sharding.DEFAULT_RULES), e.g. (("embed", "fsdp"), ("mlp", "tensor"), ...).
  c.sharding_rules = ()

  # -- checkpoints, logs, samples --------------------------------------------------
  # The tiny default checkpoints and draws its sample grid once, at the end: each costs
  # seconds of a ~45 s CPU run (a resumed run still restarts from the last checkpoint).
  c.checkpoint = dict(every=40 if tiny else 200, keep=3, async_save=True)
  c.log = dict(
      every=5 if tiny else 10,
      sample_every=40 if tiny else 200,
      sample_prompts=("a {identifier} {class_noun} on the beach", "a {class_noun} on the beach"),
      num_samples=2,
      tensorboard=True,
  )
  # JAX's persistent compilation cache: "" = the user's cache folder (~/.cache/dreambooth_jax/jax),
  # "off", or a folder (a shared gs:// one serves every host of a pod).
  c.compilation_cache = ""
  c.distributed = dict(initialize=False, coordinator_address="", num_processes=1, process_id=0,
                       local_device_ids="")

  if arg.steps > 0:
    c.two_stage.ti_steps = min(c.two_stage.ti_steps, max(1, arg.steps // 2))
  if arg.runlocal:  # smoke-test sizes for any variant
    c.train.steps = 4
    c.two_stage.ti_steps = 2
    c.prior.num_images = 2
    c.prior.batch_size = 2
    c.checkpoint.every = 2
    c.log.every = 1
    c.log.sample_every = 4
    for name in ("base", "sr256", "sr1024"):
      c.cascade[name].num_steps = 2
  return c
