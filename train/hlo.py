"""Reading compiled HLO text (`compiled.as_text()`): what a program sends, over which links, and when.

  collectives(hlo)          {kind: {count, bytes}}: instructions in the program (a collective in a
                            scanned layer counts once) and the bytes of their results
  slow_a2a(hlo, devices)    bytes each device sends to other hosts (GPU) or slices (TPU) in
                            all-to-alls (train/aot.py's docstring has the fields)
  async_all_to_alls(hlo)    whether the all-to-alls are asynchronous and how many compute
                            instructions the schedule puts between each start and its done
  matmul_flops(hlo)         the matmul FLOPs a program executes, counted from the shapes of its dots,
                            ragged dots, convolutions and GEMM custom calls, through fusions, loops
                            (times their trip counts) and conditionals (their costliest branch)
  scoped_collectives(hlo, scope)  the collectives made under `jax.named_scope(scope)`: kind, shape,
                            bytes, and how often each runs per step (conditionals counted as taken)
  peak_buffers(hlo, live)   the largest buffers live at the peak, from XLA's live-range dump, with
                            the operation and the source line that made each
"""

from __future__ import annotations

import collections
import functools
import math
import re
from typing import NamedTuple

import jax
import numpy as np

from parallel import mesh as mesh_lib

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def collectives(hlo: str) -> dict:
  """{kind: {"count", "bytes"}} of the collectives in compiled HLO text (async pairs counted once)."""
  out = {}
  pattern = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
  for shape, kind, _ in pattern.findall(hlo):
    entry = out.setdefault(kind, {"count": 0, "bytes": 0})
    entry["count"] += 1
    for dtype, dims in re.findall(r"([a-z0-9]+)\[([0-9,]*)\]", shape):
      size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
      entry["bytes"] += size * _BYTES.get(dtype, 4)
  return out


# ------------------------------------------------------------------ all-to-all over the slow network
class _Instruction(NamedTuple):
  """One HLO instruction line: name, result shape, opcode, the text after the opcode's parenthesis."""
  name: str
  shape: str
  op: str
  rest: str

  def groups(self):
    return tuple(self)

  def group(self, i: int) -> str:
    return self[i - 1]


