"""Kernels for XLA:CPU, where the general-purpose ones are slow: chosen by `impl.attention: blocked`
and `impl.experts: blocked` (the "auto" choice on CPU, moe/runtime.py); usable on any backend.

  causal_block_attention  exact attention in query blocks; block i reads only the keys before its
                          end, skipping the all-masked upper blocks (2.8x faster fwd+bwd at seq 256
                          on 2 cores than the fused path, docs/perf.md), with the softmax backward
                          written out as flash attention does
  blocked_ffn             the routed experts' grouped matmul as a batched matmul over expert-sorted,
                          block-padded rows: XLA:CPU lowers `ragged_dot` densely (every row times
                          every expert: E times the work); measured 10x faster than ragged_dot for
                          the bench-cpu layer
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from moe.kernels import fp8 as fp8_lib


# ------------------------------------------------------------------ attention
def causal_block_attention(q_BxSxHxK, k_BxSxHxK, v_BxSxHxV, mask_Bx1xSxS, scale: float, block: int = 64):
  """softmax(q k^T scale + mask) v, exact, in query blocks; block i reads only keys before its end
  (`mask` is causal, moe.mla.attention_mask)."""
  s = q_BxSxHxK.shape[1]
  outs = []
  for start in range(0, s, block):
    end = min(start + block, s)
    outs.append(_attention_core(q_BxSxHxK[:, start:end], k_BxSxHxK[:, :end], v_BxSxHxV[:, :end],
                                mask_Bx1xSxS[:, :, start:end, :end], scale))
  return jnp.concatenate(outs, axis=1)


def _probs(q_BxTxHxK, k_BxSxHxK, mask_Bx1xTxS, scale):
  logits = jnp.einsum("bthd,bshd->bhts", q_BxTxHxK, k_BxSxHxK, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask_Bx1xTxS, logits, jnp.finfo(jnp.float32).min)
  p = jnp.exp(logits - logits.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_core(q_BxTxHxK, k_BxSxHxK, v_BxSxHxV, mask_Bx1xTxS, scale):
  """softmax(q k^T scale + mask) v, with the softmax backward written out (dS = P (dP - rowsum(dO O)),
  as flash attention does): autodiff of softmax makes several more passes over [b, h, t, s]."""
  return _attention_core_fwd(q_BxTxHxK, k_BxSxHxK, v_BxSxHxV, mask_Bx1xTxS, scale)[0]


def _attention_core_fwd(q, k, v, mask, scale):
  p = _probs(q, k, mask, scale).astype(v.dtype)
  out = jnp.einsum("bhts,bshd->bthd", p, v)
  return out, (q, k, v, mask, p, out)


def _attention_core_bwd(scale, res, d_out):
  q, k, v, mask, p, out = res
  f32 = jnp.float32
  dv = jnp.einsum("bhts,bthd->bshd", p, d_out.astype(p.dtype))
  dp = jnp.einsum("bthd,bshd->bhts", d_out, v, preferred_element_type=f32)
  rowsum = jnp.einsum("bthd,bthd->bht", d_out, out, preferred_element_type=f32)[..., None]
  ds = (p.astype(f32) * (dp - rowsum) * scale).astype(q.dtype)
  dq = jnp.einsum("bhts,bshd->bthd", ds, k)
  dk = jnp.einsum("bhts,bthd->bshd", ds, q)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


# ------------------------------------------------------------------ routed experts
# Expert capacities (multiples of the mean N/E rows) tried in turn by `blocked_ffn` before its
# worst-case layout. bench-cpu's routers at initialisation have their largest expert at 1.2-1.6x the
# mean (random tokens); the tiny run on text has 2.6-3.8x at step 10, where the worst-case layout runs.
CAPACITY_TIERS = (1.25, 1.5, 2.0)


@jax.custom_vjp
def take_rows(x_NxD, idx_M, inv_N):
  """x[idx] with zero rows where idx is out of range; each row of x is taken at most once and inv is
  the inverse map (out of range for rows not taken), so the gradient is a gather too: XLA:CPU runs
  the scatter-add that autodiff would make one row at a time."""
  return jnp.take(x_NxD, idx_M, axis=0, mode="fill", fill_value=0)


def _take_rows_fwd(x_NxD, idx_M, inv_N):
  return take_rows(x_NxD, idx_M, inv_N), (idx_M, inv_N)


def _take_rows_bwd(res, g_MxD):
  idx_M, inv_N = res
  return jnp.take(g_MxD, inv_N, axis=0, mode="fill", fill_value=0), None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def _slots(expert_N, e: int, block: int, cap_blocks: int | None):
  """Where each row goes in a block-padded, expert-sorted row layout.

  cap_blocks None: each expert's rows rounded up to whole blocks, N/block + E blocks (the static
  bound); owner_B: the expert of each block. Else every expert gets exactly cap_blocks blocks
  (the caller checks that every group fits). A row of expert E is empty: it gets no slot.
  Returns (slot_of_row [N] (out of range: none), row_of_slot [B*block] (N = empty slot), owner_B)."""
  n = expert_N.shape[0]
  order = jnp.argsort(expert_N, stable=True)  # rows sorted by expert, the empty ones (E) last
  expert_sorted = expert_N[order]
  sizes = jnp.bincount(expert_N, length=e + 1)
  rank = jnp.arange(n) - (jnp.cumsum(sizes) - sizes)[expert_sorted]  # position within its expert
  sizes = sizes[:e]
  if cap_blocks is None:
    padded = (sizes + block - 1) // block * block
    n_blocks = -(-n // block) + e
    slot = jnp.where(expert_sorted < e, (jnp.cumsum(padded) - padded)[expert_sorted] + rank, n_blocks * block)
    owner = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(n_blocks) * block, side="right")
    owner = jnp.minimum(owner, e - 1)  # trailing all-padding blocks: any expert, rows are zero
  else:
    slot = expert_sorted * (cap_blocks * block) + rank
    n_blocks = e * cap_blocks
    owner = jnp.arange(n_blocks) // cap_blocks
  slot = slot.astype(jnp.int32)
  slot_of_row = jnp.zeros(n, jnp.int32).at[order].set(slot)
  row_of_slot = jnp.full(n_blocks * block, n, jnp.int32).at[slot].set(order.astype(jnp.int32))
  return slot_of_row, row_of_slot, owner


def blocked_ffn(x_NxD, expert_N, gate_ExDxF, up_ExDxF, down_ExFxD, fp8=None, block: int = 128,
                tiers=CAPACITY_TIERS, group_sizes=None):
  """Each row's expert FFN, down(silu(x gate) * (x up)), as a batched matmul over expert-sorted,
  block-padded rows. expert == E (the number of experts) marks an empty row: output 0, no room
  taken. `fp8`: a moe.kernels.fp8.Recipe to run the batched GEMMs in FP8 (a block holds one
  expert's rows, so Wgrad's 128x1 token tiles never mix experts).

  If every expert's rows fit in the first capacity tier that holds them (tier * N/E rows, whole
  blocks), the rows form [E, C, D] and each expert is one matmul with its weights as stored.
  Otherwise (a badly unbalanced router) the worst-case layout: N/block + E blocks, each expert
  padded to whole blocks, each block's weights picked by a one-hot matmul. The layout is chosen at
  run time (lax.switch) and no row is ever dropped. The backward pass recomputes the forward inside
  the chosen branch (custom_vjp): differentiating the switch directly would make every branch write
  the residuals of all the others. `group_sizes` unused (it sorts the rows itself into blocks).
  """
  return _blocked(block, fp8, tuple(tiers), expert_N, x_NxD, gate_ExDxF, up_ExDxF, down_ExFxD)


def blocked_branches(block, fp8, tiers, expert_N, e):
  """(branch index, one function (x, gate, up, down) -> y per layout) of `blocked_ffn`."""
  bmm = (lambda a, b: jnp.einsum("nij,njk->nik", a, b)) if fp8 is None else lambda a, b: fp8_lib.fp8_matmul(a, b, fp8)
  n = expert_N.shape[0]
  caps = []  # blocks per expert of each tier, up to one that holds any routing (all n rows)
  for f in sorted(tiers):
    c = max(1, math.ceil(f * n / (e * block)))
    if c not in caps:
      caps.append(c)
    if c * block >= n:
      break

  def layout(cap_blocks):
    def f(x_NxD, gate, up, down):
      d = x_NxD.shape[1]
      slot_of, row_of, owner_B = _slots(expert_N, e, block, cap_blocks)
      rows = block if cap_blocks is None else cap_blocks * block
      x_GxRxD = take_rows(x_NxD, row_of, slot_of).reshape(-1, rows, d)
      if cap_blocks is None:
        one_hot_GxE = jax.nn.one_hot(owner_B, e, dtype=gate.dtype)
        gate, up, down = (jnp.einsum("ge,e...->g...", one_hot_GxE, p) for p in (gate, up, down))
      h = jax.nn.silu(bmm(x_GxRxD, gate)) * bmm(x_GxRxD, up)
      return take_rows(bmm(h, down).reshape(-1, d), slot_of, row_of)
    return f

  largest = jnp.bincount(expert_N, length=e).max()
  branch = sum((largest > c * block).astype(jnp.int32) for c in caps)
  fallback = [] if caps and caps[-1] * block >= n else [layout(None)]
  return branch, [layout(c) for c in caps] + fallback


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _blocked(block, fp8, tiers, expert_N, *args):
  branch, fns = blocked_branches(block, fp8, tiers, expert_N, args[1].shape[0])
  return jax.lax.switch(branch, fns, *args)


def _blocked_fwd(block, fp8, tiers, expert_N, *args):
  return _blocked(block, fp8, tiers, expert_N, *args), (expert_N, args)


def _blocked_bwd(block, fp8, tiers, res, g_NxD):
  expert_N, args = res
  branch, fns = blocked_branches(block, fp8, tiers, expert_N, args[1].shape[0])
  vjps = [lambda g, *a, fn=fn: jax.vjp(fn, *a)[1](g) for fn in fns]
  return (None, *jax.lax.switch(branch, vjps, g_NxD, *args))


_blocked.defvjp(_blocked_fwd, _blocked_bwd)
