"""Ring attention over the context axis for MLA (`mesh.context_attention: ring`).

Each context slice keeps its queries and passes its latent block ([c_kv | RoPE(k_pe)], the tokens'
places and documents) to the next slice, c - 1 times, so that every slice sees every block once
without any slice holding the whole sequence's latent (the `all_gather` strategy's limit). Each
block is folded into the queries' softmax by its log-sum-exp (the latent-block core of
moe/kernels/latent_attention.py, which up-projects keys and values from the latent block by block),
and the next block's transfer is issued before the current block's attention, so that it can run
under it.

On the balanced layout (parallel.sharding.balanced_order: slice i holds sequence chunks i and
2c-1-i, L tokens each) only the tiles a causal mask leaves visible are computed: with the block from
slice j,

  j == i   chunk i x chunk i (causal), chunk 2c-1-i x chunk i, chunk 2c-1-i x chunk 2c-1-i (causal)
  j <  i   both chunks x chunk j                      (chunk 2c-1-j is later than both)
  j >  i   chunk 2c-1-i x both chunks                 (chunk i is earlier than both)

so every slice computes 2c + 1 tiles of L x L, against 4c for the queries of a slice against the
whole sequence: the same work on every slice, about half. On the tokens in order (`balanced=False`:
the MTP modules' attention) every slice computes all four tiles of every block, masked. The tiles are chosen by index (dynamic
slices), not branches, so the compiled program executes what it counts. Each tile is still masked
by the tokens' true places and documents, so packed documents stay exact.

The gradient is JAX's: each tile's backward is the latent core's (recomputed from the latent block
and the saved log-sum-exp), the fold's is elementwise, and the transfers' transposes send the
blocks' gradients back around the ring.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe.kernels import latent_attention
from parallel import sharding as sharding_lib
from parallel.common.errors import ConfigError


def attention(q_BxTxHxK, c_kv_BxTxC, k_pe_BxTxR, w_kvb_CxHxNV, index_T, seg_BxT, scale: float, par,
              block: int = 512, with_max_logit: bool = False, balanced: bool = True):
  """[B, T, H, v] (and, `with_max_logit`, each head's largest visible scaled logit [H] float32): the
  tokens of every sequence split over the `context` axis (`index_T`: each place's index in the
  original sequence), everything as laid out by the activation rules. `balanced`: the tokens are on
  the balanced layout (parallel.sharding.balanced_order), so that only its visible tiles are
  computed; else any layout, every tile computed."""
  mesh, shape, free = sharding_lib.context(par)
  spec = lambda axes, x: tuple(sharding_lib.logical_to_spec(axes, x.shape, shape, par.rules, "activation")) + (
      None,) * x.ndim
  q_spec = spec(("batch", "seq", "heads", None), q_BxTxHxK)[:4]
  lat_spec = spec(("batch", "seq", None), c_kv_BxTxC)[:3]
  axis = q_spec[1]
  if axis != "context" or lat_spec[1] != "context":
    raise ConfigError(f"mesh.context_attention=ring: the sequence must split over `context` alone (mesh.rules.seq),"
                      f" not {axis!r}")
  n = shape["context"]
  w_spec = P(None, q_spec[2], None)
  row_axes = sharding_lib.axes_of(q_spec[0]) + ("context",)
  body = functools.partial(_ring, n=n, scale=scale, block=block, with_max_logit=with_max_logit, rows=row_axes,
                           balanced=balanced)
  out_specs = (P(*q_spec), P(q_spec[2])) if with_max_logit else P(*q_spec)
  # check_vma off: W_kv_b comes in whole over the row axes, whose gradients shard_map's transpose sums
  return jax.shard_map(body, mesh=mesh, axis_names=free, check_vma=False,
                       in_specs=(P(*q_spec), P(*lat_spec), P(*lat_spec), w_spec, P("context"), P(*q_spec[:2])),
                       out_specs=out_specs)(q_BxTxHxK, c_kv_BxTxC, k_pe_BxTxR, w_kvb_CxHxNV, index_T, seg_BxT)


ALL = [(0, 0), (0, 1), (1, 0), (1, 1)]


def tiles(i: int, j: int) -> list[tuple[int, int]]:
  """The (query chunk, key chunk) tiles slice i computes with slice j's block on the balanced layout:
  0 is a slice's first chunk (i), 1 its second (2c-1-i). The module docstring's table."""
  if i == j:
    return [(0, 0), (1, 0), (1, 1)]
  return [(0, 0), (1, 0)] if j < i else [(1, 0), (1, 1)]


def _ring(q, c_kv, k_pe, w_kvb, index, seg, *, n, scale, block, with_max_logit, rows, balanced):
  """One slice's part (shard_map body): its queries against every slice's block."""
  b, t, h, _ = q.shape
  half = t // 2
  i = jax.lax.axis_index("context")
  halves = lambda x, axis: jnp.stack(jnp.split(x, 2, axis=axis))  # [2, ...]: the slice's two chunks
  qs = (halves(q, 1), halves(index, 0), halves(seg, 1))
  acc = jnp.promote_types(q.dtype, jnp.float32)
  lowest = jnp.finfo(acc).min
  out = jnp.zeros((2, b, half, h, w_kvb.shape[-1] - (q.shape[-1] - k_pe.shape[-1])), acc)
  lse = jnp.full((2, b, h, half), lowest, acc)
  best = jnp.full((h,), lowest, acc)
  perm = [(k, (k + 1) % n) for k in range(n)]

  def fold(stats, kv, x, y):
    """stats with query chunk x folded against chunk y of the block kv (x, y: 0 or 1, traced)."""
    out, lse, best = stats
    pick = lambda a, k: jax.lax.dynamic_index_in_dim(a, k, 0, keepdims=False)
    q_x, qi_x, qs_x = (pick(a, x) for a in qs)
    c_y, pe_y, ki_y, ks_y = (pick(a, y) for a in kv)
    args = (q_x, c_y, pe_y, w_kvb, qi_x, ki_y, qs_x, ks_y, scale, block)
    o_t, lse_t = latent_attention.attention_lse(*args)
    o_x, lse_x = pick(out, x), pick(lse, x)
    new = jnp.logaddexp(lse_x, lse_t)
    weigh = lambda o, l: o.astype(acc) * jnp.exp(l - new).transpose(0, 2, 1)[..., None]  # [B, L, H, v]
    out = jax.lax.dynamic_update_index_in_dim(out, weigh(o_x, lse_x) + weigh(o_t, lse_t), x, 0)
    lse = jax.lax.dynamic_update_index_in_dim(lse, new, x, 0)
    if with_max_logit:
      best = jnp.maximum(best, latent_attention.max_logit(*args).astype(acc))
    return out, lse, best

  def off_diagonal(stats, kv, s):
    """Tiles with the block of slice j = i - s: (j < i ? 0 : 1, 0) and (1, j < i ? 0 : 1); all four off
    the balanced layout."""
    if not balanced:
      for x, y in ALL:
        stats = fold(stats, kv, jnp.int32(x), jnp.int32(y))
      return stats
    earlier = (jnp.mod(i - s, n) < i).astype(jnp.int32)  # 1 when j < i
    first = 1 - earlier
    stats = fold(stats, kv, first, jnp.int32(0))
    return fold(stats, kv, jnp.int32(1), first)

  kv = (halves(c_kv, 1), halves(k_pe, 1), halves(index, 0), halves(seg, 1))
  send = lambda kv: jax.lax.ppermute(kv, "context", perm)
  nxt = send(kv) if n > 1 else kv  # in flight while the slice's own block is computed
  stats = (out, lse, best)
  for x, y in tiles(0, 0) if balanced else ALL:
    stats = fold(stats, kv, jnp.int32(x), jnp.int32(y))

  # Each step's tiles recomputed in the backward from the softmax state and the block in hand (kept, the
  # folds' float32 residuals of every step were 33 GiB per chip for V3 at 128K on 32 slices); the
  # transfer is outside the checkpoint, so that the recompute does not send the block again.
  recomputed = jax.checkpoint(off_diagonal)

  def step(carry, s):
    stats, cur = carry
    nxt = send(cur)  # the next block, in flight during this one
    return (recomputed(stats, cur, s), nxt), None

  if n > 2:
    (stats, nxt), _ = jax.lax.scan(step, (stats, nxt), jnp.arange(1, n - 1))
  if n > 1:
    stats = off_diagonal(stats, nxt, n - 1)
  out, _, best = stats
  out = jnp.concatenate([out[0], out[1]], axis=1).astype(q.dtype)  # [B, T, H, v]
  if with_max_logit:
    return out, jax.lax.pmax(best, rows).astype(jnp.float32)
  return out
