"""Writes the LPIPS v0.1 weights as one safetensors file for `dreambooth_jax.weights.load_lpips`.

Our runtime reads no pickles and has no torch, but lpips keeps its calibrated
"lin" weights as pickles inside the pip package and takes the backbone from
torchvision's ImageNet download. Run this once on a machine with torch,
torchvision, `lpips==0.1.4` and internet access (torchvision downloads the
AlexNet/VGG16 weights on first use), then copy the file to the evaluation host:

  python experiments/convert_lpips.py --net=alex --out=weights/lpips_alex.safetensors
  python experiments/convert_lpips.py --net=vgg --out=weights/lpips_vgg.safetensors

The file holds `lpips.LPIPS(net=NET, version='0.1').state_dict()` under its own
names (`net.slice1.0.weight`, `lin0.model.1.weight`, ...), float32, torch
layout, minus the two ScalingLayer buffers (lpips constants, which our model
hard-codes) and the `lins.K` aliases of the `linK` layers. After writing, the
script reloads the file with our loader and prints the largest difference to
lpips on a few random image pairs.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreambooth_jax.weights.safetensors_io import save_file  # noqa: E402

LPIPS_VERSION = "0.1"


def lpips_tensors(model) -> dict[str, np.ndarray]:
  """A torch `lpips.LPIPS` module's state dict as float32 numpy arrays, minus the constants."""
  out = {}
  for name, t in model.state_dict().items():
    # `lins.K` is lpips' ModuleList alias of `linK`: the same tensor under a second name.
    if name.startswith(("scaling_layer.", "lins.")):
      continue
    out[name] = np.ascontiguousarray(t.detach().cpu().float().numpy())
  return out


def convert(model, out: str, net: str) -> dict[str, np.ndarray]:
  """Writes `model` (a torch `lpips.LPIPS`) to the safetensors file `out`; returns the tensors."""
  if getattr(model, "version", LPIPS_VERSION) != LPIPS_VERSION:
    raise ValueError(f"only lpips version {LPIPS_VERSION!r} is supported, got {model.version!r}")
  tensors = lpips_tensors(model)
  pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(out), metadata={"format": "lpips-state-dict", "net": net,
                                         "version": LPIPS_VERSION})
  return tensors


def _compare(model, out: str, net: str, seed: int = 0) -> float:
  """Max |ours - lpips| on random image pairs, using the file just written."""
  import jax
  import torch
  from flax import nnx

  from dreambooth_jax.weights.lpips import load_lpips

  jax.config.update("jax_default_matmul_precision", "highest")
  rng = np.random.default_rng(seed)
  x0 = rng.uniform(-1, 1, (4, 64, 64, 3)).astype(np.float32)
  x1 = np.clip(x0 + rng.normal(0, 0.3, x0.shape), -1, 1).astype(np.float32)
  ours = np.asarray(nnx.jit(lambda m, a, b: m(a, b))(load_lpips(out, net), x0, x1))
  with torch.no_grad():
    nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())
    ref = model(nchw(x0), nchw(x1)).reshape(-1).numpy()
  print(f"lpips: {ref}\nours:  {ours}")
  return float(np.max(np.abs(ours - ref)))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--net", choices=("alex", "vgg"), default="alex",
                 help="backbone; 'alex' is lpips' default and the usual choice for DIV")
  p.add_argument("--out", required=True, help="the .safetensors file to write")
  p.add_argument("--no-check", action="store_true",
                 help="skip reloading the file with our JAX model and comparing with lpips")
  args = p.parse_args(argv)

  import lpips  # offline tool: torch, torchvision and lpips are allowed here

  model = lpips.LPIPS(net=args.net, version=LPIPS_VERSION, pretrained=True, verbose=False).eval()
  tensors = convert(model, args.out, args.net)
  print(f"wrote {len(tensors)} tensors ({sum(t.size for t in tensors.values()):,} values) "
        f"to {args.out}")
  if not args.no_check:
    print(f"max abs error vs lpips: {_compare(model, args.out, args.net):.3e}")


if __name__ == "__main__":
  main()
