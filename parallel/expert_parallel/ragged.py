"""The ragged transport (`mesh.ep_transport: ragged`): `jax.lax.ragged_all_to_all`, dropless.

It sends exactly the rows each rank needs; the send and receive buffers are sized for the worst case
the routing allows. A row the send buffer cannot hold (a bound that is wrong: a bug) is counted in
`dropped` like a padded drop, and the trainer stops at a dropless step that dropped anything. For
GPU/TPU. XLA:CPU does not implement ragged-all-to-all, so on CPU `ragged` runs the same code with the
collective emulated by all_gather (`ragged_emulated`; tests use it to check the offsets arithmetic);
the real collective is only exercised on GPU/TPU. Its gradient is the same exchange the other way
(`_ragged_move`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from parallel.expert_parallel.plan import EXCHANGED, Hop, exclusive, group_sum, padded_take


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name, axis_index_groups=None, member=None):
  """jax.lax.ragged_all_to_all (one or more slices per peer) built from all_gather, for backends
  without it (`member`: this rank's position in its group of `axis_index_groups`). Moves n times the
  data; for tests and CPU only."""
  del recv_sizes  # implied by the senders' send_sizes
  gather = functools.partial(jax.lax.all_gather, axis_name=axis_name, axis_index_groups=axis_index_groups)
  me = jax.lax.axis_index(axis_name) if member is None else member
  ops = gather(operand)  # [n, M, D]
  n = ops.shape[0]
  per_peer = send_sizes.shape[0] // n
  in_off, sizes, out_off = (gather(a) for a in (input_offsets, send_sizes, output_offsets))  # [n, n * per_peer]
  mine = lambda a: jax.lax.dynamic_slice_in_dim(a, me * per_peer, per_peer, axis=1)[:, None]  # [n, 1, per_peer]
  start, size, dst = mine(in_off), mine(sizes), mine(out_off)  # the senders' slices for me
  rows = jnp.arange(operand.shape[0])[None, :, None]
  inside = (rows >= start) & (rows < start + size)  # [n, M, per_peer]: row of sender, in its slice j
  target = jnp.where(inside.any(2), (inside * (dst + rows - start)).sum(2), output.shape[0])  # [n, M]
  return output.at[target.reshape(-1)].set(ops.reshape(-1, *ops.shape[2:]), mode="drop")


def how_of(hop: Hop, emulate: bool):
  """The static description of `hop` that ragged_a2a takes: (axes, groups as tuples, emulated?)."""
  return hop.axes, tuple(map(tuple, hop.groups)) if hop.groups is not None else None, emulate


def ragged_a2a(how, x, out, member, offsets):
  """ragged_all_to_all of `x` into `out` (`how`: axes, groups, emulated?; `member`: this rank's place
  in its group, for the emulation)."""
  axes, groups, emulate = how
  groups = [list(g) for g in groups] if groups is not None else None
  if emulate:
    return emulated_ragged_all_to_all(x, out, *offsets, axis_name=axes, axis_index_groups=groups, member=member)
  return jax.lax.ragged_all_to_all(x, out, *offsets, axis_name=axes, axis_index_groups=groups)


def fresh(shape, fill, dtype, key):
  """jnp.full(shape, fill, dtype) as a buffer of its own for one collective (`key`: an array that
  differs between the collectives, e.g. their offsets). ragged_all_to_all writes into its output
  buffer in place; XLA merges identical fills into one and then copies it for each collective, which
  reads and writes the buffer where filling it only writes (V3 on h100x256: 7 copies of 1 GiB in
  each layer's backward)."""
  fill, _ = jax.lax.optimization_barrier((jnp.asarray(fill, dtype), key))  # (distinct keys: distinct buffers)
  return jnp.broadcast_to(fill, shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ragged_move(how, x, out, member, there, back):
  """ragged_a2a(x, out, there), whose gradient is the same exchange the other way, ragged_a2a(dy, 0, back)
  (jax's own transpose of ragged_all_to_all drops axis_index_groups)."""
  return ragged_a2a(how, x, out, member, there)


def _ragged_move_fwd(how, x, out, member, there, back):
  return ragged_a2a(how, x, out, member, there), (jnp.zeros((x.shape[0], 0), x.dtype), member, back)


def _ragged_move_bwd(how, res, dy):
  rows, member, back = res  # (rows: x's row count, in an empty array)
  zeros = fresh((rows.shape[0], *dy.shape[1:]), 0, dy.dtype, back[0])
  return ragged_a2a(how, dy, zeros, member, back), None, None, None, None


_ragged_move.defvjp(_ragged_move_fwd, _ragged_move_bwd)


def send_ragged(hop: Hop, dest_N, most_sent: int, most_received: int, payloads, emulate: bool, group_N=None,
                groups: int = 1):
  """Rows to ranks `dest_N` (hop.n: not sent) by ragged all-to-all, exactly the rows each rank needs,
  in buffers of `most_sent` rows sent and `most_received` received. Returns as send_padded, and the
  rows received in each group [groups]: a row the send buffer cannot hold (its bound too small: a bug,
  which the trainer stops on) is not sent and comes back as 0, and is reported lost, never silently.
  Summed over m rows: where fewer rows were sent than N (the two-level dispatch's), the returned rows
  are added (in float32) into their sums as they come back, so the work is the rows sent, not N.

  `groups` > 1 (`group_N` [N]: each row's group at its destination, < groups, e.g. its local expert
  there): the rows arrive grouped, each group's rows contiguous (by sender within it) and the groups
  one after another from the buffer's first row, so that a grouped matmul reads the buffer as it is,
  with no sort. Each sender sends a slice per (peer, group), which the collective places directly."""
  n, g = hop.n, groups
  how = how_of(hop, emulate)
  key_N = dest_N if g == 1 else jnp.where(dest_N < n, dest_N * g + group_N, n * g)  # (peer, group); n * g: not sent
  by_key = jnp.argsort(key_N, stable=True)  # by destination and group; the rows not sent last
  order = by_key[:most_sent]
  send_sizes = jnp.bincount(key_N, length=n * g + 1)[:n * g].astype(jnp.int32)
  send_sizes = jnp.minimum(send_sizes, jnp.maximum(most_sent - exclusive(send_sizes), 0))  # what fits
  lost = jnp.zeros(dest_N.shape, bool).at[by_key].set(jnp.arange(dest_N.shape[0]) >= most_sent) & (dest_N < n)
  input_offsets = exclusive(send_sizes)
  recv_sizes = hop.a2a(send_sizes)  # [n * g]: rows from each (peer, group)
  received_SxG = recv_sizes.reshape(n, g)
  # each group's rows from the buffer's start, by sender within the group
  recv_offsets = (exclusive(received_SxG.sum(0))[None] + jnp.cumsum(received_SxG, 0) - received_SxG).reshape(-1)
  there = (input_offsets, send_sizes, hop.a2a(recv_offsets), recv_sizes)  # (where my rows land on each peer)
  back = (recv_offsets, recv_sizes, hop.a2a(input_offsets), send_sizes)
  # (the fills are keyed apart from the gradients' fills of the same shapes, which _ragged_move_bwd keys
  # on back[0] / there[0]: equal shapes and keys would be merged into one buffer again)
  received = [_ragged_move(how, padded_take(table, rows[order], fill),
                           fresh((most_received, *table.shape[1:]), fill, table.dtype, there[2]), hop.member, there, back)
              for table, rows, fill in payloads]

  def back_to_senders(y, m=1, w=None):
    y_sorted = checkpoint_name(_ragged_move(how, y, fresh((most_sent, *y.shape[1:]), 0, y.dtype, back[2]), hop.member,
                                            back, there), EXCHANGED)  # (rows not sent come back as 0)
    if most_sent >= dest_N.shape[0] or m == 1 and w is None:  # (a row each, no more than were sent)
      return group_sum(jnp.zeros((dest_N.shape[0], *y.shape[1:]), y.dtype).at[order].set(y_sorted), m, w)
    part = y_sorted.astype(jnp.float32) * (w[order].astype(jnp.float32)[:, None] if w is not None else 1)
    return jnp.zeros((dest_N.shape[0] // m, *y.shape[1:]), jnp.float32).at[order // m].add(part).astype(y.dtype)

  return received, back_to_senders, lost, received_SxG.sum(0)
