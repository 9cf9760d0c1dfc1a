"""Pipeline parallelism over the `stage` mesh axis: the layout of the pipelined layers, the schedules,
and the executor that runs one schedule as a scan over ticks in SPMD JAX.

The pipelined layers (the model's MoE stack) are split into C = stages x repeats chunks; chunk c runs
on stage c mod N. A layer count that does not split evenly is padded: chunk c holds L // C layers, the
first L mod C chunks one more, and the empty places are padding slots that the stage skips. The stack
is stored in slot order (`Layout.slot_layer`), stage-major, so that sharding its leading axis over
`stage` gives each stage its chunks: slot s*R*P + r*P + j is layer j of chunk r*N + s (P: the largest
chunk). With one stage the slot order is the layer order.

Schedules (a tick is one forward slot then one backward slot on every stage; activations move one
stage forward and cotangents one stage back by `ppermute` at the end of each tick):
  gpipe     every forward, then every backward (a stage holds all M micro-batches' inputs)
  circular  gpipe over R repeats: micro-batch m passes the stages R times, chunk r*N + s on stage s
            (bubble (N-1) / (M*R + N-1) instead of (N-1) / (M + N-1)); holds M*R inputs
  1f1b      a backward as soon as its cotangent arrives, in the same tick as a forward: after the
            warm-up every tick runs one forward and one backward of different micro-batches, and
            stage s holds 2(N-1-s)+1 micro-batches' inputs, however large M is. Each tick pairs a
            forward with a backward (rather than alternating F and B ticks, whose mixed ticks each cost
            a backward in lockstep), so the warm-up and drain take 2(N-1) ticks.

The executor (`run`) is one `jax.shard_map` manual over `stage` only (the other axes stay automatic:
FSDP gathers, tensor parallelism and the expert-parallel shard_map nest inside, within the stage's
devices), a `lax.scan` over the schedule's ticks, and per tick a forward slot and a backward slot
whose work each stage's row of the schedule tables chooses. Each forward runs once: it is taken under
`jax.vjp` in its F tick and keeps what its backward needs (the residuals that `impl.remat_policy`
leaves, minus the arrays the backward has anyway: the chunk's weights, its input, the micro-batch) in a
stash of as many slots as the schedule needs; the B tick only runs the pullback (Megatron's 1F1B keeps
its activations the same way). `first_fn` (embedding, dense layers) keeps its residuals likewise, and
`last_fn` (norm, head, MTP, loss) runs with its pullback in the last chunk's F tick, whose cotangent
waits in the last stage's cotangent slots for the chunk's backward. The first chunk's input cotangents
go back through first_fn's pullback.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from parallel.common.errors import ConfigError, require
from parallel.common.typed_config import check_fields

Kind = Literal["gpipe", "circular", "1f1b"]
AXIS = "stage"
# the named scopes of the executor's conditionals, read back from the compiled HLO (train/hlo.py)
SCOPES = ("pipeline_forward", "pipeline_backward", "pipeline_first", "pipeline_last", "pipeline_first_backward")
TRANSFER = "stage_transfer"  # the scope of every collective the executor itself makes over `stage`
F_COST, B_COST = 1, 2  # a backward runs the pullback of its F tick's forward (plus what the remat policy recomputes)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """`pipeline:` section. `microbatches` M splits each (grad-accumulation) micro-batch into M for the
  pipeline (null: as many as stages); `repeats` R: chunks per stage (circular only); `gather_once`:
  a stage's weights gathered over fsdp once per run and held whole over fsdp through the schedule
  (FSDP's reshard_after_forward=False), instead of gathered again in every tick's forward and
  backward: the memory of the stage's weights whole over fsdp (its matrices as the bf16 copies the
  layers compute with) for 1/T of their gathers. Their
  gradients are still reduce-scattered in each backward (XLA sums a tick's partial gradient at once:
  holding it whole over fsdp made that an all-reduce per tick)."""

  schedule: Kind = "gpipe"
  microbatches: int | None = None
  repeats: int = 1
  gather_once: bool = False

  def __post_init__(self):
    check_fields(self, "pipeline.")
    require(self.microbatches is None or self.microbatches >= 1,
            f"pipeline.microbatches={self.microbatches} must be >= 1 or null (as many as stages)")
    require(self.repeats >= 1, f"pipeline.repeats={self.repeats} must be >= 1")
    require(self.schedule == "circular" or self.repeats == 1,
            f"pipeline.repeats={self.repeats} needs pipeline.schedule=circular")
    require(self.schedule != "circular" or self.repeats >= 2,
            "pipeline.schedule=circular needs pipeline.repeats >= 2 (with one repeat it is gpipe)")


# ----------------------------------------------------------------------------------------- layout
@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each of `layers` pipelined layers is stored: `stages` x `repeats` chunks of up to
  `per_chunk` layers, in slot order."""

  layers: int
  stages: int = 1
  repeats: int = 1

  def __post_init__(self):
    if self.stages > 1 and self.layers < self.chunks:
      raise ConfigError(f"pipeline: {self.layers} MoE layers cannot fill stage x repeats = {self.chunks} chunks;"
                        " use fewer stages or repeats")

  @property
  def chunks(self) -> int:
    return self.stages * self.repeats

  @property
  def per_chunk(self) -> int:
    return -(-self.layers // self.chunks)

  @property
  def slots(self) -> int:
    return self.layers if self.stages == 1 else self.chunks * self.per_chunk

  def chunk_sizes(self) -> list[int]:
    c = self.chunks
    return [self.layers // c + (i < self.layers % c) for i in range(c)]

  def slot_layer(self) -> np.ndarray:
    """[slots] the layer stored in each slot, -1 for padding."""
    if self.stages == 1:
      return np.arange(self.layers)
    out = np.full(self.slots, -1)
    n, p, first = self.stages, self.per_chunk, 0
    for c, size in enumerate(self.chunk_sizes()):
      s, r = c % n, c // n
      base = s * self.repeats * p + r * p
      out[base:base + size] = np.arange(first, first + size)
      first += size
    return out

  def layer_slot(self) -> np.ndarray:
    """[layers] the slot of each layer."""
    out = np.empty(self.layers, np.int64)
    for slot, layer in enumerate(self.slot_layer()):
      if layer >= 0:
        out[layer] = slot
    return out

  def describe(self) -> str:
    if self.stages == 1:
      return f"{self.layers} layers in layer order"
    sizes = self.chunk_sizes()
    pad = f", {self.slots - self.layers} padding slot(s)" if self.slots > self.layers else ""
    return f"{self.layers} layers in {self.chunks} chunks of {min(sizes)}-{max(sizes)}{pad}"


def convert(x, src: Layout, dst: Layout, fill=0.0):
  """A stacked [src.slots, ...] array in `dst`'s slot order (padding slots filled with `fill`)."""
  if src == dst:
    return x
  idx = src.layer_slot()[np.maximum(dst.slot_layer(), 0)]
  out = jnp.take(x, jnp.asarray(idx), axis=0)
  pad = jnp.asarray(dst.slot_layer() < 0).reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.where(pad, jnp.asarray(fill, x.dtype), out)


# -------------------------------------------------------------------------------------- schedules
@dataclasses.dataclass(frozen=True)
class Schedule:
  """Static tables [ticks, stages] of what each stage does at each tick (-1: nothing)."""

  kind: str
  stages: int
  microbatches: int
  repeats: int
  act_in: np.ndarray  # stash slot the arriving activation goes to
  cot_in: np.ndarray  # cotangent slot the arriving cotangent goes to
  fwd: np.ndarray  # 1: run a chunk's forward (0: none)
  f_mb: np.ndarray
  f_rep: np.ndarray  # which of the stage's chunks (its repeat)
  f_slot: np.ndarray  # stash slot of the input and the residuals (chunk 0: where first_fn's output goes)
  f_cot: np.ndarray  # the last chunk: cotangent slot where last_fn's cotangent waits for the backward
  bwd: np.ndarray  # 1: run a chunk's backward (0: none)
  b_mb: np.ndarray
  b_rep: np.ndarray
  b_slot: np.ndarray
  b_cot: np.ndarray  # cotangent slot
  stash: int  # stash slots per stage (inputs and residuals held)
  cots: int  # cotangent slots per stage

  @property
  def ticks(self) -> int:
    return self.fwd.shape[0]

  @property
  def any_f(self) -> np.ndarray:
    """[ticks] whether some stage has a forward: the ticks whose forward slot `run` runs."""
    return self.fwd.max(axis=1) > 0

  @property
  def any_b(self) -> np.ndarray:
    """[ticks] whether some stage has a backward: the ticks whose backward slot `run` runs."""
    return self.bwd.max(axis=1) > 0

  def work(self) -> int:
    """The chunk work the schedule does, a forward costing 1 and a backward 2."""
    return int((self.fwd * F_COST + self.bwd * B_COST).sum())

  def executed(self) -> int:
    """The chunk work `run` executes: every stage runs a tick's forward slot when any stage has a
    forward then, and its backward slot when any has a backward (the others' results masked)."""
    return int(self.stages * (self.any_f * F_COST + self.any_b * B_COST).sum())

  def taken(self) -> dict:
    """{scope of SCOPES: the share of its enclosing code's executions in which that conditional of
    `run` does its work}: the forward and backward slots of the ticks (taken when any stage has one),
    first_fn and last_fn of a forward slot, first_fn's backward of a backward slot. What a reader of
    the compiled program (train/forecast.py) needs to count a conditional as often as it runs."""
    f_ticks, b_ticks = int(self.any_f.sum()), int(self.any_b.sum())
    m = self.microbatches
    return {"pipeline_forward": f_ticks / self.ticks, "pipeline_backward": b_ticks / self.ticks,
            "pipeline_first": m / max(f_ticks, 1), "pipeline_last": m / max(f_ticks, 1),
            "pipeline_first_backward": m / max(b_ticks, 1)}

  def bubble(self) -> float:
    """The share of the executed chunk work that is masked out: the pipeline bubble."""
    return 1 - self.work() / self.executed()

  def textbook_bubble(self) -> float:
    """The usual prediction, (N-1) / (M*R + N-1) (1F1B's is GPipe's; `bubble` is this executor's)."""
    n, m, r = self.stages, self.microbatches, self.repeats
    return (n - 1) / (m * r + n - 1)

  def flops(self, slot: dict) -> dict:
    """FLOPs of the pipelined layers' part of a step per device, from `slot`: {scope: FLOPs of one
    execution of that slot of `run`} (SCOPES, read from the compiled program by train.hlo.matmul_flops;
    a forward slot includes first_fn and last_fn, a backward slot first_fn's backward).
    `work`: per stage, what its chunks, first_fn and last_fn need (every stage runs first_fn and
    last_fn on its block of each micro-batch's rows); `executed`: what every device runs in lockstep,
    bubbles included."""
    first, last, first_b = (slot.get(k, 0) for k in ("pipeline_first", "pipeline_last", "pipeline_first_backward"))
    chunk_f = slot.get("pipeline_forward", 0) - first - last
    chunk_b = slot.get("pipeline_backward", 0) - first_b
    ends = self.microbatches * (first + last + first_b)
    work = [int(self.fwd[:, s].sum() * chunk_f + self.bwd[:, s].sum() * chunk_b + ends) for s in range(self.stages)]
    executed = self.any_f.sum() * chunk_f + self.any_b.sum() * chunk_b + ends
    return {"work": work, "executed": int(executed)}

  def describe(self) -> str:
    return (f"pipeline {self.kind}: {self.stages} stages x {self.repeats} repeat(s), {self.microbatches} micro-batches,"
            f" {self.ticks} ticks, bubble {self.bubble():.1%} (textbook {self.textbook_bubble():.1%}), stash"
            f" {self.stash} activation(s) per stage")


def _allocate(intervals: dict, n_stages: int, stage_of) -> tuple[dict, int]:
  """Slot per key from {key: (first tick, last tick)}: the lowest slot free on the key's stage."""
  slot, most = {}, 0
  busy = {s: [] for s in range(n_stages)}  # per stage: last tick of each slot's occupant
  for key, (a, b) in sorted(intervals.items(), key=lambda kv: kv[1]):
    ends = busy[stage_of(key)]
    free = [i for i, end in enumerate(ends) if end < a]
    i = free[0] if free else len(ends)
    if i == len(ends):
      ends.append(b)
    ends[i] = b
    slot[key] = i
    most = max(most, len(ends))
  return slot, most


@functools.lru_cache(maxsize=32)
def make_schedule(kind: str, stages: int, microbatches: int, repeats: int = 1) -> Schedule:
  n, m_total, r_total = stages, microbatches, repeats
  c_total = n * r_total
  own = {s: [(c, m) for c in range(s, c_total, n) for m in range(m_total)] for s in range(n)}
  f_order = {s: sorted(u, key=lambda cm: (cm[0], cm[1])) for s, u in own.items()}
  b_order = {s: sorted(u, key=lambda cm: (-cm[0], cm[1])) for s, u in own.items()}
  f_tick, b_tick, arrive_act, arrive_cot = {}, {}, {}, {}
  fi, bi = [0] * n, [0] * n
  t = 0
  while any(bi[s] < len(b_order[s]) for s in range(n)):
    if t > 4 * (m_total * r_total + n) + 8:
      raise RuntimeError(f"pipeline schedule {kind} did not finish")  # a bug, not an input error
    for s in range(n):
      if fi[s] < len(f_order[s]):
        c, m = f_order[s][fi[s]]
        if c == 0 or f_tick.get((m, c - 1), t) < t:
          f_tick[(m, c)] = t
          fi[s] += 1
          if c + 1 < c_total:
            arrive_act[(m, c + 1)] = t + 1
    for s in range(n):
      if bi[s] < len(b_order[s]) and (kind == "1f1b" or fi[s] == len(f_order[s])):
        c, m = b_order[s][bi[s]]
        if f_tick.get((m, c), t + 1) <= t and (c == c_total - 1 or b_tick.get((m, c + 1), t) < t):
          b_tick[(m, c)] = t
          bi[s] += 1
          if c > 0:
            arrive_cot[(m, c - 1)] = t + 1
    t += 1
  stage_of = lambda mc: mc[1] % n
  held = {**arrive_act, **{(m, 0): f_tick[(m, 0)] for m in range(m_total)}}  # chunk 0: from its forward on
  act_slot, stash = _allocate({k: (a, b_tick[k]) for k, a in held.items()}, n, stage_of)
  last_cot = {(m, c_total - 1): f_tick[(m, c_total - 1)] for m in range(m_total)}  # last_fn's, from the F tick
  cot_slot, cots = _allocate({k: (a, b_tick[k]) for k, a in {**arrive_cot, **last_cot}.items()}, n, stage_of)
  tab = {name: np.full((t, n), -1, np.int32) for name in
         ("act_in", "cot_in", "f_mb", "f_rep", "f_slot", "f_cot", "b_mb", "b_rep", "b_slot", "b_cot")}
  fwd, bwd = np.zeros((t, n), np.int32), np.zeros((t, n), np.int32)
  for (m, c), a in arrive_act.items():
    tab["act_in"][a, c % n] = act_slot[(m, c)]
  for (m, c), a in arrive_cot.items():
    tab["cot_in"][a, c % n] = cot_slot[(m, c)]
  for (m, c), tk in f_tick.items():
    s = c % n
    fwd[tk, s] = 1
    tab["f_mb"][tk, s], tab["f_rep"][tk, s] = m, c // n
    tab["f_slot"][tk, s] = act_slot[(m, c)]
    if c == c_total - 1:
      tab["f_cot"][tk, s] = cot_slot[(m, c)]
  for (m, c), tk in b_tick.items():
    s = c % n
    bwd[tk, s] = 1
    tab["b_mb"][tk, s], tab["b_rep"][tk, s] = m, c // n
    tab["b_slot"][tk, s] = act_slot[(m, c)]
    tab["b_cot"][tk, s] = cot_slot[(m, c)]
  return Schedule(kind, n, m_total, r_total, fwd=fwd, bwd=bwd, stash=max(stash, 1), cots=max(cots, 1), **tab)


# --------------------------------------------------------------------------------------- executor
def _take(tree, i):
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False), tree)


