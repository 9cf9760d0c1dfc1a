"""moe.rope against float64 NumPy references written from the DeepSeek/YaRN formulas."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from moe import rope
from moe.config import ModelConfig, RopeScaling

V3_YARN = RopeScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                      mscale=1.0, mscale_all_dim=1.0)
V3 = ModelConfig(qk_nope_head_dim=128, qk_rope_head_dim=64, rope_theta=10000.0, rope_scaling=V3_YARN)
PLAIN = V3.replace(rope_scaling=None)


# ------------------------------------------------------------------ references (float64)
def ref_inv_freq(d, theta, scaling=None):
  """REFERENCE.md: inv_freq_i = theta^(-2i/d), YaRN blend between inv_freq and inv_freq/factor."""
  i = np.arange(d // 2, dtype=np.float64)
  inv_freq = theta ** (-2.0 * i / d)
  if scaling is None:
    return inv_freq
  factor, orig, beta_fast, beta_slow = scaling
  low = math.floor(d * math.log(orig / (beta_fast * 2 * math.pi)) / (2 * math.log(theta)))
  high = math.ceil(d * math.log(orig / (beta_slow * 2 * math.pi)) / (2 * math.log(theta)))
  low, high = max(low, 0), min(high, d - 1)
  ramp = np.clip((i - low) / (high - low), 0.0, 1.0)
  mask = 1.0 - ramp
  return inv_freq / factor * (1.0 - mask) + inv_freq * mask


def ref_rope_complex(x, positions, freq):
  """DeepSeek's official form: adjacent pairs as complex numbers times exp(i pos freq).

  x [B, S, H, R], positions [B, S], freq [R/2] -> complex [B, S, H, R/2].
  """
  z = x[..., 0::2].astype(np.float64) + 1j * x[..., 1::2].astype(np.float64)
  angle = positions.astype(np.float64)[:, :, None, None] * freq[None, None, None, :]
  return z * np.exp(1j * angle)


def from_deinterleaved(y):
  """The module returns [real parts | imaginary parts] of the rotated pairs."""
  r2 = y.shape[-1] // 2
  return np.asarray(y[..., :r2], np.float64) + 1j * np.asarray(y[..., r2:], np.float64)


def tables_from(freq, positions):
  angle = positions.astype(np.float64)[..., None] * freq
  return jnp.asarray(np.cos(angle), jnp.float32), jnp.asarray(np.sin(angle), jnp.float32)


# ------------------------------------------------------------------ frequencies
def test_yarn_inv_freq_v3():
  want = ref_inv_freq(64, 10000.0, (40.0, 4096, 32.0, 1.0))
  got = rope.inv_frequencies(V3)
  assert got.shape == (32,) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)
  # The reference itself: low = 10, high = 23 for V3, so the blend is non-trivial.
  plain = ref_inv_freq(64, 10000.0)
  np.testing.assert_allclose(want[:11], plain[:11], rtol=1e-15)  # extrapolated (high frequencies)
  np.testing.assert_allclose(want[23:], plain[23:] / 40.0, rtol=1e-15)  # interpolated (low frequencies)
  assert np.all((want[11:23] < plain[11:23]) & (want[11:23] > plain[11:23] / 40.0))


@pytest.mark.parametrize("d, theta, scaling", [
    (16, 10000.0, (4.0, 256, 32.0, 1.0)),
    (4, 10000.0, (40.0, 4096, 32.0, 1.0)),  # tiny head: correction range clipped to [0, d-1]
    (64, 50000.0, (8.0, 8192, 16.0, 2.0)),
])
def test_yarn_inv_freq_other(d, theta, scaling):
  factor, orig, bf, bs = scaling
  cfg = V3.replace(qk_rope_head_dim=d, rope_theta=theta, rope_scaling=RopeScaling(
      factor=factor, original_max_position_embeddings=orig, beta_fast=bf, beta_slow=bs))
  np.testing.assert_allclose(rope.inv_frequencies(cfg), ref_inv_freq(d, theta, scaling), rtol=2e-6)


@pytest.mark.parametrize("d", [4, 16, 64])
def test_no_scaling_inv_freq(d):
  cfg = PLAIN.replace(qk_rope_head_dim=d)
  np.testing.assert_allclose(rope.inv_frequencies(cfg), ref_inv_freq(d, 10000.0), rtol=2e-6)


# ------------------------------------------------------------------ scales
def test_softmax_scale_v3():
  m = 0.1 * 1.0 * math.log(40.0) + 1.0
  assert rope.softmax_scale(V3) == pytest.approx(192 ** -0.5 * m * m, rel=1e-12)
  assert rope.softmax_scale(PLAIN) == pytest.approx(192 ** -0.5, rel=1e-12)
  # mscale_all_dim = 0 (RopeScaling's default): no change to the softmax scale.
  no_all_dim = V3.replace(rope_scaling=RopeScaling(factor=40.0, original_max_position_embeddings=4096))
  assert rope.softmax_scale(no_all_dim) == pytest.approx(192 ** -0.5, rel=1e-12)
  # V2-Lite: mscale_all_dim 0.707.
  lite = V3.replace(rope_scaling=RopeScaling(factor=40.0, original_max_position_embeddings=4096, mscale=0.707,
                                             mscale_all_dim=0.707))
  m = 0.1 * 0.707 * math.log(40.0) + 1.0
  assert rope.softmax_scale(lite) == pytest.approx(192 ** -0.5 * m * m, rel=1e-12)


@pytest.mark.parametrize("mscale", [1.0, 0.707])
def test_cos_sin_unscaled_when_mscale_equals_mscale_all_dim(mscale):
  cfg = V3.replace(rope_scaling=RopeScaling(factor=40.0, original_max_position_embeddings=4096, mscale=mscale,
                                            mscale_all_dim=mscale))
  assert rope.attention_factor(cfg) == pytest.approx(1.0, rel=1e-12)
  cos, sin = rope.rope_tables(jnp.arange(6)[None], cfg)
  np.testing.assert_allclose(np.asarray(cos) ** 2 + np.asarray(sin) ** 2, 1.0, rtol=1e-6)


def test_rope_tables_vs_reference():
  pos = np.array([[0, 1, 2, 7, 100, 511], [3, 3, 0, 50, 255, 4095]])
  for cfg, scaling in ((V3, (40.0, 4096, 32.0, 1.0)), (PLAIN, None)):
    cos, sin = rope.rope_tables(jnp.asarray(pos), cfg)
    angle = pos[..., None].astype(np.float64) * ref_inv_freq(64, 10000.0, scaling)
    assert cos.shape == (2, 6, 32) and cos.dtype == jnp.float32
    # float32 angles: the error grows with the angle (ulp(4095) ~ 5e-4).
    atol = 4e-7 * (1 + np.abs(angle))
    assert np.all(np.abs(np.asarray(cos, np.float64) - np.cos(angle)) <= atol)
    assert np.all(np.abs(np.asarray(sin, np.float64) - np.sin(angle)) <= atol)


# ------------------------------------------------------------------ apply_rope
@pytest.mark.parametrize("cfg, scaling", [(PLAIN, None), (V3, (40.0, 4096, 32.0, 1.0))], ids=["plain", "yarn"])
def test_apply_rope_vs_complex_rotation(cfg, scaling):
  rng = np.random.default_rng(0)
  b, s, h, r = 2, 5, 3, 64
  x = rng.standard_normal((b, s, h, r)).astype(np.float32)
  pos = rng.integers(0, 300, (b, s))
  freq = ref_inv_freq(r, 10000.0, scaling)
  want = ref_rope_complex(x, pos, freq)
  # apply_rope alone, given exact tables
  got = from_deinterleaved(rope.apply_rope(jnp.asarray(x), *tables_from(freq, pos)))
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
  # with the module's own tables (float32 angles up to 300 rad)
  got = from_deinterleaved(rope.apply_rope(jnp.asarray(x), *rope.rope_tables(jnp.asarray(pos), cfg)))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_apply_rope_single_key_head_broadcast():
  """MLA's k_pe has one head; the tables broadcast over heads."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((1, 4, 1, 8)).astype(np.float32)
  pos = np.arange(4)[None]
  freq = ref_inv_freq(8, 10000.0)
  got = from_deinterleaved(rope.apply_rope(jnp.asarray(x), *tables_from(freq, pos)))
  np.testing.assert_allclose(got, ref_rope_complex(x, pos, freq), atol=2e-6)


