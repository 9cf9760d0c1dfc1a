"""Reports on compiled HLO text (`compiled.as_text()`, parsed by train/hlo_parse.py): what a program
runs and sends, and which buffers fill its memory (the bytes over the slow network: hlo_links.py).

  collectives(hlo)          {kind: {count, bytes}}: instructions in the program (a collective in a
                            scanned layer counts once) and the bytes of their results
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
import math
import re

from train import hlo_loops, hlo_parse
from train.hlo_parse import dims, operands


def collectives(hlo: str) -> dict:
  """{kind: {"count", "bytes"}} of the collectives in compiled HLO text (async pairs counted once)."""
  out, m = {}, hlo_parse.parse(hlo)
  called = {i.name: hlo_parse.called(i.rest) or "" for i in m.instrs.values() if i.op == "fusion"}
  steps = {c for name, c in called.items()  # libtpu's async collective fusion: the done and the compute
           if name.startswith(hlo_parse.FUSED_DONE) or c.startswith(hlo_parse.FUSED_STEP)}  # fusions
  for ins in m.instrs.values():
    kind = hlo_parse.collective_kind(ins.op)
    if kind and m.home[ins.name] not in steps:  # (that carry its steps hold its start's collective again)
      entry = out.setdefault(kind, {"count": 0, "bytes": 0})
      entry["count"] += 1
      entry["bytes"] += hlo_parse.shape_bytes(ins.shape)
  return out


# ------------------------------------------------------------------ asynchronous all-to-alls
_COMPUTE = ("fusion", "convolution", "dot", "custom-call", "while", "call", "conditional")
_A2A = ("all-to-all", "ragged-all-to-all")


def _starts_all_to_all(ins: hlo_parse.Instruction, has_a2a: set) -> bool:
  """Whether an instruction starts an asynchronous all-to-all (its own start, or an async-start of a
  computation holding one)."""
  if ins.op in ("all-to-all-start", "ragged-all-to-all-start"):
    return True
  return ins.op == "async-start" and hlo_parse.called(ins.rest) in has_a2a


def _compute_between(instrs: list, k: int) -> int:
  """The compute instructions scheduled between the start at instrs[k] and its done (following
  the async-updates that carry it on)."""
  pending, done = {instrs[k].name}, len(instrs)
  for j in range(k + 1, len(instrs)):
    if set(operands(instrs[j].rest)) & pending:
      if instrs[j].op.endswith("-done"):
        done = j
        break
      pending.add(instrs[j].name)  # an async-update carries it on
  return sum(1 for ins in instrs[k + 1:done] if ins.op in _COMPUTE)


def async_all_to_alls(hlo: str) -> dict:
  """{sync, async, overlapped, between}: all-to-all and ragged-all-to-all instructions that run
  synchronously (including a GPU start marked "is_sync":true), asynchronously (a start/done pair, or
  an async-start wrapping one), and of those how many have compute (fusions, matmuls, loops) scheduled
  between start and done; `between`: those compute counts. Scheduled HLO prints each computation's
  instructions in the order they run."""
  comps = hlo_parse.parse(hlo).comps
  has_a2a = {c for c, instrs in comps.items() if any(ins.op in _A2A for ins in instrs)}
  async_bodies = {hlo_parse.called(ins.rest) for instrs in comps.values() for ins in instrs if ins.op == "async-start"}
  out = {"sync": 0, "async": 0, "overlapped": 0, "between": []}
  for computation, instrs in comps.items():
    for k, ins in enumerate(instrs):
      if ins.op in _A2A:
        out["sync"] += computation not in async_bodies  # (else counted at its async-start)
      elif _starts_all_to_all(ins, has_a2a) and '"is_sync":true' in ins.rest:
        out["sync"] += 1
      elif _starts_all_to_all(ins, has_a2a):
        between = _compute_between(instrs, k)
        out["async"] += 1
        out["overlapped"] += between > 0
        out["between"].append(between)
  return out


# ------------------------------------------------------------------ executed matmul FLOPs
GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul", "__cublas$lt$matmul$f8")
# ops whose called computations are reducers or comparators, not programs of their own
_NOT_CALLS = ("all-reduce", "all-reduce-start", "reduce-scatter", "reduce", "reduce-window", "scatter",
              "select-and-scatter", "sort", "map")


def _listed(rest: str, key: str) -> list[int]:
  m = re.search(key + r"=\{([0-9,]*)\}", rest)
  return [int(x) for x in m.group(1).split(",") if x] if m else []


def _convolution_flops(out: int, lhs: list[int], kernel: list[int], rest: str) -> int:
  """FLOPs of a convolution: the window taps that land on the input, not on padding or dilation holes
  (XLA writes batched and grouped matmuls as convolutions whose windows mostly cover padding)."""
  labels = re.search(r"dim_labels=[^_]*_([^-]*)->", rest)
  if not labels or len(kernel) != len(labels.group(1)):
    return 0
  o = labels.group(1).index("o")
  window = re.search(r"window=\{([^}]*)\}", rest)
  size = re.search(r"size=([0-9x]+)", window.group(1)) if window else None
  dilate = re.search(r"lhs_dilate=([0-9x]+)", window.group(1)) if window else None
  sizes = [int(k) for k in size.group(1).split("x")] if size else []
  dilates = [int(d) for d in dilate.group(1).split("x")] if dilate else [1] * len(sizes)
  lhs_labels = re.search(r"dim_labels=([^_]*)_", rest).group(1)
  spatial = {int(ch): lhs[i] for i, ch in enumerate(lhs_labels) if ch.isdigit() and i < len(lhs)}
  real = math.prod(min(-(-k // d), spatial.get(i, k)) for i, (k, d) in enumerate(zip(sizes, dilates)))
  return 2 * out * math.prod(kernel) // max(kernel[o], 1) // max(math.prod(sizes), 1) * real


def instruction_flops(shape: str, op: str, rest: str, shapes: dict) -> tuple[str, int]:
  """(kind, FLOPs) of one instruction's own matmul work (0 for anything else); `shapes`: name -> shape."""
  out = math.prod(dims(shape))
  names = operands(rest)
  lhs = dims(shapes.get(names[0], "")) if names else []
  if op in ("dot", "ragged-dot"):
    k = math.prod(lhs[d] for d in _listed(rest, "lhs_contracting_dims") if d < len(lhs))
    return ("ragged_dot" if op == "ragged-dot" else "dot"), 2 * out * k
  if op == "convolution":
    kernel = dims(shapes.get(names[1], "")) if len(names) > 1 else []
    return "convolution", _convolution_flops(out, lhs, kernel, rest)
  if op == "custom-call" and any(f'custom_call_target="{t}"' in rest for t in GEMM_TARGETS):
    m = re.search(r'"lhs_contracting_dimensions"\s*:\s*\[([^\]]*)\]', rest)
    contracting = [int(x.strip().strip('"')) for x in m.group(1).split(",") if x.strip()] if m else []
    return "gemm", 2 * out * math.prod(lhs[d] for d in contracting if d < len(lhs))
  return "", 0