def _put(buf, x, i, on):
  """`buf` with slot i set to x where `on` (only that slot is rewritten either way)."""
  i = jnp.maximum(i, 0)
  x = jnp.where(on, x.astype(buf.dtype), jax.lax.dynamic_index_in_dim(buf, i, 0, keepdims=False))
  return jax.lax.dynamic_update_index_in_dim(buf, x, i, 0)


def _chunk(tree, r, size):
  return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, r * size, size, 0), tree)


def _add_chunk(acc, upd, r, size, op=jnp.add):
  def one(a, u):
    cur = jax.lax.dynamic_slice_in_dim(a, r * size, size, 0)
    return jax.lax.dynamic_update_slice_in_dim(a, op(cur, u.astype(a.dtype)), r * size, 0)
  return jax.tree.map(one, acc, upd)


def _from_stage(x, source, s, parts: int, wide: bool):
  """Stage `source`'s `x` [rows, ...]: on each stage its 1/parts block of the rows (a reduce-scatter of
  it and the other stages' zeros) or, when parts is 1, all of it (an all-reduce). Exact in any dtype;
  `wide`: in float32 (XLA:CPU's all-reduce promotion fails on some bfloat16 all-reduces)."""
  y = jnp.where(s == source, x, jnp.zeros_like(x)).astype(jnp.float32 if wide else x.dtype)
  with jax.named_scope(TRANSFER):
    y = jax.lax.psum_scatter(y, AXIS, scatter_dimension=0, tiled=True) if parts > 1 else jax.lax.psum(y, AXIS)
  return y.astype(x.dtype)