class _InstructionParser:
  """`match(line)` -> _Instruction or None. A tuple shape is read to its balanced parenthesis, since
  TPU layouts put parentheses inside it ("{1,0:T(8,128)(2,1)}")."""

  _HEAD = re.compile(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
  _ARRAY = re.compile(r"[a-z][a-z0-9]*\[[0-9,]*\](?:\{[^}]*\})?")
  _OP = re.compile(r"\s+([a-z][\w\-]*)\((.*)$")

  def match(self, line: str) -> _Instruction | None:
    head = self._HEAD.match(line)
    if not head:
      return None
    i = head.end()
    if line.startswith("(", i):
      depth = 0
      for j in range(i, len(line)):
        depth += {"(": 1, ")": -1}.get(line[j], 0)
        if depth == 0:
          break
      else:
        return None
      shape, k = line[i:j + 1], j + 1
    else:
      array = self._ARRAY.match(line, i)
      if not array:
        return None
      shape, k = array.group(0), array.end()
    op = self._OP.match(line, k)
    return _Instruction(head.group(1), shape, op.group(1), op.group(2)) if op else None


_INSTR = _InstructionParser()
_TRIPS = re.compile(r'known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


def _walk(hlo: str):
  """(computation, entry computation so far, _Instruction) for each instruction of HLO text (a line
  before any computation's header: computation "")."""
  computation = entry = ""
  for line in hlo.splitlines():
    head = _COMPUTATION.match(line)
    if head and "=" not in line.split("(", 1)[0]:
      computation = head.group(1)
      entry = computation if line.startswith("ENTRY") else entry
      continue
    instr = _INSTR.match(line)
    if instr:
      yield computation, entry, instr


def _call_edges(computation: str, rest: str, trips: dict | None = None) -> list[tuple[str, str, int | None]]:
  """(caller, callee, times per call) of an instruction's called computations: a while body its trip
  count (known_trip_count, else `trips`, trip_counts' {body: n}; None: unknown), anything else once."""
  out = []
  for key, callee, many in _CALLS.findall(rest):
    known = _TRIPS.search(rest) if key == "body" else None
    n = int(known.group(1)) if known else (trips or {}).get(callee) if key == "body" else 1
    for c in [callee] if callee else re.findall(r"%?([\w.\-]+)", many):
      out.append((computation, c, n))
  return out


# ------------------------------------------------------------------ loop trip counts
_PEEL = ("copy", "bitcast", "convert", "reshape", "broadcast")
_FLIP = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE", "NE": "NE", "EQ": "EQ"}


def _value(name: str, instrs: dict, comps: dict, fusion_operands=None):
  """What an instruction amounts to for a loop counter: ("const", int), ("index", i) for element i of
  the loop's tuple parameter, or None; through copies, bitcasts, converts and a fusion's parameters."""
  seen = set()
  while name in instrs and name not in seen:
    seen.add(name)
    ins = instrs[name]
    if ins.op == "constant":
      m = re.match(r"\s*(-?\d+)\)", ins.rest)
      return ("const", int(m.group(1))) if m else None
    if ins.op == "get-tuple-element":
      m = re.search(r"\bindex=(\d+)", ins.rest)
      inner = instrs.get((_operands(ins.rest) or [""])[0])
      return ("index", int(m.group(1))) if m and inner is not None and inner.op == "parameter" else None
    if ins.op == "parameter" and fusion_operands is not None:
      k = int(re.match(r"\s*(\d+)", ins.rest).group(1))
      name, fusion_operands = fusion_operands[k], None
      continue
    if ins.op not in _PEEL:
      return None
    name = (_operands(ins.rest) or [""])[0]
  return None


def _trips_from_condition(cond: list, instrs: dict, comps: dict, init_operands: list[str], body: list) -> int | None:
  """A while loop's trip count from its condition computation, `counter DIR constant` (or that
  inside a fusion), the counter's initial value (a constant in the loop's initial tuple, else 0) and
  its step (the body's `add(counter, constant)`, else 1)."""
  compare, inside = None, None
  for ins in reversed(cond):
    if ins.op == "compare":
      compare = ins
      break
    if ins.op == "fusion":  # XLA:GPU fuses the compare
      called = re.search(r"\bcalls=%?([\w.\-]+)", ins.rest)
      found = [i for i in comps.get(called.group(1), []) if i.op == "compare"] if called else []
      if found:
        compare, inside = found[-1], _operands(ins.rest)
        break
  if compare is None:
    return None
  direction = re.search(r"direction=([A-Z]+)", compare.rest)
  sides = [_value(o, instrs, comps, inside) for o in _operands(compare.rest)[:2]]
  if not direction or len(sides) != 2 or None in sides:
    return None
  d = direction.group(1)
  if sides[0][0] == "const" and sides[1][0] == "index":
    sides, d = sides[::-1], _FLIP[d]
  if sides[0][0] != "index" or sides[1][0] != "const":
    return None
  i, limit = sides[0][1], sides[1][1]
  init = _value(init_operands[i], instrs, comps) if i < len(init_operands) else None
  start = init[1] if init and init[0] == "const" else 0
  step = 1
  root = next((ins for ins in reversed(body) if ins.op == "tuple"), None)
  if root is not None and i < len(_operands(root.rest)):
    update = instrs.get(_operands(root.rest)[i])
    if update is not None and update.op == "add":
      values = [_value(o, instrs, comps) for o in _operands(update.rest)]
      step = next((v[1] for v in values if v and v[0] == "const"), 1) or 1
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
  comps: dict[str, list] = {}
  instrs: dict[str, _Instruction] = {}
  for computation, _, ins in _walk(hlo):
    comps.setdefault(computation, []).append(ins)
    instrs[ins.name] = ins
  out = {}
  for ins in instrs.values():
    if ins.op != "while":
      continue
    body = re.search(r"\bbody=%?([\w.\-]+)", ins.rest).group(1)
    known = _TRIPS.search(ins.rest)
    cond = re.search(r"\bcondition=%?([\w.\-]+)", ins.rest)
    if known:
      out[body] = int(known.group(1))
    elif cond:
      operand = instrs.get((_operands(ins.rest) or [""])[0])
      init = _operands(operand.rest) if operand is not None and operand.op == "tuple" else []
      n = _trips_from_condition(comps.get(cond.group(1), []), instrs, comps, init, comps.get(body, []))
      if n is not None:
        out[body] = n
  return out
_COMPUTATION = re.compile(r"(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_CALLS = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
                    r"|\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_GROUPS = re.compile(r"replica_groups=(\{(?:\{[0-9,]*\},?)*\}|\[[0-9,]+\]<=\[[0-9,]+\](?:T\([0-9,]+\))?"
                     r"|mesh\[[^\]]*\](?:<=\[[0-9,]+\](?:T\([0-9,]+\))?)? \{[^}]*\})")
_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="(RAGGED_ALL_TO_ALL|ALL_TO_ALL)"')


def shape_bytes(shape: str) -> int:
  """Bytes of the arrays in an HLO shape ("f32[8,32]{1,0}", "(bf16[4], s32[])"; token[] is 0)."""
  total = 0
  for dtype, dims in re.findall(r"([a-z][a-z0-9]*)\[([0-9,]*)\]", shape):
    total += math.prod(int(d) for d in dims.split(",") if d) * _BYTES.get(dtype, 0 if dtype == "token" else 4)
  return total


def replica_groups(text: str, n: int) -> list[list[int]]:
  """The groups of an HLO `replica_groups=` value: explicit ("{{0,1},{2,3}}"; "{}" is one group of
  all `n`), iota ("[G,S]<=[d0,d1,...]T(perm)": iota(d0*d1*...) reshaped to dims, transposed by
  perm, reshaped to G groups of S) or a mesh's axes ("mesh['a'=4,'b'=2] {'a'}": iota(8) as a [4, 2]
  mesh, one group per 'b' of the 4 devices along 'a'; libtpu writes these)."""
  m = re.fullmatch(r"mesh\[([^\]]*)\](?:<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?)? \{([^}]*)\}", text)
  if m:  # mesh['a'=4,'b'=2] {'a'}: the devices of a mesh (iota, or as listed) grouped along the named axes
    axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
    dims = [int(k) for _, k in axes]
    ids = np.arange(math.prod(dims))
    if m.group(2):
      ids = ids.reshape([int(x) for x in m.group(2).split(",")])
      ids = ids.transpose([int(x) for x in m.group(3).split(",")]) if m.group(3) else ids
    ids = ids.reshape(dims)
    names = [a for a, _ in axes]
    grouped = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(4))]
    rest = [i for i in range(len(dims)) if i not in grouped]
    size = math.prod(dims[i] for i in grouped)
    return ids.transpose(rest + grouped).reshape(-1, size).tolist()
  m = re.fullmatch(r"\[(\d+),(\d+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", text)
  if m:
    dims = [int(x) for x in m.group(3).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(4):
      ids = ids.transpose([int(x) for x in m.group(4).split(",")])
    return ids.reshape(int(m.group(1)), int(m.group(2))).tolist()
  groups = [[int(x) for x in g.split(",")] for g in re.findall(r"\{([0-9,]+)\}", text)]
  return groups or [list(range(n))]


def granule_of(devices, groups=None):
  """("slices" | "hosts", device -> its slice or host): TPU devices talk over the slow network to
  other slices (slice_index), GPUs to other hosts (process_index; the compile-only CUDA devices of
  h100xN count hosts of 8 in device-id order). `groups` may also be a {device id: node} map (nodes
  of simulated devices)."""
  if isinstance(groups, dict):
    return "nodes", lambda d: groups[d.id]
  if groups is None:
    kind, node = mesh_lib.node_of(devices)
    return ("hosts", node) if kind == "one node" else (kind, node)
  if groups == "slices":
    return groups, lambda d: getattr(d, "slice_index", 0)
  return groups, lambda d: d.process_index


def _operands(rest: str) -> list[str]:
  """Operand names of an instruction, from the text after its opening parenthesis."""
  depth, end = 1, len(rest)
  for i, ch in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      end = i
      break
  return re.findall(r"%([\w.\-]+)", rest[:end]) or [w.split()[-1] for w in rest[:end].split(",") if w.strip()]


def _times(calls: list[tuple[str, str, int | None]], entry: str) -> dict[str, tuple[int, bool]]:
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


def slow_a2a(hlo: str, devices, groups: str | None = None, top: int = 6) -> dict:
  """Bytes each device sends to other hosts (GPU) or slices (TPU) in the all-to-all and
  ragged-all-to-all collectives of compiled HLO text; `devices` is the program's device assignment
  (replica-group ids are positions in it). See the module docstring."""
  kind, granule = granule_of(devices, groups)
  header = re.search(r"num_partitions=(\d+)", hlo)
  replicas = re.search(r"replica_count=(\d+)", hlo)
  size = (int(header.group(1)) if header else 1) * (int(replicas.group(1)) if replicas else 1)
  program = list(devices)
  if size < len(program):  # one program per TPU slice: its own collectives stay inside the slice
    first = getattr(program[0], "slice_index", 0)
    program = [d for d in program if getattr(d, "slice_index", 0) == first][:size]
  by_id = {d.id: d for d in devices}
  shapes, found, received, calls, entry = {}, [], {}, [], ""
  trips = trip_counts(hlo)
  for computation, entry, instr in _walk(hlo):
    name, shape, op, rest = instr
    shapes[name] = shape
    calls += _call_edges(computation, rest, trips)
    base = op.removesuffix("-start")
    if base in ("all-to-all", "ragged-all-to-all"):
      g = _GROUPS.search(rest)
      members = [[program[i] for i in group] for group in replica_groups(g.group(1) if g else "{}", size)]
      found.append((base, name, computation, members, _operands(rest)))
    elif op in ("send", "recv") and "_xla_megascale_target" in rest:  # TPU multi-slice: over the DCN
      t = _MEGASCALE.search(rest)
      if not t or (t.group(1) == "RAGGED_ALL_TO_ALL" and '_xla_megascale_ragged_operand_index="0"' not in rest):
        continue  # ragged: the data buffer (operand 0), not its offsets and sizes
      buffer = shape_bytes(re.search(r"[a-z][a-z0-9]*\[[0-9,]*\]", shape).group(0))  # (buffer, u32[], token[])
      key = re.search(r'_xla_host_transfer_rendezvous="([^"]*)"', rest)
      key = key.group(1) if key else name
      if op == "recv":
        received[key] = buffer
        continue
      ids = re.search(r"_xla_megascale_target=\{((?:\{[0-9,]*\},?)*)\}", rest).group(1)
      members = [[by_id[int(x)] for x in g.split(",")] for g in re.findall(r"\{([0-9,]+)\}", ids)]
      found.append(("ragged-all-to-all" if t.group(1) == "RAGGED_ALL_TO_ALL" else "all-to-all", name, computation,
                    members, (buffer, key)))
  times = _times(calls, entry)
  known = True
  per_device: dict[int, list[float]] = {}  # id -> [bytes, balanced, bytes per step, balanced per step]
  rows = []
  for kind_, name, computation, members, operands in found:
    ragged = kind_ == "ragged-all-to-all"
    if isinstance(operands, tuple):  # megascale: its send buffer and the matching receive buffer
      sent, rendezvous = operands
      got = received.get(rendezvous, sent)
    else:  # all-to-all: all operands (the array or the tuple of chunks); ragged: input, output
      sizes = [shape_bytes(shapes.get(o, "")) for o in operands]
      sent = sizes[0] if ragged else sum(sizes)
      got = sizes[1] if ragged and len(sizes) > 1 else sent
    even = min(sent, got)
    n_times, loops_known = times.get(computation, (1, True))
    known = known and loops_known
    row = {"kind": kind_, "name": name, "operand_bytes": sent, "group": max(map(len, members), default=0),
           "remote": 0, "bytes_per_device": 0, "times": n_times}
    if ragged:
      row["balanced_bytes_per_device"] = 0
    for group in members:
      at = collections.Counter(granule(d) for d in group)
      for d in group:
        m = len(group) - at[granule(d)]
        b, e = sent * m / len(group), even * m / len(group)
        acc = per_device.setdefault(d.id, [0.0] * 4)
        for i, v in enumerate((b, e, b * n_times, e * n_times)):
          acc[i] += v
        row["remote"] = max(row["remote"], m)
        row["bytes_per_device"] = max(row["bytes_per_device"], round(b))
        if ragged:
          row["balanced_bytes_per_device"] = max(row["balanced_bytes_per_device"], round(e))
    rows.append(row)
  rows.sort(key=lambda r: (-r["bytes_per_device"] * r["times"], r["name"]))
  worst = lambda i: round(max((v[i] for v in per_device.values()), default=0))
  return {"groups": kind, "granules": len({granule(d) for d in devices}), "count": len(rows),
          "bytes_per_device": worst(0), "balanced_bytes_per_device": worst(1),
          "total_bytes": round(sum(v[0] for v in per_device.values())),
          "per_step": {"bytes_per_device": worst(2), "balanced_bytes_per_device": worst(3),
                       "total_bytes": round(sum(v[2] for v in per_device.values())), "trip_counts_known": known},
          "upper_bound": any(r["kind"] == "ragged-all-to-all" and r["remote"] for r in rows),
          "per_instruction": rows[:top]}


def device_assignment(compiled, mesh) -> list:
  """The devices of a compiled SPMD program in the order its replica-group ids count them: the
  input shardings' mesh, flattened (for a jit over `mesh`, mesh.devices.flat)."""
  for sharding in jax.tree.leaves(compiled.input_shardings):
    if isinstance(sharding, jax.sharding.NamedSharding):
      return list(sharding.mesh.devices.flat)
  return list(mesh.devices.flat)


# ------------------------------------------------------------------ asynchronous all-to-alls
_COMPUTE = ("fusion", "convolution", "dot", "custom-call", "while", "call", "conditional")


def _instructions(hlo: str) -> dict[str, list[tuple[str, str, str]]]:
  """{computation: [(name, opcode, rest of the line)] in schedule order} (scheduled HLO prints each
  computation's instructions in the order they run)."""
  out = {}
  for computation, _, (name, _, op, rest) in _walk(hlo):
    if computation:
      out.setdefault(computation, []).append((name, op, rest))
  return out


def async_all_to_alls(hlo: str) -> dict:
  """{sync, async, overlapped, between}: all-to-all and ragged-all-to-all instructions that run
  synchronously (including a GPU start marked "is_sync":true), asynchronously (a start/done pair, or
  an async-start wrapping one), and of those how many have compute (fusions, matmuls, loops) scheduled
  between start and done; `between`: those compute counts."""
  comps = _instructions(hlo)
  has_a2a = {c for c, instrs in comps.items() if any(op in ("all-to-all", "ragged-all-to-all") for _, op, _ in instrs)}
  async_bodies = {m.group(1) for instrs in comps.values() for _, op, rest in instrs if op == "async-start"
                  for m in [re.search(r"calls=%?([\w.\-]+)", rest)] if m}
  out = {"sync": 0, "async": 0, "overlapped": 0, "between": []}
  for computation, instrs in comps.items():
    for k, (name, op, rest) in enumerate(instrs):
      if op in ("all-to-all", "ragged-all-to-all"):
        out["sync"] += computation not in async_bodies  # (else counted at its async-start)
        continue
      called = re.search(r"calls=%?([\w.\-]+)", rest)
      if not (op in ("all-to-all-start", "ragged-all-to-all-start")
              or (op == "async-start" and called is not None and called.group(1) in has_a2a)):
        continue
      if '"is_sync":true' in rest:
        out["sync"] += 1
        continue
      pending, done = {name}, len(instrs)
      for j in range(k + 1, len(instrs)):
        other, other_op, other_rest = instrs[j]
        if set(_operands(other_rest)) & pending:
          if other_op.endswith("-done"):
            done = j
            break
          pending.add(other)  # an async-update carries it on
      between = sum(1 for _, o, _ in instrs[k + 1:done] if o in _COMPUTE)
      out["async"] += 1
      out["overlapped"] += between > 0
      out["between"].append(between)
  return out


# ------------------------------------------------------------------ executed matmul FLOPs
_GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul", "__cublas$lt$matmul$f8")


def _dims(shape: str) -> list[int]:
  """The dimensions of an array shape ("bf16[8,32]{1,0}" -> [8, 32]); of a tuple, its first array."""
  m = re.search(r"[a-z][a-z0-9]*\[([0-9,]*)\]", shape)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def _listed(rest: str, key: str) -> list[int]:
  m = re.search(key + r"=\{([0-9,]*)\}", rest)
  return [int(x) for x in m.group(1).split(",") if x] if m else []


def _instruction_flops(shape: str, op: str, rest: str, shapes: dict) -> tuple[str, int]:
  """(kind, FLOPs) of one instruction's own matmul work (0 for anything else)."""
  out = math.prod(_dims(shape))
  operands = _operands(rest)
  lhs = _dims(shapes.get(operands[0], "")) if operands else []
  if op in ("dot", "ragged-dot"):
    k = math.prod(lhs[d] for d in _listed(rest, "lhs_contracting_dims") if d < len(lhs))
    return ("ragged_dot" if op == "ragged-dot" else "dot"), 2 * out * k
  if op == "convolution":
    labels = re.search(r"dim_labels=[^_]*_([^-]*)->", rest)
    kernel = _dims(shapes.get(operands[1], "")) if len(operands) > 1 else []
    if not labels or len(kernel) != len(labels.group(1)):
      return "convolution", 0
    o = labels.group(1).index("o")
    window = re.search(r"window=\{([^}]*)\}", rest)
    size = re.search(r"size=([0-9x]+)", window.group(1)) if window else None
    dilate = re.search(r"lhs_dilate=([0-9x]+)", window.group(1)) if window else None
    sizes = [int(k) for k in size.group(1).split("x")] if size else []
    dilates = [int(d) for d in dilate.group(1).split("x")] if dilate else [1] * len(sizes)
    lhs_labels = re.search(r"dim_labels=([^_]*)_", rest).group(1)
    spatial = {int(ch): lhs[i] for i, ch in enumerate(lhs_labels) if ch.isdigit() and i < len(lhs)}
    # the taps that land on the input, not on padding or dilation holes (XLA writes batched and
    # grouped matmuls as convolutions whose windows mostly cover padding)
    real = math.prod(min(-(-k // d), spatial.get(i, k)) for i, (k, d) in enumerate(zip(sizes, dilates)))
    return "convolution", 2 * out * math.prod(kernel) // max(kernel[o], 1) // max(math.prod(sizes), 1) * real
  if op == "custom-call" and any(f'custom_call_target="{t}"' in rest for t in _GEMM_TARGETS):
    m = re.search(r'"lhs_contracting_dimensions"\s*:\s*\[([^\]]*)\]', rest)
    dims = [int(x.strip().strip('"')) for x in m.group(1).split(",") if x.strip()] if m else []
    return "gemm", 2 * math.prod(_dims(shape)) * math.prod(lhs[d] for d in dims if d < len(lhs))
  return "", 0


def _matmul_costs(hlo: str):
  """(cost, entry, conditionals): cost(computation) -> (Counter of FLOPs by kind, trip counts known)
  for one execution of it; conditionals: [(op_name metadata, costliest branch's Counter)]."""
  comps: dict[str, list] = {}
  shapes: dict[str, str] = {}
  entry = ""
  for computation, entry, (name, shape, op, rest) in _walk(hlo):
    shapes[name] = shape
    if computation:
      comps.setdefault(computation, []).append((shape, op, rest))
  memo: dict[str, tuple[collections.Counter, bool]] = {}
  conditionals, loops = [], trip_counts(hlo)

  def branches_of(rest: str) -> list[str]:
    many = re.search(r"branch_computations=\{([^}]*)\}", rest)
    if many:
      return re.findall(r"%?([\w.\-]+)", many.group(1))
    return re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", rest)

  def cost(c: str, seen=()) -> tuple[collections.Counter, bool]:
    if c in memo:
      return memo[c]
    total, known = collections.Counter(), True
    if c in seen:  # not a call graph HLO can have
      return total, False
    for shape, op, rest in comps.get(c, []):
      kind, f = _instruction_flops(shape, op, rest, shapes)
      if f:
        total[kind] += f
      if op == "while":
        body = re.search(r"\bbody=%?([\w.\-]+)", rest).group(1)
        n = loops.get(body)
        inner, k = cost(body, seen + (c,))
        total.update({key: v * (1 if n is None else n) for key, v in inner.items()})
        known = known and k and n is not None
      elif op == "conditional":
        branches = [cost(b, seen + (c,)) for b in branches_of(rest)]
        if branches:
          top = max(branches, key=lambda b: sum(b[0].values()))[0]
          total.update(top)
          known = known and all(k for _, k in branches)
          name = re.search(r'op_name="([^"]*)"', rest)
          conditionals.append((name.group(1) if name else "", top))
      elif op not in ("all-reduce", "all-reduce-start", "reduce-scatter", "reduce", "reduce-window", "scatter",
                      "select-and-scatter", "sort", "map"):
        for callee in re.findall(r"\b(?:calls|to_apply)=%?([\w.\-]+)", rest):
          inner, k = cost(callee, seen + (c,))
          total.update(inner)
          known = known and k
    memo[c] = (total, known)
    return memo[c]

  return cost, entry, conditionals


def _summary(counter) -> dict:
  out = {kind: int(counter.get(kind, 0)) for kind in ("dot", "ragged_dot", "convolution", "gemm")}
  return {**out, "total": sum(out.values())}


def matmul_flops(hlo: str, scopes: tuple[str, ...] = ()) -> dict:
  """{dot, ragged_dot, convolution, gemm, total, trip_counts_known}: the matmul FLOPs one execution of
  the program's entry computation performs on one device. A while loop counts its body times its
  known trip count (an unknown one once, and trip_counts_known says so); a conditional counts its
  costliest branch (an upper bound where the branches differ; what a pipeline tick costs when any
  stage takes it, as the executor runs every slot in lockstep). With `scopes`, also {scope: FLOPs of
  one execution of the costliest branch of a conditional made under `jax.named_scope(scope)`}."""
  cost, entry, conditionals = _matmul_costs(hlo)
  total, known = cost(entry)
  out = {**_summary(total), "trip_counts_known": known}
  for scope in scopes:
    found = [c for name, c in conditionals if f"/{scope}/" in f"/{name}/"]
    out[scope] = max((_summary(c)["total"] for c in found), default=0)
  return out


def scoped_collectives(hlo: str, scope: str) -> list[dict]:
  """[{kind, shape, bytes, times}] of the collectives whose op_name metadata has the path segment
  `scope` (a collective-permute's bytes: its array's, once); `times`: executions per run of the entry
  computation, a conditional's branches each counted as taken (an upper bound)."""
  pattern = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
  calls, found, entry, trips = [], [], "", trip_counts(hlo)
  for computation, entry, instr in _walk(hlo):
    calls += _call_edges(computation, instr.rest, trips)
    line = f"= {instr.shape} {instr.op}({instr.rest}"
    m = pattern.search(line)
    name = re.search(r'op_name="([^"]*)"', instr.rest)
    if m and name and f"/{scope}/" in f"/{name.group(1)}/":
      array = re.search(r"[a-z][a-z0-9]*\[[0-9,]*\]", m.group(1)).group(0)
      found.append((computation, {"kind": m.group(2), "shape": array, "bytes": shape_bytes(array)}))
  times = _times(calls, entry)
  return [{**row, "times": times.get(c, (1, True))[0]} for c, row in found]


# ------------------------------------------------------------------ the buffers live at the peak
_LIVE = re.compile(r"\s+([\w.\-]+)\{([0-9,]*)\}: (\d+) bytes")


def _tuple_elements(shape: str) -> list[str]:
  """The top-level elements of a tuple shape "(s32[], f32[8]{0}, /*index=2*/(...))"."""
  inner, out, depth, cur = shape.strip()[1:-1], [], 0, ""
  inner = re.sub(r"/\*.*?\*/", "", inner)
  for ch in inner:
    if ch == "," and depth == 0:
      out.append(cur.strip())
      cur = ""
      continue
    depth += {"(": 1, ")": -1, "{": 1, "}": -1, "[": 1, "]": -1}.get(ch, 0)
    cur += ch
  return out + ([cur.strip()] if cur.strip() else [])


def _frames(hlo: str):
  """stack_frame_id -> [(file, function, line)] innermost first, from the module's frame tables."""
  tables = {}
  for section in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
    m = re.search(rf"^{section}\n((?:\d+ .*\n)*)", hlo, re.M)
    tables[section] = dict(re.findall(r"^(\d+) (.*)$", m.group(1), re.M)) if m else {}
  names = {k: v.strip('"') for k, v in tables["FileNames"].items()}
  funcs = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
  locs = {k: dict(re.findall(r"(\w+)=(\d+)", v)) for k, v in tables["FileLocations"].items()}
  frames = {k: dict(re.findall(r"(\w+)=(\d+)", v)) for k, v in tables["StackFrames"].items()}

  def stack(frame_id: str) -> list[tuple[str, str, int]]:
    out, seen = [], set()
    while frame_id in frames and frame_id not in seen:
      seen.add(frame_id)
      loc = locs.get(frames[frame_id].get("file_location_id", ""), {})
      out.append((names.get(loc.get("file_name_id", ""), "?"), funcs.get(loc.get("function_name_id", ""), "?"),
                  int(loc.get("line", 0))))
      parent = frames[frame_id].get("parent_frame_id")
      if parent == frame_id:
        break
      frame_id = parent
    return out

  return stack


def peak_buffers(hlo: str, live_ranges: str, top: int = 10, project=("moe/", "parallel/", "train/")) -> list[dict]:
  """The `top` largest buffers live at the program's peak (XLA's live-range dump, "Live ranges at N
  (peak)"), each with its bytes, array, the instruction and opcode that made it, the JAX op and the
  innermost source line in the project (`project` path parts) that made it."""
  live = []
  block = re.search(r"Live ranges at \d+ \(peak\):\n((?:\s+[\w.\-]+\{[0-9,]*\}: \d+ bytes.*\n)*)", live_ranges)
  for name, index, size in _LIVE.findall(block.group(1) if block else ""):
    live.append((int(size), name, index))
  live.sort(key=lambda x: (-x[0], x[1], x[2]))
  instrs, home, caller = {}, {}, {}
  for computation, _, (name, shape, op, rest) in _walk(hlo):
    instrs[name], home[name] = (shape, op, rest), computation
    for _, callee, _ in _call_edges(computation, rest):
      caller.setdefault(callee, rest)
  stack = _frames(hlo)
  rows = []
  for size, name, index in live[:top]:
    shape, op, line = instrs.get(name, ("?", "?", ""))
    if op == "parameter" and home.get(name) in caller:  # a loop's carry: where the loop (a scan) was made
      line = caller[home[name]] if "stack_frame_id" not in line else line
    if index and shape.startswith("("):
      elements = _tuple_elements(shape)
      i = int(index.split(",")[0])
      shape = elements[i] if i < len(elements) else shape
    array = re.search(r"[a-z][a-z0-9]*\[[0-9,]*\]", shape)
    op_name = re.search(r'op_name="([^"]*)"', line)
    frame = re.search(r"stack_frame_id=(\d+)", line)
    source = re.search(r'source_file="([^"]*)" source_line=(\d+)', line)
    where = f"{source.group(1)}:{source.group(2)}" if source else ""
    if frame and not where:
      frames = stack(frame.group(1))
      mine = [f for f in frames if any("/" + p in f[0] for p in project)] or frames
      if mine:
        path = mine[0][0]
        cut = min((path.find("/" + p) for p in project if "/" + p in path), default=-1)
        where = f"{path[cut + 1:] if cut >= 0 else path}:{mine[0][2]} ({mine[0][1]})"
    rows.append({"bytes": size, "array": array.group(0) if array else shape, "instruction": name + (
        f"{{{index}}}" if index else ""), "op": op, "jax_op": op_name.group(1) if op_name else "", "source": where})
  return rows
