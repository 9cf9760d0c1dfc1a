"""The attention core, softmax(q k^T scale + mask) v with float32 logits, one function per
implementation; `impl.attention` picks one when the model is built (moe/runtime.py).

  fused    `jax.nn.dot_product_attention` (XLA's attention; cuDNN's flash attention only takes head
           sizes up to 128, and MLA's queries and keys have 192, so XLA materialises the scores). It
           needs one head size for q, k and v; MLA's values are narrower, so v is zero-padded.
  flash    the Pallas (Triton) flash-attention kernel for MLA (moe/kernels/mla_flash.py: each head
           size computed as its power-of-two parts, V3's 192 as 128 + 64): the GPU choice.
  blocked  moe.kernels.cpu.causal_block_attention: query blocks that skip the masked upper blocks
           (the CPU choice).
  splash   the Pallas TPU splash-attention kernel (flash attention: neither the forward nor the
           backward materialises the [seq, seq] scores; causal within each document by segment
           ids): the TPU choice. Elsewhere it runs in the Pallas interpreter (tests).

fused and blocked take the dense [batch, 1, q, k] mask; splash and flash take the segment ids and run
per device (`per_device`). Off their hardware the Pallas kernels run in the Pallas interpreter (tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe.kernels import cpu, mla_flash
from parallel import sharding as sharding_lib


def fused_attention(q_BxSxHxK, k_BxSxHxK, v_BxSxHxV, mask_Bx1xSxS, scale: float):
  """`jax.nn.dot_product_attention`, v zero-padded to the key head size."""
  dv, dk = v_BxSxHxV.shape[-1], k_BxSxHxK.shape[-1]
  if dv < dk:
    v_BxSxHxV = jnp.pad(v_BxSxHxV, ((0, 0), (0, 0), (0, 0), (0, dk - dv)))
  out = jax.nn.dot_product_attention(q_BxSxHxK, k_BxSxHxK, v_BxSxHxV, mask=mask_Bx1xSxS, scale=scale)
  return out[..., :dv]


def splash_attention(q_BxSxHxK, k_BxSxHxK, v_BxSxHxV, segment_ids_BxS, scale: float, interpret: bool = False,
                     block: int = 512):
  """Causal attention within documents (segment ids; 0 = padding) with the Pallas TPU splash kernel."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  s0 = q_BxSxHxK.shape[1]
  q, k, v, seg = _pad_seq((q_BxSxHxK, k_BxSxHxK, v_BxSxHxV), segment_ids_BxS, 128)
  _, s, h, _ = q.shape
  bs = next(b for b in (block, 256, 128) if s % b == 0)
  sizes = splash.BlockSizes(block_q=bs, block_kv=bs, block_kv_compute=bs, block_q_dkv=bs, block_kv_dkv=bs,
                            block_kv_dkv_compute=bs, block_q_dq=bs, block_kv_dq=bs)
  kernel = splash.make_splash_mha(splash.MultiHeadMask([splash.CausalMask((s, s))] * h), block_sizes=sizes,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, H, S, D]
  out = jax.vmap(kernel)(heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v),
                         segment_ids=splash.SegmentIds(seg, seg))
  return jnp.swapaxes(out, 1, 2)[:, :s0]


def flash_attention(q_BxSxHxK, k_BxSxHxK, v_BxSxHxV, segment_ids_BxS, scale: float, interpret: bool = False,
                    block: int | None = None):
  """Causal attention within documents with the Pallas (Triton) MLA flash-attention kernel for GPUs
  (moe/kernels/mla_flash.py: q/k's head size as its power-of-two parts, v's at its own). Blocks of
  128 rows, 64 for heads wider than 128 (MLA's 192), within Hopper's shared memory."""
  s0 = q_BxSxHxK.shape[1]
  block = block or (128 if q_BxSxHxK.shape[-1] <= 128 else 64)
  q, k, v, seg = _pad_seq((q_BxSxHxK, k_BxSxHxK, v_BxSxHxV), segment_ids_BxS, block)
  return mla_flash.attention(q, k, v, seg, scale, block, interpret)[:, :s0]


def _pad_seq(qkv, segment_ids_BxS, multiple: int):
  """The sequence padded to a multiple of the kernel's blocks; padded positions are their own document."""
  pad = -qkv[0].shape[1] % multiple
  if not pad:
    return (*qkv, segment_ids_BxS)
  qkv = tuple(jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in qkv)
  return (*qkv, jnp.pad(segment_ids_BxS, ((0, 0), (0, pad)), constant_values=-1))


def per_device(kernel, q_BxSxHxK, k_BxSxHxK, v_BxSxHxV, segment_ids_BxS, par):
  """`kernel(q, k, v, segment_ids)` on each device's batch rows and heads (inside shard_map under a mesh
  of several devices: XLA does not partition a Pallas call)."""
  if par is None or par.mesh.size == 1:
    return kernel(q_BxSxHxK, k_BxSxHxK, v_BxSxHxV, segment_ids_BxS)
  mesh, shape, free = sharding_lib.context(par)  # (inside the pipeline, `stage` is already manual)
  qkv = sharding_lib.logical_to_spec(("batch", None, "heads", None), q_BxSxHxK.shape, shape, par.rules, "attention")
  qkv = P(*(tuple(qkv) + (None,) * (4 - len(qkv))))
  return jax.shard_map(kernel, mesh=mesh, in_specs=(qkv, qkv, qkv, P(qkv[0])), out_specs=qkv, axis_names=free,
                       check_vma=False)(
      q_BxSxHxK, k_BxSxHxK, v_BxSxHxV, segment_ids_BxS)


ATTENTION = {"fused": fused_attention, "blocked": cpu.causal_block_attention}  # on the dense mask
PALLAS = {"splash": splash_attention, "flash": flash_attention}  # on segment ids, per device
