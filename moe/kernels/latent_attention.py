"""MLA attention over key blocks of the compressed latent, for long sequences (context parallelism).

softmax(q k^T scale + mask) v where each block of keys is up-projected from the latent on the fly
(k_nope, v = c_kv W_kv_b; k = [k_nope, k_pe]) and folded into a running softmax (flash attention's
recurrence, in jnp): neither the per-head keys and values of the whole sequence nor the [q, k]
scores are ever made whole, only one block's. The backward pass is written out (a custom VJP, as
flash attention's): it recomputes each block from the latent and the saved log-sum-exp, so that its
memory is one block's too, and returns the gradients of the queries, the latent, the rotary key and
W_kv_b.

The mask is made per block from each token's place in the original sequence and its document
(segment id): causal within one document, as `moe.mla.attention_mask`, for any layout of the tokens
(the balanced context-parallel one included). Under a mesh the queries stay sharded as they come
(over `context`) and the latent is whole (gathered): XLA splits every block's work over the
queries. Every block is computed on every slice, masked or not.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

F32 = jnp.float32  # logits, softmax statistics and gradients: float32 (float64 with float64 inputs: tests)


def _acc(dtype):
  return jnp.promote_types(dtype, F32)


def attention(q_BxTxHxK, c_kv_BxSxC, k_pe_BxSxR, w_kvb_CxHxNV, q_index_T, k_index_S, q_seg_BxT, k_seg_BxS,
              scale: float, block: int = 512, groups: int = 1):
  """[B, T, H, v_head_dim]. q: [nope | rope] per head (rope = k_pe's last dimension); w_kvb: kv_b_proj's
  kernel as [C, H, nope + v]; q_index / k_index: each token's place in the original sequence; `groups`:
  the contiguous query slices (the context axis) whose gradient sums the backward keeps apart."""
  return attention_lse(q_BxTxHxK, c_kv_BxSxC, k_pe_BxSxR, w_kvb_CxHxNV, q_index_T, k_index_S, q_seg_BxT, k_seg_BxS,
                       scale, block, groups)[0]


def attention_lse(q_BxTxHxK, c_kv_BxSxC, k_pe_BxSxR, w_kvb_CxHxNV, q_index_T, k_index_S, q_seg_BxT, k_seg_BxS,
                  scale: float, block: int = 512, groups: int = 1):
  """(`attention`'s output [B, T, H, v], its log-sum-exp [B, H, T] float32), both differentiable: what
  ring attention (moe/kernels/ring_attention.py) folds the blocks of other slices with. A query that
  sees no key here has a log-sum-exp near the dtype's lowest, so that folding weighs it 0."""
  block, nope = _sizes(q_BxTxHxK, c_kv_BxSxC, k_pe_BxSxR, block)
  return _attention(q_BxTxHxK, c_kv_BxSxC, k_pe_BxSxR, w_kvb_CxHxNV, q_index_T, k_index_S, q_seg_BxT, k_seg_BxS,
                    scale, block, nope, groups)


def max_logit(q_BxTxHxK, c_kv_BxSxC, k_pe_BxSxR, w_kvb_CxHxNV, q_index_T, k_index_S, q_seg_BxT, k_seg_BxS,
              scale: float, block: int = 512):
  """[heads] float32: each head's largest scaled logit a query sees (QK-clip's statistic), block by
  block as `attention`, without a gradient."""
  block, nope = _sizes(q_BxTxHxK, c_kv_BxSxC, k_pe_BxSxR, block)
  q, w = jax.lax.stop_gradient(q_BxTxHxK), jax.lax.stop_gradient(w_kvb_CxHxNV)

  def step(best, blk):
    c_blk, pe_blk, idx_blk, seg_blk = blk
    k, _ = _keys(c_blk, pe_blk, w, nope)
    return jnp.maximum(best, _logits(q, k, q_index_T, idx_blk, q_seg_BxT, seg_blk, scale).max(axis=(0, 2, 3))), None

  blocks = _key_blocks(jax.lax.stop_gradient(c_kv_BxSxC), jax.lax.stop_gradient(k_pe_BxSxR), k_index_S, k_seg_BxS,
                      block)
  acc = _acc(q.dtype)
  best, _ = jax.lax.scan(step, jnp.full((q.shape[2],), jnp.finfo(acc).min, acc), blocks)
  return best.astype(F32)


def _sizes(q_BxTxHxK, c_kv_BxSxC, k_pe_BxSxR, block: int) -> tuple[int, int]:
  """(keys per block: the largest divisor of the sequence up to `block`, the queries' non-rotary width)."""
  s = c_kv_BxSxC.shape[1]
  return next(b for b in range(min(block, s), 0, -1) if s % b == 0), q_BxTxHxK.shape[-1] - k_pe_BxSxR.shape[-1]


def _key_blocks(c_kv_BxSxC, k_pe_BxSxR, k_index_S, k_seg_BxS, block: int):
  """What each step of a scan over key blocks reads: the block's latent, rotary key, places, documents."""
  return tuple(_blocks(x, block) for x in (c_kv_BxSxC, k_pe_BxSxR, k_index_S, k_seg_BxS))


def _blocks(x, block):
  """[B, S, ...] -> [S / block, B, block, ...]: the scan's leading axis (S: axis 1; k_index: axis 0)."""
  if x.ndim == 1:
    return x.reshape(-1, block)
  b, s = x.shape[:2]
  return jnp.moveaxis(x.reshape(b, s // block, block, *x.shape[2:]), 1, 0)


def _keys(c_kv_BxKxC, k_pe_BxKxR, w_kvb, nope):
  """One block's keys [B, K, H, nope + rope] and values [B, K, H, v] from its latent."""
  kv = jnp.einsum("bkc,chd->bkhd", c_kv_BxKxC, w_kvb)
  k_pe = jnp.broadcast_to(k_pe_BxKxR[:, :, None, :], (*kv.shape[:3], k_pe_BxKxR.shape[-1]))
  return jnp.concatenate([kv[..., :nope], k_pe.astype(kv.dtype)], axis=-1), kv[..., nope:]


def _logits(q, k, q_index, k_index, q_seg, k_seg, scale):
  """[B, H, T, K] float32 scaled logits, the dtype's lowest where the mask hides the key (an additive
  [B, 1, T, K] bias, not a mask broadcast over the heads: compiled for TPU, the broadcast boolean of
  every block was kept, 16 GiB per chip for V3 at 32K)."""
  acc = _acc(q.dtype)
  visible = (k_index[None, :] <= q_index[:, None])[None] & (q_seg[:, :, None] == k_seg[:, None, :])
  hidden = jnp.where(visible, jnp.zeros((), acc), jnp.finfo(acc).min)[:, None]
  s = jnp.einsum("bthd,bkhd->bhtk", q, k, preferred_element_type=acc) * scale
  return jnp.maximum(s + hidden, jnp.finfo(acc).min)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _attention(q, c_kv, k_pe, w_kvb, q_index, k_index, q_seg, k_seg, scale, block, nope, groups):
  return _forward(q, c_kv, k_pe, w_kvb, q_index, k_index, q_seg, k_seg, scale, block, nope)


def _forward(q, c_kv, k_pe, w_kvb, q_index, k_index, q_seg, k_seg, scale, block, nope):
  """(out [B, T, H, v], log-sum-exp [B, H, T]) by the running softmax over key blocks."""
  b, t, h, _ = q.shape
  dv, acc_t = w_kvb.shape[-1] - nope, _acc(q.dtype)

  def step(carry, blk):
    m, l, acc = carry  # running max [B, H, T], sum of exp [B, H, T], weighted values [B, H, T, v] (float32)
    c_blk, pe_blk, idx_blk, seg_blk = blk
    k, v = _keys(c_blk, pe_blk, w_kvb, nope)
    s = _logits(q, k, q_index, idx_blk, q_seg, seg_blk, scale)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_new[..., None])
    corr = jnp.exp(m - m_new)
    acc = acc * corr[..., None] + jnp.einsum("bhtk,bkhd->bhtd", p.astype(v.dtype), v, preferred_element_type=acc_t)
    return (m_new, l * corr + p.sum(-1), acc), None

  init = (jnp.full((b, h, t), jnp.finfo(acc_t).min, acc_t), jnp.zeros((b, h, t), acc_t),
          jnp.zeros((b, h, t, dv), acc_t))
  (m, l, acc), _ = jax.lax.scan(step, init, _key_blocks(c_kv, k_pe, k_index, k_seg, block))
  out = (acc / l[..., None]).transpose(0, 2, 1, 3).astype(q.dtype)  # [B, T, H, v]
  return out, m + jnp.log(l)


def _attention_fwd(q, c_kv, k_pe, w_kvb, q_index, k_index, q_seg, k_seg, scale, block, nope, groups):
  out, lse = _forward(q, c_kv, k_pe, w_kvb, q_index, k_index, q_seg, k_seg, scale, block, nope)
  return (out, lse), (q, c_kv, k_pe, w_kvb, q_index, k_index, q_seg, k_seg, out, lse)


def _attention_bwd(scale, block, nope, groups, res, cotangents):
  """Flash attention's backward, block by block: P = exp(S - lse), dV = P^T dO, dS = P (dP - rowsum(dO O)
  + dlse) (the log-sum-exp's own cotangent: d lse / dS = P),
  dQ += dS K, dK = dS^T Q; the block's dK_nope and dV go back through the up-projection to the latent
  and W_kv_b, its dK_pe summed over the heads. The queries in `groups` contiguous groups (the context
  slices): the sums over queries (the latent's, the rotary key's and W_kv_b's gradients) are kept per
  group, and W_kv_b's per row too (the rows split over the data axes), through the blocks and summed
  once at the end, so that partial sums cross the devices once per layer, not once per key block
  (XLA's partitioner put an all-reduce of W_kv_b's gradient in every block: 1.3 TB per layer and step
  for V3 at 128K on 32 slices)."""
  q, c_kv, k_pe, w_kvb, q_index, k_index, q_seg, k_seg, out, lse = res
  d_out, d_lse = cotangents
  f = _acc(q.dtype)
  b, t, h, _ = q.shape
  split = lambda x, axis: x.reshape(*x.shape[:axis], groups, t // groups, *x.shape[axis + 1:])
  d_out32 = d_out.astype(f)
  delta = jnp.einsum("bthd,bthd->bht", d_out32, out.astype(f)) - d_lse.astype(f)  # rowsum(dO O) - dlse
  q_g, d_out_g, delta_g, lse_g = split(q, 1), split(d_out32, 1), split(delta, 2), split(lse, 2)
  index_g, seg_g = split(q_index, 0), split(q_seg, 1)

  def one_group(q, d_out32, delta, lse, q_index, q_seg, k, v, c_blk, idx_blk, seg_blk):
    p = jnp.exp(_logits(q, k, q_index, idx_blk, q_seg, seg_blk, scale) - lse[..., None])  # [B, H, T/G, K]
    dv = jnp.einsum("bhtk,bthd->bkhd", p, d_out32)
    dp = jnp.einsum("bthd,bkhd->bhtk", d_out32, v.astype(f))
    ds = p * (dp - delta[..., None]) * scale
    dq = jnp.einsum("bhtk,bkhd->bthd", ds, k.astype(f))
    dk = jnp.einsum("bhtk,bthd->bkhd", ds, q.astype(f))
    d_kv = jnp.concatenate([dk[..., :nope], dv], axis=-1)  # [B, K, H, nope + v]
    return dq, jnp.einsum("bkc,bkhd->bchd", c_blk.astype(f), d_kv), jnp.einsum(
        "bkhd,chd->bkc", d_kv, w_kvb.astype(f)), dk[..., nope:].sum(2)

  per_group = jax.vmap(one_group, in_axes=(1, 1, 2, 2, 0, 1) + (None,) * 5, out_axes=(1, 0, 0, 0))

  def step(carry, blk):
    dq, dw = carry  # [B, G, T/G, H, K], [G, B, C, H, nope + v]: per group and row
    c_blk, pe_blk, idx_blk, seg_blk = blk
    k, v = _keys(c_blk, pe_blk, w_kvb, nope)
    dq_b, dw_b, d_c, d_pe = per_group(q_g, d_out_g, delta_g, lse_g, index_g, seg_g, k, v, c_blk, idx_blk, seg_blk)
    return (dq + dq_b, dw + dw_b), (d_c, d_pe)

  init = (jnp.zeros(q_g.shape, f), jnp.zeros((groups, b, *w_kvb.shape), f))
  (dq, dw), (d_c, d_pe) = jax.lax.scan(step, init, _key_blocks(c_kv, k_pe, k_index, k_seg, block))
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])  # [blocks, B, K, ..] -> [B, S, ..]
  d_c, d_pe = unblock(d_c.sum(1)), unblock(d_pe.sum(1))  # (the groups' sums: once)
  return (dq.reshape(q.shape).astype(q.dtype), d_c.astype(c_kv.dtype), d_pe.astype(k_pe.dtype),
          dw.sum((0, 1)).astype(w_kvb.dtype), None, None, None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)
