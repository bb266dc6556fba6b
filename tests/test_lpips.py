"""LPIPS (models.lpips, weights.lpips) against the `lpips` package v0.1.4, on random weights.

The reference is `lpips.LPIPS(net=..., pretrained=False, pnet_rand=True)`: no
calibrated lin weights are unpickled and no ImageNet backbone is downloaded
(the test blocks sockets and `torch.load` to make sure). Every tensor is then
randomised, written with `experiments/convert_lpips.py`'s `convert`, and read
back with our torch-free loader.

lpips builds its backbones with torchvision. The torchvision wheels on PyPI
are CUDA builds whose C ops fail to load beside the CPU torch we test with, so
when torchvision cannot be imported the two constructors lpips calls are
provided here, written exactly as torchvision defines `alexnet().features` and
`vgg16().features`; everything else (scaling, slicing, normalisation, lin
layers, averaging) is lpips' own code.
"""

import importlib
import importlib.util
import os
import socket
import sys
import types

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from dreambooth_jax.models import lpips as lpips_model
from dreambooth_jax.models.layers import random_init
from dreambooth_jax.weights import lpips as lpips_weights
from dreambooth_jax.weights.safetensors_io import WeightsError, save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-5  # relative to the largest reference distance; float32 on both sides
SIZES = {"alex": 64, "vgg": 32}  # AlexNet's stride-4 stem needs more pixels than VGG


def _torchvision_stub() -> types.ModuleType:
  """`torchvision.models.alexnet/vgg16(pretrained=False)`: just the `features` lpips reads."""
  nn = torch.nn

  def alexnet(pretrained=False, **kw):
    assert not pretrained, "the test must not download ImageNet weights"
    return types.SimpleNamespace(features=nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2)))

  def vgg16(pretrained=False, **kw):
    assert not pretrained, "the test must not download ImageNet weights"
    layers, cin = [], 3
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"]:
      if v == "M":
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
      else:
        layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
        cin = v
    return types.SimpleNamespace(features=nn.Sequential(*layers))

  tv = types.ModuleType("torchvision")
  tv.models = types.ModuleType("torchvision.models")
  tv.models.alexnet, tv.models.vgg16 = alexnet, vgg16
  return tv


@pytest.fixture(scope="module")
def lpips_pkg():
  if importlib.util.find_spec("lpips") is None:
    msg = "the lpips package is not installed (pip install --no-deps lpips==0.1.4)"
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(msg)
    pytest.skip(msg)
  try:
    importlib.import_module("torchvision")
    print("\nlpips backbones from torchvision")
  except Exception:  # absent, or a CUDA build whose C ops do not load with CPU torch
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
      del sys.modules[name]
    stub = _torchvision_stub()
    sys.modules.update({"torchvision": stub, "torchvision.models": stub.models})
    print("\nlpips backbones from the torchvision stand-in")
  try:
    import lpips
  finally:
    # lpips keeps its own reference; other tests (transformers' import checks)
    # must not find a module without a spec under that name.
    if getattr(sys.modules.get("torchvision"), "__spec__", True) is None:
      del sys.modules["torchvision"], sys.modules["torchvision.models"]
  return lpips


@pytest.fixture(scope="module")
def convert_lpips():
  spec = importlib.util.spec_from_file_location(
      "convert_lpips", os.path.join(REPO, "experiments", "convert_lpips.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _reference(lpips, net, seed):
  model = lpips.LPIPS(net=net, version="0.1", pretrained=False, pnet_rand=True, verbose=False)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.startswith("lin"):  # calibrated lin weights are non-negative
        p.copy_(torch.rand(p.shape, generator=gen) / p.shape[1])
      elif name.endswith("bias"):
        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
      else:  # He init keeps activations O(1) through VGG's 13 convs
        p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / p[0].numel()) ** 0.5)
  return model.eval()


@pytest.fixture(scope="module")
def converted(lpips_pkg, convert_lpips, tmp_path_factory):
  """net -> (torch reference, path of its converted safetensors file)."""
  out = {}
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("network access"))
    mp.setattr(torch, "load", lambda *a, **k: pytest.fail("unpickling"))
    for seed, net in enumerate(("alex", "vgg")):
      model = _reference(lpips_pkg, net, seed)
      path = str(tmp_path_factory.mktemp("lpips") / f"lpips_{net}.safetensors")
      convert_lpips.convert(model, path, net)
      out[net] = (model, path)
  return out


def _images(seed, size, b=2):
  rng = np.random.default_rng(seed)
  x0 = rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32)
  # Per-image noise levels, so the distances differ across the batch.
  noise = rng.normal(0, 1, x0.shape) * np.linspace(0.1, 0.6, b)[:, None, None, None]
  return x0, np.clip(x0 + noise, -1, 1).astype(np.float32)


def _torch_lpips(model, x0, x1):
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    return model(nchw(x0), nchw(x1)).reshape(-1).numpy()


