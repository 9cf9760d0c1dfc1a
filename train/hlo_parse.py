"""Compiled HLO text (`compiled.as_text()`) parsed once, for every reader of it (train/hlo.py,
hlo_loops.py, hlo_links.py, forecast.py): its instructions (name, result shape, opcode, the rest of
the line) by computation in schedule order, their operands, called computations, replica groups and
named scopes, and the bytes of a shape from the one table of dtype sizes.
"""

from __future__ import annotations

import functools
import math
import re
from typing import NamedTuple

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
               "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")  # an array of a shape without its layout: (dtype, dims)
COMPUTATION = re.compile(r"(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
CALLS = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
                   r"|\b(?:branch_computations|called_computations)=\{([^}]*)\}")
GROUPS = re.compile(r"replica_groups=(\{(?:\{[0-9,]*\},?)*\}|\[[0-9,]+\]<=\[[0-9,]+\](?:T\([0-9,]+\))?"
                    r"|mesh\[[^\]]*\](?:<=\[[0-9,]+\](?:T\([0-9,]+\))?)? \{[^}]*\})")


# ------------------------------------------------------------------ shapes
def dtype_bytes(dtype: str) -> int:
  """Bytes of one element of an HLO dtype (token: 0; one the table lacks: 4)."""
  return DTYPE_BYTES.get(dtype, 0 if dtype == "token" else 4)


def shape_bytes(shape: str) -> int:
  """Bytes of the arrays in an HLO shape ("f32[8,32]{1,0}", "(bf16[4], s32[])"; token[] is 0)."""
  return sum(math.prod(int(d) for d in dims.split(",") if d) * dtype_bytes(dtype)
             for dtype, dims in _ARRAY.findall(shape))


def dims(shape: str) -> list[int]:
  """The dimensions of an array shape ("bf16[8,32]{1,0}" -> [8, 32]); of a tuple, its first array."""
  m = _ARRAY.search(shape)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def first_array(shape: str) -> str | None:
  """The first array of a shape without its layout ("(bf16[4]{0}, u32[])" -> "bf16[4]"), or None."""
  m = _ARRAY.search(shape)
  return m.group(0) if m else None


def tuple_elements(shape: str) -> list[str]:
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


# ------------------------------------------------------------------ one instruction
class Instruction(NamedTuple):
  """One HLO instruction line: name, result shape, opcode, the text after the opcode's parenthesis."""
  name: str
  shape: str
  op: str
  rest: str


