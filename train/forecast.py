"""A step-time forecast from compiled HLO text: what one device executes, reads and sends per step,
and how long that takes on a chip (parallel/targets.py: CHIPS, each figure with its source).

  costs(hlo, granule)   per device and step: FLOPs by kind, HBM bytes, collectives by kind and link,
                        which collectives are asynchronous and how much compute the schedule puts
                        between their start and done, and the roofline time of it all on `chip`
  report(costs, ...)    step time, tokens/s per chip, model TFLOP/s per chip, MFU, exposed
                        communication, cost per million tokens

How it counts (one device; SPMD programs run the same on all):
- The program runs from its entry computation; a while loop runs its body its trip count times
  (train/hlo_loops.py: trip_counts, from known_trip_count or the loop's condition), a conditional its
  expected branch (the one not made under a named scope of UNLIKELY: the dropless exchange's chunks,
  which run only where its fast path does not fit), or its
  costliest as often as the caller says it runs (`taken`: a pipeline's slots, skipped in its bubble
  ticks), or else its costliest, a call its callee; `fallback_s` is what the step would add were every conditional
  to take its costliest branch instead. Fusions, reducers and sorting comparators are parts of one
  kernel, not programs of their own.
- FLOPs: dots and convolutions from their shapes (inside fusions too), ragged dots (XLA's, and
  libtpu's Mosaic kernels "ragged-dot-*": 2 x rows x K x N; the grouped Pallas kernels, FP8 ones at
  the FP8 peak), cuBLAS GEMM custom calls, the FP8 Pallas GEMM of the linears, the splash
  attention kernels (causal: half the blocks; forward 2 matmuls, dq 3, dkv 4, from q, k, v's
  shapes), and "other": one FLOP per element each elementwise or reduce operation makes.
- HBM bytes: each kernel's operands and results (a fusion's, not its insides; a grouped matmul's row
  arrays at the fill of its buffer, train.aot's `ragged_fill`), less what lives
  on chip (TPU: arrays in memory space S(1), VMEM), a fusion's operand that only feeds dynamic
  slices or gathers counting the slices, an in-place dynamic-update-slice its update (through any
  bitcasts: XLA:GPU relabels the layer stack's gradient accumulator so before updating it).
- Collectives: bytes each device puts on a link (ring algorithms): all-gather (n-1)/n x result,
  reduce-scatter (n-1)/n x operand (libtpu's: a fusion of an all-reduce and a dynamic slice), all-reduce 2(n-1)/n x operand, all-to-all (n-1)/n x operand
  (the part to members behind the slow link on it), ragged all-to-all as all-to-all of the smaller
  of its input and output buffers (an upper figure: a device sends no more than its input holds, and
  receives, as much as it sends under balanced routing, no more than its output holds; the dropless
  exchange sizes the receiving side for the worst case, n_ep x the balanced rows), collective-permute its
  operand, send (a TPU cross-slice transfer) its buffer. A group that spans granules (GPU hosts, TPU
  slices) with c of its n members on a device's granule moves (n - c) / n of the data across
  granules, shared by those c devices' slow links (NCCL's rings, one per rail, and XLA's cross-slice
  decomposition: (n - c) / (n c) of it on each), and (c - 1) / c of it inside the granule, the two one
  after the other; all-to-alls split by members: a member's rows to another granule cross its own
  slow link.
- Host transfers: a copy, a slice read or an update written between device and host memory (memory
  space 5: impl.remat_policy=full_offload's layer inputs) moves its bytes over the host link (PCIe;
  GB200's NVLink-C2C) at `host_bw`, asynchronously from its start to its done.
- Time: each kernel max(matmul FLOPs / peak, HBM bytes / HBM bandwidth) (f8 operands at the fp8
  peak, everything else at bf16's: f32 dots on TPU run one bf16 pass by default); each collective
  and host transfer bytes / link bandwidth, each link (fast, slow, host) carrying one transfer at a
  time in the order they start (collectives in flight together share it); a synchronous one waits
  for all of it, an asynchronous one's done for what the time since its start has not covered. No
  latency per kernel or per message: a forecast of the ideal schedule, so a lower bound on the step
  time; the measured error of it is in docs/pods.md.
- Loops (`summary`'s "loops"): for the loops that take most of the step, one iteration's time against
  what bounds it from below: its compute, each link's busy time, and its longest chain of dependencies
  (kernels and transfers at these rates, nothing shared); what the iteration takes beyond the largest
  of these is lost to the order the compiler put its work in.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import NamedTuple

from parallel.expert_parallel.exchange import FALLBACK, FAST_PATH
from train import hlo as hlo_lib
from train import hlo_loops, hlo_parse

# Named scopes of the branch of a conditional the program is not expected to take: the dropless
# exchange's chunks (parallel/expert_parallel/exchange.py: with_fast_path), which run only where some
# rank would receive more rows than the fast path's buffers hold; the conditional costs its other branch.
UNLIKELY = (FALLBACK,)
# Named scopes of operations whose grouped matmuls fill their buffers at `likely_fill` (the fast path's
# buffers are sized for the balanced share, not the worst case).
SIZED = (FAST_PATH,)

COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all",
                    "collective-permute", "send", "recv")
_CONTROL = ("while", "conditional", "call")
_FREE = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id", "add-dependency", "opt-barrier", "copy-done", "iota")
_FREE_TARGETS = ("AllocateBuffer", "AssumeGatherIndicesInBound", "PrepareAsyncCallStart", "PrepareAsyncCallDone",
                 "GatherScatterIndicesBitpacked", "Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape")
_ELEMENTWISE = ("add", "subtract", "multiply", "divide", "maximum", "minimum", "exponential", "log", "tanh",
                "rsqrt", "sqrt", "power", "negate", "abs", "select", "compare", "logistic", "exponential-minus-one",
                "log-plus-one", "cosine", "sine", "clamp", "reduce", "reduce-window", "convert", "and", "or", "xor",
                "sign", "floor", "ceil", "round-nearest-even", "atan2", "erf", "cbrt", "remainder", "is-finite")
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
# What the forecast's error is known to be (docs/pods.md, "Step-time forecast": the calibration).
ERROR = ("not measured: no run of this project on an accelerator yet (train.device_check measures it on a GPU);"
         " an ideal schedule at peak rates, so a lower bound of the step; docs/pods.md")


@dataclasses.dataclass(frozen=True)
class Chip:
  """What the forecast needs of one device (parallel/targets.py: CHIPS has them per chip, with sources)."""
  name: str
  peak_bf16: float  # FLOP/s per device
  peak_fp8: float
  hbm_bw: float  # bytes/s per device
  fast_bw: float  # bytes/s a device puts on the fast link for one collective (ICI ring, NVLink)
  slow_bw: float  # bytes/s per device across granules (DCN, the network)
  host_bw: float  # bytes/s one way between a device and host memory (PCIe, NVLink-C2C)


# ------------------------------------------------------------------ shapes
def _arrays(shape: str, on_chip: bool = True):
  """(dtype, elements, bytes) of the arrays in an HLO shape; on_chip False leaves out arrays in a
  memory space other than 0 (TPU's S(1): VMEM)."""
  for dtype, dims, layout in _ARRAY.findall(shape):
    if not on_chip and layout and re.search(r"S\([1-9]\d*\)", layout):
      continue
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    yield dtype, n, n * hlo_parse.dtype_bytes(dtype)


def _hbm(shape: str) -> int:
  return sum(b for _, _, b in _arrays(shape, on_chip=False))


def _elements(shape: str) -> int:
  return sum(n for _, n, _ in _arrays(shape))


# ------------------------------------------------------------------ the program
class Program:
  """HLO text parsed once: computations (instructions in schedule order), each instruction by name,
  loop trip counts, the module's partition count."""

  def __init__(self, hlo: str):
    m = hlo_parse.parse(hlo)
    self.comps, self.instrs, self.entry, self.size = m.comps, m.instrs, m.entry, m.size
    self.shapes = {name: ins.shape for name, ins in self.instrs.items()}
    self.trips = hlo_loops.trip_counts(hlo)
    self._stack = hlo_lib.frames(hlo)
    self.parts: dict[str, tuple] = {}  # instruction -> the parts of PARTS it belongs to (_parts)

  def source(self, ins) -> str:
    """The project source line that made an instruction (train/hlo.py: source_line), else its JAX op."""
    return hlo_lib.source_line(ins.rest, self._stack) or hlo_parse.op_name(ins.rest) or ins.op

  def shape(self, name: str) -> str:
    ins = self.instrs.get(name)
    return ins.shape if ins is not None else ""

  def collective_in(self, ins):
    """The collective inside a fusion (libtpu's async collective fusion: the start, the compute
    fusions that carry its steps, and the done each hold it), else None."""
    if ins.op != "fusion":
      return None
    return next((i for i in self.comps.get(self.called(ins) or "", []) if i.op in COLLECTIVE_KINDS[:6]), None)

  def called(self, ins, key: str = "calls") -> str | None:
    return hlo_parse.called(ins.rest, key)


# ------------------------------------------------------------------ one kernel
def _flops(p: Program, ins) -> tuple[collections.Counter, bool]:
  """(FLOPs by kind, fp8?) of one kernel: a fusion's insides, or the instruction itself."""
  out, fp8 = collections.Counter(), False
  todo = [ins]
  while todo:
    i = todo.pop()
    kind, f = hlo_lib.instruction_flops(i.shape, i.op, i.rest, p.shapes)
    if f:
      out["convolution" if kind == "convolution" else kind] += f
      fp8 = fp8 or any(p.shape(o).startswith("f8") for o in hlo_parse.operands(i.rest)[:2])
    elif i.op == "custom-call":
      kind, f = _custom_call_flops(p, i)
      out[kind] += f
      fp8 = fp8 or (f > 0 and re.search(r'op_name="[^"]*/fp8_[a-z_]*/pallas_call"', i.rest) is not None)
    elif i.op in _ELEMENTWISE:
      operand = hlo_parse.operands(i.rest)[:1]
      out["other"] += _elements(p.shape(operand[0]) if i.op.startswith("reduce") and operand else i.shape)
    if i.op == "fusion":
      todo += p.comps.get(p.called(i) or "", [])
  return out, fp8


def _constraints(rest: str) -> list[list[int]]:
  """The dimensions of a custom call's operand_layout_constraints (its operands' shapes)."""
  start = rest.find("operand_layout_constraints={")
  if start < 0:
    return []
  depth, i = 0, start + len("operand_layout_constraints=")
  for j in range(i, len(rest)):
    depth += {"{": 1, "}": -1}.get(rest[j], 0)
    if depth == 0:
      break
  return [[int(d) for d in dims.split(",") if d] for _, dims, _ in _ARRAY.findall(rest[i:j + 1])]


def _float_operands(rest: str) -> list[list[int]]:
  """The dimensions of a custom call's floating-point operands (from its layout constraints)."""
  start = rest.find("operand_layout_constraints={")
  text = rest[start:start + 4000] if start >= 0 else ""
  return [[int(d) for d in dims.split(",") if d] for dtype, dims, _ in _ARRAY.findall(text)
          if dtype.startswith(("f", "bf"))]


def _grouped_matmul(ins) -> tuple[int, int] | None:
  """(buffer rows, FLOPs over all of them) of a grouped-matmul kernel, from its shapes: libtpu's Mosaic
  "ragged-dot-*" kernels, megablox's gmm / tgmm (impl.experts=megablox) and the Triton grouped_gmm /
  grouped_tgmm (impl.experts=triton, moe/kernels/grouped_pallas.py): [rows, N] from [rows, K] x
  [groups, K, N] (or its transpose), or a weight gradient [groups, K, N] from [rows, K]^T (tgmm:
  [K, rows]) x [rows, N]. None for any other instruction."""
  name = ins.name
  ragged = name.startswith("ragged-dot") and not name.startswith("ragged-dot-metadata")
  megablox = re.fullmatch(r"t?gmm(\.\d+)?", name) and 'custom_call_target="tpu_custom_call"' in ins.rest
  triton = ('custom_call_target="__gpu$xla.gpu.triton"' in ins.rest
            and re.search(r'op_name="[^"]*/(grouped_t?gmm|fp8_grouped_matmul|fp8_grouped_wgrad)/pallas_call"', ins.rest))
  if ins.op != "custom-call" or not (ragged or megablox or triton):
    return None
  out, arrays = hlo_parse.dims(ins.shape), [d for d in _constraints(ins.rest) if len(d) == 2]
  if len(out) == 2:
    lhs = next((d for d in arrays if d[0] == out[0]), None)
    return (out[0], 2 * out[0] * out[1] * lhs[1]) if lhs else (0, 0)
  if len(out) == 3 and len(arrays) >= 2:
    rows = arrays[-1][0]  # the [rows, N] cotangent
    return rows, 2 * rows * out[1] * out[2]
  return 0, 0


def _grouped_bytes(p: Program, ins, fill: float) -> float:
  """HBM bytes of a grouped-matmul kernel: its row arrays (the [rows, K] operands, and a [rows, N]
  result) at `fill`, as it visits only the tiles of rows some group holds, and its weight arrays (the
  [groups, K, N] operand or result) whole, read once."""
  arrays = [hlo_parse.first_array(p.shape(o)) for o in hlo_parse.operands(ins.rest)] + [hlo_parse.first_array(ins.shape)]
  rows = sum(hlo_parse.shape_bytes(a) for a in arrays if a and len(hlo_parse.dims(a)) == 2)
  weights = sum(hlo_parse.shape_bytes(a) for a in arrays if a and len(hlo_parse.dims(a)) == 3)
  return rows * fill + weights


def _custom_call_flops(p: Program, ins) -> tuple[str, int]:
  """("ragged_dot" | "attention" | "gemm" | "custom_call", FLOPs) of a custom call, from its shapes."""
  target = re.search(r'custom_call_target="([^"]*)"', ins.rest)
  target = target.group(1) if target else ""
  if any(target == t for t in hlo_lib.GEMM_TARGETS):
    return hlo_lib.instruction_flops(ins.shape, ins.op, ins.rest, p.shapes)
  grouped = _grouped_matmul(ins)
  if grouped is not None:
    return ("ragged_dot", grouped[1]) if grouped[1] else ("custom_call", 0)
  if re.search(r'op_name="[^"]*/fp8_blockscaled_matmul/pallas_call"', ins.rest):  # a [M, K] @ b [K, N]
    out, arrays = hlo_parse.dims(ins.shape), _constraints(ins.rest)
    if len(out) == 2 and arrays and arrays[0][:1] == out[:1]:
      return "gemm", 2 * out[0] * out[1] * arrays[0][1]
  if (mla := re.search(r'op_name="[^"]*/mla_flash_(fwd|dkdv|dq)_qk(\d+)_v(\d+)/pallas_call"', ins.rest)) is not None:
    q = next((d for d in _float_operands(ins.rest) if len(d) == 4), None)  # q's first part: [batch, seq, heads, w]
    if q is not None:  # (moe/kernels/mla_flash.py: the widths it computes at are in its name)
      (b, s, h, _), qk, v = q, int(mla.group(2)), int(mla.group(3))
      macs = {"fwd": qk + v, "dkdv": 2 * qk + 2 * v, "dq": 2 * qk + v}[mla.group(1)]
      return "attention", b * h * s * s * macs  # 2 FLOPs per MAC x causal half
  if (gpu := re.search(r'op_name="[^"]*/(mha_forward|mha_backward)/pallas_call"', ins.rest)) is not None:
    qkv = [d for d in _float_operands(ins.rest) if len(d) == 4][:3]  # q, k, v: [batch, seq, heads, dim]
    if len(qkv) == 3:
      (b, sq, h, d), (_, skv, _, _) = qkv[:2]
      width = 1 << max(d - 1, 0).bit_length()  # the kernel computes at the head size padded to a power of two
      matmuls = 2 if gpu.group(1) == "mha_forward" else 7  # QK, PV; backward: dk/dv loop 4, dq loop 3
      return "attention", b * h * sq * skv * matmuls * width  # 2 FLOPs per MAC x causal half
  if ins.name.startswith("splash_mha"):
    qkv = [d for d in _float_operands(ins.rest) if len(d) >= 3][:3]  # q, k, v: [(batch,) heads, seq, dim]
    if len(qkv) == 3:
      (*bh, sq, dqk), (*_, skv, _), (*_, dv) = qkv
      matmuls = (dqk + dv) if "_fwd" in ins.name else (2 * dqk + dv) if "_dq" in ins.name else 2 * (dqk + dv)
      return "attention", math.prod(bh) * sq * skv * matmuls  # 2 FLOPs per MAC x causal half
  return "custom_call", 0


def _kernel_bytes(p: Program, ins) -> int:
  """HBM bytes a kernel reads and writes (see the module docstring)."""
  if ins.op in _FREE or ins.op.endswith("-done") or ins.op in _CONTROL:
    return 0
  if ins.op == "custom-call" and re.search(r'custom_call_target="(' + "|".join(_FREE_TARGETS) + ')"', ins.rest):
    return 0
  operands = hlo_parse.operands(ins.rest)
  if ins.op == "copy-start":  # (destination, source, context): a copy between memory spaces
    return _hbm(p.shape(operands[0])) + _hbm(hlo_parse.tuple_elements(ins.shape)[0]) if operands else 0
  if ins.op.endswith("-start"):  # the result holds the operands again
    return sum(_hbm(p.shape(o)) for o in operands)
  if ins.op == "dynamic-slice":
    return 2 * _hbm(ins.shape)
  if ins.op == "dynamic-update-slice":
    return 2 * _hbm(p.shape(operands[1])) if len(operands) > 1 else 0
  reads = [_hbm(p.shape(o)) for o in operands]
  write = _hbm(ins.shape)
  if (inner := p.collective_in(ins)) is not None:  # a step of an async collective: its buffers are the collective's
    chain = {hlo_parse.first_array(p.shape(o)) for o in hlo_parse.operands(inner.rest)} | {
        hlo_parse.first_array(inner.shape)}
    reads = [0 if hlo_parse.first_array(p.shape(o)) in chain else r for o, r in zip(operands, reads)]
    elements = hlo_parse.tuple_elements(ins.shape) if ins.shape.startswith("(") else [ins.shape]
    write = sum(_hbm(e) for e in elements if hlo_parse.first_array(e) not in chain)
  fused = p.comps.get(p.called(ins) or "", []) if ins.op == "fusion" else []
  if fused:
    params = {int(re.match(r"\s*(\d+)", i.rest).group(1)): i.name for i in fused if i.op == "parameter"}
    users = collections.defaultdict(list)
    for i in fused:
      for k, o in enumerate(hlo_parse.operands(i.rest)):
        users[o].append((i, k))

    def through_bitcasts(name, depth=4):  # (user, operand index), looking through bitcasts (free: the same bytes)
      out = []
      for u, j in users.get(name, []):
        out += through_bitcasts(u.name, depth - 1) if u.op == "bitcast" and depth else [(u, j)]
      return out

    for k, name in params.items():
      use = through_bitcasts(name)
      if k < len(reads) and use and all(u.op in ("dynamic-slice", "gather", "slice") and j == 0 for u, j in use):
        reads[k] = min(reads[k], sum(_hbm(u.shape) for u, _ in use))
      if k < len(reads) and use and all(u.op == "dynamic-update-slice" and j == 0 for u, j in use):
        update = sum(_hbm(p.shape(hlo_parse.operands(u.rest)[1])) for u, _ in use)
        reads[k], write = 0, min(write, update)  # in place: the update is written, the rest stays
  return sum(reads) + write


_HOST_MOVES = ("copy-start", "dynamic-slice-start", "dynamic-update-slice-start")


def _wrapped_move(p: Program, comp: str | None) -> str | None:
  """The move a fusion-start of `comp` makes: XLA:GPU writes a slice read out of a host buffer, or
  written into one, as a fusion-start of a computation holding that slice
  (wrapped_dynamic-slice_computation, its result sometimes copied); None for any other computation."""
  ops = {i.op for i in p.comps.get(comp or "", [])}
  return next((f"{op}-start" for op in ("dynamic-update-slice", "dynamic-slice") if op in ops), None)


def _host_move(p: Program, ins) -> tuple[str, int] | None:
  """("to-host" | "from-host", bytes) of an asynchronous move between device and host memory (memory
  space 5: impl.remat_policy=full_offload's layer inputs): a copy, a slice read out of a host buffer,
  or an update written into one; else None."""
  operands = hlo_parse.operands(ins.rest)
  op = (_wrapped_move(p, p.called(ins)) or ins.op) if ins.op == "fusion-start" else ins.op
  if op not in _HOST_MOVES or not operands:
    return None
  if op == "dynamic-update-slice-start":  # into operand 0, the update operand 1
    dst, src = p.shape(operands[0]), p.shape(operands[1]) if len(operands) > 1 else ""
  else:  # result (destination | (operands), result, context)
    dst, src = hlo_parse.tuple_elements(ins.shape)[0 if op == "copy-start" else 1], p.shape(operands[0])
  host = lambda shape: re.search(rf"S\({hlo_lib.HOST_MEMORY_SPACE}\)", shape) is not None
  if not src or host(dst) == host(src):
    return None
  return ("to-host" if host(dst) else "from-host"), min(hlo_parse.shape_bytes(dst), hlo_parse.shape_bytes(src))


# ------------------------------------------------------------------ collectives
# libtpu's reduce-scatter: a fusion calling a computation named all-reduce-scatter, an all-reduce of the
# whole array then this device's dynamic slice of it (its emitter "SingleInputAllReduceScatterFusion").
REDUCE_SCATTER_FUSION = "all-reduce-scatter"


def _collective(p: Program, ins) -> tuple[str, object] | None:
  """(kind, the instruction carrying the groups) of a collective or the start of one, else None."""
  op = ins.op.removesuffix("-start")
  if op in COLLECTIVE_KINDS[:6]:
    return op, ins
  if ins.op == "send" and "_xla_megascale_target" in ins.rest:
    return "send", ins
  if ins.op in ("async-start", "call-start"):  # (call-start: libtpu's offload to the SparseCores, tpu7x)
    for inner in p.comps.get(p.called(ins, "calls" if ins.op == "async-start" else "to_apply") or "", []):
      if inner.op in COLLECTIVE_KINDS[:6]:
        return inner.op, inner
  if ins.name.startswith(hlo_parse.FUSED_START) and (inner := p.collective_in(ins)) is not None:
    return inner.op, inner
  if (p.called(ins) or "").startswith(REDUCE_SCATTER_FUSION) and (inner := p.collective_in(ins)) is not None:
    return "reduce-scatter", inner  # (its all-reduce's operand is the whole array: a reduce-scatter's)
  return None


def _chain(p: Program, ins) -> str:
  """The key pairing an async collective's start with its done: the name, or for libtpu's fused form
  (hlo_parse.FUSED_START ... FUSED_DONE; the steps between are counted as the compute fusions they are)
  the collective's channel."""
  inner = p.collective_in(ins)
  channel = re.search(r"channel_id=(\d+)", inner.rest) if inner is not None else None
  return f"channel {channel.group(1)}" if channel else ins.name


def _link_bytes(p: Program, kind: str, ins, granule, split: bool = True) -> tuple[float, float, int]:
  """(fast bytes, slow bytes, group size) one device puts on the links for a collective (the worst
  device's, where groups differ); `granule`: replica-group position -> its GPU host or TPU slice.
  `split` False: a group that spans granules puts all of its bytes on the slow links (what moves
  only among the members of one granule counts as fast)."""
  operands = hlo_parse.operands(ins.rest)
  sizes = [hlo_parse.shape_bytes(p.shape(o)) for o in operands]
  if kind == "send":  # a TPU cross-slice transfer: its buffer, over the DCN
    array = hlo_parse.first_array(ins.shape)
    return 0.0, float(hlo_parse.shape_bytes(array) if array else 0), 2
  if kind == "collective-permute":
    pairs = hlo_parse.pairs_of(ins.rest)
    data = float(sizes[0]) if sizes else 0.0
    slow = any(granule(a) != granule(b) for a, b in pairs)
    return (0.0, data, 2) if slow else (data, 0.0, 2)
  groups = hlo_parse.groups_of(ins.rest, p.size)
  result = hlo_parse.shape_bytes(ins.shape if not ins.shape.startswith("(") or kind == "all-to-all"
                               else hlo_parse.tuple_elements(ins.shape)[-1])
  data = {"all-gather": result, "reduce-scatter": sum(sizes), "all-reduce": 2 * sum(sizes),
          "all-to-all": sum(sizes), "ragged-all-to-all": min(sizes[:2]) if sizes else 0}[kind]
  fast = slow = 0.0
  n = max(map(len, groups), default=1)
  for group in groups:
    at = collections.Counter(granule(i) for i in group)
    c = min(at[granule(i)] for i in group)  # the fewest members any device has on its granule
    if kind in ("all-to-all", "ragged-all-to-all"):
      m = len(group) - c  # the most members behind a device's slow link
      f, s = data * (len(group) - 1 - m) / len(group), data * m / len(group)
    elif not split:
      share = data * (len(group) - 1) / len(group)
      f, s = (share, 0.0) if c == len(group) else (0.0, share)
    else:  # across granules on c slow links, then inside the granule
      f, s = data * (c - 1) / c, data * (len(group) - c) / (len(group) * c)
    fast, slow = max(fast, f), max(slow, s)
  return fast, slow, n


# ------------------------------------------------------------------ the walk
@dataclasses.dataclass
class Cost:
  time: float = 0.0  # seconds
  compute: float = 0.0  # of which kernels
  exposed: float = 0.0  # of which communication not under compute
  flops: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  hbm: float = 0.0
  links: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (kind, fast|slow) -> bytes
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (kind, sync|async) -> n
  overlap: list = dataclasses.field(default_factory=list)  # async: (kind, comm s, of it hidden s, times)
  where: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (what, source) -> s
  matmul_where: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # source -> FLOPs
  links_where: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (link, source) -> bytes
  # (part, measure) -> value for the instructions made under a named scope of PARTS: measures "s"
  # (kernel time and exposed communication), "matmul" (FLOPs), "fast" and "slow" (collective bytes)
  parts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  known: bool = True
  fallback: float = 0.0  # seconds the step adds if every conditional takes its costliest branch
  busy: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # link -> s carrying
  path: float = 0.0  # the longest chain of dependencies through this computation (not added up by `add`)
  loops: list = dataclasses.field(default_factory=list)  # Loop per while loop run, with its times

  def add(self, other: "Cost", times: float = 1) -> None:
    self.time += other.time * times
    self.fallback += other.fallback * times
    self.compute += other.compute * times
    self.exposed += other.exposed * times
    self.hbm += other.hbm * times
    self.known = self.known and other.known
    for mine, theirs in ((self.flops, other.flops), (self.links, other.links), (self.counts, other.counts),
                         (self.where, other.where), (self.matmul_where, other.matmul_where),
                         (self.links_where, other.links_where), (self.parts, other.parts),
                         (self.busy, other.busy)):
      for k, v in theirs.items():
        mine[k] += v * times
    self.overlap += [(k, c, b, t * times) for k, c, b, t in other.overlap]
    self.loops += [loop._replace(runs=loop.runs * times) for loop in other.loops]


class Loop(NamedTuple):
  """One while loop: its body, the source line that made it, trips, and per iteration its forecast
  time, compute, each link's busy seconds and its longest chain of dependencies; `runs`: how often the
  loop itself runs."""
  body: str
  source: str
  trips: int
  iteration: float
  compute: float
  busy: dict
  path: float
  runs: float = 1

  def floors(self) -> dict:
    """What bounds one iteration from below: its compute, each link's busy time, its longest chain."""
    return {"compute": self.compute, **{f"{link} link": s for link, s in sorted(self.busy.items()) if s},
            "dependencies": self.path}


# named scopes whose share of the step is reported: the optimizer's update (train/core/step.py), its
# Newton-Schulz (train/core/muon.py), the redundant experts' moves (parallel/expert_parallel/copies.py),
# the pipeline executor's own transfers over `stage` (parallel/pipeline.py: TRANSFER)
PARTS = ("optimizer", "muon", "expert_copies", "stage_transfer")


def _parts(p: "Program", ins, depth: int = 8) -> tuple[str, ...]:
  """The parts of PARTS an instruction belongs to (nested scopes: each of them). One that XLA made
  without metadata (a rewritten dot, a copy) belongs to the parts its operands share."""
  if ins.name in p.parts:
    return p.parts[ins.name]
  if hlo_parse.op_name(ins.rest) is not None:
    out = tuple(part for part in PARTS if hlo_parse.in_scope(ins.rest, part))
  elif depth == 0:
    return ()
  else:
    found = [set(_parts(p, p.instrs[o], depth - 1)) for o in hlo_parse.operands(ins.rest) if o in p.instrs]
    out = tuple(sorted(set.intersection(*found))) if found else ()
  p.parts[ins.name] = out
  return out


def _unlikely(p: "Program", comp: str, depth: int = 3) -> bool:
  """Whether computation `comp` (a conditional's branch) holds an instruction made under a named
  scope of UNLIKELY, itself or in the computations it calls."""
  for ins in p.comps.get(comp, []):
    if any(hlo_parse.in_scope(ins.rest, scope) for scope in UNLIKELY):
      return True
    if depth and any(_unlikely(p, callee, depth - 1) for _, callee, _ in hlo_loops.call_edges(comp, ins.rest)):
      return True
  return False


def ragged_rows(hlo: str) -> int:
  """The most rows any grouped matmul of the program holds (its buffer: dropless exchanges size it for
  the worst case, and the grouped kernels skip the rows no group holds)."""
  rows = 0
  for ins in hlo_parse.parse(hlo).instrs.values():
    if ins.op == "ragged-dot":
      dims = hlo_parse.dims(ins.shape)
      rows = max(rows, dims[0] if len(dims) == 2 else 0)
    else:
      rows = max(rows, (_grouped_matmul(ins) or (0, 0))[0])
  return rows


def _share(rest: str, taken: dict) -> float | None:
  """The share of executions in which a conditional takes its costliest branch, from `taken` {named
  scope: share} by the scope it was made in (".../pipeline_forward/cond"); None for any other, such as
  a conditional inside one of those branches (".../pipeline_forward/cond/branch_1_fun/.../cond")."""
  parts = (hlo_parse.op_name(rest) or "").split("/")
  return taken.get(parts[-2]) if len(parts) > 1 else None


def costs(hlo: "str | Program", chip: Chip, granule=lambda i: 0, ragged_fill: float = 1.0,
          likely_fill: float | None = None, taken: dict | None = None, split: bool = True) -> Cost:
  """Cost of one execution of the program's entry computation on one device (module docstring).
  `granule(position)`: the host (GPU) or slice (TPU) of a replica-group position; all one by default.
  `ragged_fill`: the share of a ragged dot's rows that hold tokens (1: the buffers full, an upper
  figure; train.aot passes the balanced share); Cost.flops counts "ragged_dot" with it and
  "ragged_dot_buffer" without; `likely_fill` (default ragged_fill) the share in operations made under a
  named scope of SIZED (the dropless exchange's fast path, whose buffers are smaller than the chunked
  exchange's worst case). `taken` {named scope: share}: a conditional made under one of these
  scopes costs its costliest branch that share of its executions and its cheapest the rest (the
  pipeline's slots: parallel/pipeline.py Schedule.taken), instead of its costliest every time.
  `split` (_link_bytes): a collective across granules moves its bytes partly inside them."""
  p = hlo if isinstance(hlo, Program) else Program(hlo)
  memo: dict[str, Cost] = {}

  def kernel_time(ins) -> tuple[float, collections.Counter, float, str]:
    """(seconds, FLOPs by kind, HBM bytes, what bounds it: "matmul" or "hbm") of one kernel."""
    sized = likely_fill is not None and any(hlo_parse.in_scope(ins.rest, scope) for scope in SIZED)
    fill = likely_fill if sized else ragged_fill
    flops, fp8 = _flops(p, ins)
    if flops.get("ragged_dot"):
      flops["ragged_dot_buffer"] = flops["ragged_dot"]
      flops["ragged_dot"] = flops["ragged_dot"] * fill
    matmul = sum(v for k, v in flops.items() if k not in ("other", "ragged_dot_buffer"))
    hbm = _grouped_bytes(p, ins, fill) if _grouped_matmul(ins) else _kernel_bytes(p, ins)
    compute, memory = matmul / (chip.peak_fp8 if fp8 else chip.peak_bf16), hbm / chip.hbm_bw
    return max(compute, memory), flops, hbm, "matmul" if compute >= memory else "hbm"

  def run(c: str, seen=()) -> Cost:
    if c in memo:
      return memo[c]
    out = Cost()  # (out.time: the clock, seconds into this computation)
    pending: dict[str, list] = {}  # start (or an async-update carrying it) -> [kind, comm s, finish s, ...]
    free = collections.Counter()  # link (fast, slow, host) -> when it is next idle
    ready: dict[str, float] = {}  # instruction -> when its result is ready along its dependencies alone

    def occupy(busy: dict, together: bool) -> float:
      """When a transfer that keeps each link of `busy` {link: s} that long, starting now, is done: a
      link carries one transfer at a time, in the order they start (overlapping collectives share it),
      the links `together` or one after the other."""
      at = end = out.time
      for link, s in busy.items():
        out.busy[link] += s
        if s:
          free[link] = max(out.time if together else at, free[link]) + s
          at = end = max(end, free[link])
      return end
    for ins in p.comps.get(c, []) if c not in seen else []:
      t = 0.0
      operands = hlo_parse.operands(ins.rest)
      after = max((ready.get(o, 0.0) for o in operands), default=0.0)  # (transfers add theirs, loops their floor)
      if ins.op == "while":
        body, cond = p.called(ins, "body"), p.called(ins, "condition")
        n = p.trips.get(body)
        out.known = out.known and n is not None
        inner, each = Cost(), run(body, seen + (c,))
        inner.add(each)
        inner.add(run(cond, seen + (c,)))
        t = inner.time * (n or 1)
        out.add(inner, n or 1)
        loop = Loop(body, p.source(ins), n or 1, inner.time, inner.compute, dict(inner.busy), each.path)
        out.loops.append(loop)
        after += (n or 1) * max(loop.floors().values())  # (the loop at its floor: nothing shared)
        out.time -= t  # (added below)
      elif ins.op == "conditional":
        names = hlo_parse.branches(ins.rest)
        likely = [not _unlikely(p, b) for b in names]
        branches = [run(b, seen + (c,)) for b in names]
        share = _share(ins.rest, taken or {})
        if branches and share is not None:
          costliest, cheapest = max(branches, key=lambda b: b.time), min(branches, key=lambda b: b.time)
          t = share * costliest.time + (1 - share) * cheapest.time
          out.add(costliest, share)
          out.add(cheapest, 1 - share)
          out.time -= t
        elif branches:
          costliest = max(branches, key=lambda b: b.time)
          top = max((b for b, here in zip(branches, likely) if here), key=lambda b: b.time, default=costliest)
          t = top.time
          out.add(top)
          out.time -= t
          out.fallback += costliest.time - top.time
      elif ins.op == "call":
        inner = run(p.called(ins, "to_apply") or "", seen + (c,))
        t = inner.time
        out.add(inner)
        out.time -= t
        after += inner.path  # (the callee at its floor)
      elif (moved := _host_move(p, ins)) is not None:  # to or from host memory, asynchronous: over PCIe
        kind, nbytes = moved
        out.links[(kind, "host")] += nbytes
        out.counts[(kind, "async")] += 1
        comm = nbytes / chip.host_bw
        pending[ins.name] = [kind, comm, occupy({"host": comm}, False), p.source(ins), _parts(p, ins)]
        after += comm
      elif (found := _collective(p, ins)) is not None:
        kind, carrier = found
        fast, slow, _ = _link_bytes(p, kind, carrier, granule, split)
        out.links[(kind, "fast")] += fast
        out.links[(kind, "slow")] += slow
        out.links_where[("fast", p.source(carrier))] += fast
        out.links_where[("slow", p.source(carrier))] += slow
        parts = _parts(p, carrier)
        for part in parts:
          out.parts[(part, "fast")] += fast
          out.parts[(part, "slow")] += slow
        together = kind in ("all-to-all", "ragged-all-to-all")  # (each member's rows over both links at once)
        busy = {"fast": fast / chip.fast_bw, "slow": slow / chip.slow_bw}
        comm = max(busy.values()) if together else sum(busy.values())
        finish = occupy(busy, together)
        after += comm
        started = ins.op.endswith("-start") or ins.op == "async-start" or ins.name.startswith(hlo_parse.FUSED_START)
        asynchronous = started and '"is_sync":true' not in ins.rest
        out.counts[(kind, "async" if asynchronous else "sync")] += 1
        if asynchronous:
          pending[_chain(p, ins)] = [kind, comm, finish, p.source(carrier), parts]
        else:
          wait = finish - out.time
          out.exposed += wait
          out.time += wait
          out.where[(kind, p.source(ins))] += wait
          for part in parts:
            out.parts[(part, "s")] += wait
      elif ins.op.endswith(("-done", "-update")) or ins.name.startswith(hlo_parse.FUSED_DONE):
        for o in [_chain(p, ins)] if ins.op == "fusion" else operands:
          if o in pending:
            kind, comm, finish, source, parts = pending.pop(o)
            if ins.op.endswith("-update"):
              pending[ins.name] = [kind, comm, finish, source, parts]
              break
            wait = max(0.0, finish - out.time)
            out.overlap.append((kind, comm, max(0.0, comm - wait), 1))
            out.exposed += wait
            out.time += wait
            out.where[(kind, source)] += wait
            for part in parts:
              out.parts[(part, "s")] += wait
            break
      else:
        t, flops, hbm, bound = kernel_time(ins)
        out.flops.update(flops)
        out.hbm += hbm
        out.compute += t
        if t:
          out.where[(bound, p.source(ins))] += t
        matmul = sum(v for k, v in flops.items() if k not in ("other", "ragged_dot_buffer"))
        if matmul:
          out.matmul_where[p.source(ins)] += matmul
        for part in _parts(p, ins) if t or matmul else ():
          out.parts[(part, "s")] += t
          out.parts[(part, "matmul")] += matmul
      out.time += t
      ready[ins.name] = after if ins.op in ("while", "call") else after + t  # (kernels, the expected branch)
    out.path = max(ready.values(), default=0.0)
    for kind, comm, finish, source, parts in pending.values():  # a start without its done in this computation
      wait = max(0.0, finish - out.time)
      out.exposed += wait
      out.time += wait
      out.where[(kind, source)] += wait
      for part in parts:
        out.parts[(part, "s")] += wait
    memo[c] = out
    return out

  return run(p.entry)


def summary(cost: Cost) -> dict:
  """The per-device counts of a Cost as JSON: FLOPs by kind, HBM bytes, collective bytes by kind and
  link, sync/async counts and the overlap of the asynchronous ones."""
  links = {}
  host = {}  # impl.remat_policy=full_offload's copies to and from host memory
  for (kind, link), v in sorted(cost.links.items()):
    if link == "host":
      host[kind] = {"bytes": round(v), "count": round(cost.counts[(kind, "async")])}
    else:
      links.setdefault(kind, {"fast": 0, "slow": 0})[link] = round(v)
  for (kind, mode), v in cost.counts.items():
    if kind not in host:
      links.setdefault(kind, {"fast": 0, "slow": 0})[mode] = round(v)
  overlap = collections.defaultdict(lambda: [0.0, 0.0, 0.0])
  for kind, comm, between, times in cost.overlap:
    o = overlap[kind]
    o[0] += times
    o[1] += comm * times
    o[2] += min(comm, between) * times
  matmul = {k: int(v) for k, v in sorted(cost.flops.items()) if k not in ("other", "ragged_dot_buffer") and v}
  buffer = {"ragged_dot_buffer": int(cost.flops["ragged_dot_buffer"])} if cost.flops.get("ragged_dot_buffer") else {}
  return {"flops": {**matmul, "matmul": sum(matmul.values()), **buffer, "other": int(cost.flops.get("other", 0))},
          "hbm_bytes": round(cost.hbm), "collective_bytes": links, "host_transfers": host,
          "async": {k: {"count": round(v[0]), "comm_s": v[1], "hidden_s": v[2]} for k, v in sorted(overlap.items())},
          "trip_counts_known": cost.known, "fallback_s": float(f"{cost.fallback:.4g}"), "top": top(cost),
          "loops": loops(cost), **parts(cost)}


def loops(cost: Cost, n: int = 3) -> list[dict]:
  """The `n` loops that take most of the step, each with one iteration's forecast time against what
  bounds it from below (its compute, each link's busy time, its longest chain of dependencies):
  `bound` names the largest, `beyond_bound_s` is what the order of its work costs beyond it."""
  runs, first = collections.Counter(), {}
  for loop in cost.loops:
    runs[loop.body] += loop.runs
    first.setdefault(loop.body, loop)
  out = []
  for body in sorted(first, key=lambda b: -first[b].iteration * first[b].trips * runs[b])[:n]:
    loop = first[body]
    floors = loop.floors()
    bound = max(floors, key=floors.get)
    total = loop.iteration * loop.trips * runs[body]
    out.append({"body": body, "source": loop.source, "trips": loop.trips, "runs": float(f"{runs[body]:.4g}"),
                "iteration_s": float(f"{loop.iteration:.4g}"),
                "floors_s": {k: float(f"{v:.4g}") for k, v in floors.items()}, "bound": bound,
                "beyond_bound_s": float(f"{loop.iteration - floors[bound]:.4g}"),
                "share": round(total / cost.time, 3) if cost.time else 0.0})
  return out


def parts(cost: Cost) -> dict:
  """Each part of PARTS (the optimizer's update): its seconds (kernels and exposed communication),
  share of the step, matmul FLOPs and collective bytes per link."""
  out = {}
  for part in PARTS:
    s = cost.parts[(part, "s")]
    out[part] = {"s": float(f"{s:.4g}"), "share": round(s / cost.time, 4) if cost.time else 0.0,
                 "matmul_flops": int(cost.parts[(part, "matmul")]),
                 "collective_bytes": {link: round(cost.parts[(part, link)]) for link in ("fast", "slow")}}
  return out


def top(cost: Cost, n: int = 12) -> list[dict]:
  """Where the step's time goes: the `n` costliest (what, source) pairs, what being "matmul" or "hbm"
  for a kernel (whichever bounds it) or a collective's kind (its exposed time), source the project line
  that made it; seconds and share of the step."""
  rows = sorted(cost.where.items(), key=lambda kv: -kv[1])[:n]
  return [{"what": what, "source": source, "s": float(f"{t:.4g}"), "share": round(t / cost.time, 3) if cost.time else 0}
          for (what, source), t in rows]


def report(cost: Cost, chip: Chip, *, tokens: int, model_flops: float, chips: int, devices: int,
           price: float | None = None) -> dict:
  """The forecast of a step from a device's Cost: step time, tokens/s per chip, model TFLOP/s per chip,
  MFU against the chip's bf16 peak, the exposed communication's share, the cost per million tokens
  at `price` per chip-hour."""
  step = cost.time
  per_chip = devices / chips
  sig = lambda x: float(f"{x:.4g}")
  out = {"step_s": sig(step), "compute_s": sig(cost.compute), "exposed_comm_s": sig(cost.exposed),
         "exposed_comm_share": round(cost.exposed / step, 3) if step else 0.0}
  if step and tokens:
    out["tokens_per_s_per_chip"] = round(tokens / step / chips, 1)
  if step and model_flops:
    tflops = model_flops / step / chips / 1e12
    out["model_tflops_per_chip"] = round(tflops, 1)
    out["mfu"] = round(tflops * 1e12 / (chip.peak_bf16 * per_chip), 3)
    out["executed_over_model_flops"] = round(sum(v for k, v in cost.flops.items() if k not in (
        "other", "ragged_dot_buffer")) * devices
                                             / model_flops, 3)
  if step and tokens and price:
    out["usd_per_million_tokens"] = sig(price * chips * step / 3600 / (tokens / 1e6))
  return out


# ------------------------------------------------------------------ chips and links
def chip_of(family: str, path=None) -> Chip:
  """The per-device figures of a chip family (configs/hardware/chips.yaml: per chip, with sources)."""
  from parallel import targets

  hw = targets.hardware(family, **({"path": path} if path else {}))
  n = hw["devices_per_chip"]
  return Chip(family, hw["peak_bf16"] / n, hw["peak_fp8"] / n, hw["hbm_bw"] / n, hw["fast_bw"] / n, hw["slow_bw"] / n,
              hw["host_bw"] / n)


def granules(devices, size: int, platform: str):
  """position -> granule of a program's replica-group positions from its device assignment: the
  TPU slice (slice_index) or GPU host (process_index); a program that covers one TPU slice of
  several (libtpu compiles one per slice) numbers that slice's devices."""
  program = list(devices)
  if platform == "tpu":
    node = lambda d: getattr(d, "slice_index", 0)
    if size < len(program):
      program = [d for d in program if node(d) == node(program[0])][:size]
  else:
    node = lambda d: d.process_index
  return lambda i: node(program[i]) if i < len(program) else 0


def expected_ragged_fill(hlo: str, tokens_per_device: float, top_k: int, chunks: int) -> float:
  """The share of a ragged dot's buffer rows that hold tokens under balanced routing: a device's
  tokens x top_k / chunks rows (dropless exchanges in `chunks`), against the buffer's rows."""
  rows = ragged_rows(hlo)
  return min(1.0, tokens_per_device * top_k / max(chunks, 1) / rows) if rows else 1.0
