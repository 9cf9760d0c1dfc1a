"""Expert parallelism: routed experts split over the `expert` mesh axis, tokens exchanged by all-to-all.

`dispatch_combine(x, idx, w, weights, weight_axes, expert_fn, par)` runs the routed experts of one
MoE layer; the layer (moe/experts.py) gives it the routing and the local expert computation
`expert_fn(rows [R, D], local expert [R], *local weights) -> [R, D]` (a row whose local expert is
E_l, the number of local experts, is empty). Without a multi-device mesh it calls `expert_fn` on
the T*K (token, expert) rows directly; otherwise inside `jax.shard_map` over the whole mesh:

  tokens  [T, D] split over the batch axes (data x fsdp x expert); routing was done outside, per token
  experts [E, ...] split over `expert` (E_l = E / n_ep per rank) and on their width over `tensor`;
          gathered over `fsdp` at the shard_map boundary (FSDP: XLA all-gathers the weights going
          in and reduce-scatters their gradients coming out)

The n_ep ranks form `mesh.ep_nodes` = N nodes of n_in = n_ep / N neighbouring ranks (the closest
devices: a GPU host, a TPU slice, or any split of the axis); node g holds the experts of its ranks,
a contiguous range. Per rank, `_exchange`:

  1. across nodes (N > 1): each token once to every node holding some of its K experts, to the rank
     with this rank's position there (all-to-all among the ranks of the same position, DeepEP's
     "rail"), carrying x, all K expert ids and router weights
  2. inside the node: each (row, k) assignment whose expert is in this node to the rank owning it
     (all-to-all among the node's ranks; with N = 1 that is every rank, the one-level exchange)
  3. `expert_fn` over the received rows; with tensor parallelism each rank holds a slice of every
     expert's width and the partial outputs are summed (psum over `tensor`)
  4. back inside the node, and the node's weighted sum of its experts' outputs per row
  5. back across nodes in one trip per (token, node), summed per token; the shared experts are added
     by the caller (outside shard_map, where XLA shards them like any dense FFN).

Device-limited routing (DeepSeek-V2/V3) picks a token's experts within `topk_group` of `n_group`
groups; groups are contiguous expert ranges and so are nodes, so when groups nest in nodes (or
nodes in groups) a token reaches at most `ranks_per_token(E, N, K, n_group, topk_group)` nodes:
V3's 8 experts within 4 of 8 groups, with a group per node, cross the slow links 4 times, not 8.
The layer passes what its router really enforces (`moe.router.reach`: no limit under `greedy`
routing or one group, so a token may reach every node).

Transports (`mesh.ep_transport`), for both hops:
  padded  `jax.lax.all_to_all` of fixed buffers: per (source rank, destination node) at most
          `node_capacity` = ceil(capacity_factor * T * G / N) tokens (G: the most nodes a token
          reaches), per (source, destination) rank pair inside a node at most `capacity` =
          ceil(capacity_factor * T * K / n_in) assignments. Which rows drop: per destination, the
          first ones in (token, k) order are sent (`padded_slots`), the rest dropped; a dropped
          assignment's expert output counts as exactly 0, and the count (`dropped`, reported by the
          trainer as `dropped_tokens`: dropped (token, expert) assignments per step, padding tokens
          included, a token dropped at a node counting each of its experts there) is returned.
          capacity_factor null: dropless (T per node, every received row's assignments inside).
          Works on every backend.
  ragged  `jax.lax.ragged_all_to_all`: sends exactly the rows each rank needs (dropless); the
          send and receive buffers are sized for the worst case the routing allows. A row the
          send buffer cannot hold (a bound that is wrong: a bug) is counted in `dropped` like a
          padded drop, and the trainer stops at a dropless step that dropped anything. For GPU/TPU. XLA:CPU does not implement
          ragged-all-to-all, so on CPU `ragged` runs the same code with the collective emulated by
          all_gather (tests use this to check the offsets arithmetic); the real collective is only
          exercised on GPU/TPU. Its gradient is the same exchange the other way (`_ragged_move`).
  auto    padded on CPU and on v5e slices above 32 chips (libtpu has no ragged-all-to-all there),
          ragged elsewhere (`resolve_transport`, once, from the mesh's devices).
Dropless exchanges size their receive buffers for the worst case, every rank's tokens choosing
this rank's experts; the tokens then go in chunks (`dropless_chunks`, `mesh.ep_chunks`), one at a
time with their buffers recomputed in the backward pass.

Redundant experts (`copies`, mesh.redundant_experts): each rank also holds r_l copies of experts of
its node, which parallel/eplb.py chose, and each assignment of a copied expert goes to one of its
copies (eplb.physical_ids). The copies' weights are state (moe/experts.py), made from the experts'
weights once per optimizer step by `make_copies`: per layer one exchange inside the node of the
weights as stored (FSDP and tensor shards stay put), exactly the r_l slots each rank holds by
ragged_all_to_all wherever the devices have it, else r_l slots to every rank of the node
(`copies_transport`). The copies' gradients, accumulated over the step's micro-batches, go home
once per step the same way back (`add_copy_grads`); the dispatch itself moves no weights.
`mesh.ep_overlap`: the tokens of each chunk in two independent halves (`in_halves`), so that one
half's exchange can run while the other half computes.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from typing import Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from parallel import eplb, sharding as sharding_lib
from parallel.common.errors import ConfigError

log = logging.getLogger("parallel")

Transport = Literal["auto", "padded", "ragged"]
TRANSPORTS = ("auto", "padded", "ragged")


# libtpu does not compile ragged-all-to-all on v5e slices of 8x8 chips and more ("Ragged all-to-all is
# currently not supported in limited ICI routing settings"); v4, v5p and v6e compile it.
V5E_RAGGED_MAX_CHIPS = 32


def ragged_unsupported(mesh) -> str | None:
  """Why `mesh`'s devices cannot run ragged_all_to_all (None: they can)."""
  device = mesh.devices.flat[0]
  if device.platform == "tpu" and device.device_kind == "TPU v5 lite" and mesh.size > V5E_RAGGED_MAX_CHIPS:
    return f"libtpu has no ragged-all-to-all on v5e slices above {V5E_RAGGED_MAX_CHIPS} chips"
  return None