def _zeros(tree, at_least=None):
  """Zeros like `tree`; `at_least`: floats in at least that dtype (a stack handed over in bf16 has its
  gradients summed over the ticks in float32)."""
  dtype = lambda x: jnp.promote_types(x.dtype, at_least) if at_least and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
  return jax.tree.map(lambda x: jnp.zeros(x.shape, dtype(x)), tree)


def _lowest(tree):
  """-inf like `tree`: where a maximum (the peaks) starts, and what a masked-out one is."""
  return jax.tree.map(lambda x: jnp.full(x.shape, -jnp.inf, x.dtype), tree)


class _Residuals:
  """A `jax.vjp` pullback split into the arrays its backward must be given later (kept in the stash)
  and those the backward has anyway (`known`: the weights, the input, the micro-batch), told apart by
  identity as the forward is traced (as `jax.ad_checkpoint.print_saved_residuals` does), and put back
  together in the backward's trace."""

  def __init__(self):
    self.treedef, self.where = None, None

  def split(self, pullback, *known) -> list:
    leaves, self.treedef = jax.tree.flatten(pullback)
    ids = {id(x): (i, j) for i, tree in reversed(list(enumerate(known))) for j, x in enumerate(jax.tree.leaves(tree))}
    where = [ids.get(id(x)) for x in leaves]
    if self.where is not None and where != self.where:  # a bug, not an input error
      raise RuntimeError("pipeline: the forward's residuals differ between two traces of the same chunk")
    self.where = where
    return [x for x, w in zip(leaves, where) if w is None]

  def join(self, kept, *known):
    known, kept = [jax.tree.leaves(tree) for tree in known], iter(kept)
    return jax.tree.unflatten(self.treedef, [next(kept) if w is None else known[w[0]][w[1]] for w in self.where])


