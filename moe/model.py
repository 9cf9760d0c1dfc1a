"""The DeepSeek-V2/V3 decoder: embedding -> dense layers -> MoE layers -> norm -> head (+ MTP).

Layers of one kind are stored stacked (a leading `layers` axis) and applied with a scan
(moe/decoder.py). How the model runs (dtypes, kernels, FP8, parallelism) is the `moe.runtime.Runtime`
it is built with, resolved once; by default for float32 on this process's devices.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moe import mla, mtp, rope
from moe.config import ModelConfig
from moe.decoder import ACT, LayerStack
from moe.experts import MoEStats
from moe.layers import Embed, Linear, RMSNorm
from moe.runtime import Runtime
from parallel.sharding import constrain


class ModelOutput(NamedTuple):
  logits: jax.Array  # [batch, seq, vocab] float32
  mtp_logits: tuple  # D x [batch, seq, vocab] float32; depth k predicts t_{i+k+1}
  moe_stats: MoEStats | None  # stacked over MoE layers, main layers first then MTP blocks


class Transformer(nnx.Module):

  def __init__(self, cfg: ModelConfig, rt: Runtime | None = None, *, rngs: nnx.Rngs):
    rt = Runtime.resolve(announce=False) if rt is None else rt
    self.cfg, self.rt = cfg, rt
    k = cfg.first_k_dense_replace
    self.embed = Embed(cfg, rt, rngs=rngs)
    self.dense_layers = LayerStack(cfg, rt, k, moe=False, rngs=rngs) if k else None
    self.moe_layers = LayerStack(cfg, rt, cfg.num_moe_layers, moe=True, rngs=rngs) if cfg.num_moe_layers else None
    self.norm = RMSNorm(cfg.hidden_size, cfg, rt, rngs=rngs)
    self.lm_head = None if cfg.tie_word_embeddings else Linear(
        cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), cfg, rt, rngs=rngs, fp8=False)  # head: never FP8
    self.mtp = nnx.List([mtp.MTPModule(cfg, rt, rngs=rngs) for _ in range(cfg.num_nextn_predict_layers)])

  def stacks(self) -> list[LayerStack]:
    """The layer stacks in order (dense, then MoE), those present."""
    return [s for s in (self.dense_layers, self.moe_layers) if s is not None]

  def head(self, h_BxSxD):
    """Output head on normalised hidden states -> float32 logits."""
    logits = self.embed.attend(h_BxSxD) if self.lm_head is None else self.lm_head(h_BxSxD)
    return constrain(logits.astype(jnp.float32), ("batch", "seq", "vocab"), self.rt.par)

  def __call__(self, tokens_BxS, segment_ids_BxS=None, positions_BxS=None):
    """logits [batch, seq, vocab] float32 (the MTP modules are not run)."""
    return self.forward(tokens_BxS, segment_ids_BxS, positions_BxS, with_mtp=False).logits

  def forward(self, tokens_BxS, segment_ids_BxS=None, positions_BxS=None, with_mtp=True) -> ModelOutput:
    """Main logits, MTP logits and MoE statistics.

    segment_ids: document id of each token within its row (0 = padding); attention stays within a
    document. positions: position within the document (RoPE). Defaults: one document, 0..S-1.
    """
    b, s = tokens_BxS.shape
    if segment_ids_BxS is None:
      segment_ids_BxS = jnp.ones((b, s), jnp.int32)
    if positions_BxS is None:
      positions_BxS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    valid = segment_ids_BxS > 0
    mask = mla.document_mask(segment_ids_BxS)
    cos_sin = rope.rope_tables(positions_BxS, self.cfg)

    h = constrain(self.embed(tokens_BxS), ACT, self.rt.par)
    stats = []
    for stack in self.stacks():
      h, layer_stats, _ = stack(h, cos_sin, mask, valid)
      if stack is self.moe_layers:
        stats.append(layer_stats)
    logits = self.head(self.norm(h))

    mtp_logits = []
    if with_mtp:
      for k, module in enumerate(self.mtp, start=1):
        emb_next = self.embed(mtp.roll_left(tokens_BxS, k))
        cos_sin_k = rope.rope_tables(mtp.roll_left(positions_BxS, k), self.cfg)
        h, h_normed, block_stats = module(h, emb_next, cos_sin_k, mask, valid)
        mtp_logits.append(self.head(h_normed))
        stats.append(jax.tree.map(lambda x: x[None], block_stats))
    moe_stats = jax.tree.map(lambda *xs: jnp.concatenate(xs), *stats) if stats else None
    return ModelOutput(logits, tuple(mtp_logits), moe_stats)

  # ----------------------------------------------------------- router biases
  def router_bias_variables(self):
    """The correction-bias variables of every MoE layer, in `moe_stats` order."""
    out = []
    if self.moe_layers is not None and self.cfg.topk_method == "noaux_tc":
      out.append(self.moe_layers.layers.mlp.gate.e_score_correction_bias)  # [L_moe, E]
    for module in self.mtp:
      if module.block.is_moe and self.cfg.topk_method == "noaux_tc":
        out.append(module.block.mlp.gate.e_score_correction_bias)  # [E]
    return out

  def update_router_biases(self, load_LxE, gamma):
    """Auxiliary-loss-free balancing (V3 eq. 16 ff.): b_i += gamma * sign(mean(load) - load_i), per
    layer, for `load` in `moe_stats` order. Outside the gradient; call after each step."""
    i = 0
    for v in self.router_bias_variables():
      n = 1 if v.ndim == 1 else v.shape[0]
      load = load_LxE[i:i + n]
      delta = gamma * jnp.sign(load.mean(-1, keepdims=True) - load)
      v[...] = v[...] + (delta[0] if v.ndim == 1 else delta)
      i += n