def resolve_transport(name: str, mesh) -> str:
  """'padded', 'ragged' or (CPU only) 'ragged_emulated' for the configured `name` on `mesh`'s devices."""
  if name not in TRANSPORTS:
    raise ConfigError(f"mesh.ep_transport={name!r} must be one of {', '.join(TRANSPORTS)}")
  platform = mesh.devices.flat[0].platform
  why_not = ragged_unsupported(mesh)
  if name == "auto":
    if why_not:
      log.info("expert parallel: padded transport (%s)", why_not)
    return "padded" if platform == "cpu" or why_not else "ragged"
  if name == "ragged" and platform == "cpu":
    log.info("expert parallel: XLA:CPU has no ragged-all-to-all; emulating it with all_gather")
    return "ragged_emulated"
  if name == "ragged" and why_not:
    raise ConfigError(f"mesh.ep_transport=ragged: {why_not}; use padded (or auto)")
  return name


def ranks_per_token(n_experts: int, n_ep: int, k: int, n_group: int, topk_group: int) -> int:
  """Most of `n_ep` equal contiguous expert ranges (ranks, or nodes of ranks) one token's K
  assignments can reach under device-limited routing."""
  bound = min(k, n_ep)
  if n_group > 1 and n_experts % n_group == 0:
    if n_group % n_ep == 0:
      bound = min(bound, topk_group)
    elif n_ep % n_group == 0:
      bound = min(bound, topk_group * (n_ep // n_group))
  return bound


# A dropless exchange must size its receive buffers for the worst case: every token of every rank
# choosing this rank's experts, n_ep * min(K, E_l) rows per local token against K when balanced (8x for
# DeepSeek-V3 on 8 expert ranks). The tokens then go in chunks, one at a time, each chunk's buffers
# recomputed in the backward pass rather than kept, so that a chunk's worst case is at most this many
# times the balanced receive of all the tokens. (DeepSeek-V3 on v5p-1024, fsdp=64 x expert=8, remat
# full: 63.3 GiB of temporaries per chip in one go, 45.4 GiB in 4 chunks, 35.4 GiB in the 8 chunks of
# factor 1, as much as the padded transport with capacity factor 1.25, which drops; docs/pods.md.)
CHUNK_BUFFER_FACTOR = 1


def dropless_chunks(t: int, k: int, n_ep: int, e_local: int, given: int | None = None) -> int:
  """Chunks of the `t` local tokens for a dropless exchange (`given`: mesh.ep_chunks)."""
  if given is not None:
    if given < 1 or t % given:
      raise ConfigError(f"mesh.ep_chunks={given} must divide the {t} tokens each expert-parallel rank holds")
    return given
  want = math.ceil(n_ep * min(k, e_local) / (CHUNK_BUFFER_FACTOR * k))
  return next(c for c in range(max(1, want), t + 1) if t % c == 0)


def capacity(t: int, k: int, n_ep: int, e_local: int, capacity_factor: float | None, rows: int | None = None) -> int:
  """Assignments per (source, destination) rank pair of the padded transport, for `t` tokens per rank
  whose assignments come from `rows` rows (default t; more in the two-level dispatch's second hop)."""
  dropless = (t if rows is None else rows) * min(k, e_local)
  if capacity_factor is None:
    return dropless
  return max(1, min(dropless, math.ceil(capacity_factor * t * k / n_ep)))


def node_capacity(t: int, nodes_per_token: int, nodes: int, capacity_factor: float | None) -> int:
  """Tokens per (source rank, destination node) of the two-level padded dispatch: a token goes to a
  node once, to at most `nodes_per_token` of the `nodes`."""
  if capacity_factor is None:
    return t
  return max(1, min(t, math.ceil(capacity_factor * t * nodes_per_token / nodes)))


def combine(y_NxD, w_TxK):
  """sum_k w[t, k] y[t * K + k]: the weighted sum of each token's expert outputs."""
  t, k = w_TxK.shape
  return jnp.einsum("tkd,tk->td", y_NxD.reshape(t, k, -1), w_TxK.astype(y_NxD.dtype))


# ----------------------------------------------------------------- local pieces (inside shard_map)
def _local(x_TxD, idx_TxK, w_TxK, *weights, expert_fn):
  """All experts on this rank: every (token, k) assignment is one row."""
  y = expert_fn(jnp.repeat(x_TxD, idx_TxK.shape[1], axis=0), idx_TxK.reshape(-1), *weights)
  return combine(y, w_TxK), jnp.zeros((), jnp.int32)


def padded_slots(dest_N, n_ep: int, c: int):
  """(slot in the [n_ep * C] send buffer of each row, kept?) for rows going to ranks `dest_N` (n_ep:
  not sent): per destination, the first C rows in order are kept; the slot of a row not kept is
  n_ep * C (out of range)."""
  n = dest_N.shape[0]
  order = jnp.argsort(dest_N, stable=True)
  counts = jnp.bincount(dest_N, length=n_ep + 1)
  starts = jnp.cumsum(counts) - counts
  pos = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32) - starts[dest_N[order]])
  keep = (pos < c) & (dest_N < n_ep)
  return jnp.where(keep, dest_N * c + pos, n_ep * c), keep


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name, axis_index_groups=None, member=None):
  """jax.lax.ragged_all_to_all (one slice per peer) built from all_gather, for backends without it
  (`member`: this rank's position in its group of `axis_index_groups`). Moves n times the data; for
  tests and CPU only."""
  del recv_sizes  # implied by the senders' send_sizes
  gather = functools.partial(jax.lax.all_gather, axis_name=axis_name, axis_index_groups=axis_index_groups)
  n = send_sizes.shape[0]
  me = jax.lax.axis_index(axis_name) if member is None else member
  ops = gather(operand)  # [n, M, D]
  in_off, sizes, out_off = (gather(a) for a in (input_offsets, send_sizes, output_offsets))
  rows = jnp.arange(operand.shape[0])
  result = output
  for s in range(n):
    start, size, dst = in_off[s, me], sizes[s, me], out_off[s, me]
    target = jnp.where((rows >= start) & (rows < start + size), dst + rows - start, output.shape[0])
    result = result.at[target].set(ops[s], mode="drop")
  return result