_apply = nnx.jit(lambda m, a, b: m(a, b))
_apply_per_layer = nnx.jit(lambda m, a, b: m(a, b, per_layer=True))


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_parity_with_lpips_package(converted, net):
  model, path = converted[net]
  ours_model = lpips_weights.load_lpips(path)  # net inferred from the tensor names
  assert ours_model.net_name == net
  x0, x1 = _images(1, SIZES[net])
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    ref, ref_layers = model(nchw(x0), nchw(x1), retPerLayer=True)
  ref, ref_layers = ref.reshape(-1).numpy(), [r.reshape(-1).numpy() for r in ref_layers]
  ours, ours_layers = _apply_per_layer(ours_model, x0, x1)
  ours = np.asarray(ours)
  assert ours.shape == (2,) and abs(ref[0] - ref[1]) > 1e-3 * abs(ref).max()
  err = float(np.max(np.abs(ours - ref)))
  layer_err = max(float(np.max(np.abs(np.asarray(o) - r))) for o, r in zip(ours_layers, ref_layers))
  print(f"\nLPIPS-{net} {SIZES[net]}x{SIZES[net]} (ref {ref}): max abs error {err:.3e}, "
        f"per layer {layer_err:.3e}")
  assert err <= RTOL * float(np.abs(ref).max())
  assert len(ours_layers) == 5 and layer_err <= RTOL * float(np.abs(ref).max())

  # Identical images: lpips gives exactly 0; XLA may round identical rows differently.
  same = np.asarray(_apply_per_layer(ours_model, x0, x0)[0])
  assert np.all(_torch_lpips(model, x0, x0) == 0)
  assert np.max(np.abs(same)) < 1e-12


def test_params_carry_logical_axes():
  model = lpips_model.abstract_lpips("vgg")
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("axes")
    assert axes is not None and len(axes) == var.get_value().ndim, path


def test_identical_images_and_shape_errors():
  model = random_init(lpips_model.abstract_lpips("alex"), seed=3)
  x0, x1 = _images(2, 64)
  d = np.asarray(_apply(model, x0, x1))
  assert d.shape == (2,) and np.all(np.isfinite(d)) and np.all(d != 0)
  assert np.max(np.abs(np.asarray(_apply(model, x0, x0)))) < 1e-12
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    model(x0, x1[:1])
  with pytest.raises(ValueError, match="squeeze"):
    lpips_model.LPIPS("squeeze")


def test_missing_file_says_how_to_create_it(tmp_path):
  path = str(tmp_path / "nowhere" / "lpips_alex.safetensors")
  with pytest.raises(WeightsError, match="LPIPS weights file not found") as e:
    lpips_weights.load_lpips(path)
  assert path in str(e.value)
  assert f"python experiments/convert_lpips.py --net=alex --out={path}" in str(e.value)
  with pytest.raises(WeightsError, match="unpickling") as e:
    lpips_weights.load_lpips(str(tmp_path / "alex.pth"))
  assert f"--out={tmp_path / 'alex.safetensors'}" in str(e.value)


def test_wrong_shape_and_wrong_net(converted, tmp_path):
  from dreambooth_jax.weights.safetensors_io import SafetensorsFile
  tensors = dict(SafetensorsFile(converted["alex"][1]))
  tensors["lin2.model.1.weight"] = np.zeros((1, 383, 1, 1), np.float32)
  tensors["scaling_layer.shift"] = np.asarray(lpips_model.SHIFT, np.float32)  # accepted
  bad = str(tmp_path / "bad.safetensors")
  save_file(tensors, bad)
  with pytest.raises(WeightsError) as e:
    lpips_weights.load_lpips(bad)
  msg = str(e.value)
  print(f"\n{msg}")
  assert bad in msg and "'lin2.model.1.weight'" in msg
  assert "(1, 383, 1, 1)" in msg and "(1, 384, 1, 1)" in msg and "1 problem(s)" in msg

  with pytest.raises(WeightsError, match="holds LPIPS-vgg weights"):
    lpips_weights.load_lpips(converted["vgg"][1], net="alex")
  empty = str(tmp_path / "empty.safetensors")
  save_file({"foo": np.zeros(3, np.float32)}, empty)
  with pytest.raises(WeightsError, match="cannot tell the LPIPS backbone"):
    lpips_weights.load_lpips(empty)


def test_raw_state_dict_is_accepted(converted, tmp_path):
  """A plain `state_dict()` dump: scaling buffers and the `lins.K` aliases are tolerated."""
  model, path = converted["alex"]
  raw = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  assert "lins.0.model.1.weight" in raw and "scaling_layer.scale" in raw
  raw_path = str(tmp_path / "raw.safetensors")
  save_file(raw, raw_path)
  x0, x1 = _images(4, 64)
  a = _apply(lpips_weights.load_lpips(raw_path), x0, x1)
  np.testing.assert_array_equal(a, _apply(lpips_weights.load_lpips(path), x0, x1))
  raw["lins.3.model.1.weight"] = raw["lins.3.model.1.weight"] + 1
  save_file(raw, raw_path)
  with pytest.raises(WeightsError, match="'lins.3.model.1.weight' differs"):
    lpips_weights.load_lpips(raw_path)


def test_converter_self_check(converted, convert_lpips):
  """The check `convert_lpips.py` runs after writing a file agrees with the parity test."""
  model, path = converted["alex"]
  err = convert_lpips._compare(model, path, "alex")
  print(f"convert_lpips self-check: max abs error {err:.3e}")
  assert err < 1e-7


def test_loaded_params_are_jax_arrays_of_dtype(converted):
  import jax.numpy as jnp
  model = lpips_weights.load_lpips(converted["alex"][1], "alex", dtype=jnp.bfloat16)
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert len(leaves) == 15 and all(x.dtype == jnp.bfloat16 for x in leaves)
