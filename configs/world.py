r"""DreamBooth on a subject of the procedural world, with the pretrained tiny world cascade.

The real IF cascade does not fit a CPU, and a random tiny one cannot learn a
subject. The package ships a tiny cascade pretrained on `dreambooth_jax.world`
(32 px base, 32 -> 64 px SR, a tiny frozen T5; DeepFloyd IF's published layout
under dreambooth_jax/assets/world_cascade/, loaded by the same loaders as IF)
and the photos of the world's six subjects, objects whose looks it never saw:

  python -m dreambooth_jax.train --config=configs/world.py --workdir=workdirs/zigzag_ball
  python -m dreambooth_jax.sample --workdir=workdirs/zigzag_ball --prompt="a [V] ball in the snow"
  python -m dreambooth_jax.evaluate --protocol=world --subject=zigzag_ball --workdir=workdirs/zigzag_ball

Arguments after ':' as in configs/imagen_dog.py (`method=`, `stages=`,
`steps=`, `runlocal`), plus `subject=NAME` (zigzag_ball, star_ball, star_box,
heart_cup, diamond_ring, wavy_cone) and `cascade=FOLDER` (another export of
experiments/pretrain_world.py, with IF-I/ and IF-II/; default: the packaged one). This is configs/imagen_dog.py's `if`
variant with the world's folders and sizes: nothing else differs, so what a
world run shows is what the IF path does.
"""

import json
import pathlib

import ml_collections

from dreambooth_jax import config_lib
from dreambooth_jax.world import instances

ASSETS = pathlib.Path(config_lib.__file__).resolve().parent / "assets"
WORLD = ASSETS / "world_cascade"
SUBJECTS = ASSETS / "world_subjects"
CLASS_NOUNS = dict(zigzag_ball="ball", star_ball="ball", star_box="box", heart_cup="cup",
                   diamond_ring="ring", wavy_cone="cone")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, subject="zigzag_ball", method="dreambooth", stages="base+sr256",
                             steps=-1, lora=0, runlocal=False, cascade="")
  world = pathlib.Path(arg.cascade) if arg.cascade else WORLD
  if arg.subject not in CLASS_NOUNS:
    raise config_lib.ConfigError(f"subject {arg.subject!r}: use one of {', '.join(CLASS_NOUNS)}")
  if not (world / "IF-I" / "model_index.json").is_file():
    raise config_lib.ConfigError(
        f"the pretrained world cascade is not at {world}: pretrain and export it with "
        f"python experiments/pretrain_world.py --workdir=workdirs/world_pretrain "
        f"--export={world}")
  forwarded = f"if,method={arg.method},stages={arg.stages},steps={arg.steps},lora={arg.lora}"
  # The IF config is the single source of the method's settings; the world config only
  # points it at other folders and sizes.
  imagen = pathlib.Path(__file__).with_name("imagen_dog.py")
  c = config_lib.from_file(f"{imagen}:{forwarded}" + (",runlocal" if arg.runlocal else ""))
  tiny_runs = arg.runlocal

  c.subject.dir = str(SUBJECTS / arg.subject)
  c.subject.class_noun = CLASS_NOUNS[arg.subject]
  # The world's tokenizer has 868 pieces; pretraining's named instances use the lower half
  # of 100..768 (dreambooth_jax/world/instances.py), so the identifier never is one of them.
  c.subject.identifier_id_range = instances.IDENTIFIER_ID_RANGE
  c.subject.min_size = 64
  if arg.method == "textual_inversion":
    c.learned_token = dict(text=f"<{c.subject.class_noun}*>", init_word=c.subject.class_noun)
  elif arg.method == "ti_then_finetune":
    c.learned_token = dict(text="<rare>", init_word="rare")

  c.model.update(dtype="float32", t5_dtype="float32", remat=False)
  trained = world / "world_cascade.json"  # how pretrain_world.py trained it (text mask or not)
  if trained.is_file():
    c.model.unet_text_mask = bool(json.loads(trained.read_text()).get("unet_text_mask", False))
  c.lora.base_dtype = ""  # the tiny frozen UNets stay float32
  c.pretrained.update(stage_1=str(world / "IF-I"), stage_2=str(world / "IF-II"),
                      t5=str(world / "IF-I" / "text_encoder"),
                      tokenizer=str(world / "IF-I" / "tokenizer"))

  # The world cascade was pretrained at 32 and 64 px with guidance dropout 0.1. DDPM at 25
  # steps: on 64 held-out captions (experiments/score_world_cascade.py) the step-11,500 base
  # drew the caption's class in 56% of samples, its context in 77%; DPM-Solver++ at 20,
  # 44% and 58%.
  for name, res, guidance in (("base", 32, 4.0), ("sr256", 64, 4.0)):
    c.cascade[name].update(resolution=res, guidance_scale=guidance, sampler="ddpm",
                           num_steps=2 if tiny_runs else 25)
  # The tiny SR UNet never learned its input's low frequencies (an epsilon loss gives an
  # image's mean colour ~1/4096 of its weight): it casts its samples purple, and 1,500 more
  # pretraining steps (uniform or v-weighted) did not help. So it keeps its input's colours
  # and adds detail (cascade.keep_lowres_colours): at 64 px, colour / context 0.41 / 0.48
  # -> 0.72 / 0.91 on 64 held-out captions, as the base's 0.70 / 0.91 (experiments/README.md,
  # "The SR stage's colours").
  c.cascade.sr256.colour_fix = True

  c.prior.update(num_images=2 if tiny_runs else 32, batch_size=2 if tiny_runs else 16)
  # DreamBooth: on the packaged cascade (zigzag_ball, base, prior weight 1) the subject's
  # look comes with steps at 1e-4: Subject 0.01 / 0.07 / 0.08 after 1000 / 2000 / 4000 steps
  # on its first named-instance leg, 0.18 after 4000 on the second, 0.38 on the third (the
  # packaged one; 0.32 +- 0.21 over seeds 0-2); 2e-4 did worse (experiments/README.md,
  # "Named instances"). 8000 steps: 0.42 +- 0.32 and PRES still 0, but "a ball" narrowed
  # (seed 0: 1.01 bits of colour, 15 of 16 at night, against 2.25 at 4000; "What 'a ball'
  # still varies in"); 256 class images instead of 32 halved Subject ("After the third leg").
  steps, lr = dict(dreambooth=(4000, 1e-4), textual_inversion=(400, 5e-3),
                   ti_then_finetune=(200, 5e-5))[arg.method]
  c.train.update(steps=4 if tiny_runs else (arg.steps if arg.steps > 0 else steps), lr=lr,
                 optimizer="adamw", batch_size=1, prior_batch_size=1)
  if arg.method == "ti_then_finetune" and not tiny_runs:
    c.two_stage.ti_steps = min(100, c.train.steps // 2)
  every = c.train.steps
  c.checkpoint.every = every
  c.log.update(every=1 if tiny_runs else 10, sample_every=every,
               sample_prompts=("a {identifier} {class_noun} in the snow",
                               "a {identifier} {class_noun} on the beach",
                               "a {class_noun}"),
               num_samples=4)
  return ml_collections.ConfigDict(c)