def _matmul_costs(hlo: str):
  """(cost, entry, conditionals): cost(computation) -> (Counter of FLOPs by kind, trip counts known)
  for one execution of it; conditionals: [(op_name metadata, costliest branch's Counter)]."""
  m = hlo_parse.parse(hlo)
  shapes = {name: ins.shape for name, ins in m.instrs.items()}
  memo: dict[str, tuple[collections.Counter, bool]] = {}
  conditionals, loops = [], hlo_loops.trip_counts(hlo)

  def cost(c: str, seen=()) -> tuple[collections.Counter, bool]:
    if c in memo:
      return memo[c]
    total, known = collections.Counter(), True
    if c in seen:  # not a call graph HLO can have
      return total, False
    for ins in m.comps.get(c, []):
      kind, f = instruction_flops(ins.shape, ins.op, ins.rest, shapes)
      if f:
        total[kind] += f
      if ins.op == "while":
        body = hlo_parse.called(ins.rest, "body")
        n = loops.get(body)
        inner, k = cost(body, seen + (c,))
        total.update({key: v * (1 if n is None else n) for key, v in inner.items()})
        known = known and k and n is not None
      elif ins.op == "conditional":
        branches = [cost(b, seen + (c,)) for b in hlo_parse.branches(ins.rest)]
        if branches:
          top = max(branches, key=lambda b: sum(b[0].values()))[0]
          total.update(top)
          known = known and all(k for _, k in branches)
          conditionals.append((hlo_parse.op_name(ins.rest) or "", top))
      elif ins.op not in _NOT_CALLS:
        for callee in re.findall(r"\b(?:calls|to_apply)=%?([\w.\-]+)", ins.rest):
          inner, k = cost(callee, seen + (c,))
          total.update(inner)
          known = known and k
    memo[c] = (total, known)
    return memo[c]

  return cost, m.entry, conditionals


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
  """[{kind, shape, bytes, times, groups}] of the collectives whose op_name metadata has the path segment
  `scope` (a collective-permute's bytes: its array's, once); `times`: executions per run of the entry
  computation, a conditional's branches each counted as taken (an upper bound); `groups`: the device
  positions that exchange data (a collective-permute's source-target pairs; "done" halves of async
  pairs: none)."""
  m = hlo_parse.parse(hlo)
  times = hlo_loops.executions(hlo_loops.module_calls(hlo), m.entry)
  rows = []
  for ins in m.instrs.values():
    kind = hlo_parse.collective_kind(ins.op)
    if kind and hlo_parse.in_scope(ins.rest, scope):
      array = hlo_parse.first_array(ins.shape)
      pairs = hlo_parse.pairs_of(ins.rest)
      groups = [list(g) for g in pairs] if pairs else hlo_parse.groups_of(ins.rest, m.size) if (
          "replica_groups" in ins.rest) else []
      rows.append({"kind": kind, "shape": array, "bytes": hlo_parse.shape_bytes(array),
                   "times": times.get(m.home[ins.name], (1, True))[0], "groups": groups})
  return rows


