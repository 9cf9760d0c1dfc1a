"""Expert parallelism: routed experts split over the `expert` mesh axis, tokens exchanged by all-to-all.

The MoE block (moe/experts.py) asks `dispatcher(n_experts)` for a function; it gets one when a mesh
with more than one device is current (parallel.mesh.activate, or jax.set_mesh), else None and uses
the single-device `sorted_experts`. The function runs inside `jax.shard_map` over the whole mesh:

  tokens  [T, D] split over the batch axes (data x fsdp x expert); routing was done outside, per token
  experts [E, D, F] split over `expert` (E_l = E / n_ep per rank) and on F over `tensor`;
          gathered over `fsdp` at the shard_map boundary (FSDP: XLA all-gathers the weights going
          in and reduce-scatters their gradients coming out)

  1. each (token, k) assignment goes to rank idx // E_l, the rank owning its expert
  2. exchange with those ranks (all-to-all over `expert`)
  3. grouped matmul over the local experts (`jax.lax.ragged_dot` on rows sorted by local expert;
     on CPU moe.experts.blocked_experts, as XLA:CPU runs ragged_dot densely);
     with tensor parallelism each rank holds F / n_tp of every expert and the partial outputs are
     summed (psum over `tensor`)
  4. exchange back (the reverse all-to-all)
  5. weighted combine of the K expert outputs per token; the shared experts are added by the
     caller (outside shard_map, where XLA shards them like any dense FFN).

Transports (`mesh.ep_transport`):
  padded  `jax.lax.all_to_all` of fixed [n_ep, C, D] buffers: each rank sends at most C assignments
          to each other rank, C = ceil(capacity_factor * T*K / n_ep), capped at the dropless
          T * min(K, E_l); assignments past C are dropped (their expert output counts as 0) and
          counted (`dropped`, reported by the trainer as `dropped_tokens`: dropped (token, expert)
          assignments per step, padding tokens included). capacity_factor null: dropless (C =
          T * min(K, E_l)). Works on every backend.
  ragged  `jax.lax.ragged_all_to_all`: sends exactly the assignments each rank needs (dropless); the
          receive buffer is sized for the worst case, n_ep * T * min(K, E_l) rows. For GPU/TPU.
          XLA:CPU does not implement ragged-all-to-all, so on CPU `ragged` runs the same code with
          the collective emulated by all_gather (tests use this to check the offsets arithmetic);
          the real collective is only exercised on GPU/TPU.
  auto    padded on CPU, ragged elsewhere.

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

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe.config import ConfigError
from parallel import mesh as mesh_lib
from parallel import sharding as sharding_lib

log = logging.getLogger("parallel")

TRANSPORTS = ("auto", "padded", "ragged")


def resolve_transport(name: str, mesh) -> str:
  """'padded', 'ragged' or (CPU only) 'ragged_emulated' for the configured `name`."""
  if name not in TRANSPORTS:
    raise ConfigError(f"mesh.ep_transport={name!r} must be one of {', '.join(TRANSPORTS)}")
  platform = mesh.devices.flat[0].platform
  if name == "auto":
    return "padded" if platform == "cpu" else "ragged"
  if name == "ragged" and platform == "cpu":
    log.info("expert parallel: XLA:CPU has no ragged-all-to-all; emulating it with all_gather")
    return "ragged_emulated"
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


def capacity(t: int, k: int, n_ep: int, e_local: int, capacity_factor: float | None) -> int:
  """Rows per (source, destination) rank pair of the padded transport."""
  dropless = t * min(k, e_local)
  if capacity_factor is None:
    return dropless
  return max(1, min(dropless, math.ceil(capacity_factor * t * k / n_ep)))


# ----------------------------------------------------------------- local pieces (inside shard_map)
def _on_cpu() -> bool:
  return jax.default_backend() == "cpu"


def _grouped(rows_RxD, expert_R, gate, up, down, tp_axes, fp8=None):
  """Expert FFN of each row (expert_R in [0, E_l]; E_l marks an empty row, whose output is 0).

  GPU/TPU: rows sorted by expert, `ragged_dot` (FP8: moe.fp8.fp8_ragged_dot) over the non-empty
  rows. CPU: XLA:CPU lowers ragged_dot densely (E_l times the work), so the rows go through
  moe.experts.blocked_experts (block-padded batched matmul), where expert E_l is no expert, so
  the empty rows take no room in its layouts.
  """
  from moe import experts as experts_lib  # moe.experts imports this module

  e_local = gate.shape[0]
  if _on_cpu():
    y = experts_lib.blocked_experts(rows_RxD, expert_R[:, None], jnp.ones_like(expert_R, jnp.float32)[:, None],
                                    gate, up, down, fp8=fp8)
    return jax.lax.psum(y, tp_axes) if tp_axes else y
  if fp8 is None:
    ragged_dot = jax.lax.ragged_dot
  else:
    from moe import fp8 as fp8_lib

    ragged_dot = lambda a, b, sz: fp8_lib.fp8_ragged_dot(a, b, sz, fp8)
  order = jnp.argsort(expert_R, stable=True)
  sizes = jnp.bincount(expert_R, length=e_local + 1)[:e_local].astype(jnp.int32)
  x_sorted = rows_RxD[order]
  h = jax.nn.silu(ragged_dot(x_sorted, gate, sizes)) * ragged_dot(x_sorted, up, sizes)
  y_sorted = ragged_dot(h, down, sizes)
  y_sorted = jax.lax.psum(y_sorted, tp_axes) if tp_axes else y_sorted
  return jnp.zeros_like(y_sorted).at[order].set(y_sorted)


def _combine(y_NxD, w_TxK):
  t, k = w_TxK.shape
  return jnp.einsum("tkd,tk->td", y_NxD.reshape(t, k, -1), w_TxK.astype(y_NxD.dtype))


def _local(x_TxD, idx_TxK, w_TxK, gate, up, down, tp_axes, fp8=None):
  """No expert parallelism (n_ep == 1): the single-device grouped experts, per shard."""
  from moe import experts as experts_lib

  y = experts_lib.grouped_experts(x_TxD, idx_TxK, w_TxK, gate, up, down, fp8=fp8)
  return (jax.lax.psum(y, tp_axes) if tp_axes else y), jnp.zeros((), jnp.int32)


def _padded(x_TxD, idx_TxK, w_TxK, gate, up, down, *, ep_axes, tp_axes, n_ep, capacity_factor, fp8=None):
  t, k = idx_TxK.shape
  n, d, e_local = t * k, x_TxD.shape[1], gate.shape[0]
  c = capacity(t, k, n_ep, e_local, capacity_factor)
  flat = idx_TxK.reshape(-1)
  dest = flat // e_local  # owning rank of each assignment
  order = jnp.argsort(dest, stable=True)
  counts = jnp.bincount(dest, length=n_ep)
  starts = jnp.cumsum(counts) - counts
  pos = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32) - starts[dest[order]])
  keep = pos < c
  slot = jnp.where(keep, dest * c + pos, n_ep * c)  # out of range: dropped
  send_x = jnp.zeros((n_ep * c, d), x_TxD.dtype).at[slot].set(jnp.repeat(x_TxD, k, axis=0), mode="drop")
  send_e = jnp.full((n_ep * c,), e_local, jnp.int32).at[slot].set(flat % e_local, mode="drop")
  a2a = functools.partial(jax.lax.all_to_all, axis_name=ep_axes, split_axis=0, concat_axis=0, tiled=True)
  y_recv = _grouped(a2a(send_x), a2a(send_e), gate, up, down, tp_axes, fp8)
  y_back = a2a(y_recv)
  y = jnp.where(keep[:, None], y_back[jnp.minimum(slot, n_ep * c - 1)], 0)
  return _combine(y, w_TxK), (~keep).sum().astype(jnp.int32)


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


def _ragged(x_TxD, idx_TxK, w_TxK, gate, up, down, *, ep_axes, tp_axes, n_ep, emulate, fp8=None):
  t, k = idx_TxK.shape
  n, d, e_local = t * k, x_TxD.shape[1], gate.shape[0]
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
  y_rx = _grouped(rx, expert, gate, up, down, tp_axes, fp8)

  # Back to the sources, into their sorted order, then unsort and combine.
  y_sorted = ragged_a2a(y_rx, jnp.zeros((n, d), y_rx.dtype), recv_offsets, recv_sizes, a2a(input_offsets),
                        send_sizes, axis_name=ep_axes)
  y = jnp.zeros_like(y_sorted).at[order].set(y_sorted)
  return _combine(y, w_TxK), jnp.zeros((), jnp.int32)


# ----------------------------------------------------------------- the dispatcher
def _axes_of(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def dispatcher(n_experts: int):
  """The routed-experts function for the current mesh, or None (no mesh / one device: use
  moe.experts.sorted_experts). Signature: (x [T, D], idx [T, K], w [T, K], gate [E, D, F],
  up [E, D, F], down [E, F, D], fp8=None) -> (y [T, D], dropped assignments [] int32); `fp8` (a
  moe.fp8.Recipe, with the float32 master weights) runs the expert GEMMs in FP8."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or mesh._any_axis_manual:
    return None
  par = mesh_lib.current()
  transport = par.ep_transport if par is not None else ("padded" if mesh.abstract_device is None or
                                                        mesh.abstract_device.platform == "cpu" else "ragged")
  cf = par.capacity_factor if par is not None else None
  return functools.partial(routed_experts, mesh=mesh, rules=sharding_lib.current_rules(), transport=transport,
                           capacity_factor=cf)