_TABLES = ("act_in", "cot_in", "fwd", "f_mb", "f_rep", "f_slot", "f_cot", "bwd", "b_mb", "b_rep", "b_slot", "b_cot")


class _Plan(NamedTuple):
  """What every tick of a run reads, fixed before tracing."""
  sched: Schedule
  size: int  # layers per chunk
  tables: dict  # the schedule's tables [ticks, stages]
  any_f: jax.Array  # [ticks] some stage runs a forward
  any_b: jax.Array  # [ticks] some stage runs a backward
  first_f: jax.Array  # [ticks] the micro-batch entering the first stage (first_fn's forward), else -1
  first_b: jax.Array  # [ticks] the micro-batch leaving the first stage (first_fn's backward), else -1
  last_f: jax.Array  # [ticks] the micro-batch leaving the last stage (last_fn), else -1
  fwd_perm: list  # the ppermute pairs of activations (a ring when chunks repeat)
  bwd_perm: list  # and of cotangents
  rows: int  # rows per micro-batch
  parts: int  # blocks of rows first_fn and last_fn run on (the stages, where they divide the rows, else 1)
  wide: bool  # collectives of activations in float32 (XLA:CPU)
  train: bool


def _plan(sched: Schedule, mesh, per_chunk: int, rows: int, train: bool) -> _Plan:
  n, reps = sched.stages, sched.repeats
  tables = {k: jnp.asarray(getattr(sched, k)) for k in _TABLES}
  any_f, any_b = jnp.asarray(sched.any_f), jnp.asarray(sched.any_b)
  first_f = jnp.asarray(np.where((sched.fwd[:, 0] == 1) & (sched.f_rep[:, 0] == 0), sched.f_mb[:, 0], -1))
  first_b = jnp.asarray(np.where((sched.bwd[:, 0] == 1) & (sched.b_rep[:, 0] == 0), sched.b_mb[:, 0], -1))
  last_f = jnp.asarray(np.where((sched.fwd[:, n - 1] == 1) & (sched.f_rep[:, n - 1] == reps - 1),
                                sched.f_mb[:, n - 1], -1))
  ring = reps > 1
  fwd_perm = [(i, i + 1) for i in range(n - 1)] + ([(n - 1, 0)] if ring else [])
  bwd_perm = [(i + 1, i) for i in range(n - 1)] + ([(0, n - 1)] if ring else [])
  wide = mesh.devices.flat[0].platform == "cpu"  # the target's, not the host's (train.aot compiles for pods)
  return _Plan(sched, per_chunk, tables, any_f, any_b, first_f, first_b, last_f, fwd_perm, bwd_perm, rows,
               n if rows % n == 0 else 1, wide, train)