# ------------------------------------------------------------------ the buffers live at the peak
_LIVE = re.compile(r"\s+([\w.\-]+)\{([0-9,]*)\}: (\d+) bytes")


def frames(hlo: str):
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


def _live_at_peak(live_ranges: str) -> list[tuple[int, str, str]]:
  """(bytes, instruction, tuple index) of the buffers live at the peak of XLA's live-range dump ("Live
  ranges at N (peak)"), largest first."""
  block = re.search(r"Live ranges at \d+ \(peak\):\n((?:\s+[\w.\-]+\{[0-9,]*\}: \d+ bytes.*\n)*)", live_ranges)
  live = [(int(size), name, index) for name, index, size in _LIVE.findall(block.group(1) if block else "")]
  return sorted(live, key=lambda x: (-x[0], x[1], x[2]))


def _callers(m: hlo_parse.Module) -> dict[str, str]:
  """computation -> the rest of the line of the first instruction that calls it."""
  out = {}
  for ins in m.instrs.values():
    for _, callee, _ in hlo_loops.call_edges(m.home[ins.name], ins.rest):
      out.setdefault(callee, ins.rest)
  return out


def source_line(line: str, stack, project=("moe/", "parallel/", "train/")) -> str:
  """The source line that made an instruction: its source_file metadata, else the innermost frame of
  its stack in the project (`project` path parts), "path:line (function)"."""
  source = re.search(r'source_file="([^"]*)" source_line=(\d+)', line)
  if source:
    return f"{source.group(1)}:{source.group(2)}"
  frame = re.search(r"stack_frame_id=(\d+)", line)
  frames = stack(frame.group(1)) if frame else []
  mine = [f for f in frames if any("/" + p in f[0] for p in project)] or frames
  if not mine:
    return ""
  path = mine[0][0]
  cut = min((path.find("/" + p) for p in project if "/" + p in path), default=-1)
  return f"{path[cut + 1:] if cut >= 0 else path}:{mine[0][2]} ({mine[0][1]})"


