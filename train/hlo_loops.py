"""How often each part of a compiled HLO program runs: loop trip counts (XLA:GPU's known_trip_count,
else read from the loop's condition, as XLA:TPU records none) and the executions of each computation
per run of the entry computation, through calls, loops and conditionals.

  trip_counts(hlo)           {while body: trip count}
  executions(calls, entry)   {computation: (times per run of entry, every loop around it known)}
"""

from __future__ import annotations

import functools
import re

from train import hlo_parse
from train.hlo_parse import Instruction, operands

TRIPS = re.compile(r'known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_PEEL = ("copy", "bitcast", "convert", "reshape", "broadcast")
_FLIP = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE", "NE": "NE", "EQ": "EQ"}


def call_edges(computation: str, rest: str, trips: dict | None = None) -> list[tuple[str, str, int | None]]:
  """(caller, callee, times per call) of an instruction's called computations: a while body its trip
  count (known_trip_count, else `trips`, trip_counts' {body: n}; None: unknown), anything else once."""
  out = []
  for key, callee, many in hlo_parse.CALLS.findall(rest):
    known = TRIPS.search(rest) if key == "body" else None
    n = int(known.group(1)) if known else (trips or {}).get(callee) if key == "body" else 1
    for c in [callee] if callee else re.findall(r"%?([\w.\-]+)", many):
      out.append((computation, c, n))
  return out


_ELEMENT = re.compile(r"([\w.\-]+)#(\d+)")  # libtpu 0.0.50 writes element k of a tuple as `%name#k`


def _value(name: str, instrs: dict, fusion_operands=None):
  """What an instruction amounts to for a loop counter: ("const", int), ("index", i) for element i of
  the loop's tuple parameter, or None; through copies, bitcasts, converts and a fusion's parameters.
  `name#k` is element k of `name` (libtpu 0.0.50's shorthand for a get-tuple-element)."""
  seen = set()
  while name not in seen:
    seen.add(name)
    if (element := _ELEMENT.fullmatch(name)) is not None:
      base, k = instrs.get(element.group(1)), int(element.group(2))
      if base is not None and base.op == "parameter" and fusion_operands is None:
        return ("index", k)
      if base is not None and base.op == "tuple" and k < len(operands(base.rest, True)):
        name = operands(base.rest, True)[k]
        continue
      return None
    if name not in instrs:
      return None
    ins = instrs[name]
    if ins.op == "constant":
      m = re.match(r"\s*(-?\d+)\)", ins.rest)
      return ("const", int(m.group(1))) if m else None
    if ins.op == "get-tuple-element":
      m = re.search(r"\bindex=(\d+)", ins.rest)
      inner = instrs.get((operands(ins.rest) or [""])[0])
      return ("index", int(m.group(1))) if m and inner is not None and inner.op == "parameter" else None
    if ins.op == "parameter" and fusion_operands is not None:
      k = int(re.match(r"\s*(\d+)", ins.rest).group(1))
      name, fusion_operands = fusion_operands[k], None
      continue
    if ins.op not in _PEEL:
      return None
    name = (operands(ins.rest, True) or [""])[0]
  return None


def _compare_of(cond: list[Instruction], comps: dict) -> tuple[Instruction | None, list[str] | None]:
  """(the compare deciding a loop condition, the fusion's operands when XLA:GPU fused it, else None)."""
  for ins in reversed(cond):
    if ins.op == "compare":
      return ins, None
    if ins.op == "fusion":  # XLA:GPU fuses the compare
      callee = hlo_parse.called(ins.rest)
      found = [i for i in comps.get(callee, []) if i.op == "compare"] if callee else []
      if found:
        return found[-1], operands(ins.rest, True)
  return None, None


def _counter_bound(compare: Instruction, instrs: dict, inside) -> tuple[int, int, str] | None:
  """(the counter's index in the loop's tuple, its limit, direction) of `counter DIR constant` (or
  `constant DIR counter`, flipped), else None."""
  direction = re.search(r"direction=([A-Z]+)", compare.rest)
  sides = [_value(o, instrs, inside) for o in operands(compare.rest, True)[:2]]
  if not direction or len(sides) != 2 or None in sides:
    return None
  d = direction.group(1)
  if sides[0][0] == "const" and sides[1][0] == "index":
    sides, d = sides[::-1], _FLIP[d]
  if sides[0][0] != "index" or sides[1][0] != "const":
    return None
  return sides[0][1], sides[1][1], d


def _step(i: int, instrs: dict, body: list[Instruction]) -> int:
  """What the loop body adds to element i of its tuple each trip (its `add(counter, constant)`, else 1)."""
  root = next((ins for ins in reversed(body) if ins.op == "tuple"), None)
  if root is None or i >= len(operands(root.rest)):
    return 1
  update = instrs.get(operands(root.rest)[i])
  if update is None or update.op != "add":
    return 1
  values = [_value(o, instrs) for o in operands(update.rest, True)]
  return next((v[1] for v in values if v and v[0] == "const"), 1) or 1


def _trips_from_condition(cond: list, instrs: dict, comps: dict, init_operands: list[str], body: list) -> int | None:
  """A while loop's trip count from its condition computation, `counter DIR constant` (or that
  inside a fusion), the counter's initial value (a constant in the loop's initial tuple, else 0) and
  its step (the body's `add(counter, constant)`, else 1)."""
  compare, inside = _compare_of(cond, comps)
  bound = _counter_bound(compare, instrs, inside) if compare is not None else None
  if bound is None:
    return None
  i, limit, d = bound
  init = _value(init_operands[i], instrs) if i < len(init_operands) else None
  start = init[1] if init and init[0] == "const" else 0
  step = _step(i, instrs, body)
  span = {"LT": limit - start, "LE": limit - start + 1, "GT": start - limit, "GE": start - limit + 1,
          "NE": limit - start}.get(d)
  if span is None:
    return None
  return max(0, -(-span // abs(step)))


@functools.lru_cache(maxsize=4)
def trip_counts(hlo: str) -> dict[str, int]:
  """{while body computation: trip count} for the loops of HLO text: XLA:GPU's known_trip_count, or
  read from the loop's condition (XLA:TPU records none): `counter < constant` on an element of the
  loop's tuple, from its initial value in the loop's operand, by the step the body adds."""
  m = hlo_parse.parse(hlo)
  out = {}
  for ins in m.instrs.values():
    if ins.op != "while":
      continue
    body = hlo_parse.called(ins.rest, "body")
    known = TRIPS.search(ins.rest)
    cond = hlo_parse.called(ins.rest, "condition")
    if known:
      out[body] = int(known.group(1))
    elif cond:
      operand = m.instrs.get((operands(ins.rest) or [""])[0])
      init = operands(operand.rest, True) if operand is not None and operand.op == "tuple" else []
      n = _trips_from_condition(m.comps.get(cond, []), m.instrs, m.comps, init, m.comps.get(body, []))
      if n is not None:
        out[body] = n
  return out


def module_calls(hlo: str) -> list[tuple[str, str, int | None]]:
  """call_edges of every instruction of HLO text, loops by their trip counts."""
  m, trips = hlo_parse.parse(hlo), trip_counts(hlo)
  return [edge for ins in m.instrs.values() for edge in call_edges(m.home[ins.name], ins.rest, trips)]


def executions(calls: list[tuple[str, str, int | None]], entry: str) -> dict[str, tuple[int, bool]]:
  """How often each computation runs per execution of `entry` (the sum over its call sites of the
  caller's count, times a while body's known trip count, an unknown one taken as 1), and whether
  every loop around it had a known trip count."""
  callers: dict[str, list] = {}
  for caller, callee, n in calls:
    callers.setdefault(callee, []).append((caller, n))
  memo = {entry: (1, True)}

  def times(c: str, seen=()) -> tuple[int, bool]:
    if c not in memo:
      if c in seen:  # not a call graph HLO can have; stop rather than recurse
        return 0, False
      total, known = 0, True
      for caller, n in callers.get(c, []):
        count, known_above = times(caller, seen + (c,))
        total += count * (1 if n is None else n)
        known = known and known_above and n is not None
      memo[c] = (total, known)
    return memo[c]

  return {c: times(c) for c in {callee for _, callee, _ in calls} | {entry}}
