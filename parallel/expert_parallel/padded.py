"""The padded transport (`mesh.ep_transport: padded`): `jax.lax.all_to_all` of fixed buffers.

Per (source rank, destination node) at most `plan.node_capacity` = ceil(capacity_factor * T *
nodes_per_token / nodes) tokens (nodes_per_token: the most nodes one token reaches), per (source,
destination) rank pair inside a node at most `plan.capacity` = ceil(capacity_factor * T * K / n_in)
assignments. Which rows drop: per destination, the first ones in (token, k) order are sent
(`padded_slots`), the rest dropped; a dropped assignment's expert output counts as exactly 0, and the
count (`dropped`, reported by the trainer as `dropped_tokens`: dropped (token, expert) assignments per
step, padding tokens included, a token dropped at a node counting each of its experts there) is
returned. capacity_factor null: dropless (T per node, every received row's assignments inside).
Works on every backend.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from parallel.expert_parallel.plan import EXCHANGED, Hop, group_sum, padded_take


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


def send_padded(hop: Hop, dest_N, c: int, payloads):
  """Rows to ranks `dest_N` (hop.n: not sent) in fixed [n * C] buffers: (received [n * C, ...] per
  payload (table, row of each of the N rows, fill), back, rows dropped). back(y [n * C, D], m=1, w=None)
  -> [N / m, D]: each row's result back where it came from, summed over each m consecutive rows (times
  w [N], if given)."""
  slot, keep = padded_slots(dest_N, hop.n, c)
  received = []
  for table, rows, fill in payloads:
    src = jnp.full((hop.n * c,), table.shape[0], jnp.int32).at[slot].set(rows, mode="drop")
    received.append(hop.a2a(padded_take(table, src, fill)))

  def back(y, m=1, w=None):
    y_back = hop.a2a(y)
    y_N = checkpoint_name(jnp.where(keep[:, None], y_back[jnp.minimum(slot, hop.n * c - 1)], 0), EXCHANGED)
    return group_sum(y_N, m, w)

  return received, back, (dest_N < hop.n) & ~keep
