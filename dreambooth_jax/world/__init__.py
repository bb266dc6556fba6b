"""A small procedural world to pretrain a tiny cascade on and to show a subject learned.

The real cascades do not fit a CPU, and a random tiny model cannot learn a
subject from nothing. This world is small enough to pretrain a tiny cascade
on: captioned images of a few object classes with colours, patterns, sizes and
poses, in a few contexts, plus subjects whose looks the pretraining data never
shows. Every image is drawn from a `Scene`, so it comes with exact labels.

  vocab.py         the class nouns, colours, patterns, sizes, contexts (label orders)
  scene.py         Scene, sampling, captions, labels, render, pretraining_examples
  backgrounds.py   one painter per context
  objects.py       the objects' surfaces, patterns and shading
  subjects.py      the subjects, their photos, write_subject_folder
  instances.py     named instances: pretraining objects a caption calls by a name
  tfds_builder.py  a tensorflow-datasets builder (optional extra `world`; imported on its own)
  evaluator.py     a small trained classifier of the world's labels (jax/flax), shipped in
                   assets/world_evaluator.safetensors; the world protocol scores with it

Submodules are imported by their users (`from dreambooth_jax.world import scene,
subjects`), as in `evaluation/`: importing the package alone loads nothing, and
nothing in training imports it. The world needs only numpy and PIL (the evaluator
also jax and flax); the TFDS builder needs the optional extra `world`.
"""
