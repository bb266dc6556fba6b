"""Where a training step's time goes: per-op traces of our jitted step (XLA:CPU thunks
from a jax.profiler trace, mapped back to HLO) and of the PyTorch step (torch.profiler),
summed by kind of op and, for ours, by pass (forward, backward, update).

Used by bench_train_step.py --profile; the categories are shared so the two columns
of its table compare like with like.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile

import jax

CATEGORIES = ("convolution", "matmul (dense, attention)", "reductions (norms, softmax)",
              "copy / transpose / concat", "elementwise", "other")
_INSTR = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_CONTAINERS = {"while", "call", "conditional"}  # their bodies' thunks are traced themselves
_MOVES = {"copy", "transpose", "concatenate", "pad", "slice", "dynamic-slice", "dynamic-update-slice",
          "broadcast", "reshape", "bitcast", "parameter", "constant", "tuple", "get-tuple-element"}


def _hlo_index(hlo_text: str) -> dict:
  """Instruction name -> (its opcode, every opcode it runs incl. fused ones, jax op_name)."""
  comps, instrs, cur = {}, {}, None
  for line in hlo_text.splitlines():
    if line.rstrip().endswith("{") and not line.startswith(" "):
      cur = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
      comps[cur] = []
      continue
    m = _INSTR.match(line)
    if m and cur is not None:
      op = re.search(r'op_name="([^"]*)"', line)
      instrs[m.group(1)] = (m.group(2), _CALLS.findall(line), op.group(1) if op else "")
      comps[cur].append(m.group(1))

  def opcodes(name, seen):
    opcode, calls, _ = instrs[name]
    out = {opcode}
    for c in calls:
      if c not in seen:
        seen.add(c)
        for n in comps.get(c, ()):
          out |= opcodes(n, seen)
    return out

  return {n: (v[0], opcodes(n, set()), v[2]) for n, v in instrs.items()}


def _xla_category(ops: set) -> str:
  if "convolution" in ops:
    return "convolution"
  if "dot" in ops:
    return "matmul (dense, attention)"
  if ops & {"reduce", "reduce-window"}:
    return "reductions (norms, softmax)"
  if ops <= _MOVES:
    return "copy / transpose / concat"
  if ops & {"custom-call", "rng-bit-generator", "sort", "scatter", "gather"}:
    return "other"
  return "elementwise"


def _xla_pass(op_name: str) -> str:
  """jax's op_name metadata: transpose(jvp(...)) is the backward pass, jvp(...) the forward.
  Ops XLA made itself (layout copies, rewritten convolutions) carry none."""
  if not op_name:
    return "no op_name"
  if "transpose(" in op_name:
    return "backward"
  return "forward" if "jvp(" in op_name else "update"


def trace_ours(run, hlo_text: str, steps: int) -> dict:
  """{(category, pass): ms per step} summed over XLA:CPU thunks, from a jax.profiler trace."""
  index = _hlo_index(hlo_text)
  with tempfile.TemporaryDirectory(prefix="bench_trace_") as d:
    with jax.profiler.trace(d):
      for _ in range(steps):
        run()
    data = jax.profiler.ProfileData.from_file(
        sorted(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True))[-1])
  out = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for e in line.events:
        name = dict(e.stats).get("hlo_op")
        if name not in index or index[name][0] in _CONTAINERS:
          continue
        _, ops, op_name = index[name]
        out[(_xla_category(ops), _xla_pass(op_name))] += e.duration_ns / 1e6 / steps
  return dict(out)


def _torch_category(name: str) -> str:
  n = name.lower()
  if "conv" in n:
    return "convolution"
  if any(k in n for k in ("addmm", "::mm", "bmm", "matmul", "linear", "scaled_dot_product",
                          "flash_attention", "baddbmm")):
    return "matmul (dense, attention)"
  if any(k in n for k in ("norm", "softmax", "::sum", "::mean")):
    return "reductions (norms, softmax)"
  if any(k in n for k in ("copy", "contiguous", "clone", "cat", "transpose", "permute", "::to",
                          "pad", "slice", "index", "expand", "view", "reshape", "upsample", "repeat")):
    return "copy / transpose / concat"
  if any(k in n for k in ("add", "mul", "sub", "div", "gelu", "silu", "exp", "sqrt", "pow", "lerp",
                          "square", "neg", "zero", "fill", "where", "clamp", "sin", "cos", "erf",
                          "avg_pool", "rand", "foreach", "adam")):
    return "elementwise"
  return "other"


def trace_theirs(step, steps: int) -> dict:
  """{category: ms per step} of torch's op self times, from torch.profiler."""
  import torch
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      step()
  out = collections.Counter()
  for e in prof.key_averages():
    if e.key.startswith("aten::") or "Backward" in e.key or "Optimizer" in e.key:
      out[_torch_category(e.key)] += e.self_cpu_time_total / 1e3 / steps
  return dict(out)


def print_breakdown(ours: dict, theirs: dict | None, ours_wall_ms: float, theirs_wall_ms: float | None):
  passes = ("forward", "backward", "update", "no op_name")
  print(f"\n{'op kind (ms/step, traced)':<30} " + " ".join(f"{'ours ' + p:>16}" for p in passes)
        + f" {'ours total':>11} {'theirs total':>13}")
  for c in CATEGORIES:
    row = [ours.get((c, p), 0.0) for p in passes]
    t = f"{theirs.get(c, 0.0):>13.1f}" if theirs is not None else ""
    print(f"{c:<30} " + " ".join(f"{v:>16.1f}" for v in row) + f" {sum(row):>11.1f} {t}")
  tot = [sum(v for (c, p), v in ours.items() if p == q) for q in passes]
  t = f"{sum(theirs.values()):>13.1f}" if theirs is not None else ""
  print(f"{'sum of traced ops':<30} " + " ".join(f"{v:>16.1f}" for v in tot) + f" {sum(tot):>11.1f} {t}")
  print(f"(wall per untraced step: ours {ours_wall_ms:.1f} ms"
        + (f", theirs {theirs_wall_ms:.1f} ms" if theirs_wall_ms else "") + "; thunks and"
        " torch ops can overlap or leave gaps, so sums differ from wall time)")
