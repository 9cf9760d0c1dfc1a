"""Multi-token prediction (DeepSeek-V3 report, section 2.2), depth D = num_nextn_predict_layers.

Module k (1-based) at position i combines the depth-(k-1) representation h_i^{k-1} (h^0: the
main model's last block output, before the final norm) with the embedding of token t_{i+k}:
  h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_i^{k-1})])     (embedding half first, as released)
  h_i^k = TransformerBlock_k(h'_{1..i})                      (causal, same document mask)
  logits_i^k = Head(norm_k(h_i^k)), predicting t_{i+k+1}     (norm_k is shared_head.norm)
Embedding and output head are the main model's. Input tokens and RoPE positions are rolled left by
k (as Megatron-Core does); attention uses position i's document mask, and the trainer masks the
last k positions and cross-document targets (train/loss.py).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from moe.config import ModelConfig
from moe.decoder import DecoderLayer
from moe.layers import Linear, RMSNorm
from moe.runtime import Runtime


class MTPModule(nnx.Module):

  def __init__(self, cfg: ModelConfig, rt: Runtime, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.enorm = RMSNorm(d, cfg, rt, rngs=rngs)
    self.hnorm = RMSNorm(d, cfg, rt, rngs=rngs)
    # Not FP8: outside the recipe's attention/FFN/expert GEMMs, next to the embedding and head.
    self.eh_proj = Linear(2 * d, d, ("mtp_concat", "embed"), cfg, rt, rngs=rngs, fp8=False)
    self.block = DecoderLayer(cfg, rt, moe=cfg.n_routed_experts > 0, rngs=rngs)  # a normal decoder layer
    self.norm = RMSNorm(d, cfg, rt, rngs=rngs)

  def __call__(self, h_prev_BxSxD, emb_next_BxSxD, cos_sin, mask, valid_BxS):
    """(h^k [b, s, d] for the next depth, normalised h^k for the shared head, MoE stats)."""
    x = self.eh_proj(jnp.concatenate([self.enorm(emb_next_BxSxD), self.hnorm(h_prev_BxSxD)], axis=-1))
    h, stats, _ = self.block(x, cos_sin, mask, valid_BxS)
    return h, self.norm(h), stats


def roll_left(x_BxS, k: int, fill=0):
  """x[:, i + k], with `fill` in the last k positions."""
  return jnp.concatenate([x_BxS[:, k:], jnp.full_like(x_BxS[:, :k], fill)], axis=1)
