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
devices), a `lax.scan` over the schedule's ticks, and per tick a `lax.switch` per slot chosen by the
stage's row of the schedule tables. A forward keeps only its input (in a stash of as many slots as the
schedule needs); the backward recomputes the chunk's forward under `jax.vjp` (a stage-level remat).
The last chunk's forward is folded into its backward, which also runs `last_fn` (norm, head, MTP,
loss) and starts the cotangent. The first chunk's input cotangents are returned for the layers before
the pipeline.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from parallel.errors import ConfigError, check_fields, require

Kind = Literal["gpipe", "circular", "1f1b"]
AXIS = "stage"
F_COST, B_COST = 1, 3  # a backward recomputes its forward: 1 + 2


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """`pipeline:` section. `microbatches` M splits each (grad-accumulation) micro-batch into M for the
  pipeline (null: as many as stages); `repeats` R: chunks per stage (circular only)."""

  schedule: Kind = "gpipe"
  microbatches: int | None = None
  repeats: int = 1

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
  fwd: np.ndarray  # 1: run a forward (0: none; the last chunk's forward is folded into its backward)
  f_mb: np.ndarray
  f_rep: np.ndarray  # which of the stage's chunks (its repeat)
  f_slot: np.ndarray  # stash slot of the input (chunk 0: where first_fn's output goes)
  bwd: np.ndarray  # 0 none, 1 a chunk's backward, 2 the last chunk's forward + last_fn + backward
  b_mb: np.ndarray
  b_rep: np.ndarray
  b_slot: np.ndarray
  b_cot: np.ndarray  # cotangent slot (bwd == 1)
  stash: int  # stash slots per stage (activations held)
  cots: int  # cotangent slots per stage

  @property
  def ticks(self) -> int:
    return self.fwd.shape[0]

  def work(self) -> int:
    """The chunk work the schedule does, a forward costing 1 and a backward 3 (it recomputes its
    forward; the last chunk's folded forward is in its backward)."""
    return int(((self.fwd == 1) * F_COST + (self.bwd > 0) * B_COST).sum())

  def executed(self) -> int:
    """The chunk work `run` executes: every stage runs a tick's forward slot when any stage has a
    forward then, and its backward slot when any has a backward (the others' results masked)."""
    return int(self.stages * ((self.fwd.max(axis=1) > 0) * F_COST + (self.bwd.max(axis=1) > 0) * B_COST).sum())

  def bubble(self) -> float:
    """The share of the executed chunk work that is masked out: the pipeline bubble."""
    return 1 - self.work() / self.executed()

  def textbook_bubble(self) -> float:
    """The usual prediction, (N-1) / (M*R + N-1) (1F1B's is GPipe's; `bubble` is this executor's)."""
    n, m, r = self.stages, self.microbatches, self.repeats
    return (n - 1) / (m * r + n - 1)

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
  cot_slot, cots = _allocate({k: (a, b_tick[k]) for k, a in arrive_cot.items()}, n, stage_of)
  tab = {name: np.full((t, n), -1, np.int32) for name in
         ("act_in", "cot_in", "f_mb", "f_rep", "f_slot", "b_mb", "b_rep", "b_slot", "b_cot")}
  fwd, bwd = np.zeros((t, n), np.int32), np.zeros((t, n), np.int32)
  for (m, c), a in arrive_act.items():
    tab["act_in"][a, c % n] = act_slot[(m, c)]
  for (m, c), a in arrive_cot.items():
    tab["cot_in"][a, c % n] = cot_slot[(m, c)]
  for (m, c), tk in f_tick.items():
    if c < c_total - 1:
      s = c % n
      fwd[tk, s] = 1
      tab["f_mb"][tk, s], tab["f_rep"][tk, s] = m, c // n
      tab["f_slot"][tk, s] = act_slot[(m, c)]
  for (m, c), tk in b_tick.items():
    s = c % n
    bwd[tk, s] = 2 if c == c_total - 1 else 1
    tab["b_mb"][tk, s], tab["b_rep"][tk, s] = m, c // n
    tab["b_slot"][tk, s] = act_slot[(m, c)]
    tab["b_cot"][tk, s] = cot_slot.get((m, c), -1)
  return Schedule(kind, n, m_total, r_total, fwd=fwd, bwd=bwd, stash=max(stash, 1), cots=max(cots, 1), **tab)


