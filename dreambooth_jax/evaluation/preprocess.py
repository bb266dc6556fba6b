"""Image preprocessing of the evaluation protocol (DINO, CLIP-I, CLIP-T), without torch.

Both encoders see "resize the shorter side (bicubic), center crop, normalise":

- DINO ViT-S/16: torchvision `Resize(256, BICUBIC)`, `CenterCrop(224)`,
  `ToTensor()`, `Normalize(ImageNet mean/std)`, as in DINO's own evaluation
  code and the DreamBooth protocol.
- CLIP ViT-B/32: shorter side to 224 bicubic, center crop 224, CLIP's
  mean/std, as transformers' `CLIPImageProcessor` does (and OpenAI's `clip`
  package: same resize, same crop up to the rounding noted below).

The resize is done by PIL on uint8 images in both references (torchvision's
`Resize` on a PIL image calls `PIL.Image.resize`; the PIL backend of
`CLIPImageProcessor` does too), so we call PIL as well: a JAX bicubic
(`jax.image.resize`) uses a different kernel and no antialiasing and would
shift the scores. This runs on the host, before the images go to devices.

Center-crop offsets differ in one corner: torchvision takes
`int(round((h - 224) / 2))` (Python's round-half-to-even), transformers takes
`(h - 224) // 2`. They disagree by one pixel when `h - 224` is odd and the half
rounds up. `crop_rounding` selects the rule: DINO defaults to torchvision's,
CLIP to `CLIPImageProcessor`'s.

Output: float32 NHWC numpy arrays, ready for `ViT` / `CLIP.encode_image`.
"""

from __future__ import annotations

from typing import Iterable, Sequence, Union

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageLike = Union[Image.Image, np.ndarray]


def to_pil(image: ImageLike) -> Image.Image:
  """A PIL RGB image from a PIL image (any mode) or a uint8 [H, W], [H, W, 1|3|4] array."""
  if isinstance(image, Image.Image):
    return image if image.mode == "RGB" else image.convert("RGB")
  a = np.asarray(image)
  if a.dtype != np.uint8:
    # Float images have no single right quantisation (0..1 or 0..255? round or
    # truncate?), and the references resize uint8 images: make the caller choose.
    raise TypeError(f"expected a uint8 image array, got dtype {a.dtype}; convert with e.g. "
                    "np.clip(np.round(x * 255), 0, 255).astype(np.uint8)")
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim == 2:
    return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")
  if a.ndim == 3 and a.shape[-1] in (3, 4):
    img = Image.fromarray(np.ascontiguousarray(a))
    return img if img.mode == "RGB" else img.convert("RGB")
  raise ValueError(f"expected an image array [H, W] or [H, W, 1|3|4], got shape {a.shape}")


def _as_list(images) -> list[ImageLike]:
  """One image, a sequence of images, or a uint8 batch [B, H, W, C] -> list of images."""
  if isinstance(images, Image.Image):
    return [images]
  if not isinstance(images, (list, tuple)) and hasattr(images, "__array__"):  # numpy, jax
    a = np.asarray(images)
    return [a] if a.ndim in (2, 3) else list(a)
  return list(images)


def resize_shorter(image: Image.Image, size: int, resample=Image.BICUBIC) -> Image.Image:
  """Shorter side to `size`, longer side `int(size * long / short)` (truncated), as
  torchvision's `Resize(int)` and transformers' `shortest_edge` both compute it."""
  w, h = image.size
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = size, int(size * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  if (new_w, new_h) == (w, h):
    return image
  return image.resize((new_w, new_h), resample=resample)


def center_crop(a: np.ndarray, size: int, rounding: str = "torchvision") -> np.ndarray:
  """Crops an [H, W, C] array to [size, size, C] around the centre.

  rounding: "torchvision" (`int(round((h - size) / 2))`) or "floor" (`(h - size) // 2`,
  transformers' image processors).
  """
  h, w = a.shape[:2]
  if h < size or w < size:
    raise ValueError(f"center_crop: image {h}x{w} is smaller than the crop {size}; resize first")
  if rounding == "torchvision":
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  elif rounding == "floor":
    top, left = (h - size) // 2, (w - size) // 2
  else:
    raise ValueError(f"rounding must be 'torchvision' or 'floor', got {rounding!r}")
  return a[top:top + size, left:left + size]


def preprocess(images: ImageLike | Iterable[ImageLike], *, resize: int, crop: int,
               mean: Sequence[float], std: Sequence[float],
               crop_rounding: str = "torchvision") -> np.ndarray:
  """Resize shorter side (PIL bicubic), center crop, scale to 0..1, normalise.

  Returns float32 [B, crop, crop, 3] (NHWC). A single image gives B = 1.
  """
  mean64 = np.asarray(mean, np.float64)
  std64 = np.asarray(std, np.float64)
  out = []
  for image in _as_list(images):
    a = np.asarray(resize_shorter(to_pil(image), resize), dtype=np.uint8)
    a = center_crop(a, crop, crop_rounding)
    # float64 then one rounding to float32: within 1 ulp of both references
    # (torchvision computes in float32, transformers rescales in float64).
    out.append(((a.astype(np.float64) / 255.0 - mean64) / std64).astype(np.float32))
  if not out:
    raise ValueError("preprocess: no images given")
  return np.stack(out)


def preprocess_dino(images: ImageLike | Iterable[ImageLike], *, resize: int = 256, crop: int = 224,
                    crop_rounding: str = "torchvision") -> np.ndarray:
  """DINO ViT-S/16 input: Resize(256, bicubic), CenterCrop(224), ImageNet mean/std. NHWC float32."""
  return preprocess(images, resize=resize, crop=crop, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    crop_rounding=crop_rounding)


def preprocess_clip(images: ImageLike | Iterable[ImageLike], *, size: int = 224,
                    crop_rounding: str = "floor") -> np.ndarray:
  """CLIP ViT-B/32 input, as CLIPImageProcessor: shorter side 224 bicubic, center crop 224,
  CLIP mean/std. NHWC float32."""
  return preprocess(images, resize=size, crop=size, mean=CLIP_MEAN, std=CLIP_STD,
                    crop_rounding=crop_rounding)
