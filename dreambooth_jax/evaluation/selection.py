"""Which step's adapters a many-subject job keeps for each subject: `config.eval.select`.

Fine-tuning longer raises subject fidelity and then costs prompt fidelity (the
subject overfits: every prompt draws the training photos). The job evaluates every
`config.eval.every` steps, and a rule picks one evaluated step per subject:

  rule  := "last"
         | ("max" | "min") METRIC [ "if" cond { "and" cond } ]
  cond  := METRIC (">=" | "<=" | ">" | "<") bound
  bound := NUMBER | "first" [ ("+" | "-") NUMBER ]

METRIC is a metric of the job's protocol, lower case with '-' as '_': `dino`,
`clip_i`, `clip_t`, `pres`, `div` (dreambooth), `subject`, `attributes`, `context`,
`pres`, `div` (world). `first` is the same metric at the subject's first
evaluation. Examples:

  "max dino if clip_t >= first"         the issue's rule: the best subject fidelity
                                        whose prompt fidelity has not fallen below
                                        the first evaluation's
  "max dino if clip_t >= first - 0.01"  the same with a tolerance
  "max subject if context >= 0.5"       (world) an absolute floor
  "last"                                the final step, as a job without evaluation

Among the evaluations that meet every condition the best value of METRIC wins
(the earliest step on a tie); an evaluation missing a metric the rule reads does
not qualify. When none qualifies, the last evaluation is kept and the reason says
so. Every rule here is decidable online: `first` is fixed once the first
evaluation is in, so a later evaluation can only take over the choice, never
revive an earlier one. The job relies on that: it saves a subject's adapters when
the current step becomes its choice, and only then.

Pure python: parsed and checked against the protocol's metrics before any model
is built, and tested on hand-made histories.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from typing import Any, Mapping, Sequence

from dreambooth_jax import config_lib

GRAMMAR = ('"last" or "max|min METRIC [if METRIC OP BOUND [and ...]]" with OP one of >= <= > < '
           'and BOUND a number or "first" [+|- number], e.g. "max dino if clip_t >= first"')
OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_NUMBER = r"[-+]?[0-9.e+-]+"  # loose; float() decides
_COND = re.compile(rf"^([a-z0-9_]+)\s*(>=|<=|>|<)\s*(first(?:\s*[-+]\s*{_NUMBER})?|{_NUMBER})$")


def metric_key(name: str) -> str:
  """A protocol metric as rules spell it: "CLIP-T" -> "clip_t"."""
  return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


@dataclasses.dataclass(frozen=True)
class Condition:
  metric: str
  op: str
  value: float          # the number, or the offset from the first evaluation
  relative: bool        # True: the bound is first + value

  def bound(self, first: Mapping[str, float | None]) -> float | None:
    if not self.relative:
      return self.value
    base = first.get(self.metric)
    return None if base is None else base + self.value

  def text(self) -> str:
    if not self.relative:
      return f"{self.metric} {self.op} {self.value:g}"
    offset = f" {'+' if self.value > 0 else '-'} {abs(self.value):g}" if self.value else ""
    return f"{self.metric} {self.op} first{offset}"


@dataclasses.dataclass(frozen=True)
class Rule:
  goal: str                            # "last", "max" or "min"
  metric: str = ""
  conditions: tuple[Condition, ...] = ()

  def text(self) -> str:
    if self.goal == "last":
      return "last"
    conds = " and ".join(c.text() for c in self.conditions)
    return f"{self.goal} {self.metric}" + (f" if {conds}" if conds else "")

  @property
  def reads(self) -> tuple[str, ...]:
    """The metrics the rule needs, target first."""
    names = ([self.metric] if self.metric else []) + [c.metric for c in self.conditions]
    return tuple(dict.fromkeys(names))


def parse(text: str, metrics: Sequence[str]) -> Rule:
  """The rule in `text`, checked against a protocol's `metrics` (names as the protocol
  writes them); a ConfigError names the key, what is wrong and the grammar."""
  known = {metric_key(m) for m in metrics}
  where = f"config.eval.select={text!r}"

  def check(metric: str) -> str:
    if metric not in known:
      raise config_lib.ConfigError(f"{where}: {metric!r} is not a metric of this protocol; "
                                   f"use one of {', '.join(sorted(known))}")
    return metric

  words = " ".join(str(text).lower().split())
  if words == "last":
    return Rule("last")
  head, _, tail = words.partition(" if ")
  parts = head.split(" ")
  if len(parts) != 2 or parts[0] not in ("max", "min"):
    raise config_lib.ConfigError(f"{where}: cannot read it; write {GRAMMAR}")
  conditions = []
  for cond in (c.strip() for c in tail.split(" and ")) if tail else ():
    m = _COND.match(cond)
    if m is None:
      raise config_lib.ConfigError(f"{where}: cannot read the condition {cond!r}; write {GRAMMAR}")
    metric, op, bound = m.groups()
    relative = bound.startswith("first")
    number = bound[len("first"):].replace(" ", "") if relative else bound
    try:
      value = float(number) if number else 0.0
    except ValueError:
      raise config_lib.ConfigError(f"{where}: {bound!r} is not a number or first [+|- number]"
                                   ) from None
    conditions.append(Condition(check(metric), op, value, relative))
  return Rule(parts[0], check(parts[1]), tuple(conditions))


def select(rule: Rule, history: Sequence[tuple[int, Mapping[str, Any]]]) -> dict[str, Any]:
  """One subject's choice over its evaluations `history` [(step, {metric key: value or
  None})] in step order: {rule, step, reason, metrics, candidates: [{step, eligible,
  failed}], first}. The reason is a sentence a person reads in selection.json."""
  if not history:
    raise ValueError("select needs at least one evaluation")
  history = sorted(history, key=lambda h: h[0])
  first = dict(history[0][1])
  last_step, last_metrics = history[-1]
  candidates = []
  for step, values in history:
    failed = [c.text() for c in rule.conditions if not _holds(c, values, first)]
    if rule.metric and values.get(rule.metric) is None:
      failed.insert(0, f"{rule.metric} missing")
    candidates.append(dict(step=step, eligible=not failed, failed=failed))
  out = dict(rule=rule.text(), first=first, candidates=candidates)
  if rule.goal == "last":
    return dict(out, step=last_step, metrics=dict(last_metrics),
                reason=f"the rule keeps the last evaluation (step {last_step})")
  eligible = [(step, values) for (step, values), c in zip(history, candidates) if c["eligible"]]
  conds = " and ".join(c.text() for c in rule.conditions)
  if not eligible:
    return dict(out, step=last_step, metrics=dict(last_metrics),
                reason=f"no evaluation met {conds or 'the rule'}; kept the last (step {last_step})")
  pick = max if rule.goal == "max" else min
  # The first of equal values wins: max/min return the first extreme element.
  step, values = pick(eligible, key=lambda sv: sv[1][rule.metric])
  among = (f" among the {len(eligible)} of {len(history)} evaluations with {conds}" if conds
           else f" over {len(history)} evaluations")
  highest = "highest" if rule.goal == "max" else "lowest"
  return dict(out, step=step, metrics=dict(values),
              reason=f"step {step}: the {highest} {rule.metric} ({values[rule.metric]:.4f})"
                     f"{among}" + _first_note(rule, first))


def _holds(c: Condition, values: Mapping[str, Any], first: Mapping[str, Any]) -> bool:
  v, bound = values.get(c.metric), c.bound(first)
  return v is not None and bound is not None and OPS[c.op](v, bound)


def _first_note(rule: Rule, first: Mapping[str, Any]) -> str:
  rel = [c for c in rule.conditions if c.relative]
  if not rel:
    return ""
  said = {c.metric: first.get(c.metric) for c in rel}
  return " (first: " + ", ".join(f"{m} {'missing' if v is None else f'{v:.4f}'}"
                                 for m, v in said.items()) + ")"


def keyed(rows: Sequence[tuple[int, Mapping[str, Any]]]) -> list[tuple[int, dict]]:
  """[(step, {metric key: value})] from [(step, {protocol metric name: value})]."""
  return [(step, {metric_key(k): v for k, v in values.items()}) for step, values in rows]
