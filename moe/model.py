"""The DeepSeek-V2/V3 decoder: embedding -> dense layers -> MoE layers -> norm -> head (+ MTP).

Layers of one kind are stored stacked (a leading `layers` axis) and applied with a scan, so
compile time does not grow with depth; `remat_policy` picks what the backward pass recomputes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moe import mla, mtp, rope
from moe.config import ModelConfig
from moe.experts import MoE, MoEStats
from moe.layers import MLP, Embed, Linear, RMSNorm
from parallel.sharding import constrain

ACT = ("batch", "seq", "embed")  # hidden states between layers (logical axes; see parallel/sharding.py)

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class ModelOutput(NamedTuple):
  logits: jax.Array  # [batch, seq, vocab] float32
  mtp_logits: tuple  # D x [batch, seq, vocab] float32; depth k predicts t_{i+k+1}
  moe_stats: MoEStats | None  # stacked over MoE layers, main layers first then MTP blocks


class DecoderLayer(nnx.Module):
  """Pre-norm block: h = x + MLA(norm(x)); y = h + FFN(norm(h)), FFN dense or DeepSeekMoE."""

  def __init__(self, cfg: ModelConfig, moe: bool, *, rngs: nnx.Rngs):
    self.is_moe = moe
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
    self.self_attn = mla.MLA(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
    self.mlp = MoE(cfg, rngs=rngs) if moe else MLP(cfg, cfg.intermediate_size, rngs=rngs)

  def __call__(self, x_BxSxD, cos_sin, mask, valid_BxS):
    h = constrain(x_BxSxD + self.self_attn(self.input_layernorm(x_BxSxD), cos_sin, mask), ACT)
    if self.is_moe:
      y, stats = self.mlp(self.post_attention_layernorm(h), valid_BxS)
    else:
      y, stats = self.mlp(self.post_attention_layernorm(h)), None
    return constrain(h + y, ACT), stats


class LayerStack(nnx.Module):
  """n identical-shape decoder layers, parameters stacked on a leading `layers` axis."""

  def __init__(self, cfg: ModelConfig, n: int, moe: bool, *, rngs: nnx.Rngs):
    self.remat_policy = cfg.remat_policy
    self.unroll = not cfg.scan_layers

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return DecoderLayer(cfg, moe, rngs=rngs)

    self.layers = create(rngs)
    for _, v in nnx.iter_graph(self.layers):
      if isinstance(v, nnx.Variable):
        v.set_metadata(axes=("layers",) + tuple(v.get_metadata()["axes"]))

  def __call__(self, x_BxSxD, cos_sin, mask, valid_BxS):
    graphdef, stacked = nnx.split(self.layers)

    def body(x, layer_state):  # one layer: a slice of every stacked variable
      return nnx.merge(graphdef, layer_state)(x, cos_sin, mask, valid_BxS)

    if self.remat_policy != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat_policy])
    return jax.lax.scan(body, x_BxSxD, stacked, unroll=self.unroll)


class Transformer(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    k = cfg.first_k_dense_replace
    self.embed = Embed(cfg, rngs=rngs)
    self.dense_layers = LayerStack(cfg, k, moe=False, rngs=rngs) if k else None
    self.moe_layers = LayerStack(cfg, cfg.num_moe_layers, moe=True, rngs=rngs) if cfg.num_moe_layers else None
    self.norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
    self.lm_head = None if cfg.tie_word_embeddings else Linear(
        cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), cfg, rngs=rngs, fp8=False)  # head: never FP8
    self.mtp = nnx.List([mtp.MTPModule(cfg, rngs=rngs) for _ in range(cfg.num_nextn_predict_layers)])

  def head(self, h_BxSxD):
    """Output head on normalised hidden states -> float32 logits."""
    logits = self.embed.attend(h_BxSxD) if self.lm_head is None else self.lm_head(h_BxSxD)
    return constrain(logits.astype(jnp.float32), ("batch", "seq", "vocab"))

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
    mask = mla.attention_mask(segment_ids_BxS)
    cos_sin = rope.rope_tables(positions_BxS, self.cfg)

    h = constrain(self.embed(tokens_BxS), ACT)
    stats = []
    if self.dense_layers is not None:
      h, _ = self.dense_layers(h, cos_sin, mask, valid)
    if self.moe_layers is not None:
      h, layer_stats = self.moe_layers(h, cos_sin, mask, valid)
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
