"""What fills a compiled step's temp memory on XLA:CPU: float32 copies of bfloat16 weights.

XLA:CPU has no bfloat16 convolutions or matrix products: before compiling, it
rewrites each one to convert its operands to float32, the frozen bf16 weights
included, and for the backward pass it lays the kernels out again with input and
output features swapped. Those copies are temp buffers that a TPU, which runs
bf16 dots and convolutions natively with either feature order, never allocates.
`plan_tpu.py --xla_report` has XLA write its buffer report for the train step
(`--xla_dump_to`) and this module reads it.

The report lists each temp allocation with its size and the shapes of every value
that ever lives in it. An allocation counts as a weight copy only if every one of
its values is a float32 array shaped like a bf16 argument of the step (or like one
with its last two axes swapped); allocations that also hold activations are left
in. The figure is therefore what a TPU saves at least, by this accounting.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

_UNITS = {"GiB": 2 ** 30, "MiB": 2 ** 20, "KiB": 2 ** 10, "B": 1}
_VALUE = re.compile(r"(?:(\d+)×)?(\w+)\[([\d,]*)\]")


def dump_flags(directory: str, module: str = "train_step") -> str:
  """XLA_FLAGS that make XLA write `module`'s buffer report into `directory`."""
  return f" --xla_dump_to={directory} --xla_dump_hlo_module_re=.*{module}.*"


def latest_report(directory: str, module: str = "train_step") -> str | None:
  """The newest memory-usage report of `module` in `directory`, or None."""
  found = glob.glob(os.path.join(directory, f"*{module}*memory-usage-report.txt"))
  return max(found, key=os.path.getmtime) if found else None


def allocations(text: str) -> list[tuple[int, list[tuple[str, tuple[int, ...]]]]]:
  """[(bytes, [(dtype, shape), ...])] of each allocation in a memory-usage report."""
  out = []
  for line in text.splitlines():
    parts = [p.strip() for p in line.split(";")]
    if len(parts) < 5:
      continue
    size = re.match(r"([\d.]+)\s*(GiB|MiB|KiB|B)$", parts[1])
    if not size:
      continue
    values = [(m.group(2), tuple(int(d) for d in m.group(3).split(",") if d))
              for m in _VALUE.finditer(parts[4])]
    out.append((int(float(size.group(1)) * _UNITS[size.group(2)]), values))
  return out


@dataclasses.dataclass
class WeightCopies:
  same_layout_bytes: int   # allocations holding only float32 copies shaped as a bf16 weight
  swapped_bytes: int       # ... also (or only) its [.., out, in] transposes
  allocations: int

  @property
  def bytes(self) -> int:
    return self.same_layout_bytes + self.swapped_bytes


def weight_copies(report_text: str, bf16_shapes) -> WeightCopies:
  """The temp bytes of allocations that hold nothing but float32 copies of the given
  bf16 weight shapes (as they are, or with the last two axes swapped)."""
  same = {tuple(s) for s in bf16_shapes if len(s) >= 2}
  swapped = {s[:-2] + (s[-1], s[-2]) for s in same}
  out = WeightCopies(0, 0, 0)
  for size, values in allocations(report_text):
    if not values or not all(d == "f32" and (s in same or s in swapped) for d, s in values):
      continue
    out.allocations += 1
    if all(s in same for _, s in values):
      out.same_layout_bytes += size
    else:
      out.swapped_bytes += size
  return out
