"""Embedding lookup with the table left sharded: table[ids] without gathering the table.

The table [V, D] is sharded on D over the fsdp-like axes (and on V over `tensor`). Gathering it whole
for a `take` costs a whole table per device, and a whole float32 gradient for its transpose: for
DeepSeek-V3 (129280 x 7168) 3.7 GB each, the largest buffers of its step on v5p-512 (and at 32K,
where `context` shards D too, three of them). Instead:

  1. the token ids (a few bytes each) are all-gathered over the table's D axes, each of which splits the
     tokens (the batch, or the sequence: `context`);
  2. each device looks them all up in its own column slice [V, D / n], in the compute dtype;
  3. an all-to-all sends each device its own tokens' rows, the column slices side by side: [b, s, D].

Over `tensor` (the vocabulary split) each device looks up the ids in its row range and the partial rows
are summed (Megatron's vocabulary-parallel embedding). The backward is the transpose: an all-to-all of
the rows' cotangents and a scatter-add into the local slice, so the table's gradient stays sharded too.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from parallel import sharding as sharding_lib


def _plan(table_shape, ids_shape, shape: dict, rules: dict):
  """(vocab axes, column axes, batch axes, sequence axes of the ids) if the sharded lookup applies, else
  None: each of the table's column axes must split the ids too (then each device's tokens come back
  whole)."""
  t_spec = tuple(sharding_lib.logical_to_spec(("vocab", "embed"), table_shape, shape, rules, "embedding"))
  vocab, cols = (sharding_lib.axes_of(e) for e in t_spec + (None,) * (2 - len(t_spec)))
  ids_spec = tuple(sharding_lib.logical_to_spec(("batch", "seq"), ids_shape, shape, rules, "activation"))
  batch, seq = (sharding_lib.axes_of(e) for e in ids_spec + (None,) * (2 - len(ids_spec)))
  if not cols or not set(cols) <= set(batch) | set(seq):
    return None
  return vocab, cols, batch, seq


def take_rows(table_VxD: jax.Array, ids_BxS: jax.Array, par, dtype) -> jax.Array:
  """table[ids] as `dtype`, [B, S, D], sharded like the ids; the table stays sharded."""
  if (where := sharding_lib.splitting(par)) is None:
    return jnp.take(table_VxD, ids_BxS, axis=0).astype(dtype)
  mesh, shape, free = where
  plan = _plan(table_VxD.shape, ids_BxS.shape, shape, dict(par.rules))
  if plan is None:  # whole rows, gathered by XLA
    table = sharding_lib.constrain(table_VxD, ("vocab", None), par)
    return jnp.take(table, ids_BxS, axis=0).astype(dtype)
  vocab, cols, batch, seq = plan
  v_local = table_VxD.shape[0] // math.prod(shape[a] for a in vocab)

  def local(table, ids):  # table [V / t, D / n], ids [b, s]
    b, s = ids.shape
    ids = jax.lax.all_gather(ids.reshape(-1), cols, axis=0, tiled=True)  # [n b s]: the column group's tokens
    if vocab:
      first = jax.lax.axis_index(vocab) * v_local
      mine = (ids >= first) & (ids < first + v_local)
      rows = jnp.take(table, jnp.where(mine, ids - first, 0), axis=0).astype(dtype) * mine[:, None].astype(dtype)
      rows = jax.lax.psum(rows, vocab)
    else:
      rows = jnp.take(table, ids, axis=0).astype(dtype)
    rows = jax.lax.all_to_all(rows, cols, split_axis=0, concat_axis=1, tiled=True)  # [b s, D]
    return rows.reshape(b, s, -1)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(vocab or None, cols), P(batch or None, seq or None)),
                       out_specs=P(batch or None, seq or None, None), axis_names=free)(table_VxD, ids_BxS)