class Hop(NamedTuple):
  """One exchange among `n` expert-parallel ranks: all of them (`groups` None) or, in the two-level
  dispatch, each rank's node (inner) or the ranks with its position in the other nodes (outer)."""

  axes: tuple[str, ...]
  n: int
  groups: list[list[int]] | None
  member: jax.Array  # this rank's position among its n peers

  def a2a(self, x):
    return jax.lax.all_to_all(x, self.axes, 0, 0, tiled=True, axis_index_groups=self.groups)


def _hops(plan, rank) -> tuple[Hop, Hop]:
  """(across nodes: the ranks with this rank's position in every node, inside this rank's node)."""
  n_in = plan.n_ep // plan.nodes
  outer = Hop(plan.axes, plan.nodes, [[i + n_in * g for g in range(plan.nodes)] for i in range(n_in)]
              if n_in > 1 else None, rank // n_in)
  inner = Hop(plan.axes, n_in, [[g * n_in + i for i in range(n_in)] for g in range(plan.nodes)]
              if plan.nodes > 1 else None, rank % n_in)
  return outer, inner


def _exclusive(c):
  return (jnp.cumsum(c) - c).astype(jnp.int32)


def _padded_take(table, rows, fill):
  """table[rows], a row index of len(table) giving `fill`."""
  pad = jnp.full((1, *table.shape[1:]), fill, table.dtype)
  return jnp.concatenate([table, pad])[rows]


def _send_padded(hop: Hop, dest_N, c: int, payloads):
  """Rows to ranks `dest_N` (hop.n: not sent) in fixed [n * C] buffers: (received [n * C, ...] per
  payload (table, row of each of the N rows, fill), back(y [n * C, D]) -> [N, D], rows dropped)."""
  slot, keep = padded_slots(dest_N, hop.n, c)
  received = []
  for table, rows, fill in payloads:
    src = jnp.full((hop.n * c,), table.shape[0], jnp.int32).at[slot].set(rows, mode="drop")
    received.append(hop.a2a(_padded_take(table, src, fill)))

  def back(y):
    y_back = hop.a2a(y)
    return jnp.where(keep[:, None], y_back[jnp.minimum(slot, hop.n * c - 1)], 0)

  return received, back, (dest_N < hop.n) & ~keep


def _ragged(how, x, out, member, offsets):
  """ragged_all_to_all of `x` into `out` (`how`: axes, groups, emulated?; `member`: this rank's place
  in its group, for the emulation)."""
  axes, groups, emulate = how
  groups = [list(g) for g in groups] if groups is not None else None
  if emulate:
    return emulated_ragged_all_to_all(x, out, *offsets, axis_name=axes, axis_index_groups=groups, member=member)
  return jax.lax.ragged_all_to_all(x, out, *offsets, axis_name=axes, axis_index_groups=groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ragged_move(how, x, out, member, there, back):
  """_ragged(x, out, there), whose gradient is the same exchange the other way, _ragged(dy, 0, back)
  (jax's own transpose of ragged_all_to_all drops axis_index_groups)."""
  return _ragged(how, x, out, member, there)


def _ragged_move_fwd(how, x, out, member, there, back):
  return _ragged(how, x, out, member, there), (jnp.zeros_like(x), member, back)


def _ragged_move_bwd(how, res, dy):
  zeros, member, back = res
  return _ragged(how, dy, zeros, member, back), None, None, None, None


_ragged_move.defvjp(_ragged_move_fwd, _ragged_move_bwd)


def _send_ragged(hop: Hop, dest_N, most_sent: int, most_received: int, payloads, emulate: bool):
  """Rows to ranks `dest_N` (hop.n: not sent) by ragged all-to-all, exactly the rows each rank needs,
  in buffers of `most_sent` rows sent and `most_received` received. Returns as _send_padded: a row
  the send buffer cannot hold (its bound too small: a bug, which the trainer stops on) is not sent
  and comes back as 0, and is reported lost, never silently."""
  n = hop.n
  how = (hop.axes, tuple(map(tuple, hop.groups)) if hop.groups is not None else None, emulate)
  by_dest = jnp.argsort(dest_N, stable=True)  # by destination; the rows not sent last
  order = by_dest[:most_sent]
  send_sizes = jnp.bincount(dest_N, length=n + 1)[:n].astype(jnp.int32)
  send_sizes = jnp.minimum(send_sizes, jnp.maximum(most_sent - _exclusive(send_sizes), 0))  # what fits
  lost = jnp.zeros(dest_N.shape, bool).at[by_dest].set(jnp.arange(dest_N.shape[0]) >= most_sent) & (dest_N < n)
  input_offsets = _exclusive(send_sizes)
  recv_sizes = hop.a2a(send_sizes)  # [n]: rows from each peer, packed back to back by peer
  recv_offsets = _exclusive(recv_sizes)
  there = (input_offsets, send_sizes, hop.a2a(recv_offsets), recv_sizes)  # (where my rows land on each peer)
  back = (recv_offsets, recv_sizes, hop.a2a(input_offsets), send_sizes)
  received = [_ragged_move(how, _padded_take(table, rows[order], fill),
                           jnp.full((most_received, *table.shape[1:]), fill, table.dtype), hop.member, there, back)
              for table, rows, fill in payloads]

  def back_to_senders(y):
    y_sorted = _ragged_move(how, y, jnp.zeros((most_sent, *y.shape[1:]), y.dtype), hop.member, back, there)
    return jnp.zeros((dest_N.shape[0], *y.shape[1:]), y.dtype).at[order].set(y_sorted)

  return received, back_to_senders, lost


class Plan(NamedTuple):
  """How one MoE layer's tokens travel on this mesh (static)."""

  axes: tuple[str, ...]  # the expert-parallel mesh axes
  n_ep: int
  nodes: int  # mesh.ep_nodes: 1, one level; > 1, across nodes once per node, then inside the node
  transport: str  # padded | ragged | ragged_emulated
  capacity_factor: float | None  # padded; None: dropless
  nodes_per_token: int  # the most nodes one token's experts live on (device-limited routing)


def _exchange(x_TxD, idx_TxK, w_TxK, *weights, expert_fn, plan: Plan):
  """The routed experts of this rank's tokens, in one or two hops (module docstring)."""
  t, k = idx_TxK.shape
  e_local = weights[0].shape[0]
  n_in = plan.n_ep // plan.nodes
  per_node = e_local * n_in
  padded, cf = plan.transport == "padded", plan.capacity_factor
  emulate = plan.transport == "ragged_emulated"
  rank = jax.lax.axis_index(plan.axes)
  node = rank // n_in
  outer, inner = _hops(plan, rank)
  dropped = jnp.zeros((), jnp.int32)

  # 1. Across nodes: each token once to every node holding some of its experts (to the rank with this
  #    rank's position there), carrying all K expert ids and router weights.
  if plan.nodes == 1:
    x_R, idx_R, w_R = x_TxD, idx_TxK, w_TxK
  else:
    hits_TxG = (idx_TxK[:, :, None] // per_node == jnp.arange(plan.nodes)).sum(1)
    dest_N = jnp.where(hits_TxG > 0, jnp.arange(plan.nodes), plan.nodes).reshape(-1)
    tok_N = jnp.arange(t * plan.nodes, dtype=jnp.int32) // plan.nodes
    payloads = [(x_TxD, tok_N, 0), (idx_TxK, tok_N, plan.n_ep * e_local), (w_TxK, tok_N, 0)]
    g = plan.nodes_per_token
    if padded:
      c = node_capacity(t, g, plan.nodes, cf)
      (x_R, idx_R, w_R), back_outer, lost = _send_padded(outer, dest_N, c, payloads)
    else:
      (x_R, idx_R, w_R), back_outer, lost = _send_ragged(outer, dest_N, t * g, plan.nodes * t, payloads, emulate)
    dropped += (hits_TxG.reshape(-1) * lost).sum().astype(jnp.int32)
    x_R, idx_R, w_R = (checkpoint_name(a, EXCHANGED) for a in (x_R, idx_R, w_R))

  # 2. Inside the node: each (row, k) assignment to the rank owning its expert; the expert FFN there.
  rows = x_R.shape[0]
  mine_RxK = idx_R // per_node == node
  dest_N = jnp.where(mine_RxK, idx_R // e_local % n_in, n_in).reshape(-1)
  expert_N = jnp.where(mine_RxK, idx_R % e_local, e_local).reshape(-1)
  row_N = jnp.arange(rows * k, dtype=jnp.int32) // k
  if n_in == 1:
    y_N = expert_fn(x_R[row_N], expert_N, *weights)
  else:
    payloads = [(x_R, row_N, 0), (expert_N, jnp.arange(rows * k, dtype=jnp.int32), e_local)]
    if padded:
      c = capacity(t, k, n_in, e_local, cf, rows)
      (rx, ex), back_inner, lost = _send_padded(inner, dest_N, c, payloads)
    else:
      (rx, ex), back_inner, lost = _send_ragged(inner, dest_N, rows * min(k, per_node),
                                                n_in * rows * min(k, e_local), payloads, emulate)
    dropped += lost.sum().astype(jnp.int32)
    rx, ex = checkpoint_name(rx, EXCHANGED), checkpoint_name(ex, EXCHANGED)
    y_N = checkpoint_name(back_inner(expert_fn(rx, ex, *weights)), EXCHANGED)

  # 3. Back: the node's weighted sum of its experts' outputs per row, one trip per node to the token.
  y_R = combine(y_N, jnp.where(mine_RxK, w_R, 0))
  if plan.nodes == 1:
    return y_R, dropped
  return back_outer(y_R).reshape(t, plan.nodes, -1).sum(1), dropped


COPIES = "expert_copies"  # the jax.named_scope of the copies' moves, by which the HLO readers find them


def _node_slots(slots_R, plan: Plan, rank, e_local: int):
  """(home member [n_in, r_l], local index there [n_in, r_l]) of the expert each redundant slot of each
  rank of this rank's node holds (a placement valid here: eplb.in_nodes)."""
  n_in = plan.n_ep // plan.nodes
  r_l = slots_R.shape[0] // plan.n_ep
  held = jax.lax.dynamic_index_in_dim(slots_R.reshape(plan.nodes, n_in, r_l), rank // n_in, keepdims=False)
  return held // e_local % n_in, held % e_local


def _rows(ws):
  """The arrays [n, ...] of `ws` as one [n, sum of their sizes] (one collective moves them all)."""
  return jnp.concatenate([w.reshape(w.shape[0], -1) for w in ws], axis=1)


def _unrows(rows, like):
  """`_rows` undone: arrays [n, ...] shaped as `like`'s."""
  sizes = [math.prod(w.shape[1:]) for w in like]
  parts = jnp.split(rows, list(itertools.accumulate(sizes))[:-1], axis=1)
  return [p.reshape(rows.shape[0], *w.shape[1:]) for p, w in zip(parts, like)]


def _copy_offsets(home, me, to_homes: bool):
  """ragged_all_to_all offsets (input offsets, send sizes, output offsets, receive sizes) [n_in] of
  the copies' move inside the node, each known to every rank from the placement (`home` [n_in, r_l]:
  the home member of each slot of each member), so no sizes are exchanged. Making copies, a home
  sends each slot it is home to, by (member, slot), and a member receives its r_l slots by (home,
  slot); sending gradients home (`to_homes`) the reverse."""
  n_in = home.shape[0]
  peers = jnp.arange(n_in)
  count = (home[:, :, None] == peers).sum(1).astype(jnp.int32)  # [member i, home s]: i's slots homed at s
  if to_homes:  # send count[me, s] to s, at s after the rows of members before me
    send, recv = count[me], count[:, me]
    out = ((peers[:, None] < me) * count).sum(0)  # at each home s: rows from members before me
  else:  # send count[i, me] to i, at i after its slots homed before me
    send, recv = count[:, me], count[me]
    out = ((peers[None, :] < me) * count).sum(1)  # at each member i: its slots homed at members before me
  return _exclusive(send), send, out.astype(jnp.int32), recv


def _make_copies(ws, slots_R, plan: Plan):
  """This rank's copies [r_l, ...] of each weight of `ws` ([E_l, ...] here), from their home ranks in
  its node, in one collective: `ragged` transports send exactly the slots each rank holds (r_l
  experts received per rank), the padded one r_l slots to every rank of the node, filled where the
  sender is the home."""
  n_in = plan.n_ep // plan.nodes
  r_l, e_local = slots_R.shape[0] // plan.n_ep, ws[0].shape[0]
  rank = jax.lax.axis_index(plan.axes)
  _, inner = _hops(plan, rank)
  home, local = _node_slots(slots_R, plan, rank, e_local)
  if n_in == 1:
    return [w[local[0]] for w in ws]
  me = inner.member
  rows = _rows(ws)  # [E_l, size]
  mine = (home == me).reshape(-1)  # the node's slots (member, slot) whose expert is mine
  if plan.transport == "padded":
    got = inner.a2a(jnp.where(mine[:, None], rows[local.reshape(-1)], 0)).reshape(n_in, r_l, -1)  # [home, my slot]
    return _unrows(got[home[me], jnp.arange(r_l)], ws)
  order = jnp.argsort(~mine, stable=True)  # mine first, by (member, slot)
  how = (inner.axes, tuple(map(tuple, inner.groups)) if inner.groups is not None else None,
         plan.transport == "ragged_emulated")
  got = _ragged(how, rows[local.reshape(-1)[order]], jnp.zeros((r_l, rows.shape[1]), rows.dtype), me,
                _copy_offsets(home, me, to_homes=False))  # [my slots by (home, slot)]
  arrival = jnp.argsort(jnp.argsort(home[me], stable=True))
  return _unrows(got[arrival], ws)


def _add_copy_grads(gs, cgs, slots_R, plan: Plan):
  """`gs` ([E_l, ...], this rank's experts' gradients) plus the gradients of their copies, `cgs`
  ([r_l, ...] on each rank), each sent once to its expert's home rank (the reverse of _make_copies)."""
  n_in = plan.n_ep // plan.nodes
  r_l, e_local = slots_R.shape[0] // plan.n_ep, gs[0].shape[0]
  rank = jax.lax.axis_index(plan.axes)
  _, inner = _hops(plan, rank)
  home, local = _node_slots(slots_R, plan, rank, e_local)
  if n_in == 1:
    return [g.at[local[0]].add(cg.astype(g.dtype)) for g, cg in zip(gs, cgs)]
  me = inner.member
  rows = _rows(cgs)  # [r_l, size]
  mine = (home == me).reshape(-1)  # the node's slots (member, slot) whose expert is mine
  to = jnp.where(mine, local.reshape(-1), e_local)
  if plan.transport == "padded":
    send = jnp.zeros((n_in, r_l, rows.shape[1]), rows.dtype).at[home[me], jnp.arange(r_l)].set(rows)
    got = inner.a2a(send.reshape(n_in * r_l, -1))  # [(member, its slot)]
  else:
    how = (inner.axes, tuple(map(tuple, inner.groups)) if inner.groups is not None else None,
           plan.transport == "ragged_emulated")
    out = jnp.zeros((n_in * r_l, rows.shape[1]), rows.dtype)
    arrived = _ragged(how, rows[jnp.argsort(home[me], stable=True)], out, me,
                      _copy_offsets(home, me, to_homes=True))  # the slots homed here, by (member, slot)
    got = arrived[jnp.cumsum(mine) - mine]
  return [g.at[to].add(d.astype(g.dtype), mode="drop") for g, d in zip(gs, _unrows(got, gs))]


def _stored(fn, arrays, axes, slots, par, n_out: int):
  """`fn(slots [R], local arrays, plan)` on every rank over `arrays` as they are stored ([*L, E or R,
  ...] with logical `axes`, the expert dimension after the leading stacked ones), once per stacked
  layer; its `n_out` results are sharded as the first `n_out` arrays."""
  mesh, shape, free = sharding_lib.context(par)
  lead = slots.ndim - 1
  specs = []
  for x, ax in zip(arrays, axes):
    spec = tuple(sharding_lib.logical_to_spec(ax, x.shape, shape, dict(par.rules), "experts"))
    specs.append(P(*spec, *(None,) * (x.ndim - len(spec))))
  ep_axes = _axes_of(specs[0][lead])
  plan = Plan(ep_axes, math.prod(shape[a] for a in ep_axes), par.ep_nodes, copies_transport(par), None, 1)

  def body(s, *xs):
    if lead == 0:
      return tuple(fn(s, xs, plan))
    flat = lambda x: x.reshape(-1, *x.shape[lead:])
    ys = jax.lax.map(lambda a: tuple(fn(a[0], a[1:], plan)), (flat(s), *map(flat, xs)))
    return tuple(y.reshape(x.shape[:lead] + y.shape[1:]) for y, x in zip(ys, xs))

  run = jax.shard_map(body, mesh=mesh, in_specs=(P(*specs[0][:lead], None), *specs),
                      out_specs=tuple(specs[:n_out]), axis_names=free)
  with jax.named_scope(COPIES):
    return list(run(slots, *arrays))


def copies_transport(par) -> str:
  """How the copies' weights and gradients move: exactly (ragged_all_to_all) wherever the devices
  have it, whatever mesh.ep_transport; else (CPU, large v5e slices) r_l slots to every rank of the
  node, or the ragged emulation where the dispatch emulates it too (tests)."""
  if par.ep_transport != "padded":
    return par.ep_transport
  return "padded" if par.mesh.devices.flat[0].platform == "cpu" or ragged_unsupported(par.mesh) else "ragged"


def make_copies(weights: Sequence[jax.Array], axes: Sequence[tuple], slots, par) -> list[jax.Array]:
  """The redundant slots' copies [*L, R, ...] of the experts' `weights` ([*L, E, ...], logical `axes`
  as stored, e.g. ("layers", "expert", "embed", "moe_mlp")) for the placement `slots` [*L, R] (valid
  on this mesh: eplb.in_nodes), made where the weights are stored: per layer one exchange inside
  each node of the weights' shards (FSDP and tensor slices stay where they are). Run once per
  optimizer step (moe/experts.py), not in the forward."""
  return _stored(lambda s, ws, plan: _make_copies(ws, s, plan), list(weights), list(axes), slots, par, len(weights))


def add_copy_grads(grads: Sequence[jax.Array], copy_grads: Sequence[jax.Array], axes: Sequence[tuple], slots,
                   par) -> list[jax.Array]:
  """`grads` of the experts' weights ([*L, E, ...], logical `axes` as stored) with the gradients of
  their copies (`copy_grads` [*L, R, ...], sent in their own dtype) summed in: the transpose of
  `make_copies`, once per step."""
  k = len(grads)
  return _stored(lambda s, xs, plan: _add_copy_grads(xs[:k], xs[k:], s, plan), list(grads) + list(copy_grads),
                 list(axes) * 2, slots, par, k)


def in_halves(fn):
  """`fn` over the two halves of the tokens as independent computations (mesh.ep_overlap), so that
  the compiler can run one half's exchange while the other half's experts compute."""

  def run(x, idx, w, *weights):
    h = x.shape[0] // 2
    y0, dropped0 = fn(x[:h], idx[:h], w[:h], *weights)
    y1, dropped1 = fn(x[h:], idx[h:], w[h:], *weights)
    return jnp.concatenate([y0, y1]), dropped0 + dropped1

  return run


EXCHANGED = "ep_exchanged"  # the checkpoint name of the rows an exchange received or returned


def in_chunks(fn, chunks: int, keep: bool = False):
  """`fn(x, idx, w, *weights) -> (y, dropped)` over `chunks` consecutive slices of the tokens, one
  after the other (lax.scan), each under jax.checkpoint: its expert FFN is recomputed in the backward
  pass, and its exchange too, so that only one chunk's buffers are ever live; with `keep`
  (impl.ep_remat=keep) the rows each chunk received and got back (named EXCHANGED) are saved
  instead, and the backward repeats no all-to-all."""
  if chunks == 1:
    return fn
  policy = jax.checkpoint_policies.save_only_these_names(EXCHANGED) if keep else None

  def run(x, idx, w, *weights):
    split = lambda a: a.reshape(chunks, a.shape[0] // chunks, *a.shape[1:])

    def step(_, c):
      return None, fn(*c, *weights)

    _, (ys, dropped) = jax.lax.scan(jax.checkpoint(step, policy=policy), None, (split(x), split(idx), split(w)))
    return ys.reshape(x.shape[0], -1), dropped.sum()

  return run


# ----------------------------------------------------------------- the dispatch
def ep_size(par, n_experts: int) -> int:
  """Expert-parallel ranks the `n_experts` routed experts split over on `par`'s mesh."""
  if par is None:
    return 1
  spec = sharding_lib.logical_to_spec(("expert",), (n_experts,), dict(par.mesh.shape), dict(par.rules), "experts")
  return math.prod(par.mesh.shape[a] for a in _axes_of(spec[0] if len(spec) else None))


def _axes_of(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def dispatch_combine(x_TxD, idx_TxK, w_TxK, weights: Sequence[jax.Array], weight_axes: Sequence[tuple],
                     expert_fn: Callable, par=None, routing: tuple[int, int, int] | None = None,
                     copies: jax.Array | None = None, keep_exchanged: bool = False):
  """Routed experts of one MoE layer: (y [T, D] = sum_k w[t, k] expert_{idx[t, k]}(x[t]), dropped
  assignments [] int32).

  weights: the experts' stacked parameters, [E, ...] each, with logical axes `weight_axes` (the first
  "expert"; a None dimension is gathered whole inside). expert_fn(rows [R, D], local expert [R],
  *local weights) -> [R, D]: the expert FFN of each row, whose local expert id E_l (the number of
  local experts) marks an empty row. par: a parallel.mesh.Parallelism, or None (one device).
  routing: (logical experts, n_group, topk_group) of device-limited routing, which bounds the nodes a
  token reaches in the two-level dispatch (None: no limit). copies: redundant experts
  (mesh.redundant_experts), (slots [R], copy weights): the logical expert held by each redundant
  slot (parallel/eplb.py) and its weights [R, ...] (`make_copies` of `weights`, with their
  `weight_axes`), R = n_ep * r_l; each assignment goes to one copy of its expert
  (eplb.physical_ids), and nothing moves the weights here. Ignored without expert parallelism. keep_exchanged:
  the backward of chunked dropless exchanges keeps their rows rather than exchanging again (in_chunks).
  """
  if par is None or par.mesh.size == 1:
    return _local(x_TxD, idx_TxK, w_TxK, *weights, expert_fn=expert_fn)
  mesh, shape, free = sharding_lib.context(par)  # (inside the pipeline, `stage` is already manual)
  if math.prod(shape.values()) == 1:
    return _local(x_TxD, idx_TxK, w_TxK, *weights, expert_fn=expert_fn)
  rules = dict(par.rules)

  def full_spec(wt, axes):
    spec = tuple(sharding_lib.logical_to_spec(axes, wt.shape, shape, rules, "experts"))
    return spec + (None,) * (wt.ndim - len(spec))

  specs = [full_spec(wt, a) for wt, a in zip(weights, weight_axes)]
  ep_axes = _axes_of(specs[0][0])
  n_ep = math.prod(shape[a] for a in ep_axes)

  # Token axes: the batch axes, plus the expert axes (each EP rank must hold its own tokens), then the
  # axes that split each sequence (context parallelism): [batch * seq] flattened, as the tokens lie.
  t = x_TxD.shape[0]
  batch_axes = [a for a in rules.get("batch", ()) if shape.get(a, 1) > 1 and a not in ep_axes]
  seq_axes = [a for a in rules.get("seq", ()) if shape.get(a, 1) > 1 and a not in ep_axes + tuple(batch_axes)]
  token_axes = list(batch_axes) + list(ep_axes) + seq_axes
  if t % n_ep:
    raise ValueError(f"expert parallelism: {t} tokens do not divide over {'x'.join(ep_axes)}={n_ep}")
  while t % math.prod(shape[a] for a in token_axes):
    token_axes.remove(batch_axes.pop())
  # The experts' other dimensions: sharded over the non-token axes (tensor parallelism), whose
  # partial outputs are summed.
  inner = [tuple(tuple(a for a in _axes_of(s) if a not in token_axes) for s in spec[1:]) for spec in specs]
  tp_axes = tuple(dict.fromkeys(a for dims in inner for axes in dims for a in axes))
  ep = ep_axes if ep_axes else None
  weight_specs = [P(ep, *(axes or None for axes in dims)) for dims in inner]
  tok = P(tuple(token_axes) if token_axes else None)

  def local_fn(rows, expert, *ws):
    y = expert_fn(rows, expert, *ws)
    return jax.lax.psum(y, tp_axes) if tp_axes else y

  t_local = t // math.prod(shape[a] for a in token_axes)
  k, e_local = idx_TxK.shape[1], weights[0].shape[0] // n_ep
  chunks = dropless_chunks(t_local, k, n_ep, e_local, par.ep_chunks) if par.dropless and n_ep > 1 else 1
  nodes = par.ep_nodes
  if n_ep % nodes:
    raise ConfigError(f"mesh.ep_nodes={nodes} does not divide the {n_ep} expert-parallel ranks"
                      f" ({'x'.join(ep_axes) or 'expert'}={n_ep})")
  if n_ep == 1:
    fn = functools.partial(_local, expert_fn=local_fn)
  else:
    n_experts, n_group, topk_group = routing or (n_ep * e_local, 1, 1)
    plan = Plan(ep_axes, n_ep, nodes, par.ep_transport, par.capacity_factor,
                ranks_per_token(n_experts, nodes, k, n_group, topk_group))
    fn = functools.partial(_exchange, expert_fn=local_fn, plan=plan)
  if par.ep_overlap and n_ep > 1:
    if t_local % (2 * chunks):
      raise ConfigError(f"mesh.ep_overlap: the {t_local} tokens of each expert-parallel rank do not split into"
                        f" {chunks} chunk(s) of two halves")
    fn = in_halves(fn)
  fn = in_chunks(fn, chunks, keep_exchanged)
  slots, copy_weights = (None, ()) if copies is None or n_ep == 1 else copies

  def body(x, idx, w, slots_R, *ws):
    if slots_R is not None:  # this rank's copies follow its own experts
      k = len(ws) // 2
      ws = [jnp.concatenate([a, c.astype(a.dtype)]) for a, c in zip(ws[:k], ws[k:])]
      idx = eplb.physical_ids(idx, eplb.usable(slots_R, n_ep * e_local, n_ep, nodes), n_ep * e_local, n_ep)
    y, dropped = fn(x, idx, w, *ws)
    return y, jax.lax.psum(dropped, tuple(token_axes)) if token_axes else dropped

  return jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, P(), *weight_specs, *weight_specs[:len(copy_weights)]),
                       out_specs=(tok, P()), axis_names=free)(
      x_TxD, idx_TxK, w_TxK, slots, *weights, *copy_weights)
