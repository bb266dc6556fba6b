"""LPIPS (Zhang et al. 2018) in flax.nnx, for the DIV metric of the DreamBooth evaluation.

DIV is the mean LPIPS distance between generations of one subject and prompt,
so we need exactly what the `lpips` pip package (v0.1.4) computes with
`lpips.LPIPS(net=..., version='0.1')`, the protocol's reference:

  1. ScalingLayer: (x - shift) / scale with fixed per-channel constants
     (inputs are images in [-1, 1]);
  2. the torchvision backbone's `features` up to five ReLU outputs, split into
     the same five slices as `lpips.pretrained_networks` (AlexNet, the lpips
     default, or VGG16);
  3. each feature map divided by (its L2 norm over channels + 1e-10);
  4. squared difference, a learned 1x1 conv without bias ("lin" layer) to one
     channel, mean over space;
  5. the sum over the five layers.

Modules are named after the lpips state-dict keys (`net.slice2.3.weight`,
`lin0.model.1.weight`) so `dreambooth_jax.weights.lpips` needs no renames, only
the usual conv-kernel transpose. Layout is NHWC, like the rest of the library.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dreambooth_jax.models.layers import Conv, Rngs

# lpips.ScalingLayer: ImageNet mean/std re-expressed for inputs in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# lpips.normalize_tensor adds eps to the norm (not to the squared norm), so a
# zero feature vector stays zero instead of becoming NaN.
NORM_EPS = 1e-10


class ConvOp(NamedTuple):
  """A torchvision Conv2d that is always followed by ReLU in these backbones."""

  cin: int
  cout: int
  kernel: int
  stride: int
  padding: int


class PoolOp(NamedTuple):
  """torchvision MaxPool2d without padding and ceil_mode=False, i.e. a VALID window."""

  kernel: int
  stride: int


class ReluOp(NamedTuple):
  pass


class BackboneSpec(NamedTuple):
  features: tuple  # torchvision's `features` Sequential, one entry per torch index
  slices: tuple[int, ...]  # lpips's slice boundaries into `features` (6 numbers, 5 slices)

  @property
  def channels(self) -> tuple[int, ...]:
    """Channels of the feature map each slice ends with: the lin layers' inputs."""
    out = []
    for lo, hi in zip(self.slices, self.slices[1:]):
      out.append([op.cout for op in self.features[lo:hi] if isinstance(op, ConvOp)][-1])
    return tuple(out)


def _alexnet() -> BackboneSpec:
  r, p = ReluOp(), PoolOp(3, 2)
  features = (ConvOp(3, 64, 11, 4, 2), r, p, ConvOp(64, 192, 5, 1, 2), r, p,
              ConvOp(192, 384, 3, 1, 1), r, ConvOp(384, 256, 3, 1, 1), r,
              ConvOp(256, 256, 3, 1, 1), r, p)
  # The final max-pool (index 12) is outside every slice: lpips never uses it.
  return BackboneSpec(features, (0, 2, 5, 8, 10, 12))


def _vgg16() -> BackboneSpec:
  # torchvision's `vgg.make_layers(cfgs["D"])`: conv3x3 + ReLU per number, "M" = 2x2 pool.
  cfg = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
  features, cin = [], 3
  for v in cfg:
    if v == "M":
      features.append(PoolOp(2, 2))
    else:
      features += [ConvOp(cin, v, 3, 1, 1), ReluOp()]
      cin = v
  return BackboneSpec(tuple(features), (0, 4, 9, 16, 23, 30))


BACKBONES = {"alex": _alexnet(), "vgg": _vgg16()}
# lpips accepts 'vgg16' as a synonym of 'vgg'.
_ALIASES = {"vgg16": "vgg"}


def canonical_net(net: str) -> str:
  net = _ALIASES.get(net, net)
  if net not in BACKBONES:
    raise ValueError(f"unknown LPIPS backbone {net!r}; supported: {sorted(BACKBONES)} "
                     "(lpips' 'squeeze' is not implemented)")
  return net


def max_pool(x, kernel: int, stride: int):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, kernel, kernel, 1),
                               (1, stride, stride, 1), "VALID")


