"""Checks of pretrained folders that read only config.json and safetensors headers.

Loading IF-I-XL and T5-XXL takes minutes and 30+ GB; a wrong folder found
then (an IF-II given as stage_1, an IF UNet as the x4 upscaler's stage_3, a
missing shard, mT5 instead of T5) wastes all of it. Everything checked here
costs milliseconds per file and never touches tensor data:

- the config parses and describes the right kind of model for its role
  (`weights.unet.check_unet_role`, `weights.t5.describe_text_config`);
- the weights resolve in one of the layouts `safetensors_io.open_folder`
  reads, the index lists shards that exist, and every header is readable
  and consistent with the file size (a partial download fails here);
- every tensor name and shape matches the abstract model built from the
  config (`torch_layout.match_params`, the same code `load_params` runs);
- across folders: T5's d_model equals each UNet's encoder_hid_dim, and the
  tokenizer's ids fit T5's embedding table.

The results carry the parsed configs and the resolved folders (a pipeline
folder's `unet/`, `text_encoder/`, `tokenizer/`), so callers load from them
without reparsing.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Iterable, Mapping

from dreambooth_jax.models.t5 import T5Config
from dreambooth_jax.models.unet import UNetConfig, abstract_unet
from dreambooth_jax.weights import safetensors_io, sd_upscaler, t5 as t5_lib, torch_layout
from dreambooth_jax.weights import unet as unet_lib
from dreambooth_jax.weights.safetensors_io import WeightsError

SPIECE = "spiece.model"


@dataclasses.dataclass(frozen=True)
class UNetFolder:
  folder: str             # the UNet folder itself (a pipeline folder's unet/)
  role: str | None        # stage_1, stage_2, stage_3 or None
  config: UNetConfig
  weights: str            # the .safetensors file or index the tensors come from
  variant: str | None     # None: full precision
  num_params: int

  @property
  def text_width(self) -> int:
    """The width of the text features the UNet takes (T5's d_model for IF)."""
    return self.config.encoder_hid_dim or self.config.cross_attention_dim


@dataclasses.dataclass(frozen=True)
class T5Folder:
  folder: str             # the encoder folder itself (a pipeline folder's text_encoder/)
  config: T5Config
  weights: str
  variant: str | None
  num_params: int         # encoder only


@dataclasses.dataclass(frozen=True)
class TokenizerFolder:
  folder: str             # the folder holding spiece.model (a pipeline folder's tokenizer/)
  vocab_size: int         # SentencePiece pieces + 100 sentinels, like len(T5Tokenizer)


@dataclasses.dataclass(frozen=True)
class UpscalerFolder:
  folder: str             # the stabilityai/stable-diffusion-x4-upscaler download (model_index.json)
  role: str               # stage_3
  num_params: dict[str, int]  # {unet, vae, text_encoder}


@dataclasses.dataclass(frozen=True)
class Preflight:
  unets: dict[str, UNetFolder]
  t5: T5Folder | None
  tokenizer: TokenizerFolder | None
  seconds: float
  upscaler: UpscalerFolder | None = None  # stage_3 given as the x4 upscaler download


def _matched(model, tensors, *, renames=(), ignore=lambda k: False) -> int:
  """Parameter count of `model` after checking every tensor name and shape of `tensors`."""
  plan, problems = torch_layout.match_params(model, tensors, renames=renames, ignore=ignore)
  if problems:
    raise torch_layout.mismatch_error(tensors.source, problems)
  return sum(math.prod(var.get_value().shape) for _, var, _ in plan)


def check_unet_folder(folder: str, role: str | None = None, *,
                      variant: str | None = None) -> UNetFolder:
  """Checks a UNet (or IF pipeline) folder for `role` without reading tensor data.

  `role`: 'stage_1' (IF-I base), 'stage_2' / 'stage_3' (IF-II-style
  super-resolution) or None (any IF UNet). Raises WeightsError naming the
  folder, what it holds and what was expected.
  """
  resolved = unet_lib.resolve_unet_folder(folder)
  cfg = unet_lib.unet_config_from_dict(safetensors_io.read_config(resolved), resolved, role)
  tensors = safetensors_io.open_folder(resolved, (unet_lib.WEIGHTS_STEM,), variant)
  n = _matched(abstract_unet(cfg), tensors)
  return UNetFolder(resolved, role, cfg, tensors.source, tensors.variant, n)


def check_t5_folder(folder: str, *, variant: str | None = None) -> T5Folder:
  """Checks a T5 encoder folder (or a pipeline holding text_encoder/) without reading tensor data."""
  resolved = t5_lib.resolve_t5_folder(folder)
  cfg = t5_lib.t5_config_from_dict(safetensors_io.read_config(resolved),
                                   os.path.join(resolved, "config.json"))
  tensors = safetensors_io.open_folder(resolved, ("model",), variant)
  renames, ignore = t5_lib.t5_tensor_layout(tensors)
  n = _matched(t5_lib.abstract_t5_encoder(cfg), tensors, renames=renames, ignore=ignore)
  return T5Folder(resolved, cfg, tensors.source, tensors.variant, n)


def check_tokenizer_folder(folder: str) -> TokenizerFolder:
  """Checks that `folder` (or a pipeline's tokenizer/) holds a T5 SentencePiece spiece.model."""
  if not os.path.isdir(folder):
    raise WeightsError(f"tokenizer folder {folder!r} does not exist. Download the model there "
                       "(e.g. `huggingface-cli download <repo> --local-dir DIR`) and pass DIR.")
  resolved = folder
  if not os.path.isfile(os.path.join(folder, SPIECE)):
    if os.path.isdir(os.path.join(folder, "tokenizer")):
      resolved = os.path.join(folder, "tokenizer")
    elif os.path.isfile(os.path.join(folder, "model_index.json")):
      safetensors_io.resolve_component(  # raises: a pipeline without tokenizer/
          folder, "tokenizer", f"tokenizer ({SPIECE})",
          "Use the tokenizer/ of DeepFloyd/IF-I-XL-v1.0 or the google/t5-v1_1-xxl folder.")
  path = os.path.join(resolved, SPIECE)
  if not os.path.isfile(path):
    saved = [n for n in ("tokenizer.json", "tokenizer_config.json")
             if os.path.isfile(os.path.join(resolved, n))]
    why = (f" It holds {' and '.join(saved)} only: transformers 5 saves T5 tokenizers without "
           f"{SPIECE}, and this library reads the SentencePiece model itself. Copy {SPIECE} from "
           "the original download (DeepFloyd IF's tokenizer/ or google/t5-v1_1-xxl) into it."
           if saved else " Point at DeepFloyd IF's tokenizer/ or the google/t5-v1_1-xxl folder.")
    raise WeightsError(f"{resolved!r} has no {SPIECE}, the T5 SentencePiece model.{why}")
  from dreambooth_jax.tokenizer import Tokenizer  # lazily: it needs sentencepiece
  try:
    tok = Tokenizer(path)
  except (OSError, RuntimeError, ValueError) as e:
    raise WeightsError(f"{path}: not a usable T5 SentencePiece model ({e}). Re-download it from "
                       "DeepFloyd IF's tokenizer/ or google/t5-v1_1-xxl.") from e
  return TokenizerFolder(resolved, tok.vocab_size)


def check_text_width(t5: T5Folder, unets: Iterable[UNetFolder]) -> None:
  """Raises WeightsError unless every UNet takes text of T5's width (IF: 4096)."""
  for u in unets:
    if u.text_width != t5.config.d_model:
      raise WeightsError(
          f"The T5 encoder in {t5.folder!r} outputs features of width d_model="
          f"{t5.config.d_model}, but the {u.role or ''} UNet in {u.folder!r} takes text of width "
          f"{u.text_width} (encoder_hid_dim); they were not trained together. DeepFloyd IF's "
          "UNets take T5 v1.1 XXL (d_model 4096): use the text_encoder/ of DeepFloyd/IF-I-XL-v1.0 "
          "or google/t5-v1_1-xxl, or the UNets that belong to this encoder.")


def check_tokenizer_fits(tokenizer: TokenizerFolder, t5: T5Folder) -> None:
  """Raises WeightsError when the tokenizer emits ids past T5's embedding table."""
  if tokenizer.vocab_size > t5.config.vocab_size:
    raise WeightsError(
        f"The tokenizer in {tokenizer.folder!r} has {tokenizer.vocab_size} ids (pieces + 100 "
        f"sentinels), but the T5 encoder in {t5.folder!r} embeds only vocab_size="
        f"{t5.config.vocab_size}; they come from different models. Use the tokenizer/ and "
        "text_encoder/ of the same download (T5 v1.1: 32100 ids, vocab_size 32128).")


def check_pretrained(unets: Mapping[str, str], t5: str | None = None, tokenizer: str | None = None,
                     *, variant: str | None = None) -> Preflight:
  """All checks of a pretrained cascade: {role: folder} UNets, T5 folder, tokenizer folder.

  stage_3 may be DeepFloyd's public stage III, the x4 upscaler download: all its parts
  are checked (`sd_upscaler.check_sd_upscaler`) and it is left out of the T5 checks, as
  it brings its own CLIP text encoder.

  Every folder is checked before anything raises, so one WeightsError lists
  every broken folder (one paragraph each); the cross-checks run when the
  folders they compare are sound. Reads configs and headers only.
  """
  t0 = time.perf_counter()
  errors, checked, upscaler = [], {}, None
  for role, folder in unets.items():
    try:
      root = sd_upscaler.download_root(folder) if role == "stage_3" else None
      if root is not None:
        upscaler = UpscalerFolder(root, role, sd_upscaler.check_sd_upscaler(root, variant=variant))
      else:
        checked[role] = check_unet_folder(folder, role, variant=variant)
    except WeightsError as e:
      errors.append(str(e))
  t5_result = tok_result = None
  try:
    t5_result = check_t5_folder(t5, variant=variant) if t5 else None
  except WeightsError as e:
    errors.append(str(e))
  try:
    tok_result = check_tokenizer_folder(tokenizer) if tokenizer else None
  except WeightsError as e:
    errors.append(str(e))
  if t5_result is not None:
    try:
      check_text_width(t5_result, checked.values())
      if tok_result is not None:
        check_tokenizer_fits(tok_result, t5_result)
    except WeightsError as e:
      errors.append(str(e))
  if errors:
    raise WeightsError(errors[0] if len(errors) == 1 else
                       f"{len(errors)} pretrained folders are unusable:\n\n" + "\n\n".join(errors))
  return Preflight(checked, t5_result, tok_result, time.perf_counter() - t0, upscaler)
