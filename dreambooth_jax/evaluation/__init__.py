"""The DreamBooth evaluation protocol, kept apart from training as big_vision keeps `evaluators/`.

  benchmark.py      the 30-subject DreamBooth dataset: subjects, class nouns, prompt templates
  protocol.py       prompt set, resumable generation, scoring, report.json / report.md
                    (`protocol.run` is `python -m dreambooth_jax.evaluate` from Python)
  world_protocol.py the same protocol on a subject of the procedural world, scored by the
                    world's own classifier (`python -m dreambooth_jax.evaluate --protocol=world`)
  metrics.py        DINO, CLIP-I, CLIP-T, PRES, DIV and the `Encoders` that feed them
  preprocess.py     DINO / CLIP image preprocessing (resize, center crop, normalise)
  tiny_encoders.py  tiny RANDOM stand-in encoders, so the pipeline runs without real weights
  in_loop.py        a many-subject job's in-loop evaluation (either protocol, on its adapters)
  selection.py      the rule that picks each subject's step among its evaluations
  job_report.py     the many-subject job's report (the table over subjects)

The single-subject trainer never imports this package: it neither knows nor pays
for the protocol. `train_many` imports in_loop (and through it the rest) only when
`config.eval.every` > 0. The direction is one way: evaluation uses the core modules
(`finetuned`, `data`, `grids`, `sharding`, `models`, `weights`), never the reverse.
Submodules are imported by their users (`from dreambooth_jax.evaluation import
protocol`); importing the package alone loads nothing.
"""
