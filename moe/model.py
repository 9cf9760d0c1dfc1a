"""The DeepSeek-V2/V3 decoder: embedding -> dense layers -> MoE layers -> norm -> head (+ MTP).

Layers of one kind are stored stacked (a leading `layers` axis) and applied with a scan
(moe/decoder.py). With pipeline stages (`mesh.stage` > 1) the MoE layers are the pipelined ones: their
stack is stored in the pipeline's slot order, padding included (`layout`, parallel/pipeline.py), and
the trainer runs it through the pipeline (train/core/pipelined.py) between `bottom` (embedding, dense
layers) and `top` (norm, head, MTP). How the model runs (dtypes, kernels, FP8, parallelism) is the `moe.runtime.Runtime`
it is built with, resolved once; by default for float32 on this process's devices.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe import mla, mtp, rope
from moe.config import ModelConfig
from moe.decoder import ACT, LayerStack
from moe.experts import MoEStats
from moe.layers import Embed, Linear, RMSNorm
from moe.runtime import Runtime
from parallel.pipeline import Layout
from parallel.sharding import balanced_order, constrain, gather_to, take_seq


STACKS = ("dense_layers", "moe_layers")  # the Transformer's layer stacks, in order
LOSS_CHUNK = 1024  # tokens of a sequence whose logits a deferred head computes at a time
HEAD_ROWS = ("head_batch", "seq", "head_embed")  # the hidden states' layout where the head takes them


class HeadInput(NamedTuple):
  """Logits not yet computed (Transformer.defer_head): the normalised hidden states the output head
  takes and the head, for a loss that computes them a sequence chunk at a time
  (train/core/loss.py: token_nll); `chunks`: how many (1 where the sequence is split over devices)."""

  h_BxSxD: jax.Array  # laid out as HEAD_ROWS says
  head: Callable  # h -> float32 logits
  chunks: int
  weight: jax.Array  # [hidden, vocab] in the compute dtype: what `head` multiplies h by
  weight_axes: tuple  # its logical axes
  par: object  # parallel.mesh.Parallelism or None


class ModelOutput(NamedTuple):
  logits: jax.Array | HeadInput  # [batch, seq, vocab] float32
  mtp_logits: tuple  # D x [batch, seq, vocab] float32 (or HeadInput); depth k predicts t_{i+k+1}
  moe_stats: MoEStats | None  # stacked over MoE layers, main layers first then MTP blocks
  # [seq] the original index of each place of the logits (context parallelism's balanced layout, kept
  # through the head with `forward(..., keep_layout=True)`: the loss lays its targets out the same
  # way); None: in order
  order: np.ndarray | None = None


class Context(NamedTuple):
  """Per-batch inputs every layer needs."""
  positions: jax.Array  # [batch, seq] RoPE positions
  cos_sin: tuple  # RoPE tables
  mask: jax.Array  # document mask
  valid: jax.Array  # [batch, seq] real tokens


def context(cfg: ModelConfig, tokens_BxS, segment_ids_BxS=None, positions_BxS=None, order_S=None) -> Context:
  """Document mask, RoPE tables and padding of a batch (defaults: one document, positions 0..S-1);
  `order`: the original index of each place, for tokens laid out in another order (mla.attention_mask)."""
  b, s = tokens_BxS.shape
  if segment_ids_BxS is None:
    segment_ids_BxS = jnp.ones((b, s), jnp.int32)
  if positions_BxS is None:
    positions_BxS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  return Context(positions_BxS, rope.rope_tables(positions_BxS, cfg), mla.document_mask(segment_ids_BxS, order_S),
                 segment_ids_BxS > 0)


def laid_out(cfg: ModelConfig, par, tokens_BxS, segment_ids_BxS=None, positions_BxS=None):
  """(Context in order, the tokens and Context on the layers' layout, its order): with context
  parallelism (`par`, a parallel.mesh.Parallelism) the balanced layout (parallel.sharding.balanced_order),
  else the order itself (None)."""
  ctx = context(cfg, tokens_BxS, segment_ids_BxS, positions_BxS)
  order = balanced_order(tokens_BxS.shape[1], par.context) if par is not None else None
  if order is None:
    return ctx, tokens_BxS, ctx, None
  tokens, seg, pos = (take_seq(a, order) for a in (tokens_BxS, ctx.mask.segment_ids, ctx.positions))
  return ctx, tokens, context(cfg, tokens, seg, pos, order), order


class Transformer(nnx.Module):

  def __init__(self, cfg: ModelConfig, rt: Runtime | None = None, *, rngs: nnx.Rngs):
    rt = Runtime.resolve(announce=False) if rt is None else rt
    self.cfg, self.rt = cfg, rt
    k = cfg.first_k_dense_replace
    self.embed = Embed(cfg, rt, rngs=rngs)
    self.dense_layers = LayerStack(cfg, rt, k, moe=False, rngs=rngs) if k else None
    self.layout = rt.par.layout(cfg.num_moe_layers) if rt.par is not None else Layout(cfg.num_moe_layers)
    self.moe_layers = LayerStack(cfg, rt, cfg.num_moe_layers, moe=True, rngs=rngs, axis="stage_layers",
                                 layout=self.layout) if cfg.num_moe_layers else None
    self.norm = RMSNorm(cfg.hidden_size, cfg, rt, rngs=rngs)
    self.lm_head = None if cfg.tie_word_embeddings else Linear(
        cfg.hidden_size, cfg.vocab_size, ("head_embed", "head_vocab"), cfg, rt, rngs=rngs, fp8=False)  # never FP8
    self.mtp = nnx.List([mtp.MTPModule(cfg, rt, rngs=rngs) for _ in range(cfg.num_nextn_predict_layers)])
    self.defer_head = False  # the trainer sets it: forward returns HeadInputs, not logits

  def stacks(self) -> list[LayerStack]:
    """The layer stacks in order (dense, then MoE), those present."""
    return [s for s in (getattr(self, name) for name in STACKS) if s is not None]

  def head(self, h_BxSxD):
    """Output head on normalised hidden states -> float32 logits."""
    # the head's rows (with vocabulary parallelism: gathered over fsdp), its gradient reduce-scattered back;
    # the hidden dimension as the head's weight holds it (None gathered it whole: a block of rows too few
    # to split over fsdp has it split there, and each fsdp device then computed every logit, V2-Lite's
    # pipelined step 1.31x the matmul FLOPs)
    return self._head_rows(gather_to(h_BxSxD, ACT, HEAD_ROWS, self.rt.par))

  def _head_rows(self, h_BxSxD):
    logits = self.embed.attend(h_BxSxD) if self.lm_head is None else self.lm_head(h_BxSxD)
    return constrain(logits.astype(jnp.float32), ("head_batch", "seq", "head_vocab"), self.rt.par)

  def head_weight(self) -> tuple[jax.Array, tuple]:
    """(the head's [hidden, vocab] weight in the compute dtype, its logical axes): what `head` multiplies by."""
    if self.lm_head is None:
      table = self.embed.embedding
      return table[...].T.astype(self.embed.dtype), tuple(reversed(table.get_metadata()["axes"]))
    return self.lm_head.kernel[...].astype(self.lm_head.dtype), self.lm_head.kernel.get_metadata()["axes"]

  def __call__(self, tokens_BxS, segment_ids_BxS=None, positions_BxS=None):
    """logits [batch, seq, vocab] float32 (the MTP modules are not run)."""
    return self.forward(tokens_BxS, segment_ids_BxS, positions_BxS, with_mtp=False).logits

  def forward(self, tokens_BxS, segment_ids_BxS=None, positions_BxS=None, with_mtp=True,
              keep_layout=False) -> ModelOutput:
    """Main logits, MTP logits and MoE statistics.

    keep_layout: with context parallelism, the head and the MTP modules run on the balanced layout
    too and the logits come out in it (`order` says where each place's token is in the sequence),
    for a per-token loss that lays its targets out the same way (train/core/loss.py): the hidden
    state is then never put back in order (an all-gather of it per step); else the logits are in order.

    segment_ids: document id of each token within its row (0 = padding); attention stays within a
    document. positions: position within the document (RoPE). Defaults: one document, 0..S-1.
    With a pipelined layout the MoE layers run here unpipelined, in layer order (a reference: every
    device gathers the whole stack); training and evaluation pipeline them (train/core/pipelined.py).
    """
    # With context parallelism the layers run on the balanced layout (every context slice the same
    # causal work): the inputs are permuted once here and, unless `keep_layout`, the last layer's output
    # put back in order.
    ctx, tokens, inner, order = self.laid_out(tokens_BxS, segment_ids_BxS, positions_BxS)
    h, stats = self.bottom(tokens, inner)
    if self.moe_layers is not None:
      graphdef, stacked = nnx.split(self.moe_layers.layers)
      slots = self.layout.layer_slot()
      if not (slots == np.arange(len(slots))).all() or len(slots) != self.layout.slots:
        stacked = jax.tree.map(lambda x: jnp.take(x, jnp.asarray(slots), axis=0), stacked)
      h, layer_stats, *_ = self.moe_layers.apply(graphdef, (stacked,), h, inner.cos_sin, inner.mask, inner.valid)
      stats.append(layer_stats)
    if order is not None and keep_layout:
      logits, mtp_logits, mtp_stats = self.top(h, tokens_BxS, ctx, with_mtp, inner, order)
    else:
      if order is not None:
        h = constrain(take_seq(h, np.argsort(order)), ACT, self.rt.par)
      logits, mtp_logits, mtp_stats = self.top(h, tokens_BxS, ctx, with_mtp)
    stats += mtp_stats
    moe_stats = jax.tree.map(lambda *xs: jnp.concatenate(xs), *stats) if stats else None
    return ModelOutput(logits, mtp_logits, moe_stats, order if keep_layout else None)

  def context(self, tokens_BxS, segment_ids_BxS=None, positions_BxS=None, order_S=None) -> Context:
    return context(self.cfg, tokens_BxS, segment_ids_BxS, positions_BxS, order_S)

  def laid_out(self, tokens_BxS, segment_ids_BxS=None, positions_BxS=None):
    return laid_out(self.cfg, self.rt.par, tokens_BxS, segment_ids_BxS, positions_BxS)

  def bottom(self, tokens_BxS, ctx: Context):
    """(hidden states after the embedding and the dense layers, [] : no MoE statistics here)."""
    h = constrain(self.embed(tokens_BxS), ACT, self.rt.par)
    if self.dense_layers is not None:
      h, _, _ = self.dense_layers(h, ctx.cos_sin, ctx.mask, ctx.valid)
    return h, []

  def head_of(self, h_normed_BxSxD):
    """The logits, or with `defer_head` what computes them (HeadInput): a chunk of LOSS_CHUNK tokens
    of each sequence at a time, whole where the sequence is split over `context` devices."""
    if not self.defer_head:
      return self.head(h_normed_BxSxD)
    s = h_normed_BxSxD.shape[1]
    context = self.rt.par.context if self.rt.par is not None else 1
    chunks = s // LOSS_CHUNK if context == 1 and s % LOSS_CHUNK == 0 else 1
    h = gather_to(h_normed_BxSxD, ACT, HEAD_ROWS, self.rt.par)
    return HeadInput(h, self._head_rows, chunks, *self.head_weight(), self.rt.par)

  def top(self, h_BxSxD, tokens_BxS, ctx: Context, with_mtp=True, inner: Context | None = None, order=None):
    """(logits, MTP logits, [MTP blocks' statistics stacked [1, ...] each]) from the last MoE layer's
    output (as HeadInputs with `defer_head`). `inner` and `order`: h is on that layout (the balanced
    one; `ctx` and the tokens in order), so are the logits."""
    logits = self.head_of(self.norm(h_BxSxD))
    mtp_logits, stats = [], []
    if with_mtp:
      h = h_BxSxD
      here = ctx if inner is None else inner
      lay = lambda x: take_seq(x, order)  # in order -> h's layout
      for k, module in enumerate(self.mtp, start=1):
        emb_next = self.embed(lay(mtp.roll_left(tokens_BxS, k)))
        cos_sin_k = rope.rope_tables(lay(mtp.roll_left(ctx.positions, k)), self.cfg)
        h, h_normed, block_stats = module(h, emb_next, cos_sin_k, here.mask, here.valid)
        mtp_logits.append(self.head_of(h_normed))
        stats.append(jax.tree.map(lambda x: x[None], block_stats))
    return logits, tuple(mtp_logits), stats

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

  def moe_experts(self):
    """The routed experts of every MoE layer in `moe_stats` order: the stack's (one module over
    [L_moe, ...]) and each MTP block's."""
    out = [self.moe_layers.layers.mlp.experts] if self.moe_layers is not None else []
    return out + [module.block.mlp.experts for module in self.mtp if module.block.is_moe]

  def replace_expert_copies(self, load_LxE, step):
    """Redundant experts (mesh.redundant_experts): every `redundant_every` steps, re-place the copies
    of each MoE layer from its load in `load_LxE` (`moe_stats` order). Call after each step with the
    number of steps done."""
    i = 0
    for experts in self.moe_experts():
      n = 1 if experts.gate_proj.ndim == 3 else experts.gate_proj.shape[0]
      if hasattr(experts, "copies"):
        experts.replace_copies(load_LxE[i] if n == 1 else load_LxE[i:i + n], step)
      i += n

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