class _Stage(NamedTuple):
  """One stage's part of a run, inside the shard_map over `stage`: the plan, the stage's index, the
  functions it runs and their arguments, the splitters of their residuals; from `_shapes` on, the
  zero activation [rows, ...], the shape of a chunk's loss term and of one stash slot of residuals."""
  plan: _Plan
  s: jax.Array
  first_fn: Callable
  stage_fn: Callable
  last_fn: Callable
  stack_params: object
  stack_consts: object
  post_params: object
  post_consts: object
  mb_inputs: object
  chunk_res: _Residuals
  first_res: _Residuals
  zero_act: jax.Array | None = None
  term_shape: jax.ShapeDtypeStruct | None = None
  first_slot: list | None = None  # the shapes of first_fn's residuals of one micro-batch (one stash slot)
  chunk_slot: list | None = None  # and of a chunk's


def _row(st: _Stage, tab: str, t):
  """This stage's entry of table `tab` at tick t."""
  return jax.lax.dynamic_index_in_dim(st.plan.tables[tab][t], st.s, 0, keepdims=False)


def _block(st: _Stage, tree):
  """This stage's block of a micro-batch's rows (all of them when parts is 1)."""
  rows, parts = st.plan.rows, st.plan.parts
  return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, (st.s if parts > 1 else 0) * (
      rows // parts), rows // parts, 0), tree)


def _mask(on, tree, fill=0.0):
  return jax.tree.map(lambda x: jnp.where(on, x, jnp.full_like(x, fill)), tree)


def _gather(x, parts: int):
  """The stages' blocks [rows / parts, ...] of x joined into all rows, on every stage."""
  with jax.named_scope(TRANSFER):
    return jax.lax.all_gather(x, AXIS, axis=0, tiled=True) if parts > 1 else x


def _one_stage(tree, keep, parts: int):
  """A result every stage computed on its block, or, when all rows ran on every stage, only `keep`'s."""
  return tree if parts > 1 else _mask(keep, tree)


def _chunk_forward(st: _Stage, p, c, x, mb):
  """(y, term, stats, peaks, the residuals to keep) of one chunk."""
  f = lambda p, x: (lambda y, term, stats, peaks: ((y, term), (stats, peaks)))(*st.stage_fn(p, c, x, mb))
  if not st.plan.train:
    (y, term), (stats, peaks) = f(p, x)
    return y, term, stats, peaks, []
  (y, term), pullback, (stats, peaks) = jax.vjp(f, p, x, has_aux=True)
  return y, term, stats, peaks, st.chunk_res.split(pullback, p, c, x, mb)


def _first_forward(st: _Stage, mb):
  """first_fn on this stage's block of a micro-batch: (x, peaks, the residuals to keep)."""
  if not st.plan.train:
    return *st.first_fn(st.post_params, st.post_consts, mb), []
  x, pullback, peaks = jax.vjp(lambda q: st.first_fn(q, st.post_consts, mb), st.post_params, has_aux=True)
  return x, peaks, st.first_res.split(pullback, st.post_params, st.post_consts, mb)


def _shapes(st: _Stage):
  """(the stage with its zero activation and term shape, first_fn's residuals, a chunk's residuals,
  and the shapes of a chunk's stats, last_fn's aux and the peaks {first, stack, last}: from tracing
  each once)."""
  plan, mb0 = st.plan, _take(st.mb_inputs, 0)
  act_shape, first_peaks, first_kept = jax.eval_shape(functools.partial(_first_forward, st), _block(st, mb0))
  act_shape = jax.ShapeDtypeStruct((plan.rows,) + act_shape.shape[1:], act_shape.dtype)
  zero_act = jnp.zeros(act_shape.shape, act_shape.dtype)
  _, term_shape, stats_shape, chunk_peaks, chunk_kept = jax.eval_shape(
      functools.partial(_chunk_forward, st), _chunk(st.stack_params, 0, plan.size),
      _chunk(st.stack_consts, 0, plan.size), zero_act, mb0)
  _, aux_shape, last_peaks = jax.eval_shape(st.last_fn, st.post_params, st.post_consts, _block(st, zero_act),
                                            _block(st, mb0), plan.parts)
  peaks = {"first": first_peaks, "stack": chunk_peaks, "last": last_peaks}
  st = st._replace(zero_act=zero_act, term_shape=term_shape, first_slot=first_kept, chunk_slot=chunk_kept)
  return st, first_kept, chunk_kept, stats_shape, aux_shape, peaks


def _init_carry(st: _Stage, first_kept, chunk_kept, stats_shape, aux_shape, peaks) -> dict:
  """The scan's carry before the first tick: empty stashes, zero gradients, stats, aux and loss,
  peaks at -inf."""
  zero_act, sched = st.zero_act, st.plan.sched
  slots = lambda shapes: [jnp.zeros((sched.stash,) + x.shape, x.dtype) for x in shapes]
  per_slot = lambda x: jax.ShapeDtypeStruct((sched.repeats * st.plan.size,) + x.shape[1:], x.dtype)
  return {
      "stash": jnp.zeros((sched.stash,) + zero_act.shape, zero_act.dtype),
      "kept": slots(chunk_kept), "first_kept": slots(first_kept),
      "cots": jnp.zeros((sched.cots,) + zero_act.shape, zero_act.dtype),
      "recv_act": zero_act, "recv_cot": zero_act, "send_cot": zero_act,
      "g_stack": _zeros(st.stack_params, jnp.float32), "g_post": _zeros(st.post_params, jnp.float32),
      "stats": _zeros(jax.tree.map(per_slot, stats_shape)),
      "aux": _zeros(aux_shape), "loss": jnp.zeros((), jnp.float32),
      "peaks": _lowest({**peaks, "stack": jax.tree.map(per_slot, peaks["stack"])}),
  }


def _unchanged(carry, *_):
  return dict(carry)


def _first(st: _Stage, carry, t):
  """first_fn of the micro-batch entering the first stage: (carry, its output gathered [rows, ...],
  this stage's residuals of its block), the last two for the stash slot of the micro-batch."""
  carry = dict(carry)
  x, peaks, kept = _first_forward(st, _block(st, _take(st.mb_inputs, st.plan.first_f[t])))
  carry["peaks"] = {**carry["peaks"], "first": jax.tree.map(jnp.maximum, carry["peaks"]["first"], peaks)}
  return carry, _gather(x, st.plan.parts).astype(st.zero_act.dtype), kept


def _no_first(st: _Stage, carry, t):
  return dict(carry), st.zero_act, _zeros(st.first_slot)


def _last(st: _Stage, t, carry, y):
  """last_fn on the last stage's output (and its pullback): (carry with the loss, aux and post grads,
  the cotangent for y gathered [rows, ...], for the last stage's cotangent slot)."""
  plan, s = st.plan, st.s
  carry = dict(carry)
  y = _from_stage(y, plan.sched.stages - 1, s, plan.parts, plan.wide)  # this stage's block of the last stage's y
  mb = _block(st, _take(st.mb_inputs, plan.last_f[t]))
  f = lambda q, y: (lambda loss, aux, peaks: (loss, (aux, peaks)))(*st.last_fn(q, st.post_consts, y, mb, plan.parts))
  keep = s == plan.sched.stages - 1
  if plan.train:
    loss, pullback, (aux, peaks) = jax.vjp(f, st.post_params, y, has_aux=True)
    gq, gy = pullback(jnp.ones_like(loss))
    gy = _gather(gy, plan.parts).astype(st.zero_act.dtype)
    carry["g_post"] = jax.tree.map(jnp.add, carry["g_post"], _one_stage(gq, keep, plan.parts))
  else:
    loss, (aux, peaks) = f(st.post_params, y)
    gy = st.zero_act
  # (every stage ran last_fn on the last stage's output: its block, or all rows)
  carry["peaks"] = {**carry["peaks"], "last": jax.tree.map(jnp.maximum, carry["peaks"]["last"], peaks)}
  carry["loss"] = carry["loss"] + jnp.where(keep | (plan.parts > 1), loss, 0.0).astype(jnp.float32)
  carry["aux"] = jax.tree.map(jnp.add, carry["aux"], _one_stage(aux, keep, plan.parts))
  return carry, gy


def _no_last(st: _Stage, t, carry, y):
  return dict(carry), st.zero_act


def _forward(st: _Stage, carry, x, t):
  """The forward slot of a tick: first_fn where a micro-batch enters, this stage's chunk on its input
  x from the stash (masked out where it has none), last_fn where one leaves. Returns (carry, the
  activation to send on, what goes into the stashes: first_fn's output and residuals, the chunk's
  residuals, last_fn's cotangent; `_tick` writes them, outside the conditionals)."""
  plan = st.plan
  with jax.named_scope("pipeline_first"):
    entering = plan.first_f[t] >= 0
    carry, first_x, first_kept = jax.lax.cond(entering, functools.partial(_first, st),
                                              functools.partial(_no_first, st), carry, t)
  x = jnp.where(entering & (st.s == 0), first_x, x)  # (the first chunk's input, on the first stage)
  on, m, r = _row(st, "fwd", t) == 1, jnp.maximum(_row(st, "f_mb", t), 0), jnp.maximum(_row(st, "f_rep", t), 0)
  p, c = _chunk(st.stack_params, r, plan.size), _chunk(st.stack_consts, r, plan.size)
  y, term, stats, peaks, kept = _chunk_forward(st, p, c, x, _take(st.mb_inputs, m))
  carry["stats"] = _add_chunk(carry["stats"], _mask(on, stats), r, plan.size)
  carry["peaks"] = {**carry["peaks"], "stack": _add_chunk(carry["peaks"]["stack"], _mask(on, peaks, -jnp.inf), r,
                                                          plan.size, jnp.maximum)}
  carry["loss"] = carry["loss"] + jnp.where(on, term, 0.0).astype(jnp.float32)
  with jax.named_scope("pipeline_last"):
    carry, gy = jax.lax.cond(plan.last_f[t] >= 0, functools.partial(_last, st, t), functools.partial(_no_last, st, t),
                             carry, y)
  return carry, jnp.where(on, y.astype(st.zero_act.dtype), st.zero_act), (first_x, first_kept, kept, gy)


def _no_forward(st: _Stage, carry, x, t):
  return dict(carry), st.zero_act, (st.zero_act, _zeros(st.first_slot), _zeros(st.chunk_slot), st.zero_act)


def _first_backward(st: _Stage, gx, kept, t):
  """first_fn's gradients for the micro-batch leaving the first stage (its cotangent gx there)."""
  plan = st.plan
  gx = _from_stage(gx, 0, st.s, plan.parts, plan.wide)  # this stage's block of the first stage's gx
  mb = _block(st, _take(st.mb_inputs, plan.first_b[t]))
  (gq,) = st.first_res.join(kept, st.post_params, st.post_consts, mb)(gx.astype(st.zero_act.dtype))
  return _one_stage(gq, st.s == 0, plan.parts)


def _no_first_backward(st: _Stage, gx, kept, t):
  return _zeros(st.post_params)


def _backward(st: _Stage, carry, held, t):
  """The backward slot of a tick: this stage's chunk's pullback (masked out where it has none), and
  first_fn's where a micro-batch leaves the first stage; the cotangent to send back in the carry.
  `held`: the stash slots it reads (the chunk's input, residuals and cotangent, first_fn's residuals)."""
  plan, s, zero_act = st.plan, st.s, st.zero_act
  carry = dict(carry)
  x, kept, cot, first_kept = held
  on, m, r = _row(st, "bwd", t) == 1, jnp.maximum(_row(st, "b_mb", t), 0), jnp.maximum(_row(st, "b_rep", t), 0)
  p, c, mb = _chunk(st.stack_params, r, plan.size), _chunk(st.stack_consts, r, plan.size), _take(st.mb_inputs, m)
  pullback = st.chunk_res.join(kept, p, c, x, mb)
  gp, gx = pullback((cot, jnp.ones(st.term_shape.shape, st.term_shape.dtype)))
  with jax.named_scope("pipeline_first_backward"):
    g_first = jax.lax.cond(plan.first_b[t] >= 0, functools.partial(_first_backward, st),
                           functools.partial(_no_first_backward, st), gx, first_kept, t)
  carry["g_stack"] = _add_chunk(carry["g_stack"], _mask(on, gp), r, plan.size)
  carry["g_post"] = jax.tree.map(jnp.add, carry["g_post"], g_first)
  carry["send_cot"] = jnp.where(on & ((r > 0) | (s > 0)), gx.astype(zero_act.dtype), zero_act)
  return carry


_HELD = ("stash", "kept", "first_kept", "cots")  # the stashes: read and written by _tick, not in the slots


def _tick(st: _Stage, carry, t):
  """One tick: the arrivals into their slots, the forward slot, the backward slot, and the sends.
  The stashes never pass through the slots' conditionals: a slot gets the slices it reads and returns
  the ones to write, and the tick writes them in place (written inside, XLA kept a second copy of the
  whole stash: 6.8 GiB a GPU for V3 on 16 stages)."""
  plan, s = st.plan, st.s
  a, k = _row(st, "act_in", t), _row(st, "cot_in", t)  # arrivals from the previous tick's ppermute
  carry["stash"] = _put(carry["stash"], carry["recv_act"], a, a >= 0)
  carry["cots"] = _put(carry["cots"], carry["recv_cot"], k, k >= 0)
  held = {name: carry.pop(name) for name in _HELD}
  f_slot, first_slot = _row(st, "f_slot", t), plan.tables["f_slot"][t, 0]
  with jax.named_scope("pipeline_forward"):  # (the scopes name the slots in the compiled HLO: SCOPES)
    carry, send_act, (first_x, first_kept, kept, gy) = jax.lax.cond(
        plan.any_f[t], functools.partial(_forward, st), functools.partial(_no_forward, st), carry,
        _take(held["stash"], jnp.maximum(f_slot, 0)), t)
  entering = plan.first_f[t] >= 0
  held["stash"] = _put(held["stash"], first_x, first_slot, entering & (s == 0))
  held["first_kept"] = [_put(buf, x, first_slot, entering) for buf, x in zip(held["first_kept"], first_kept)]
  held["kept"] = [_put(buf, x, f_slot, _row(st, "fwd", t) == 1) for buf, x in zip(held["kept"], kept)]
  if plan.train:
    held["cots"] = _put(held["cots"], gy, _row(st, "f_cot", t), (plan.last_f[t] >= 0) & (s == plan.sched.stages - 1))
  carry["send_cot"] = st.zero_act
  if plan.train:
    b_slot = jnp.maximum(_row(st, "b_slot", t), 0)
    reads = (_take(held["stash"], b_slot), _take(held["kept"], b_slot),
             _take(held["cots"], jnp.maximum(_row(st, "b_cot", t), 0)),
             _take(held["first_kept"], jnp.maximum(plan.tables["b_slot"][t, 0], 0)))
    with jax.named_scope("pipeline_backward"):
      carry = jax.lax.cond(plan.any_b[t], functools.partial(_backward, st), _unchanged, carry, reads, t)
  carry.update(held)
  with jax.named_scope(TRANSFER):
    carry["recv_act"] = jax.lax.ppermute(send_act, AXIS, plan.fwd_perm)
    carry["recv_cot"] = jax.lax.ppermute(carry["send_cot"], AXIS, plan.bwd_perm)
  return carry, None


def _body(plan: _Plan, first_fn, stage_fn, last_fn, stack_params, stack_consts, post_params, post_consts, mb_inputs):
  """`run` on one stage (the shard_map's body): a scan over the ticks, then the sums over stages."""
  st = _Stage(plan, jax.lax.axis_index(AXIS), first_fn, stage_fn, last_fn, stack_params, stack_consts, post_params,
              post_consts, mb_inputs, _Residuals(), _Residuals())
  st, *shapes = _shapes(st)
  carry = _init_carry(st, *shapes)
  carry, _ = jax.lax.scan(functools.partial(_tick, st), carry, jnp.arange(plan.sched.ticks))
  psum = lambda tree: jax.tree.map(lambda x: jax.lax.psum(x, AXIS), tree)
  pmax = lambda tree: jax.tree.map(lambda x: jax.lax.pmax(x, AXIS), tree)
  peaks = carry["peaks"]
  return (psum(carry["loss"]), carry["g_stack"], psum(carry["g_post"]), carry["stats"], psum(carry["aux"]),
          {"first": pmax(peaks["first"]), "stack": peaks["stack"], "last": pmax(peaks["last"])})


def run(sched: Schedule, mesh, per_chunk: int, first_fn: Callable, stage_fn: Callable, last_fn: Callable,
        stack_params, stack_consts, post_params, post_consts, mb_inputs, train: bool = True):
  """Run the pipeline's forwards and backwards: (loss, stack grads, post grads, stack stats, last_fn's
  aux summed over micro-batches, peaks). `train=False` runs the forwards only (evaluation; grads zero).
  Peaks (QK-clip's max logits) are maxima over micro-batches: {"first": first_fn's, "stack": the
  chunks' [slots, ...] (-inf in slots never run), "last": last_fn's}; each function returns a pytree of
  them (empty when it has none), not differentiated.

  first_fn(post params, post consts, mb) -> (x, peaks): what comes before the first chunk (the
    embedding and dense layers), on a block of a micro-batch's rows.
  stage_fn(chunk params, chunk consts, x, mb) -> (y, term, stats, peaks): one chunk of `per_chunk`
    layers; `term` is added to the loss (differentiated), `stats` and `peaks` pytrees with a leading
    [per_chunk] axis (not differentiated), stats summed over micro-batches.
  last_fn(post params, post consts, y, mb, blocks) -> (loss, aux, peaks): after the last chunk, on one
    of `blocks` equal row blocks of the micro-batch; `aux` summed.
  stack_params / stack_consts: leading [slots] axis, sharded over `stage` (slot order of `Layout`).
  post_params / post_consts: whole over `stage` inside (their gradients, from first_fn and last_fn, come
  back summed). mb_inputs: a pytree of [M, rows, ...] arrays (tokens, masks).

  Control flow is the same on every device: XLA needs every device to reach the same collectives
  (the FSDP, tensor and expert-parallel ones inside a chunk), so a stage never branches on its own
  index. A tick runs the forward slot if any stage has a forward then, and the backward slot if any
  has a backward; a stage without one computes on its stash's stale contents and its results are
  masked out (MaxText's pipeline computes its bubbles the same way). first_fn and last_fn run on every
  stage, each on a 1/N block of the micro-batch's rows (first_fn's outputs all-gathered, kept on the
  first stage; the last stage's output reduce-scattered into the blocks; the cotangents back the same
  two ways) when the rows divide by N, else on all rows on every stage with one stage's result kept.
  So a micro-batch's activations exist only while it is in flight, and the first stage holds no
  whole-batch buffer.
  """
  plan = _plan(sched, mesh, per_chunk, jax.tree.leaves(mb_inputs)[0].shape[1], train)
  staged = lambda tree: jax.tree.map(lambda _: P(AXIS), tree)
  whole = lambda tree: jax.tree.map(lambda _: P(), tree)
  return jax.shard_map(
      functools.partial(_body, plan, first_fn, stage_fn, last_fn), mesh=mesh, axis_names={AXIS}, check_vma=False,
      in_specs=(staged(stack_params), staged(stack_consts), whole(post_params), whole(post_consts),
                whole(mb_inputs)),
      out_specs=(P(), staged(stack_params), whole(post_params), P(AXIS), P(),
                 {"first": P(), "stack": P(AXIS), "last": P()}),
  )(stack_params, stack_consts, post_params, post_consts, mb_inputs)