_HEAD = re.compile(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_SHAPE_ARRAY = re.compile(r"[a-z][a-z0-9]*\[[0-9,]*\](?:\{[^}]*\})?")
_OP = re.compile(r"\s+([a-z][\w\-]*)\((.*)$")


def _tuple_end(line: str, i: int) -> int | None:
  """The index of the parenthesis closing the one at line[i], or None."""
  depth = 0
  for j in range(i, len(line)):
    depth += {"(": 1, ")": -1}.get(line[j], 0)
    if depth == 0:
      return j
  return None


def instruction(line: str) -> Instruction | None:
  """The instruction on a line of HLO text, or None. A tuple shape is read to its balanced
  parenthesis, since TPU layouts put parentheses inside it ("{1,0:T(8,128)(2,1)}")."""
  head = _HEAD.match(line)
  if not head:
    return None
  i = head.end()
  if line.startswith("(", i):
    j = _tuple_end(line, i)
    if j is None:
      return None
    shape, k = line[i:j + 1], j + 1
  else:
    array = _SHAPE_ARRAY.match(line, i)
    if not array:
      return None
    shape, k = array.group(0), array.end()
  op = _OP.match(line, k)
  return Instruction(head.group(1), shape, op.group(1), op.group(2)) if op else None


def operands(rest: str, elements: bool = False) -> list[str]:
  """Operand names of an instruction, from the text after its opening parenthesis. `elements`: keep
  libtpu 0.0.50's `#k` of an operand that is element k of a tuple (`%param#0`), else dropped."""
  depth, end = 1, len(rest)
  for i, ch in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      end = i
      break
  named = re.findall(r"%([\w.\-]+(?:#\d+)?)" if elements else r"%([\w.\-]+)", rest[:end])
  return named or [w.split()[-1] for w in rest[:end].split(",") if w.strip()]


def called(rest: str, key: str = "calls") -> str | None:
  """The computation an instruction names by `key` (calls, to_apply, body, condition), or None."""
  m = re.search(rf"\b{key}=%?([\w.\-]+)", rest)
  return m.group(1) if m else None


def branches(rest: str) -> list[str]:
  """The branch computations of a conditional."""
  many = re.search(r"branch_computations=\{([^}]*)\}", rest)
  if many:
    return re.findall(r"%?([\w.\-]+)", many.group(1))
  return re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", rest)


def op_name(rest: str) -> str | None:
  """The JAX operation (with its named scopes) an instruction's metadata names, or None."""
  m = re.search(r'op_name="([^"]*)"', rest)
  return m.group(1) if m else None


def in_scope(rest: str, scope: str) -> bool:
  """Whether an instruction was made under `jax.named_scope(scope)` (a path segment of its op_name)."""
  name = op_name(rest)
  return name is not None and f"/{scope}/" in f"/{name}/"


# libtpu's async collective fusion (xla_tpu_enable_async_collective_fusion): a collective starts in a
# fusion named async-collective-start.N, its steps ride in compute fusions calling async_collective_fusion.N,
# and it ends in async-collective-done.N; all three hold the same collective (one channel_id).
FUSED_START, FUSED_STEP, FUSED_DONE = ("async-collective-start", "async_collective_fusion",
                                       "async-collective-done")


def collective_kind(op: str) -> str | None:
  """The collective an opcode is or starts ("all-gather-start" -> "all-gather"), or None."""
  base = op.removesuffix("-start")
  return base if base in COLLECTIVES else None


def replica_groups(text: str, n: int) -> list[list[int]]:
  """The groups of an HLO `replica_groups=` value: explicit ("{{0,1},{2,3}}"; "{}" is one group of
  all `n`), iota ("[G,S]<=[d0,d1,...]T(perm)": iota(d0*d1*...) reshaped to dims, transposed by
  perm, reshaped to G groups of S) or a mesh's axes ("mesh['a'=4,'b'=2] {'a'}": iota(8) as a [4, 2]
  mesh, one group per 'b' of the 4 devices along 'a'; libtpu writes these)."""
  m = re.fullmatch(r"mesh\[([^\]]*)\](?:<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?)? \{([^}]*)\}", text)
  if m:
    return _mesh_groups(*m.groups())
  m = re.fullmatch(r"\[(\d+),(\d+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", text)
  if m:
    shape = [int(x) for x in m.group(3).split(",")]
    ids = np.arange(math.prod(shape)).reshape(shape)
    if m.group(4):
      ids = ids.transpose([int(x) for x in m.group(4).split(",")])
    return ids.reshape(int(m.group(1)), int(m.group(2))).tolist()
  groups = [[int(x) for x in g.split(",")] for g in re.findall(r"\{([0-9,]+)\}", text)]
  return groups or [list(range(n))]


def _mesh_groups(axes_text: str, order: str | None, perm: str | None, grouped_text: str) -> list[list[int]]:
  """mesh['a'=4,'b'=2] {'a'}: the devices of a mesh (iota, or as listed) grouped along the named axes."""
  axes = re.findall(r"'([^']+)'=(\d+)", axes_text)
  sizes = [int(k) for _, k in axes]
  ids = np.arange(math.prod(sizes))
  if order:
    ids = ids.reshape([int(x) for x in order.split(",")])
    ids = ids.transpose([int(x) for x in perm.split(",")]) if perm else ids
  ids = ids.reshape(sizes)
  names = [a for a, _ in axes]
  grouped = [names.index(a) for a in re.findall(r"'([^']+)'", grouped_text)]
  rest = [i for i in range(len(sizes)) if i not in grouped]
  size = math.prod(sizes[i] for i in grouped)
  return ids.transpose(rest + grouped).reshape(-1, size).tolist()


def groups_of(rest: str, n: int) -> list[list[int]]:
  """The replica groups of a collective (positions in the program's device assignment)."""
  g = GROUPS.search(rest)
  return replica_groups(g.group(1) if g else "{}", n)


PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")


def pairs_of(rest: str) -> list[tuple[int, int]]:
  """The (source, target) positions of a collective-permute (none for another instruction)."""
  m = PAIRS.search(rest)
  return [tuple(map(int, x)) for x in re.findall(r"\{(\d+),(\d+)\}", m.group(1))] if m else []


# ------------------------------------------------------------------ the module
def walk(hlo: str):
  """(computation, entry computation so far, Instruction) for each instruction of HLO text (a line
  before any computation's header: computation "")."""
  computation = entry = ""
  for line in hlo.splitlines():
    head = COMPUTATION.match(line)
    if head and "=" not in line.split("(", 1)[0]:
      computation = head.group(1)
      entry = computation if line.startswith("ENTRY") else entry
      continue
    instr = instruction(line)
    if instr:
      yield computation, entry, instr


class Module(NamedTuple):
  """HLO text parsed once (shared: read it, never change it)."""
  comps: dict[str, list[Instruction]]  # computation -> its instructions in schedule order
  instrs: dict[str, Instruction]  # every instruction by name
  home: dict[str, str]  # instruction name -> its computation
  entry: str  # the entry computation
  size: int  # devices the program runs on (partitions x replicas)

  def shape(self, name: str) -> str:
    ins = self.instrs.get(name)
    return ins.shape if ins is not None else ""


def program_size(hlo: str) -> int:
  """The devices an SPMD program runs on: its module's num_partitions x replica_count."""
  parts = re.search(r"num_partitions=(\d+)", hlo)
  replicas = re.search(r"replica_count=(\d+)", hlo)
  return (int(parts.group(1)) if parts else 1) * (int(replicas.group(1)) if replicas else 1)


@functools.lru_cache(maxsize=4)
def parse(hlo: str) -> Module:
  """The Module of HLO text (instructions before any computation's header belong to none)."""
  comps, instrs, home, entry = {}, {}, {}, ""
  for computation, entry, ins in walk(hlo):
    if computation:
      comps.setdefault(computation, []).append(ins)
    instrs[ins.name], home[ins.name] = ins, computation
  return Module(comps, instrs, home, entry, program_size(hlo))
