"""One LPIPS safetensors file -> `models.lpips.LPIPS`, without torch and without unpickling.

The lpips package ships its "lin" weights as pickles (`weights/v0.1/alex.pth`)
and takes the backbone from torchvision's ImageNet download, so neither can be
read here. `experiments/convert_lpips.py` (run once where torch and lpips are
installed) writes both into one file named like `lpips.LPIPS().state_dict()`:

  net.slice1.0.weight [64, 3, 11, 11]  ...  net.slice5.10.bias [256]     (AlexNet)
  lin0.model.1.weight [1, 64, 1, 1]    ...  lin4.model.1.weight [1, 256, 1, 1]

The ScalingLayer buffers (`scaling_layer.shift/scale`) are constants in our
model; a file that carries them is accepted if they hold lpips' values. So is
a raw state dict's second name of each lin layer (`lins.0.model.1.weight`).
"""

from __future__ import annotations

import functools
import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreambooth_jax.models.lpips import (BACKBONES, LPIPS, SCALE, SHIFT, abstract_lpips,
                                         canonical_net)
from dreambooth_jax.weights import torch_layout
from dreambooth_jax.weights.safetensors_io import SafetensorsFile, WeightsError

_SCALING = {"scaling_layer.shift": SHIFT, "scaling_layer.scale": SCALE}


def _convert_hint(path: str, net: str | None) -> str:
  return (f"create it with `python experiments/convert_lpips.py --net={net or 'alex'} "
          f"--out={path}` on a machine with torch and the lpips package")


def expected_shapes(net: str) -> dict[str, tuple[int, ...]]:
  """lpips state-dict key -> torch-layout shape, for every tensor our model needs."""
  return dict(_expected_shapes(canonical_net(net)))


@functools.lru_cache(maxsize=None)
def _expected_shapes(net: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
  _, state = nnx.split(abstract_lpips(net))
  shape = lambda path, var: torch_layout.to_torch(
      str(path[-1]), np.empty(var.get_value().shape, np.bool_)).shape
  return tuple((torch_layout.torch_key(path), shape(path, var))
               for path, var in nnx.to_flat_state(state))


def infer_net(names, source: str = "LPIPS weights") -> str:
  """The backbone ('alex' or 'vgg') whose key set the tensor names match best."""
  names = {n for n in names if n not in _SCALING and _twin(n) == n}
  if any(n.startswith(("lin5.", "lin6.")) for n in names):
    raise WeightsError(f"{source}: holds 7 lin layers, i.e. lpips' SqueezeNet variant, which "
                       "is not implemented; convert with --net=alex (the lpips default) or "
                       "--net=vgg.")
  scores = {}
  for net in BACKBONES:
    keys = set(expected_shapes(net))
    scores[net] = len(keys & names) / len(keys | names) if names else 0.0
  best = max(scores, key=scores.get)
  if scores[best] < 0.5:  # lin tensors alone are common to both: need the backbone too
    shown = sorted(names)[:8]
    raise WeightsError(f"{source}: cannot tell the LPIPS backbone from its tensor names "
                       f"(first: {shown}); expected lpips state-dict names such as "
                       "'net.slice1.0.weight' and 'lin0.model.1.weight'. Pass net='alex' or "
                       "net='vgg', or re-create the file with experiments/convert_lpips.py.")
  return best


def _twin(key: str) -> str:
  """lpips registers each lin layer twice (`lin0` and the ModuleList `lins.0`), so a raw
  `state_dict()` holds both names; the converter keeps `linK`, `lins.K` is its alias."""
  m = re.fullmatch(r"lins\.(\d+)\.(.*)", key)
  return f"lin{m.group(1)}.{m.group(2)}" if m else key


def _check(tensors: SafetensorsFile, net: str, path: str):
  """Every missing, unexpected and mis-shaped tensor in one WeightsError, before any copy."""
  expected = expected_shapes(net)
  problems = []
  for key, shape in expected.items():
    if key not in tensors:
      problems.append(f"missing tensor {key!r} (expected shape {shape})")
    elif tensors.shape(key) != tuple(shape):
      problems.append(f"tensor {key!r} has shape {tensors.shape(key)}, expected {tuple(shape)}")
  for key in sorted(set(tensors) - set(expected)):
    if key in _SCALING:
      value = np.asarray(tensors[key], np.float32).reshape(-1)
      if value.shape != (3,) or not np.allclose(value, _SCALING[key], rtol=0, atol=1e-6):
        problems.append(f"tensor {key!r} is {value.tolist()}, but lpips v0.1 uses "
                        f"{list(_SCALING[key])}; this is not an lpips v0.1 model")
    elif _twin(key) in expected and _twin(key) in tensors:
      if not np.array_equal(tensors[key], tensors[_twin(key)]):
        problems.append(f"tensor {key!r} differs from {_twin(key)!r}; in lpips both name the "
                        "same lin layer")
    else:
      problems.append(f"unexpected tensor {key!r} with shape {tensors.shape(key)}")
  if problems:
    shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    raise WeightsError(
        f"{path}: not LPIPS-{net} weights in lpips' state-dict layout ({len(problems)} "
        "problem(s)):\n  " + "\n  ".join(shown) + f"\nRe-{_convert_hint(path, net)}.")


def load_lpips(path: str, net: str | None = None, dtype=jnp.float32, *,
               compute_dtype=None) -> LPIPS:
  """Loads LPIPS v0.1 ('alex' or 'vgg'; None: inferred from the tensor names) from `path`.

  Params are stored in `dtype`; the backbone computes in `compute_dtype`
  (default: float32). Raises WeightsError naming the file and each offending
  key (with both shapes) when the file is missing, a pickle, or does not match.
  """
  if net is not None:
    net = canonical_net(net)
  path = os.fspath(path)
  if path.endswith((".pth", ".pt", ".bin", ".ckpt")):
    target = os.path.splitext(path)[0] + ".safetensors"
    raise WeightsError(f"{path}: a pickle checkpoint; it is not loaded because unpickling runs "
                       f"arbitrary code. Instead {_convert_hint(target, net)}.")
  if not os.path.isfile(path):
    raise WeightsError(f"LPIPS weights file not found: {path}; {_convert_hint(path, net)}.")
  tensors = SafetensorsFile(path)
  if net is None:
    net = infer_net(tensors, source=path)
  else:
    try:
      found = infer_net(tensors, source=path)
    except WeightsError:  # too broken to tell: `_check` lists what is wrong for `net`
      found = net
    if found != net:
      raise WeightsError(f"{path}: holds LPIPS-{found} weights, but net={net!r} was asked for; "
                         f"pass net={found!r} (or None to infer it).")
  _check(tensors, net, path)
  model = abstract_lpips(net, dtype=compute_dtype, param_dtype=dtype)
  return torch_layout.load_params(model, tensors, dtype=dtype, source=path,
                                  ignore=lambda k: k in _SCALING or _twin(k) != k)