def test_apply_rope_preserves_dtype_and_position_zero():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 1, 2, 8)), jnp.bfloat16)
  cos, sin = rope.rope_tables(jnp.zeros((1, 1), jnp.int32), PLAIN.replace(qk_rope_head_dim=8))
  y = rope.apply_rope(x, cos, sin)
  assert y.dtype == jnp.bfloat16
  xf = np.asarray(x, np.float32)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.concatenate([xf[..., 0::2], xf[..., 1::2]], -1))


def test_rotation_preserves_norm():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 7, 4, 64)).astype(np.float32)
  pos = rng.integers(0, 4096, (2, 7))
  y = np.asarray(rope.apply_rope(jnp.asarray(x), *rope.rope_tables(jnp.asarray(pos), V3)))
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  # pair-wise too: each complex pair keeps its modulus
  np.testing.assert_allclose(np.abs(from_deinterleaved(y)), np.abs(x[..., 0::2] + 1j * x[..., 1::2]), rtol=1e-5)


@pytest.mark.parametrize("cfg", [PLAIN, V3], ids=["plain", "yarn"])
def test_scores_depend_only_on_relative_position(cfg):
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.standard_normal((1, 1, 1, 64)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 1, 64)), jnp.float32)

  def score(pq, pk):
    tq = rope.rope_tables(jnp.asarray([[pq]]), cfg)
    tk = rope.rope_tables(jnp.asarray([[pk]]), cfg)
    return float(jnp.sum(rope.apply_rope(q, *tq) * rope.apply_rope(k, *tk)))

  for pq, pk in [(5, 2), (17, 17), (3, 40), (100, 0)]:
    base = score(pq, pk)
    for offset in (1, 7, 250):
      assert score(pq + offset, pk + offset) == pytest.approx(base, rel=1e-4, abs=1e-4)
  # ... and does depend on it
  assert abs(score(5, 2) - score(5, 3)) > 1e-3
  # the float64 reference agrees: Re(conj(z_k) z_q) summed over pairs
  freq = rope.inv_frequencies(cfg).astype(np.float64)
  zq = ref_rope_complex(np.asarray(q), np.array([[9]]), freq)
  zk = ref_rope_complex(np.asarray(k), np.array([[4]]), freq)
  assert score(9, 4) == pytest.approx(float(np.sum((zq * np.conj(zk)).real)), rel=1e-5, abs=1e-5)
