"""The attention core, softmax(q k^T scale + mask) v with float32 logits, one function per
implementation; `impl.attention` picks one when the model is built (moe/runtime.py).

  fused    `jax.nn.dot_product_attention` (XLA's fused attention, cuDNN flash attention where it
           applies): GPU/TPU. It needs one head size for q, k and v; MLA's values are narrower, so v
           is zero-padded and the pad sliced off.
  blocked  moe.kernels.cpu.causal_block_attention: query blocks that skip the masked upper blocks
           (the CPU choice).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe.kernels import cpu


def fused_attention(q_BxSxHxK, k_BxSxHxK, v_BxSxHxV, mask_Bx1xSxS, scale: float):
  """`jax.nn.dot_product_attention`, v zero-padded to the key head size."""
  dv, dk = v_BxSxHxV.shape[-1], k_BxSxHxK.shape[-1]
  if dv < dk:
    v_BxSxHxV = jnp.pad(v_BxSxHxV, ((0, 0), (0, 0), (0, 0), (0, dk - dv)))
  out = jax.nn.dot_product_attention(q_BxSxHxK, k_BxSxHxK, v_BxSxHxV, mask=mask_Bx1xSxS, scale=scale)
  return out[..., :dv]


ATTENTION = {"fused": fused_attention, "blocked": cpu.causal_block_attention}