def peak_buffers(hlo: str, live_ranges: str, top: int = 10, project=("moe/", "parallel/", "train/"),
                 assignment: str = "") -> list[dict]:
  """The `top` largest buffers live at the program's peak (XLA's live-range dump, "Live ranges at N
  (peak)"), each with its bytes, array, the instruction and opcode that made it, the JAX op and the
  innermost source line in the project (`project` path parts) that made it. The dump lists values, and
  values that share a buffer (a loop's carry and the in-place update that writes it) each; with XLA's
  buffer-assignment dump (`assignment`) each buffer is one row, named by the instruction that wrote
  it rather than the loop or parameter it passes through, and `aliases` counts the others. Buffers in
  host memory (memory space 5: what impl.remat_policy=full_offload keeps there) are not the device's
  and are left out."""
  m = hlo_parse.parse(hlo)
  caller, stack = _callers(m), frames(hlo)
  place = _placements(assignment)
  groups: dict = {}
  for size, name, index in _live_at_peak(live_ranges):
    where = place.get((name, index), (name, index, 0))
    if where[2] != HOST_MEMORY_SPACE:
      groups.setdefault(where[:2], []).append((size, name, index))
  def passes(name):  # a value that passes a buffer on (or only allocates it: libtpu's AllocateBuffer)
    ins = m.instrs.get(name)
    return ins is None or ins.op in _PASS_THROUGH or 'custom_call_target="AllocateBuffer"' in ins.rest

  def line_of(name):
    ins = m.instrs.get(name)
    line = ins.rest if ins is not None else ""
    if ins is not None and ins.op == "parameter" and m.home.get(name) in caller:  # a loop's carry: where the
      line = caller[m.home[name]] if "stack_frame_id" not in line else line  # loop (a scan) was made
    return line

  rows = []
  for values in sorted(groups.values(), key=lambda v: -v[0][0])[:top]:  # named by a writer, else one with a source
    size, name, index = min(values, key=lambda v: (passes(v[1]), not source_line(line_of(v[1]), stack, project),
                                                   values.index(v)))
    ins = m.instrs.get(name)
    shape, op, line = (ins.shape, ins.op, line_of(name)) if ins is not None else ("?", "?", "")
    if index and shape.startswith("("):
      elements = hlo_parse.tuple_elements(shape)
      i = int(index.split(",")[0])
      shape = elements[i] if i < len(elements) else shape
    rows.append({"bytes": size, "array": hlo_parse.first_array(shape) or shape,
                 "instruction": name + (f"{{{index}}}" if index else ""), "op": op,
                 "jax_op": hlo_parse.op_name(line) or "", "source": source_line(line, stack, project),
                 "aliases": len(values) - 1})
  return rows


# opcodes that pass a buffer on rather than write it: a peak row is named by another of its values
_PASS_THROUGH = {"parameter", "while", "conditional", "get-tuple-element", "tuple", "bitcast", "call"}
_VALUE = re.compile(r"value: <\d+ ([\w.\-]+)(?:\{([0-9,]*)\})?(?: \(phi\))? @(\d+)> \(size=\d+,offset=(\d+)\)")
HOST_MEMORY_SPACE = 5  # XLA's memory space ("@5", layouts' "S(5)") for host memory, on TPU and GPU


def _placements(assignment: str) -> dict:
  """(instruction, tuple index) -> (allocation, offset, memory space), from XLA's buffer-assignment dump."""
  out, allocation = {}, None
  for line in assignment.splitlines():
    if line.startswith("allocation "):
      allocation = line.split(":")[0]
    elif (v := _VALUE.search(line)) and allocation is not None:
      out.setdefault((v.group(1), v.group(2) or ""), (allocation, int(v.group(4)), int(v.group(3))))
  return out
