"""Multi-head latent attention (DeepSeek-V2 report, section 2.1), for training and for decoding.

  c_q  = RMSNorm(h W_qa)            q = c_q W_qb              (or q = h W_q when q_lora_rank is null)
  [c_kv | k_pe] = h W_kva           [k_nope | v] = RMSNorm(c_kv) W_kvb
  q = [q_nope | RoPE(q_pe)]         k = [k_nope | RoPE(k_pe) shared by all heads]
  o = softmax(q k^T * scale + causal/segment mask) v W_o

Without a cache (training, evaluation) the keys and values are materialised per head and the core
runs the implementation the Runtime chose (moe/kernels/attention.py: fused, blocked on CPU, the
splash kernel on TPU). With context parallelism (`mesh.context` > 1: each sequence's tokens split
into slices, on the balanced layout of moe/model.py) the latent [c_kv | RoPE(k_pe)] of the whole
sequence is all-gathered (`gather_latent`), not the per-head keys and values, which each slice
up-projects itself; its queries stay local and see their rows of the causal/document mask (the
latent-block core, moe/kernels/latent_attention.py, or the fused one). With a `LatentCache`
(decoding, moe/decode.py) only what MLA needs is cached per token (section 2.1.3): the normalised
latent `c_kv` and the rotated decoupled key `k_pe`; kv_b_proj = [W_UK | W_UV] is absorbed into the
query and the output, so keys and values are never materialised per head:

  q_lat  = q_nope W_UK^T                                 [batch, new, heads, kv_lora_rank]
  scores = (q_lat . c_kv + RoPE(q_pe) . k_pe) * scale    over the cached tokens
  o      = (softmax(scores) c_kv) W_UV, then o_proj

which is exactly the full-attention result (q_nope . (c_kv W_UK) = (q_nope W_UK^T) . c_kv).

With `keep_max_logit` set (the trainer sets it when QK-clip is on) each training call also leaves
`max_logit` [heads], an nnx.Intermediate: each head's largest pre-softmax logit over the batch, which
QK-clip reads (train/core/muon.py). Off, a forward leaves the model's state as it found it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moe import rope
from moe.config import ModelConfig
from moe.kernels import latent_attention, ring_attention
from moe.kernels.attention import ATTENTION, PALLAS, per_device
from moe.layers import Linear, RMSNorm
from moe.runtime import Runtime
from parallel.sharding import constrain, gather_seq


class LatentCache(NamedTuple):
  """One layer's decoding cache: normalised c_kv [batch, max_len, kv_lora_rank] and the rotated
  k_pe [batch, max_len, qk_rope_head_dim] (RoPE applied at each token's position)."""

  c_kv: jax.Array
  k_pe: jax.Array


class Mask(NamedTuple):
  """Which keys each query sees: `dense` [batch, 1, q, k] bool, and in training the `segment_ids`
  [batch, seq] it was made from (causal within each document), which the splash kernel takes."""

  dense: jax.Array
  segment_ids: jax.Array | None = None
  order: jax.Array | None = None  # each place's index in the original sequence (None: in order)


def document_mask(segment_ids_BxS, order_S=None) -> Mask:
  return Mask(attention_mask(segment_ids_BxS, order_S), segment_ids_BxS,
              None if order_S is None else jnp.asarray(order_S))


def attention_mask(segment_ids_BxS, order_S=None):
  """[batch, 1, q, k] bool: causal, and within one document (segment id; 0 = padding). `order`: each
  place's index in the original sequence when the tokens are laid out in another order (the balanced
  context-parallel layout), which causality follows; None: in order."""
  s = segment_ids_BxS.shape[1]
  index = jnp.arange(s) if order_S is None else jnp.asarray(order_S)
  causal = index[None, :] <= index[:, None]
  same_doc = segment_ids_BxS[:, :, None] == segment_ids_BxS[:, None, :]
  return (causal[None] & same_doc)[:, None]


class MLA(nnx.Module):

  def __init__(self, cfg: ModelConfig, rt: Runtime, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.attention = rt.attention
    self.par = rt.par  # the Pallas kernels run per device, under the mesh
    self.context = rt.par.context if rt.par is not None else 1  # slices of each sequence (context parallelism)
    self.interpret = rt.platform != {"splash": "tpu", "flash": "gpu"}.get(rt.attention)  # else the interpreter
    self.dtype = rt.compute_dtype
    self.keep_max_logit = False  # QK-clip's statistic: the trainer sets it (model.set_attributes) when it reads it
    d, h = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank is None:
      self.q_proj = Linear(d, h * cfg.qk_head_dim, ("embed", "heads"), cfg, rt, rngs=rngs)
    else:
      self.q_a_proj = Linear(d, cfg.q_lora_rank, ("embed", "q_lora"), cfg, rt, rngs=rngs)
      self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg, rt, rngs=rngs)
      self.q_b_proj = Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, ("q_lora", "heads"), cfg, rt, rngs=rngs)
    self.kv_a_proj_with_mqa = Linear(
        d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, ("embed", "kv_lora"), cfg, rt, rngs=rngs
    )
    self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg, rt, rngs=rngs)
    self.kv_b_proj = Linear(
        cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), ("kv_lora", "heads"), cfg, rt, rngs=rngs
    )
    self.o_proj = Linear(h * cfg.v_head_dim, d, ("heads", "embed"), cfg, rt, rngs=rngs)

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

  def __call__(self, x_BxTxD, cos_sin, mask: Mask, cache: LatentCache | None = None, slots_BxT=None):
    """(output [B, T, D], cache).

    Without `cache`: self-attention over the T tokens (`mask`: document_mask); returns cache None.
    With `cache`: the T new tokens' latents are written to it at `slots` [B, T] and they attend to
    the cached tokens `mask.dense` [B, 1, T, max_len] marks visible; returns the updated cache.
    """
    cfg = self.cfg
    b, t, _ = x_BxTxD.shape
    h, nope = cfg.num_attention_heads, cfg.qk_nope_head_dim
    cos, sin = cos_sin

    q_nope, q_pe = jnp.split(self.query(x_BxTxD), [nope], axis=-1)
    q_pe = rope.apply_rope(q_pe, cos, sin)
    c_kv, k_pe = self.latent(x_BxTxD)
    k_pe = rope.apply_rope(k_pe[:, :, None, :], cos, sin)  # [B, T, 1, rope]
    if cache is None and self.attention in ("latent", "ring"):  # context parallelism: the latent's key blocks
      out = self._over_latent_blocks(jnp.concatenate([q_nope, q_pe], axis=-1), c_kv, k_pe, mask)
    elif cache is None:
      if self.context > 1:  # every key on every context slice, from the gathered latent
        c_kv, k_pe = gather_latent(c_kv, k_pe, self.par)
      kv = self.kv_b_proj(c_kv).reshape(b, t, h, nope + cfg.v_head_dim)
      k_nope, v = jnp.split(kv, [nope], axis=-1)
      q = jnp.concatenate([q_nope, q_pe], axis=-1)
      k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe, (b, t, h, cfg.qk_rope_head_dim))], axis=-1)
      if self.context > 1:  # local queries against all keys: each slice's rows of the mask
        q = constrain(q, ("batch", "seq", "heads", None), self.par)
        k, v = (constrain(a, ("batch", None, "heads", None), self.par) for a in (k, v))
        mask = mask._replace(dense=constrain(mask.dense, ("batch", None, "seq", None), self.par))
      if self.keep_max_logit:  # QK-clip's statistic (train/core/muon.py), an intermediate the trainer pops
        self.max_logit = nnx.Intermediate(max_logit(q, k, mask.dense, rope.softmax_scale(cfg)))
      if self.attention in PALLAS:
        kernel = functools.partial(PALLAS[self.attention], scale=rope.softmax_scale(cfg), interpret=self.interpret)
        out = per_device(kernel, q, k, v, mask.segment_ids, self.par)
      else:
        out = ATTENTION[self.attention](q, k, v, mask.dense, rope.softmax_scale(cfg))
    else:
      cache = _write(cache, c_kv, k_pe[:, :, 0], slots_BxT)
      out = self._absorbed(q_nope, q_pe, cache, mask.dense)
    return self.o_proj(out.reshape(b, t, h * cfg.v_head_dim)), cache

  def _over_latent_blocks(self, q_BxTxHxK, c_kv_BxTxC, k_pe_BxTx1xR, mask: Mask):
    """Each context slice's queries against every key, block by block from the gathered latent
    (moe.kernels.latent_attention), or from each slice's latent passed around the context axis
    (`ring`: moe.kernels.ring_attention); [B, T, H, v_head_dim]."""
    cfg = self.cfg
    w = self._w_kvb()
    index = jnp.arange(q_BxTxHxK.shape[1]) if mask.order is None else mask.order
    if self.attention == "ring":
      out = ring_attention.attention(q_BxTxHxK, c_kv_BxTxC.astype(self.dtype), k_pe_BxTx1xR[:, :, 0].astype(self.dtype),
                                     w, index, mask.segment_ids, rope.softmax_scale(cfg), self.par,
                                     with_max_logit=self.keep_max_logit, balanced=mask.order is not None)
      if self.keep_max_logit:  # QK-clip's statistic (train/core/muon.py), an intermediate the trainer pops
        out, best = out
        self.max_logit = nnx.Intermediate(best)
      return out
    c_kv, k_pe = gather_latent(c_kv_BxTxC, k_pe_BxTx1xR, self.par)
    q = constrain(q_BxTxHxK, ("batch", "seq", "heads", None), self.par)
    w = constrain(w, (None, None, None), self.par)  # whole once per layer: left sharded, XLA re-gathered it per key block
    args = (q, c_kv.astype(self.dtype), k_pe[:, :, 0].astype(self.dtype), w, index, index, mask.segment_ids,
            mask.segment_ids, rope.softmax_scale(cfg))
    if self.keep_max_logit:  # QK-clip's statistic (train/core/muon.py), an intermediate the trainer pops
      self.max_logit = nnx.Intermediate(latent_attention.max_logit(*args))
    return latent_attention.attention(*args, groups=self.par.context if self.par is not None else 1)

  def _w_kvb(self):
    """kv_b_proj's kernel in the compute dtype as [kv_lora_rank, heads, nope + v]."""
    cfg = self.cfg
    return self.kv_b_proj.kernel[...].astype(self.dtype).reshape(cfg.kv_lora_rank, cfg.num_attention_heads, -1)

  def _absorbed(self, q_nope_BxTxHxN, q_pe_BxTxHxR, cache: LatentCache, mask_Bx1xTxL):
    """softmax over the cached tokens in the latent space; [B, T, H, v_head_dim]."""
    cfg, dtype = self.cfg, self.dtype
    nope = cfg.qk_nope_head_dim
    w_kvb = self._w_kvb()
    w_uk, w_uv = w_kvb[..., :nope], w_kvb[..., nope:]  # [C, H, nope], [C, H, v]
    q_lat = jnp.einsum("bthn,chn->bthc", q_nope_BxTxHxN.astype(dtype), w_uk)
    ckv, kpe = cache.c_kv.astype(dtype), cache.k_pe.astype(dtype)
    scores = (jnp.einsum("bthc,bsc->bhts", q_lat, ckv, preferred_element_type=jnp.float32)
              + jnp.einsum("bthr,bsr->bhts", q_pe_BxTxHxR.astype(dtype), kpe, preferred_element_type=jnp.float32))
    scores = jnp.where(mask_Bx1xTxL, scores * rope.softmax_scale(cfg), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    o_lat = jnp.einsum("bhts,bsc->bthc", probs, ckv)
    return jnp.einsum("bthc,chv->bthv", o_lat, w_uv)


def gather_latent(c_kv_BxTxC, k_pe_BxTx1xR, par):
  """Context parallelism's all_gather strategy for MLA: the latent c_kv and the rotated shared key
  k_pe (kv_lora_rank + qk_rope_head_dim values per token) of the whole sequence, gathered over the
  axes that split it, in one all-gather; keys and values are up-projected from it on each slice."""
  c = c_kv_BxTxC.shape[-1]
  latent = jnp.concatenate([c_kv_BxTxC, k_pe_BxTx1xR[:, :, 0].astype(c_kv_BxTxC.dtype)], axis=-1)
  latent = gather_seq(latent, ("batch", "seq", None), par)
  c_kv, k_pe = jnp.split(latent, [c], axis=-1)
  return c_kv, k_pe[:, :, None, :]


def max_logit(q_BxTxHxK, k_BxSxHxK, mask_Bx1xTxS, scale, block: int = 512):
  """[heads] float32: each head's largest pre-softmax logit q.k * scale over the batch where `mask`
  lets the query see the key, without a gradient; over blocks of `block` queries, so that no
  [batch, heads, T, S] array is made whole."""
  b, t, h, d = q_BxTxHxK.shape
  n = t // block if t % block == 0 and t > block else 1
  q = jax.lax.stop_gradient(q_BxTxHxK).reshape(b, n, t // n, h, d).swapaxes(0, 1)
  k = jax.lax.stop_gradient(k_BxSxHxK)
  mask = jnp.broadcast_to(mask_Bx1xTxS, (b, 1, t, k.shape[1])).reshape(b, 1, n, t // n, -1).swapaxes(0, 2)

  def one(qm):  # one block of queries: [B, t/n, H, K], [1, B, t/n, S]
    q_blk, m_blk = qm
    s = jnp.einsum("bthd,bshd->bhts", q_blk, k, preferred_element_type=jnp.float32)
    return jnp.where(m_blk[0][:, None], s, -jnp.inf).max(axis=(0, 2, 3))

  return jax.lax.map(one, (q, mask)).max(axis=0) * scale


def _write(cache: LatentCache, c_kv_BxTxC, k_pe_BxTxR, slots_BxT) -> LatentCache:
  rows = jnp.arange(c_kv_BxTxC.shape[0])[:, None]
  return LatentCache(cache.c_kv.at[rows, slots_BxT].set(c_kv_BxTxC.astype(cache.c_kv.dtype), mode="drop"),
                     cache.k_pe.at[rows, slots_BxT].set(k_pe_BxTxR.astype(cache.k_pe.dtype), mode="drop"))
