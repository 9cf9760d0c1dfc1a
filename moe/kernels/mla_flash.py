"""Flash attention for MLA on GPUs (Pallas Triton), causal within documents, each head size computed
as its power-of-two parts: V3's queries and keys (192 = 128 nope + 64 rope) as 128 + 64 and its
values at 128. JAX's Pallas GPU kernel takes one head size for q, k and v and pads it to a power of two
(192 -> 256 for all three): 1.6x the forward's FLOPs and 1.56x the backward's for V3.

  forward  o = softmax(q k^T scale + mask) v over the key blocks at or before each query block, online
           (FlashAttention-2), and the log-sum-exp of each query's row (base 2)
  dk, dv   for each key block, over the query blocks at or after it
  dq       for each query block, over the key blocks at or before it
  delta    rowsum(o * do), the softmax backward's correction (an XLA fusion)

Each program holds one block of one (batch row, head); a head size d is cut into the powers of two of
its binary digits (d first padded with zero columns to a multiple of 16, Triton's smallest matmul
side), whose matmuls are summed (q k^T) or kept apart (p v, and the gradients). Segment ids mask across
documents, as `moe.mla.attention_mask`. Each kernel is named with the widths it computes at
(`mla_flash_fwd_qk192_v128`), from which train/forecast.py counts its FLOPs.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2_E = math.log2(math.e)


def parts(d: int) -> tuple[int, ...]:
  """The power-of-two widths a head size `d` is computed as: d rounded up to a multiple of 16, by its
  binary digits, largest first (192 -> (128, 64), 48 -> (32, 16), 12 -> (16,))."""
  d = -(-d // 16) * 16
  return tuple(1 << b for b in reversed(range(d.bit_length())) if d >> b & 1)


def _split(x_BxSxHxD, widths):
  """x's last dimension as arrays of `widths` (zero columns past its end)."""
  x = jnp.pad(x_BxSxHxD, ((0, 0),) * 3 + ((0, sum(widths) - x_BxSxHxD.shape[-1]),))
  starts = [sum(widths[:i]) for i in range(len(widths))]
  return [x[..., s:s + w] for s, w in zip(starts, widths)]


def _name(kind: str, qk, v) -> str:
  return f"mla_flash_{kind}_qk{sum(qk)}_v{sum(v)}"


def _logits(qs, ks, seg_q, seg_k, span_q, span_k, scale):
  """[block_q, block_k] scores in base 2 (x log2 e), masked across documents and the future."""
  s = sum(plgpu.dot(q, k.T) for q, k in zip(qs, ks)) * (scale * LOG2_E)
  visible = (seg_q[:, None] == seg_k[None, :]) & (span_q[:, None] >= span_k[None, :])
  return jnp.where(visible, s, MASKED)


def _forward_kernel(*refs, nq, nv, scale, block_q, block_k):
  q_refs, k_refs, v_refs = refs[:nq], refs[nq:2 * nq], refs[2 * nq:2 * nq + nv]
  seg_ref, o_refs, lse_ref = refs[2 * nq + nv], refs[2 * nq + nv + 1:2 * nq + 2 * nv + 1], refs[-1]
  start_q = pl.program_id(0)
  span_q = start_q * block_q + jnp.arange(block_q)
  qs = [r[...] for r in q_refs]
  seg_q = seg_ref[pl.ds(start_q * block_q, block_q)]

  def body(start_k, carry):
    os, m_prev, l_prev = carry
    keys = pl.ds(start_k * block_k, block_k)
    s = _logits(qs, [r[keys, :] for r in k_refs], seg_q, seg_ref[keys], span_q,
                start_k * block_k + jnp.arange(block_k), scale)
    m = jnp.maximum(m_prev, s.max(axis=-1))
    correction = jnp.exp2(m_prev - m)
    p = jnp.exp2(s - m[:, None])
    l = correction * l_prev + p.sum(axis=-1)
    os = [o * correction[:, None] + plgpu.dot(p.astype(r.dtype), r[keys, :]) for o, r in zip(os, v_refs)]
    return os, m, l

  os = [jnp.zeros((block_q, r.shape[-1]), jnp.float32) for r in v_refs]
  m = jnp.full((block_q,), -jnp.inf, jnp.float32)
  l = jnp.zeros((block_q,), jnp.float32)
  upper = lax.div(block_q * (start_q + 1) + block_k - 1, block_k)  # the key blocks at or before the queries'
  os, m, l = lax.fori_loop(0, upper, body, (os, m, l))
  for o, r in zip(os, o_refs):
    r[...] = (o / l[:, None]).astype(r.dtype)
  lse_ref[...] = m + jnp.log2(l)