class Backbone(nnx.Module):
  """torchvision AlexNet/VGG16 `features` as lpips slices them; returns the 5 slice outputs."""

  def __init__(self, net: str = "alex", *, dtype=None, param_dtype=jnp.float32,
               rngs: Rngs = None):
    self.net_name = canonical_net(net)
    spec = BACKBONES[self.net_name]
    for s, (lo, hi) in enumerate(zip(spec.slices, spec.slices[1:]), start=1):
      # Keyed by the torch index inside `features`, which the state dict keeps.
      convs = {str(i): Conv(op.cin, op.cout, op.kernel, stride=op.stride, padding=op.padding,
                            dtype=dtype, param_dtype=param_dtype, rngs=rngs)
               for i, op in enumerate(spec.features[lo:hi], start=lo) if isinstance(op, ConvOp)}
      setattr(self, f"slice{s}", nnx.Dict(convs))

  def __call__(self, x) -> list[jax.Array]:
    spec = BACKBONES[self.net_name]
    outs = []
    for s, (lo, hi) in enumerate(zip(spec.slices, spec.slices[1:]), start=1):
      convs = getattr(self, f"slice{s}")
      for i, op in enumerate(spec.features[lo:hi], start=lo):
        if isinstance(op, ConvOp):
          x = convs[str(i)](x)
        elif isinstance(op, PoolOp):
          x = max_pool(x, op.kernel, op.stride)
        else:
          x = jax.nn.relu(x)
      outs.append(x)
    return outs


class NetLinLayer(nnx.Module):
  """lpips.NetLinLayer: a 1x1 conv to one channel, no bias.

  lpips builds it as Sequential(Dropout, Conv2d) (use_dropout=True is its
  default, and the released weights were saved that way), hence the conv sits
  at index "1"; dropout is inactive in evaluation, so it has no counterpart here.
  """

  def __init__(self, channels: int, *, param_dtype=jnp.float32, rngs: Rngs = None):
    self.model = nnx.Dict({"1": Conv(channels, 1, 1, padding=0, use_bias=False,
                                     dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)})

  def __call__(self, x):
    return self.model["1"](x)


def normalize(features, eps: float = NORM_EPS):
  """lpips.normalize_tensor over the channel (last) axis."""
  norm = jnp.sqrt(jnp.sum(jnp.square(features), axis=-1, keepdims=True))
  return features / (norm + eps)


class LPIPS(nnx.Module):
  """LPIPS v0.1 distance between two batches of NHWC images in [-1, 1]; returns [B].

  `dtype` is the backbone's compute dtype (None: float32); normalisation,
  the lin layers and the averages always run in float32, as the distances are
  small differences of unit vectors.
  """

  def __init__(self, net: str = "alex", *, dtype=None, param_dtype=jnp.float32,
               rngs: Rngs = None):
    self.net_name = canonical_net(net)
    self.net = Backbone(self.net_name, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    for k, c in enumerate(BACKBONES[self.net_name].channels):
      setattr(self, f"lin{k}", NetLinLayer(c, param_dtype=param_dtype, rngs=rngs))

  def __call__(self, x0, x1, *, per_layer: bool = False):
    """Distances [B]; with `per_layer=True` also the 5 per-layer terms, each [B]."""
    if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
      raise ValueError(f"LPIPS expects two NHWC image batches of equal shape [B, H, W, 3] in "
                       f"[-1, 1], got {x0.shape} and {x1.shape}")
    shift = jnp.asarray(SHIFT, jnp.float32)
    scale = jnp.asarray(SCALE, jnp.float32)
    x = (jnp.concatenate([x0, x1]).astype(jnp.float32) - shift) / scale
    # One backbone pass over both batches (bigger convs, one launch per layer).
    # d(x, x) is then 0 only up to rounding (~1e-17 under jit on CPU; lpips
    # gives 0): XLA may round the channel norms of two identical rows
    # differently, even in separate passes, so we keep the faster single pass.
    feats = self.net(x)
    b = x0.shape[0]
    layers = []
    for k, f in enumerate(feats):
      n = normalize(f.astype(jnp.float32))
      diff = jnp.square(n[:b] - n[b:])
      layers.append(jnp.mean(getattr(self, f"lin{k}")(diff), axis=(1, 2, 3)))
    total = sum(layers[1:], layers[0])
    return (total, layers) if per_layer else total


def abstract_lpips(net: str = "alex", *, dtype=None, param_dtype=jnp.float32) -> LPIPS:
  """A shape-only LPIPS (no weights, no memory), to be filled by an importer or `random_init`."""
  return nnx.eval_shape(lambda: LPIPS(net, dtype=dtype, param_dtype=param_dtype))

