"""One MoE layer's exchange on one rank (inside shard_map), in one or two hops.

  1. across nodes (nodes > 1): each token once to every node holding some of its K experts, to the
     rank with this rank's position there (all-to-all among the ranks of the same position, DeepEP's
     "rail"), carrying x, all K expert ids and router weights
  2. inside the node: each (row, k) assignment whose expert is in this node to the rank owning it
     (all-to-all among the node's ranks; with one node that is every rank, the one-level exchange)
  3. `expert_fn` over the received rows (the ragged transport places each (sender, expert) slice
     so that the rows arrive sorted by expert: the grouped matmul reads them with no sort); with
     tensor parallelism each rank holds a slice of every expert's width and the partial outputs are
     summed (psum over `tensor`)
  4. back inside the node, and the node's weighted sum of its experts' outputs per row
  5. back across nodes in one trip per (token, node), summed per token (the ragged transport adds
     returned rows into their sums as they arrive, never making a row per assignment); the shared
     experts are added by the caller (outside shard_map, where XLA shards them like any dense FFN).

Each hop by the padded or the ragged transport (padded.py, ragged.py). Dropless exchanges go in
chunks, one at a time with their buffers recomputed in the backward pass (`in_chunks`);
`mesh.ep_overlap`: the tokens of each chunk in two independent halves (`in_halves`), so that one
half's exchange can run while the other half computes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from parallel.expert_parallel.padded import send_padded
from parallel.expert_parallel.plan import EXCHANGED, Plan, capacity, combine, hops, node_capacity
from parallel.expert_parallel.ragged import send_ragged

FAST_PATH = "ep_fast_path"  # the named scope of the fast path's operations (the forecast counts them)
FALLBACK = "ep_fallback"  # and of the chunked exchange it falls back to (a branch the forecast does not count)


def local(x_TxD, idx_TxK, w_TxK, *weights, expert_fn):
  """All experts on this rank: every (token, k) assignment is one row."""
  y = expert_fn(jnp.repeat(x_TxD, idx_TxK.shape[1], axis=0), idx_TxK.reshape(-1), *weights)
  return combine(y, w_TxK), jnp.zeros((), jnp.int32)


def exchange(x_TxD, idx_TxK, w_TxK, *weights, expert_fn, plan: Plan):
  """The routed experts of this rank's tokens, in one or two hops (module docstring)."""
  t, k = idx_TxK.shape
  e_local = weights[0].shape[0]
  n_in = plan.n_ep // plan.nodes
  per_node = e_local * n_in
  padded, cf = plan.transport == "padded", plan.capacity_factor
  emulate = plan.transport == "ragged_emulated"
  rank = jax.lax.axis_index(plan.axes)
  node = rank // n_in
  outer, inner = hops(plan, rank)
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
    if padded:
      c = node_capacity(t, plan.nodes_per_token, plan.nodes, cf)
      (x_R, idx_R, w_R), back_outer, lost = send_padded(outer, dest_N, c, payloads)
    else:
      most_sent = t * plan.nodes_per_token
      (x_R, idx_R, w_R), back_outer, lost, _ = send_ragged(outer, dest_N, most_sent,
                                                            plan.across_rows or plan.nodes * t, payloads, emulate)
    dropped += (hits_TxG.reshape(-1) * lost).sum().astype(jnp.int32)
    x_R, idx_R, w_R = (checkpoint_name(a, EXCHANGED) for a in (x_R, idx_R, w_R))

  # 2. Inside the node: each (row, k) assignment to the rank owning its expert; the expert FFN there.
  rows = x_R.shape[0]
  mine_RxK = idx_R // per_node == node
  dest_N = jnp.where(mine_RxK, idx_R // e_local % n_in, n_in).reshape(-1)
  expert_N = jnp.where(mine_RxK, idx_R % e_local, e_local).reshape(-1)
  row_N = jnp.arange(rows * k, dtype=jnp.int32) // k
  if n_in == 1:  # (an empty row's output and gradient are undefined, moe/kernels/expert_ffn.py: masked both ways)
    x_N = jnp.where(mine_RxK.reshape(-1, 1), x_R[row_N], 0)
    y_N = jnp.where(mine_RxK.reshape(-1, 1), expert_fn(x_N, expert_N, *weights), 0)
    y_R = combine(y_N, jnp.where(mine_RxK, w_R, 0))  # 3. the node's weighted sum per row
  else:
    if padded:
      c = capacity(t, k, n_in, e_local, cf, rows)
      payloads = [(x_R, row_N, 0), (expert_N, jnp.arange(rows * k, dtype=jnp.int32), e_local)]
      (rx, ex), back_inner, lost = send_padded(inner, dest_N, c, payloads)
      rx, ex = checkpoint_name(rx, EXCHANGED), checkpoint_name(ex, EXCHANGED)
      y = expert_fn(rx, ex, *weights)
    else:  # the rows arrive sorted by local expert: the grouped matmul reads them where they land
      most_sent = plan.inside_rows or rows * min(k, per_node)
      most_received = plan.receive_rows or n_in * rows * min(k, e_local)
      (rx,), back_inner, lost, sizes = send_ragged(inner, dest_N, most_sent, most_received, [(x_R, row_N, 0)],
                                                    emulate, expert_N, e_local)
      rx, sizes = checkpoint_name(rx, EXCHANGED), checkpoint_name(sizes, EXCHANGED)
      y = expert_fn(rx, group_ids(sizes, most_received), *weights, group_sizes=sizes)
    dropped += lost.sum().astype(jnp.int32)
    # 3. Back: the node's weighted sum of its experts' outputs per row (the ragged transport sums the
    #    rows as they come back, never making a row per assignment)
    y_R = back_inner(y, k, jnp.where(mine_RxK, w_R, 0).reshape(-1))
  if plan.nodes == 1:
    return y_R, dropped
  return back_outer(y_R, plan.nodes), dropped  # one trip per node to the token, summed there


def group_ids(sizes_G, rows: int):
  """[rows]: the group of each row of a buffer holding sizes_G[g] rows of each group g one after
  another from its first row; len(sizes_G) for the rows after them (empty)."""
  return (jnp.arange(rows, dtype=jnp.int32)[:, None] >= jnp.cumsum(sizes_G)[None]).sum(1).astype(jnp.int32)


def loads(plan: Plan, idx_TxK, e_local: int):
  """[len(plan.bounds())]: the most rows any rank of the expert-parallel group must hold in each of the
  fast path's buffers for these tokens (each rank's `idx_TxK`, its tokens' experts): the assignments it
  receives for its experts and, in two levels, first the token rows it receives across nodes (one a
  token and node its experts are in, from the rank with its position in the token's node) and the
  assignments among those it sends inside its node. Counted here for every rank, summed over the group."""
  n_in = plan.n_ep // plan.nodes
  receive = jnp.bincount((idx_TxK // e_local).reshape(-1), length=plan.n_ep)
  if plan.nodes == 1:
    counts = receive[None]
  else:
    node_TxK = idx_TxK // (e_local * n_in)
    hits_G = (node_TxK[:, :, None] == jnp.arange(plan.nodes)).any(1).sum(0)  # tokens with experts in each node
    rail_G = jnp.arange(plan.nodes) * n_in + jax.lax.axis_index(plan.axes) % n_in  # my position in each node
    across = jnp.zeros(plan.n_ep, jnp.int32).at[rail_G].add(hits_G.astype(jnp.int32))
    inside = jnp.zeros(plan.n_ep, jnp.int32).at[rail_G].add(jnp.bincount(node_TxK.reshape(-1), length=plan.nodes))
    counts = jnp.stack([across, inside, receive.astype(jnp.int32)])
  return jax.lax.psum(counts, plan.axes).max(1)


def with_fast_path(fast, slow, plan: Plan, token_axes: tuple[str, ...], parts: int = 1):
  """`fast(x, idx, w, *weights)` (the ragged exchange of all the tokens at once, in the buffers of
  `plan.bounds()`) when no rank would need more this layer, else `slow` (the chunked exchange sized for
  the worst case): both dropless, equal up to rounding. One decision for the whole mesh, a pmax over
  the token axes, so that every device runs the same branch's collectives. The fast path reads the
  local experts' weights and writes their gradient once, not once per chunk, and its buffers hold few
  rows no token fills. `parts`: `fast` exchanges that many consecutive slices of the tokens one after
  another (in_halves), each in buffers of `plan.bounds()`.

  The fast path runs outside any conditional, so that the compiler can schedule the layer's other
  work under its all-to-alls; a collective inside a conditional's branch can only overlap that
  branch (V3 on h100x256: 244.9 -> 236.8 s a step forecast, docs/pods.md). Where it does not fit it
  sends nothing (every assignment to no expert) and a conditional runs the chunks instead (named
  FALLBACK; the forecast counts the fast path). Returns (y, dropped, 1 where the chunks ran else 0)."""
  def run(x, idx, w, *weights):
    e_local = weights[0].shape[0]
    split = idx.reshape(parts, -1, idx.shape[1])
    most = jax.lax.pmax(jax.vmap(lambda i: loads(plan, i, e_local))(split).max(0), token_axes)
    fits = (most <= jnp.asarray(plan.bounds())).all()
    with jax.named_scope(FAST_PATH):
      y, dropped = fast(x, jnp.where(fits, idx, plan.n_ep * e_local), w, *weights)  # (n_ep * e_local: no expert)

    def fallback(*args):
      with jax.named_scope(FALLBACK):
        return slow(*args)

    return *jax.lax.cond(fits, lambda *_: (y, dropped), fallback, x, idx, w, *weights), (~fits).astype(jnp.int32)

  return run


def in_halves(fn):
  """`fn` over the two halves of the tokens as independent computations (mesh.ep_overlap), so that
  the compiler can run one half's exchange while the other half's experts compute."""

  def run(x, idx, w, *weights):
    h = x.shape[0] // 2
    y0, dropped0 = fn(x[:h], idx[:h], w[:h], *weights)
    y1, dropped1 = fn(x[h:], idx[h:], w[h:], *weights)
    return jnp.concatenate([y0, y1]), dropped0 + dropped1

  return run


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
