"""Rotary position embedding on MLA's decoupled rope dimensions, with YaRN context extension.

Layout: DeepSeek rotates *adjacent pairs* (x[2i], x[2i+1]) by angle pos * freq_i (the official code
views them as complex numbers). We return the rotated pairs de-interleaved, as `transformers` does:
[x_even*cos - x_odd*sin | x_odd*cos + x_even*sin]. Queries and keys are permuted alike, so q.k is
exactly the released model's.

YaRN (DeepSeek-V2 report, appendix; `rope_scaling` in config.json), with d = qk_rope_head_dim:
  inv_freq_i = theta^(-2i/d)
  low  = max(floor(d ln(orig / (beta_fast 2 pi)) / (2 ln theta)), 0)
  high = min(ceil (d ln(orig / (beta_slow 2 pi)) / (2 ln theta)), d - 1)
  ramp_i = clip((i - low) / (high - low), 0, 1)           (high == low: high += 0.001)
  freq_i = inv_freq_i / factor * ramp_i + inv_freq_i * (1 - ramp_i)
  cos, sin are multiplied by get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
  softmax scale = qk_head_dim^-0.5 * get_mscale(factor, mscale_all_dim)^2
with get_mscale(s, m) = 0.1 m ln(s) + 1 for s > 1, else 1.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from moe.config import ModelConfig


def get_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
  """freq_i, i < d/2, float32 (YaRN-corrected when cfg.rope_scaling is set)."""
  d, theta = cfg.qk_rope_head_dim, cfg.rope_theta
  inv_freq = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
  rs = cfg.rope_scaling
  if rs is None:
    return inv_freq.astype(np.float32)

  def correction_dim(rotations):
    return d * math.log(rs.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low = max(math.floor(correction_dim(rs.beta_fast)), 0)
  high = min(math.ceil(correction_dim(rs.beta_slow)), d - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  freq = inv_freq / rs.factor * ramp + inv_freq * (1 - ramp)
  return freq.astype(np.float32)


def attention_factor(cfg: ModelConfig) -> float:
  """YaRN's multiplier on cos/sin (1 without rope_scaling)."""
  rs = cfg.rope_scaling
  if rs is None:
    return 1.0
  if rs.mscale and rs.mscale_all_dim:
    return get_mscale(rs.factor, rs.mscale) / get_mscale(rs.factor, rs.mscale_all_dim)
  return get_mscale(rs.factor)


def softmax_scale(cfg: ModelConfig) -> float:
  """qk_head_dim^-0.5, times YaRN's mscale^2 when mscale_all_dim is set."""
  scale = cfg.qk_head_dim ** -0.5
  rs = cfg.rope_scaling
  if rs is not None and rs.mscale_all_dim:
    scale *= get_mscale(rs.factor, rs.mscale_all_dim) ** 2
  return scale


def rope_tables(positions_BxS, cfg: ModelConfig):
  """cos, sin: [batch, seq, rope_dim/2] float32 for integer positions."""
  angles = positions_BxS.astype(jnp.float32)[..., None] * jnp.asarray(inv_frequencies(cfg))
  factor = attention_factor(cfg)
  return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x_BxSxHxR, cos_BxSxR2, sin_BxSxR2):
  """Rotate adjacent pairs of the last axis; output de-interleaved (see module docstring)."""
  cos, sin = cos_BxSxR2[:, :, None, :], sin_BxSxR2[:, :, None, :]
  x32 = x_BxSxHxR.astype(jnp.float32)
  even, odd = x32[..., 0::2], x32[..., 1::2]
  out = jnp.concatenate([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
  return out.astype(x_BxSxHxR.dtype)
