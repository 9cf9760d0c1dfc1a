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

  1. each (token, k) assignment goes to rank idx // E_l, the rank owning its expert
  2. exchange with those ranks (all-to-all over `expert`)
  3. `expert_fn` over the received rows; with tensor parallelism each rank holds a slice of every
     expert's width and the partial outputs are summed (psum over `tensor`)
  4. exchange back (the reverse all-to-all)
  5. weighted combine of the K expert outputs per token; the shared experts are added by the
     caller (outside shard_map, where XLA shards them like any dense FFN).

Transports (`mesh.ep_transport`):
  dropless exchanges (ragged, or padded without a capacity factor) size their receive buffers for the
          worst case, every rank's tokens choosing this rank's experts; the tokens go in chunks
          (`dropless_chunks`, `mesh.ep_chunks`), one at a time with their buffers recomputed in the
          backward pass, so that a chunk's worst case is at most the balanced receive of all tokens.
  padded  `jax.lax.all_to_all` of fixed [n_ep, C, D] buffers: each rank sends at most C assignments
          to each other rank, C = ceil(capacity_factor * T*K / n_ep), capped at the dropless
          T * min(K, E_l). Which assignments drop: per destination rank, a rank's assignments in
          (token, k) order (token-major, then the k-th choice), the first C are sent and the rest
          dropped (`padded_slots`); a dropped assignment's expert output counts as exactly 0, and the
          count (`dropped`, reported by the trainer as `dropped_tokens`: dropped (token, expert)
          assignments per step, padding tokens included) is returned. capacity_factor null:
          dropless (C = T * min(K, E_l)). Works on every backend.
  ragged  `jax.lax.ragged_all_to_all`: sends exactly the assignments each rank needs (dropless); the
          receive buffer is sized for the worst case, n_ep * T * min(K, E_l) rows. For GPU/TPU.
          XLA:CPU does not implement ragged-all-to-all, so on CPU `ragged` runs the same code with
          the collective emulated by all_gather (tests use this to check the offsets arithmetic);
          the real collective is only exercised on GPU/TPU.
  auto    padded on CPU and on v5e slices above 32 chips (libtpu has no ragged-all-to-all there),
          ragged elsewhere (`resolve_transport`, once, from the mesh's devices).

Device-limited routing (DeepSeek-V2/V3): the router picks experts within `topk_group` of `n_group`
groups; groups are contiguous expert ranges and so are ranks' experts, so with n_group == n_ep a group
is a rank and a token goes to at most topk_group ranks. If n_group is a multiple of n_ep a rank holds
n_group / n_ep whole groups (still <= topk_group ranks per token); if n_ep is a multiple of n_group a
group spans n_ep / n_group ranks, so a token may reach topk_group * n_ep / n_group ranks. Otherwise
groups and ranks do not nest and the bound is min(K, n_ep) ranks (`ranks_per_token`).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Callable, Literal, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from parallel import sharding as sharding_lib
from parallel.errors import ConfigError

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
  """Most expert-parallel ranks one token's K assignments can reach (device-limited routing)."""
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


def capacity(t: int, k: int, n_ep: int, e_local: int, capacity_factor: float | None) -> int:
  """Rows per (source, destination) rank pair of the padded transport."""
  dropless = t * min(k, e_local)
  if capacity_factor is None:
    return dropless
  return max(1, min(dropless, math.ceil(capacity_factor * t * k / n_ep)))


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
  """(slot in the [n_ep * C] send buffer of each assignment, kept?) for assignments going to ranks
  `dest_N`: per destination, the first C assignments in order are kept; the slot of a dropped one is
  n_ep * C (out of range)."""
  n = dest_N.shape[0]
  order = jnp.argsort(dest_N, stable=True)
  counts = jnp.bincount(dest_N, length=n_ep)
  starts = jnp.cumsum(counts) - counts
  pos = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32) - starts[dest_N[order]])
  keep = pos < c
  return jnp.where(keep, dest_N * c + pos, n_ep * c), keep