# --------------------------------------------------------------------------------------- executor
def _take(tree, i):
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False), tree)


def _chunk(tree, r, size):
  return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, r * size, size, 0), tree)


def _add_chunk(acc, upd, r, size):
  def one(a, u):
    cur = jax.lax.dynamic_slice_in_dim(a, r * size, size, 0)
    return jax.lax.dynamic_update_slice_in_dim(a, cur + u.astype(a.dtype), r * size, 0)
  return jax.tree.map(one, acc, upd)


def _broadcast_from(x, source, s):
  """`x` of stage `source` on every stage (a psum of it and zeros, in float32: XLA:CPU's all-reduce
  promotion fails on some bfloat16 all-reduces)."""
  return jax.lax.psum(jnp.where(s == source, x, jnp.zeros_like(x)).astype(jnp.float32), AXIS).astype(x.dtype)


def _zeros(tree):
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)


def run(sched: Schedule, mesh, per_chunk: int, first_fn: Callable, stage_fn: Callable, last_fn: Callable,
        stack_params, stack_consts, post_params, post_consts, mb_inputs, train: bool = True):
  """Run the pipeline's forwards and backwards: (loss, stack grads, post grads, stack stats, last_fn's
  aux summed over micro-batches). `train=False` runs the forwards only (evaluation; grads zero).

  first_fn(post params, post consts, mb) -> x: what comes before the first chunk (the embedding and
    dense layers), on a block of a micro-batch's rows.
  stage_fn(chunk params, chunk consts, x, mb) -> (y, term, stats): one chunk of `per_chunk` layers;
    `term` is added to the loss (differentiated), `stats` a pytree with a leading [per_chunk] axis
    (not differentiated), summed over micro-batches.
  last_fn(post params, post consts, y, mb, blocks) -> (loss, aux): after the last chunk, on one of
    `blocks` equal row blocks of the micro-batch; `aux` summed.
  stack_params / stack_consts: leading [slots] axis, sharded over `stage` (slot order of `Layout`).
  post_params / post_consts: whole on every stage (their gradients, from first_fn and last_fn, come
  back summed). mb_inputs: a pytree of [M, rows, ...] arrays (tokens, masks).

  Control flow is the same on every device: XLA needs every device to reach the same collectives
  (the FSDP, tensor and expert-parallel ones inside a chunk), so a stage never branches on its own
  index. A tick runs the forward slot if any stage has a forward then, and the backward slot if any
  has a backward; a stage without one computes on its stash's stale contents and its results are
  masked out (MaxText's pipeline computes its bubbles the same way). first_fn and last_fn run on every
  stage, each on a 1/N block of the micro-batch's rows (first_fn's outputs gathered to the first
  stage, last_fn's inputs broadcast from the last; the cotangents back the same ways) when the rows
  divide by N, else on all rows on every stage with one stage's result kept. So a micro-batch's
  activations exist only while it is in flight, and the first stage holds no whole-batch buffer.
  """
  n, reps, size = sched.stages, sched.repeats, per_chunk
  tables = {k: jnp.asarray(getattr(sched, k)) for k in
            ("act_in", "cot_in", "fwd", "f_mb", "f_rep", "f_slot", "bwd", "b_mb", "b_rep", "b_slot", "b_cot")}
  any_f = jnp.asarray(sched.fwd.max(axis=1) > 0)
  any_b = jnp.asarray(sched.bwd.max(axis=1) > (0 if train else 1))
  first_f = jnp.asarray(np.where((sched.fwd[:, 0] == 1) & (sched.f_rep[:, 0] == 0), sched.f_mb[:, 0], -1))
  first_b = jnp.asarray(np.where((sched.bwd[:, 0] > 0) & (sched.b_rep[:, 0] == 0), sched.b_mb[:, 0], -1))
  last_mb = jnp.asarray(np.where(sched.bwd[:, n - 1] == 2, sched.b_mb[:, n - 1], -1))
  ring = reps > 1
  fwd_perm = [(i, i + 1) for i in range(n - 1)] + ([(n - 1, 0)] if ring else [])
  bwd_perm = [(i + 1, i) for i in range(n - 1)] + ([(0, n - 1)] if ring else [])
  rows = jax.tree.leaves(mb_inputs)[0].shape[1]
  parts = n if rows % n == 0 else 1

  def body(stack_params, stack_consts, post_params, post_consts, mb_inputs):
    s = jax.lax.axis_index(AXIS)
    row = lambda tab, t: jax.lax.dynamic_index_in_dim(tables[tab][t], s, 0, keepdims=False)
    block = lambda tree: jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, (s if parts > 1 else 0) * (
        rows // parts), rows // parts, 0), tree)
    mask = lambda on, tree: jax.tree.map(lambda x: jnp.where(on, x, jnp.zeros_like(x)), tree)
    mb0 = _take(mb_inputs, 0)
    act_shape = jax.eval_shape(first_fn, post_params, post_consts, mb0)
    act_shape = jax.ShapeDtypeStruct((rows,) + act_shape.shape[1:], act_shape.dtype)
    zero_act = jnp.zeros(act_shape.shape, act_shape.dtype)
    _, _, stats_shape = jax.eval_shape(stage_fn, _chunk(stack_params, 0, size), _chunk(stack_consts, 0, size),
                                       zero_act, mb0)
    aux_shape = jax.eval_shape(last_fn, post_params, post_consts, block(zero_act), block(mb0), parts)[1]
    gather = lambda x: jax.lax.all_gather(x, AXIS, axis=0, tiled=True) if parts > 1 else x
    one_stage = lambda tree, keep: tree if parts > 1 else mask(keep, tree)  # (all rows ran on every stage)

    def first(stash, t):
      """first_fn of the micro-batch entering the first stage, into its stash slot there."""
      x = gather(first_fn(post_params, post_consts, block(_take(mb_inputs, first_f[t]))))
      put = jax.lax.dynamic_update_index_in_dim(stash, x.astype(stash.dtype), jnp.maximum(row("f_slot", t), 0), 0)
      return jnp.where(s == 0, put, stash)

    def forward(carry, t):
      carry = dict(carry)
      carry["stash"] = jax.lax.cond(first_f[t] >= 0, first, lambda stash, t: stash, carry["stash"], t)
      m, r = jnp.maximum(row("f_mb", t), 0), jnp.maximum(row("f_rep", t), 0)
      x = _take(carry["stash"], jnp.maximum(row("f_slot", t), 0))
      y, _, _ = stage_fn(_chunk(stack_params, r, size), _chunk(stack_consts, r, size), x, _take(mb_inputs, m))
      return carry, jnp.where(row("fwd", t) == 1, y.astype(zero_act.dtype), zero_act)

    def last(y, t):
      """last_fn on the last stage's output: (this block's loss, cotangent for y, post grads, aux)."""
      y = _broadcast_from(y, n - 1, s)  # the last stage's y, everywhere
      mb = block(_take(mb_inputs, last_mb[t]))
      f = lambda q, y: last_fn(q, post_consts, y, mb, parts)
      if train:
        loss, vjp, aux = jax.vjp(f, post_params, block(y), has_aux=True)
        gq, gy = vjp(jnp.ones_like(loss))
        gy = gather(gy)
      else:
        (loss, aux), gq, gy = f(post_params, block(y)), None, None
      keep = s == n - 1
      return jnp.where(keep | (parts > 1), loss, 0.0), gy, one_stage(gq, keep), one_stage(aux, keep)

    def first_backward(gx, t):
      """Gradients of first_fn for the micro-batch leaving the first stage (its cotangent gx there)."""
      gx = _broadcast_from(gx, 0, s)
      _, vjp = jax.vjp(lambda q: first_fn(q, post_consts, block(_take(mb_inputs, first_b[t]))), post_params)
      (gq,) = vjp(block(gx).astype(act_shape.dtype))
      return one_stage(gq, s == 0)

    def backward(carry, t):
      kind, m, r = row("bwd", t), jnp.maximum(row("b_mb", t), 0), jnp.maximum(row("b_rep", t), 0)
      on = kind > (0 if train else 1)
      x = _take(carry["stash"], jnp.maximum(row("b_slot", t), 0))
      p, c, mb = _chunk(stack_params, r, size), _chunk(stack_consts, r, size), _take(mb_inputs, m)
      carry = dict(carry)

      def chunk(p, x):
        y, term, stats = stage_fn(p, c, x, mb)
        return (y, term), stats

      if train:
        (y, term), vjp, stats = jax.vjp(chunk, p, x, has_aux=True)
      else:
        (y, term), stats = chunk(p, x)
      nothing = lambda y: jax.tree.map(lambda z: jnp.zeros(z.shape, z.dtype), jax.eval_shape(lambda y: last(y, t), y))
      loss_post, gy, gq, aux = jax.lax.cond(last_mb[t] >= 0, lambda y: last(y, t), nothing, y)
      carry["stats"] = _add_chunk(carry["stats"], mask(on, stats), r, size)
      carry["loss"] = carry["loss"] + jnp.where(on, term, 0.0).astype(jnp.float32) + loss_post.astype(jnp.float32)
      carry["aux"] = jax.tree.map(jnp.add, carry["aux"], aux)
      if not train:
        return carry
      cot = jnp.where(kind == 2, gy.astype(zero_act.dtype), _take(carry["cots"], jnp.maximum(row("b_cot", t), 0)))
      gp, gx = vjp((cot, jnp.ones_like(term)))
      g_first = jax.lax.cond(first_b[t] >= 0, first_backward, lambda gx, t: _zeros(post_params), gx, t)
      carry["g_stack"] = _add_chunk(carry["g_stack"], mask(on, gp), r, size)
      carry["g_post"] = jax.tree.map(lambda a, b, c: a + b + c, carry["g_post"], gq, g_first)
      carry["send_cot"] = jnp.where(on & ((r > 0) | (s > 0)), gx.astype(zero_act.dtype), zero_act)
      return carry

    def tick(carry, t):
      a, k = row("act_in", t), row("cot_in", t)  # arrivals from the previous tick's ppermute
      carry["stash"] = jnp.where(a >= 0, jax.lax.dynamic_update_index_in_dim(
          carry["stash"], carry["recv_act"], jnp.maximum(a, 0), 0), carry["stash"])
      carry["cots"] = jnp.where(k >= 0, jax.lax.dynamic_update_index_in_dim(
          carry["cots"], carry["recv_cot"], jnp.maximum(k, 0), 0), carry["cots"])
      carry, send_act = jax.lax.cond(any_f[t], forward, lambda carry, t: (dict(carry), zero_act), carry, t)
      carry["send_cot"] = zero_act
      carry = jax.lax.cond(any_b[t], backward, lambda carry, t: dict(carry), carry, t)
      carry["recv_act"] = jax.lax.ppermute(send_act, AXIS, fwd_perm)
      carry["recv_cot"] = jax.lax.ppermute(carry["send_cot"], AXIS, bwd_perm)
      return carry, None

    carry = {
        "stash": jnp.zeros((sched.stash,) + zero_act.shape, zero_act.dtype),
        "cots": jnp.zeros((sched.cots,) + zero_act.shape, zero_act.dtype),
        "recv_act": zero_act, "recv_cot": zero_act, "send_cot": zero_act,
        "g_stack": _zeros(stack_params), "g_post": _zeros(post_params),
        "stats": jax.tree.map(lambda x: jnp.zeros((reps * size,) + x.shape[1:], x.dtype), stats_shape),
        "aux": _zeros(aux_shape), "loss": jnp.zeros((), jnp.float32),
    }
    carry, _ = jax.lax.scan(tick, carry, jnp.arange(sched.ticks))
    psum = lambda tree: jax.tree.map(lambda x: jax.lax.psum(x, AXIS), tree)
    return psum(carry["loss"]), carry["g_stack"], psum(carry["g_post"]), carry["stats"], psum(carry["aux"])

  staged = lambda tree: jax.tree.map(lambda _: P(AXIS), tree)
  whole = lambda tree: jax.tree.map(lambda _: P(), tree)
  return jax.shard_map(
      body, mesh=mesh, axis_names={AXIS}, check_vma=False,
      in_specs=(staged(stack_params), staged(stack_consts), whole(post_params), whole(post_consts),
                whole(mb_inputs)),
      out_specs=(P(), staged(stack_params), whole(post_params), P(AXIS), P()),
  )(stack_params, stack_consts, post_params, post_consts, mb_inputs)
