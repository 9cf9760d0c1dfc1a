"""DeepSeekMoE routing (V2 report section 2.2, V3 report section 2.1.2).

  s = sigmoid(h W_g) (V3) or softmax(h W_g) (V2), in float32
  choice = s + e_score_correction_bias              (noaux_tc only; selection only, never weights)
  group-limited: experts in n_group groups; group score = sum of its top-2 `choice` (noaux_tc)
     or max (group_limited_greedy); keep the topk_group best groups, mask the rest with -inf
     (the official code; transformers' V2 fills 0.0, which differs only if a score is negative)
  idx = top-k(choice);  w = s[idx];  w /= sum(w) + 1e-20 if norm_topk_prob;  w *= routed_scaling_factor

Statistics for training: per-expert load (tokens routed to each expert) and the complementary
sequence-wise balance loss of V3 (eq. 17-20), per sequence of T valid tokens:
  f_i = N_r / (K_r T) sum_t 1[i in TopK(t)],   P_i = (1/T) sum_t s_it / sum_j s_jt,
  L_bal = sum_i f_i P_i   (averaged over sequences; the weight alpha is applied by the trainer)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe.config import ModelConfig
from moe.layers import param
from moe.runtime import Runtime


class RouterBias(nnx.Variable):
  """e_score_correction_bias: moved by the auxiliary-loss-free update, never by gradients."""


def scores_of(logits_TxE, cfg: ModelConfig):
  if cfg.scoring_func == "sigmoid":
    return jax.nn.sigmoid(logits_TxE)
  return jax.nn.softmax(logits_TxE, axis=-1)


# The group limit without lax.top_k or a scatter, whose operands XLA's SPMD partitioner gathers to every
# device: V3 on 256 H100s sorted all 3.1M tokens' group scores on each GPU, after a 200 MB all-gather,
# in every MoE layer's forward and recompute.
def top2_sum(x_TxGxN):
  """[T, G]: the sum of the two largest of each group (lax.top_k(x, 2)[0].sum(-1))."""
  n = x_TxGxN.shape[-1]
  first = jnp.argmax(x_TxGxN, -1)
  rest = jnp.where(jnp.arange(n) == first[..., None], -jnp.inf, x_TxGxN)
  return x_TxGxN.max(-1) + rest.max(-1)


def top_mask(x_TxG, k: int):
  """[T, G] bool: each row's k largest, ties to the lower index (the groups lax.top_k(x, k) keeps)."""
  g = jnp.arange(x_TxG.shape[-1])
  other, this = x_TxG[:, None, :], x_TxG[:, :, None]  # [T, G, G']: group G' against group G
  beaten_by = (other > this) | ((other == this) & (g[None, :] < g[:, None]))
  return beaten_by.sum(-1) < k


def select(scores_TxE, bias_E, cfg: ModelConfig):
  """(weights [T, K] float32, expert indices [T, K] int32) for float32 scores."""
  choice = scores_TxE if bias_E is None else scores_TxE + bias_E
  t, e = choice.shape
  if cfg.group_limited:
    grouped = choice.reshape(t, cfg.n_group, e // cfg.n_group)
    group_scores = top2_sum(grouped) if cfg.topk_method == "noaux_tc" else grouped.max(-1)
    group_mask = top_mask(group_scores, cfg.topk_group)
    choice = jnp.where(group_mask[:, :, None], grouped, -jnp.inf).reshape(t, e)
  _, idx = jax.lax.top_k(choice, cfg.num_experts_per_tok)
  weights = jnp.take_along_axis(scores_TxE, idx, axis=-1)
  if cfg.norm_topk_prob:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  return weights * cfg.routed_scaling_factor, idx.astype(jnp.int32)


def reach(cfg: ModelConfig) -> tuple[int, int, int]:
  """(experts, groups, groups kept) as the router enforces them, which bounds how many expert-parallel
  nodes one token can reach (parallel.expert_parallel.ranks_per_token): without a group limit
  (`greedy`, or one group) a token's experts may be anywhere."""
  if cfg.group_limited:
    return cfg.n_routed_experts, cfg.n_group, cfg.topk_group
  return cfg.n_routed_experts, 1, 1


def expert_load(idx_TxK, valid_T, n_experts: int):
  """Tokens routed to each expert: [E] float32 (padding tokens excluded)."""
  hits = jax.nn.one_hot(idx_TxK, n_experts, dtype=jnp.float32) * valid_T[:, None, None]
  return hits.sum((0, 1))


def sequence_balance_loss(scores_BxSxE, idx_BxSxK, valid_BxS, cfg: ModelConfig):
  """V3's complementary sequence-wise balance loss (unweighted), averaged over sequences."""
  e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
  valid = valid_BxS.astype(jnp.float32)
  n_tok = jnp.maximum(valid.sum(-1), 1.0)  # [B]
  hits = (jax.nn.one_hot(idx_BxSxK, e, dtype=jnp.float32) * valid[..., None, None]).sum((1, 2))
  f = hits * e / (k * n_tok[:, None])  # [B, E]
  s_norm = scores_BxSxE / scores_BxSxE.sum(-1, keepdims=True)
  p = (s_norm * valid[..., None]).sum(1) / n_tok[:, None]  # [B, E]
  has_tokens = (valid.sum(-1) > 0).astype(jnp.float32)
  return ((f * p).sum(-1) * has_tokens).sum() / jnp.maximum(has_tokens.sum(), 1.0)


class Router(nnx.Module):
  """The MoE gate: `kernel` [hidden, n_routed_experts] and (noaux_tc) the correction bias."""

  def __init__(self, cfg: ModelConfig, rt: Runtime, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.kernel = param(rngs, (cfg.hidden_size, cfg.n_routed_experts), ("embed", None), cfg, rt)
    if cfg.topk_method == "noaux_tc":
      self.e_score_correction_bias = RouterBias(jnp.zeros((cfg.n_routed_experts,), jnp.float32), axes=(None,))

  def __call__(self, x_BxSxD):
    """weights [B, S, K] float32, indices [B, S, K], scores [B, S, E] float32."""
    b, s, d = x_BxSxD.shape
    logits = jnp.dot(x_BxSxD.reshape(b * s, d).astype(jnp.float32), self.kernel[...].astype(jnp.float32))
    scores = scores_of(logits, self.cfg)
    bias = self.e_score_correction_bias[...] if self.cfg.topk_method == "noaux_tc" else None
    weights, idx = select(scores, bias, self.cfg)
    k, e = self.cfg.num_experts_per_tok, self.cfg.n_routed_experts
    return weights.reshape(b, s, k), idx.reshape(b, s, k), scores.reshape(b, s, e)