def _padded(x_TxD, idx_TxK, w_TxK, *weights, expert_fn, ep_axes, n_ep, capacity_factor):
  t, k = idx_TxK.shape
  d, e_local = x_TxD.shape[1], weights[0].shape[0]
  c = capacity(t, k, n_ep, e_local, capacity_factor)
  flat = idx_TxK.reshape(-1)
  slot, keep = padded_slots(flat // e_local, n_ep, c)
  send_x = jnp.zeros((n_ep * c, d), x_TxD.dtype).at[slot].set(jnp.repeat(x_TxD, k, axis=0), mode="drop")
  send_e = jnp.full((n_ep * c,), e_local, jnp.int32).at[slot].set(flat % e_local, mode="drop")
  a2a = functools.partial(jax.lax.all_to_all, axis_name=ep_axes, split_axis=0, concat_axis=0, tiled=True)
  y_back = a2a(expert_fn(a2a(send_x), a2a(send_e), *weights))
  y = jnp.where(keep[:, None], y_back[jnp.minimum(slot, n_ep * c - 1)], 0)
  return combine(y, w_TxK), (~keep).sum().astype(jnp.int32)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
  """jax.lax.ragged_all_to_all (one slice per peer) built from all_gather, for backends without it.
  Moves n_ep times the data; for tests and CPU only."""
  del recv_sizes  # implied by the senders' send_sizes
  n = jax.lax.axis_size(axis_name)
  me = jax.lax.axis_index(axis_name)
  ops = jax.lax.all_gather(operand, axis_name)  # [n, M, D]
  in_off, sizes, out_off = (jax.lax.all_gather(a, axis_name) for a in (input_offsets, send_sizes, output_offsets))
  rows = jnp.arange(operand.shape[0])
  result = output
  for s in range(n):
    start, size, dst = in_off[s, me], sizes[s, me], out_off[s, me]
    target = jnp.where((rows >= start) & (rows < start + size), dst + rows - start, output.shape[0])
    result = result.at[target].set(ops[s], mode="drop")
  return result


def _ragged(x_TxD, idx_TxK, w_TxK, *weights, expert_fn, ep_axes, n_ep, emulate):
  t, k = idx_TxK.shape
  n, d, e_local = t * k, x_TxD.shape[1], weights[0].shape[0]
  r = n_ep * t * min(k, e_local)  # worst-case rows received
  ragged_a2a = emulated_ragged_all_to_all if emulate else jax.lax.ragged_all_to_all
  a2a = functools.partial(jax.lax.all_to_all, axis_name=ep_axes, split_axis=0, concat_axis=0, tiled=True)
  exclusive = lambda c: (jnp.cumsum(c) - c).astype(jnp.int32)

  # Source side: assignments sorted by global expert, hence by owning rank, then local expert.
  flat = idx_TxK.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  x_sorted = x_TxD[order // k]
  send_counts = jnp.bincount(flat, length=n_ep * e_local).astype(jnp.int32).reshape(n_ep, e_local)
  send_sizes = send_counts.sum(1)
  input_offsets = exclusive(send_sizes)

  # What each rank receives: per source, per local expert; chunks packed back to back by source.
  recv_counts = a2a(send_counts)  # [n_ep (source), E_l]
  recv_sizes = recv_counts.sum(1)
  recv_offsets = exclusive(recv_sizes)
  output_offsets = a2a(recv_offsets)  # where my slice lands on each destination
  rx = ragged_a2a(x_sorted, jnp.zeros((r, d), x_TxD.dtype), input_offsets, send_sizes, output_offsets, recv_sizes,
                  axis_name=ep_axes)

  # Local expert of each received row: segments (source, expert) in order, sizes recv_counts.
  seg_end = jnp.cumsum(recv_counts.reshape(-1))
  seg = jnp.searchsorted(seg_end, jnp.arange(r, dtype=jnp.int32), side="right")
  expert = jnp.where(seg < n_ep * e_local, seg % e_local, e_local).astype(jnp.int32)
  y_rx = expert_fn(rx, expert, *weights)

  # Back to the sources, into their sorted order, then unsort and combine.
  y_sorted = ragged_a2a(y_rx, jnp.zeros((n, d), y_rx.dtype), recv_offsets, recv_sizes, a2a(input_offsets),
                        send_sizes, axis_name=ep_axes)
  y = jnp.zeros_like(y_sorted).at[order].set(y_sorted)
  return combine(y, w_TxK), jnp.zeros((), jnp.int32)


def in_chunks(fn, chunks: int):
  """`fn(x, idx, w, *weights) -> (y, dropped)` over `chunks` consecutive slices of the tokens, one
  after the other (lax.scan); each chunk's exchange and expert FFN are recomputed in the backward
  pass (jax.checkpoint), so only one chunk's buffers are ever live."""
  if chunks == 1:
    return fn

  def run(x, idx, w, *weights):
    split = lambda a: a.reshape(chunks, a.shape[0] // chunks, *a.shape[1:])

    def step(_, c):
      return None, fn(*c, *weights)

    _, (ys, dropped) = jax.lax.scan(jax.checkpoint(step), None, (split(x), split(idx), split(w)))
    return ys.reshape(x.shape[0], -1), dropped.sum()

  return run


# ----------------------------------------------------------------- the dispatch
def _axes_of(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def dispatch_combine(x_TxD, idx_TxK, w_TxK, weights: Sequence[jax.Array], weight_axes: Sequence[tuple],
                     expert_fn: Callable, par=None):
  """Routed experts of one MoE layer: (y [T, D] = sum_k w[t, k] expert_{idx[t, k]}(x[t]), dropped
  assignments [] int32).

  weights: the experts' stacked parameters, [E, ...] each, with logical axes `weight_axes` (the first
  "expert"; a None dimension is gathered whole inside). expert_fn(rows [R, D], local expert [R],
  *local weights) -> [R, D]: the expert FFN of each row, whose local expert id E_l (the number of
  local experts) marks an empty row. par: a parallel.mesh.Parallelism, or None (one device).
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

  # Token axes: the batch axes, plus the expert axes (each EP rank must hold its own tokens).
  t = x_TxD.shape[0]
  batch_axes = [a for a in rules.get("batch", ()) if shape.get(a, 1) > 1 and a not in ep_axes]
  token_axes = list(batch_axes) + list(ep_axes)
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
  dropless = par.ep_transport != "padded" or par.capacity_factor is None
  chunks = dropless_chunks(t_local, k, n_ep, e_local, par.ep_chunks) if dropless and n_ep > 1 else 1
  if n_ep == 1:
    fn = functools.partial(_local, expert_fn=local_fn)
  elif par.ep_transport == "padded":
    fn = functools.partial(_padded, expert_fn=local_fn, ep_axes=ep_axes, n_ep=n_ep,
                           capacity_factor=par.capacity_factor)
  elif par.ep_transport in ("ragged", "ragged_emulated"):
    fn = functools.partial(_ragged, expert_fn=local_fn, ep_axes=ep_axes, n_ep=n_ep,
                           emulate=par.ep_transport == "ragged_emulated")
  else:
    raise ValueError(f"unknown expert-parallel transport {par.ep_transport!r}")

  fn = in_chunks(fn, chunks)

  def body(x, idx, w, *ws):
    y, dropped = fn(x, idx, w, *ws)
    return y, jax.lax.psum(dropped, tuple(token_axes)) if token_axes else dropped

  return jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, *weight_specs), out_specs=(tok, P()),
                       axis_names=free)(
      x_TxD, idx_TxK, w_TxK, *weights)