def routed_experts(x_TxD, idx_TxK, w_TxK, gate, up, down, fp8=None, *, mesh, rules, transport="padded",
                   capacity_factor=None):
  """Expert-parallel routed experts over `mesh` (see the module docstring); (y [T, D], dropped)."""
  shape = dict(mesh.shape)
  gate_spec = sharding_lib.logical_to_spec(("expert", None, "moe_mlp"), gate.shape, shape, rules, "experts")
  gate_spec = tuple(gate_spec) + (None,) * (3 - len(gate_spec))
  ep_axes = _axes_of(gate_spec[0])
  n_ep = math.prod(shape[a] for a in ep_axes)

  # Token axes: the batch axes, plus the expert axes (each EP rank must hold its own tokens).
  t = x_TxD.shape[0]
  batch_axes = [a for a in rules.get("batch", ()) if shape.get(a, 1) > 1 and a not in ep_axes]
  token_axes = list(batch_axes) + list(ep_axes)
  if t % n_ep:
    raise ValueError(f"expert parallelism: {t} tokens do not divide over {'x'.join(ep_axes)}={n_ep}")
  while t % math.prod(shape[a] for a in token_axes):
    token_axes.remove(batch_axes.pop())
  tp_axes = tuple(a for a in _axes_of(gate_spec[2]) if a not in token_axes)
  ep_axes = tuple(ep_axes)
  tok = P(tuple(token_axes) if token_axes else None)
  ep = ep_axes if ep_axes else None
  tp = tp_axes if tp_axes else None

  if n_ep == 1:
    fn = functools.partial(_local, tp_axes=tp_axes, fp8=fp8)
  elif transport == "padded":
    fn = functools.partial(_padded, ep_axes=ep_axes, tp_axes=tp_axes, n_ep=n_ep, capacity_factor=capacity_factor,
                           fp8=fp8)
  elif transport in ("ragged", "ragged_emulated"):
    fn = functools.partial(_ragged, ep_axes=ep_axes, tp_axes=tp_axes, n_ep=n_ep,
                           emulate=transport == "ragged_emulated", fp8=fp8)
  else:
    raise ValueError(f"unknown expert-parallel transport {transport!r}")

  def body(x, idx, w, g, u, dn):
    y, dropped = fn(x, idx, w, g, u, dn)
    return y, jax.lax.psum(dropped, tuple(token_axes)) if token_axes else dropped

  return jax.shard_map(
      body, mesh=mesh,
      in_specs=(tok, tok, tok, P(ep, None, tp), P(ep, None, tp), P(ep, tp, None)),
      out_specs=(tok, P()),
  )(x_TxD, idx_TxK, w_TxK, gate, up, down)
