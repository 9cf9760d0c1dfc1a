"""Multi-head latent attention (DeepSeek-V2 report, section 2.1).

  c_q  = RMSNorm(h W_qa)            q = c_q W_qb              (or q = h W_q when q_lora_rank is null)
  [c_kv | k_pe] = h W_kva           [k_nope | v] = RMSNorm(c_kv) W_kvb
  q = [q_nope | RoPE(q_pe)]         k = [k_nope | RoPE(k_pe) shared by all heads]
  o = softmax(q k^T * scale + causal/segment mask) v W_o
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moe import rope
from moe.config import ModelConfig
from moe.layers import Linear, RMSNorm


def attention_mask(segment_ids_BxS):
  """[batch, 1, q, k] bool: causal, and within one document (segment id; 0 = padding)."""
  s = segment_ids_BxS.shape[1]
  causal = jnp.tril(jnp.ones((s, s), bool))
  same_doc = segment_ids_BxS[:, :, None] == segment_ids_BxS[:, None, :]
  return (causal[None] & same_doc)[:, None]


def attend(q_BxSxHxK, k_BxSxHxK, v_BxSxHxV, mask_Bx1xSxS, scale: float):
  """softmax(q k^T scale + mask) v with float32 logits; `mask` is causal (attention_mask).

  GPU/TPU: `jax.nn.dot_product_attention` (fused kernels where they apply). Those need one head
  size for q, k and v; MLA's values are narrower, so v is zero-padded and the pad sliced off.
  CPU: `causal_block_attention`, which skips the all-masked upper blocks (2.8x faster fwd+bwd at
  seq 256 on 2 cores, docs/perf.md).
  """
  fn = causal_block_attention if jax.default_backend() == "cpu" else fused_attention
  return fn(q_BxSxHxK, k_BxSxHxK, v_BxSxHxV, mask_Bx1xSxS, scale)


def fused_attention(q_BxSxHxK, k_BxSxHxK, v_BxSxHxV, mask_Bx1xSxS, scale: float):
  """`jax.nn.dot_product_attention`, v zero-padded to the key head size."""
  dv, dk = v_BxSxHxV.shape[-1], k_BxSxHxK.shape[-1]
  if dv < dk:
    v_BxSxHxV = jnp.pad(v_BxSxHxV, ((0, 0), (0, 0), (0, 0), (0, dk - dv)))
  out = jax.nn.dot_product_attention(q_BxSxHxK, k_BxSxHxK, v_BxSxHxV, mask=mask_Bx1xSxS, scale=scale)
  return out[..., :dv]


def causal_block_attention(q_BxSxHxK, k_BxSxHxK, v_BxSxHxV, mask_Bx1xSxS, scale: float, block: int = 64):
  """Exact attention in query blocks; block i reads only keys before its end (causality)."""
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


class MLA(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank is None:
      self.q_proj = Linear(d, h * cfg.qk_head_dim, ("embed", "heads"), cfg, rngs=rngs)
    else:
      self.q_a_proj = Linear(d, cfg.q_lora_rank, ("embed", "q_lora"), cfg, rngs=rngs)
      self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg, rngs=rngs)
      self.q_b_proj = Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, ("q_lora", "heads"), cfg, rngs=rngs)
    self.kv_a_proj_with_mqa = Linear(
        d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, ("embed", "kv_lora"), cfg, rngs=rngs
    )
    self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg, rngs=rngs)
    self.kv_b_proj = Linear(
        cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), ("kv_lora", "heads"), cfg, rngs=rngs
    )
    self.o_proj = Linear(h * cfg.v_head_dim, d, ("heads", "embed"), cfg, rngs=rngs)

  def query(self, x_BxSxD):
    """q: [batch, seq, heads, qk_head_dim] before RoPE."""
    if self.cfg.q_lora_rank is None:
      q = self.q_proj(x_BxSxD)
    else:
      q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BxSxD)))
    b, s, _ = x_BxSxD.shape
    return q.reshape(b, s, self.cfg.num_attention_heads, self.cfg.qk_head_dim)

  def latent(self, x_BxSxD):
    """The per-token cache of MLA: normalised c_kv [b, s, kv_lora_rank], un-rotated k_pe [b, s, rope]."""
    ckv = self.kv_a_proj_with_mqa(x_BxSxD)
    c_kv, k_pe = jnp.split(ckv, [self.cfg.kv_lora_rank], axis=-1)
    return self.kv_a_layernorm(c_kv), k_pe

  def __call__(self, x_BxSxD, cos_sin, mask_Bx1xSxS):
    cfg = self.cfg
    b, s, _ = x_BxSxD.shape
    h, nope = cfg.num_attention_heads, cfg.qk_nope_head_dim
    cos, sin = cos_sin

    q_nope, q_pe = jnp.split(self.query(x_BxSxD), [nope], axis=-1)
    c_kv, k_pe = self.latent(x_BxSxD)
    kv = self.kv_b_proj(c_kv).reshape(b, s, h, nope + cfg.v_head_dim)
    k_nope, v = jnp.split(kv, [nope], axis=-1)

    q_pe = rope.apply_rope(q_pe, cos, sin)
    k_pe = rope.apply_rope(k_pe[:, :, None, :], cos, sin)
    q = jnp.concatenate([q_nope, q_pe], axis=-1)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe, (b, s, h, cfg.qk_rope_head_dim))], axis=-1)

    out = attend(q, k, v, mask_Bx1xSxS, rope.softmax_scale(cfg))
    return self.o_proj(out.reshape(b, s, h * cfg.v_head_dim))