def _backward_refs(refs, nq, nv):
  """A backward kernel's refs, as `_bwd` passes them: (q parts, k parts, v parts, segment ids, do
  parts, lse, delta, the outputs)."""
  i = 2 * nq + nv
  return (refs[:nq], refs[nq:2 * nq], refs[2 * nq:i], refs[i], refs[i + 1:i + 1 + nv], refs[i + 1 + nv],
          refs[i + 2 + nv], refs[i + 3 + nv:])


def _dkdv_kernel(*refs, nq, nv, scale, block_q, block_k):
  q_refs, k_refs, v_refs, seg_ref, do_refs, lse_ref, delta_ref, outs = _backward_refs(refs, nq, nv)
  dk_refs, dv_refs = outs[:nq], outs[nq:]
  start_k = pl.program_id(0)
  span_k = start_k * block_k + jnp.arange(block_k)
  ks, vs = [r[...] for r in k_refs], [r[...] for r in v_refs]
  seg_k = seg_ref[pl.ds(start_k * block_k, block_k)]
  seq = q_refs[0].shape[0]

  def body(start_q, carry):
    dks, dvs = carry
    queries = pl.ds(start_q * block_q, block_q)
    qs = [r[queries, :] for r in q_refs]
    dos = [r[queries, :] for r in do_refs]
    s = _logits(qs, ks, seg_ref[queries], seg_k, start_q * block_q + jnp.arange(block_q), span_k, scale)
    p = jnp.exp2(s - lse_ref[queries][:, None])
    dvs = [dv + plgpu.dot(p.astype(do.dtype).T, do) for dv, do in zip(dvs, dos)]
    dp = sum(plgpu.dot(do, v.T) for do, v in zip(dos, vs)) - delta_ref[queries][:, None]
    ds = (p * dp * scale).astype(qs[0].dtype)
    dks = [dk + plgpu.dot(ds.T, q) for dk, q in zip(dks, qs)]
    return dks, dvs

  dks = [jnp.zeros((block_k, r.shape[-1]), jnp.float32) for r in k_refs]
  dvs = [jnp.zeros((block_k, r.shape[-1]), jnp.float32) for r in v_refs]
  lower = lax.div(start_k * block_k, block_q)  # the query blocks at or after the keys'
  dks, dvs = lax.fori_loop(lower, seq // block_q, body, (dks, dvs))
  for d, r in zip(dks + dvs, list(dk_refs) + list(dv_refs)):
    r[...] = d.astype(r.dtype)


def _dq_kernel(*refs, nq, nv, scale, block_q, block_k):
  q_refs, k_refs, v_refs, seg_ref, do_refs, lse_ref, delta_ref, dq_refs = _backward_refs(refs, nq, nv)
  start_q = pl.program_id(0)
  span_q = start_q * block_q + jnp.arange(block_q)
  qs, dos = [r[...] for r in q_refs], [r[...] for r in do_refs]
  seg_q = seg_ref[pl.ds(start_q * block_q, block_q)]
  lse, delta = lse_ref[...], delta_ref[...]

  def body(start_k, dqs):
    keys = pl.ds(start_k * block_k, block_k)
    ks = [r[keys, :] for r in k_refs]
    s = _logits(qs, ks, seg_q, seg_ref[keys], span_q, start_k * block_k + jnp.arange(block_k), scale)
    p = jnp.exp2(s - lse[:, None])
    dp = sum(plgpu.dot(do, r[keys, :].T) for do, r in zip(dos, v_refs)) - delta[:, None]
    ds = (p * dp * scale).astype(ks[0].dtype)
    return [dq + plgpu.dot(ds, k) for dq, k in zip(dqs, ks)]

  dqs = [jnp.zeros((block_q, r.shape[-1]), jnp.float32) for r in q_refs]
  upper = lax.div(block_q * (start_q + 1) + block_k - 1, block_k)
  dqs = lax.fori_loop(0, upper, body, dqs)
  for d, r in zip(dqs, dq_refs):
    r[...] = d.astype(r.dtype)


def _call(kernel, name, block, inputs, in_blocks, outputs, out_blocks, interpret, warps):
  """pallas_call over the grid (sequence blocks of `block` positions, batch, heads): `in_blocks` /
  `out_blocks` per array, "block" (the program's block of the sequence), "whole" (the whole sequence)
  for [B, S, H, w] arrays, "rows_block" / "rows_whole" for [B, H, S] rows and "seg" for the [B, S]
  segment ids."""
  def spec(kind, a):
    return {"block": lambda: pl.BlockSpec((None, block, None, a.shape[-1]), lambda i, b, h: (b, i, h, 0)),
            "whole": lambda: pl.BlockSpec((None, a.shape[1], None, a.shape[-1]), lambda i, b, h: (b, 0, h, 0)),
            "rows_block": lambda: pl.BlockSpec((None, None, block), lambda i, b, h: (b, h, i)),
            "rows_whole": lambda: pl.BlockSpec((None, None, a.shape[-1]), lambda i, b, h: (b, h, 0)),
            "seg": lambda: pl.BlockSpec((None, a.shape[1]), lambda i, b, h: (b, 0))}[kind]()

  batch, seq, heads = inputs[0].shape[:3]
  return pl.pallas_call(kernel, grid=(seq // block, batch, heads),
                        in_specs=[spec(k, a) for k, a in zip(in_blocks, inputs)],
                        out_specs=[spec(k, a) for k, a in zip(out_blocks, outputs)], out_shape=outputs,
                        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=2), interpret=interpret,
                        name=name)(*inputs)


def _warps(qk) -> int:
  return 4 if sum(qk) <= 64 else 8


def _forward(q, k, v, seg, scale, block, interpret):
  qk, vw = parts(q.shape[-1]), parts(v.shape[-1])
  qs, ks, vs = _split(q, qk), _split(k, qk), _split(v, vw)
  b, s, h, _ = q.shape
  warps = _warps(qk)
  kernel = functools.partial(_forward_kernel, nq=len(qk), nv=len(vw), scale=scale, block_q=block, block_k=block)
  outs = _call(kernel, _name("fwd", qk, vw), block, [*qs, *ks, *vs, seg],
               ["block"] * len(qk) + ["whole"] * (len(qk) + len(vw)) + ["seg"],
               [jax.ShapeDtypeStruct(x.shape, q.dtype) for x in vs] + [jax.ShapeDtypeStruct((b, h, s), jnp.float32)],
               ["block"] * len(vw) + ["rows_block"], interpret, warps)
  o = jnp.concatenate(outs[:-1], axis=-1)[..., :v.shape[-1]]
  return o, outs[-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def attention(q_BxSxHxK, k_BxSxHxK, v_BxSxHxV, segment_ids_BxS, scale: float, block: int, interpret: bool = False):
  """Causal attention within documents: [B, S, H, V]. S a multiple of `block` (>= 16)."""
  return _forward(q_BxSxHxK, k_BxSxHxK, v_BxSxHxV, segment_ids_BxS, scale, block, interpret)[0]


def _fwd(q, k, v, seg, scale, block, interpret):
  o, lse = _forward(q, k, v, seg, scale, block, interpret)
  return o, (q, k, v, seg, o, lse)


def _bwd(scale, block, interpret, res, do):
  q, k, v, seg, o, lse = res
  qk, vw = parts(q.shape[-1]), parts(v.shape[-1])
  qs, ks, vs, dos = _split(q, qk), _split(k, qk), _split(v, vw), _split(do.astype(q.dtype), vw)
  delta = jnp.einsum("bshd,bshd->bhs", o.astype(jnp.float32), do.astype(jnp.float32))
  warps = _warps(qk)
  nq, nv = len(qk), len(vw)
  args = dict(nq=nq, nv=nv, scale=scale, block_q=block, block_k=block)
  inputs = [*qs, *ks, *vs, seg, *dos, lse, delta]
  like = lambda xs: [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs]
  grads_kv = _call(functools.partial(_dkdv_kernel, **args), _name("dkdv", qk, vw), block, inputs,
                   ["whole"] * nq + ["block"] * (nq + nv) + ["seg"] + ["whole"] * nv + ["rows_whole"] * 2,
                   like(ks + vs), ["block"] * (nq + nv), interpret, warps)
  dqs = _call(functools.partial(_dq_kernel, **args), _name("dq", qk, vw), block, inputs,
              ["block"] * nq + ["whole"] * (nq + nv) + ["seg"] + ["block"] * nv + ["rows_block"] * 2,
              like(qs), ["block"] * nq, interpret, warps)
  whole = lambda xs, d: jnp.concatenate(xs, axis=-1)[..., :d]
  return (whole(dqs, q.shape[-1]), whole(grads_kv[:nq], k.shape[-1]), whole(grads_kv[nq:], v.shape[-1]), None)


attention.defvjp(_fwd, _bwd)
