"""Tiny RANDOM stand-ins for the evaluation encoders, written without torch.

The evaluation protocol needs DINO ViT-S/16, CLIP ViT-B/32 (with its BPE
tokenizer) and LPIPS weights. When none are at hand (the notebooks on the
tiny default, CI), `write_tiny_encoders(root)` writes folders that the real
loaders accept, so the whole evaluation runs end to end:

  root/dino/   config.json + model.safetensors  (transformers ViTModel layout)
  root/clip/   config.json + model.safetensors  (transformers CLIPModel layout)
               + vocab.json + merges.txt         (a byte-level BPE CLIPTokenizer loads)
  root/lpips.safetensors                         (lpips' AlexNet state-dict layout)

The architectures are the real ones at toy width (224 px inputs, so the
protocol's resize-and-crop fits), the values are random. Scores computed with
them mean NOTHING; they exist to exercise the pipeline. Each folder carries a
STAND_IN.txt saying so, and `encoders_or_stand_ins` (what the notebooks call:
the real encoders when all three are given, else these) prints a banner.

Tensors are named and laid out as transformers / lpips save them
(`weights.torch_layout.export_params` of our modules, whose names are the
state-dict keys), so `transformers.ViTModel.from_pretrained` and
`CLIPModel.from_pretrained` load these folders too.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreambooth_jax.models.clip import CLIPConfig, abstract_clip_model
from dreambooth_jax.models.layers import random_init
from dreambooth_jax.models.lpips import abstract_lpips
from dreambooth_jax.models.vit import ViTConfig, abstract_vit
from dreambooth_jax.weights import torch_layout

STAND_IN_NOTE = ("Tiny RANDOM stand-in written by dreambooth_jax.evaluation.tiny_encoders: "
                 "real architecture at toy width, random weights. Scores computed with it are "
                 "meaningless.\n")
HIDDEN, HEADS, MLP, PROJECTION = 32, 2, 64, 16
# Word-final merges for the words of the benchmark prompts that matter least to get
# right: any text tokenizes (byte-level alphabet), these only shorten common words.
_MERGES = (("d", "o"), ("do", "g</w>"), ("t", "h"), ("th", "e</w>"), ("o", "n</w>"),
           ("i", "n</w>"), ("o", "f</w>"))


def _write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)


def _random(abstract: nnx.Module, seed: int) -> nnx.Module:
  """`layers.random_init`, with scalars (CLIP's logit_scale) set to CLIP's initial value."""
  graphdef, state = nnx.split(abstract)
  scalars = {}
  for path, var in nnx.to_flat_state(state):
    if not var.get_value().shape:
      scalars[path] = var
      var.set_value(jax.ShapeDtypeStruct((1,), var.get_value().dtype))
  model = random_init(nnx.merge(graphdef, state), seed)
  graphdef, state = nnx.split(model)
  for path, var in nnx.to_flat_state(state):
    if path in scalars:
      var.set_value(jnp.asarray(2.6592, var.get_value().dtype))
  return nnx.merge(graphdef, state)


def _save(model: nnx.Module, path: str, extra: dict[str, np.ndarray] | None = None) -> None:
  tensors = torch_layout.export_params(model, dtype=np.float32)
  if "logit_scale" in tensors:  # a scalar; export_params' ascontiguousarray made it [1]
    tensors["logit_scale"] = tensors["logit_scale"].reshape(())
  tensors.update(extra or {})
  _save_file(tensors, path)


def _save_file(tensors: dict[str, np.ndarray], path: str) -> None:
  # The safetensors package (not safetensors_io.save_file, which writes 0-d arrays as
  # [1]): CLIP's logit_scale is a scalar in transformers' files.
  from safetensors.numpy import save_file
  save_file(tensors, path, metadata={"format": "pt"})


def _note(folder: str) -> None:
  with open(os.path.join(folder, "STAND_IN.txt"), "w") as f:
    f.write(STAND_IN_NOTE)


def write_tiny_dino(folder: str, seed: int = 0) -> str:
  """A random ViT (DINO ViT-S/16's geometry: 224 px, 16 px patches) at hidden size 32."""
  os.makedirs(folder, exist_ok=True)
  config = dict(architectures=["ViTModel"], model_type="vit", hidden_size=HIDDEN,
                num_hidden_layers=1, num_attention_heads=HEADS, intermediate_size=MLP,
                hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                initializer_range=0.02, layer_norm_eps=1e-12, image_size=224, patch_size=16,
                num_channels=3, qkv_bias=True)
  model = _random(abstract_vit(ViTConfig.from_hf(config)), seed)
  # ViTModel's default pooler: not DINO's (our loader skips it), saved so that
  # transformers loads the folder without newly initialised weights.
  rng = np.random.default_rng(seed + 1)
  pooler = {"pooler.dense.weight": (rng.standard_normal((HIDDEN, HIDDEN)) / HIDDEN ** 0.5
                                    ).astype(np.float32),
            "pooler.dense.bias": np.zeros(HIDDEN, np.float32)}
  _write_json(os.path.join(folder, "config.json"), config)
  _save(model, os.path.join(folder, "model.safetensors"), pooler)
  _note(folder)
  return folder


def _bytes_to_unicode() -> list[str]:
  """GPT-2 / CLIP byte-level alphabet: 256 printable stand-ins for the byte values."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for c in cs]


def write_clip_tokenizer(folder: str) -> int:
  """vocab.json + merges.txt of a tiny byte-level BPE in CLIP's conventions; returns its size.

  Every byte and byte + "</w>" is a token, so any prompt tokenizes; end-of-text
  comes last (the largest id, as in CLIP's own vocabulary).
  """
  os.makedirs(folder, exist_ok=True)
  chars = _bytes_to_unicode()
  vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in _MERGES]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  _write_json(os.path.join(folder, "vocab.json"), {t: i for i, t in enumerate(vocab)})
  with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES))
  _write_json(os.path.join(folder, "tokenizer_config.json"),
              dict(tokenizer_class="CLIPTokenizer", model_max_length=77,
                   bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                   unk_token="<|endoftext|>", pad_token="<|endoftext|>"))
  return len(vocab)


def write_tiny_clip(folder: str, seed: int = 1) -> str:
  """A random CLIPModel (ViT-B/32's geometry: 224 px, 32 px patches, 77 text positions) at
  width 32, with a tokenizer whose vocabulary matches its text tower."""
  vocab = write_clip_tokenizer(folder)
  tower = dict(hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=1,
               num_attention_heads=HEADS, hidden_act="quick_gelu", layer_norm_eps=1e-5)
  config = dict(architectures=["CLIPModel"], model_type="clip", projection_dim=PROJECTION,
                logit_scale_init_value=2.6592,
                text_config=dict(tower, vocab_size=vocab, max_position_embeddings=77,
                                 bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                 pad_token_id=vocab - 1),
                vision_config=dict(tower, image_size=224, patch_size=32, num_channels=3))
  model = _random(abstract_clip_model(CLIPConfig.from_hf(config)), seed)
  _write_json(os.path.join(folder, "config.json"), config)
  _save(model, os.path.join(folder, "model.safetensors"))
  _note(folder)
  return folder


def write_tiny_lpips(path: str, seed: int = 2) -> str:
  """A random LPIPS-AlexNet file (the backbone is AlexNet's fixed shape; 2.5 M params).

  The "lin" weights are made non-negative, as trained LPIPS weights are, so
  distances are at least >= 0 and 0 for identical images.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tensors = torch_layout.export_params(_random(abstract_lpips("alex"), seed), dtype=np.float32)
  tensors = {k: np.abs(v) if k.startswith("lin") else v for k, v in tensors.items()}
  _save_file(tensors, path)
  return path


def write_tiny_encoders(root: str, seed: int = 0) -> dict[str, str]:
  """{"dino", "clip", "lpips"}: paths of tiny random encoders under `root`, written once
  (an existing complete set is reused)."""
  paths = dict(dino=os.path.join(root, "dino"), clip=os.path.join(root, "clip"),
               lpips=os.path.join(root, "lpips.safetensors"))
  done = os.path.join(root, "DONE")
  if not os.path.isfile(done):
    write_tiny_dino(paths["dino"], seed)
    write_tiny_clip(paths["clip"], seed + 1)
    write_tiny_lpips(paths["lpips"], seed + 2)
    _note(root)
    with open(done, "w") as f:
      f.write("ok\n")
  return paths


STAND_IN_WARNING = (
    "DINO_DIR / CLIP_DIR / LPIPS_FILE not all given: the evaluation uses tiny RANDOM stand-in\n"
    "encoders (dreambooth_jax.evaluation.tiny_encoders). The pipeline runs; the SCORES ARE "
    "MEANINGLESS.")


def encoders_or_stand_ins(dino: str, clip: str, lpips: str, stand_in_root: str) -> dict[str, str]:
  """{"dino", "clip", "lpips"}: the given encoders when all three are set, else stand-ins.

  What the notebooks call: a half-configured set falls back to the stand-ins
  as a whole (scores from one real and one random encoder would look
  plausible and mean nothing), with a banner that cannot be missed.
  """
  if dino and clip and lpips:
    return dict(dino=dino, clip=clip, lpips=lpips)
  paths = write_tiny_encoders(stand_in_root)
  print("=" * 88)
  print(STAND_IN_WARNING)
  print("=" * 88)
  return paths
