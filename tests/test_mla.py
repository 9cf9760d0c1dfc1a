"""moe.mla: the causal/segment mask, attention with narrow values, packed documents end to end."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe import mla, rope
from moe.config import ModelConfig, RopeScaling
from moe.kernels import cpu
from moe.kernels.attention import ATTENTION, PALLAS
from moe.runtime import ImplConfig, Runtime
from tests.random_weights import random_state


def ref_mask(seg):
  """m[b, q, k] = k <= q and seg[b, q] == seg[b, k]."""
  seg = np.asarray(seg)
  s = seg.shape[1]
  causal = np.arange(s)[None, :] <= np.arange(s)[:, None]
  return causal[None] & (seg[:, :, None] == seg[:, None, :])


def test_attention_mask_causal_and_block_diagonal():
  seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
  m = np.asarray(mla.attention_mask(jnp.asarray(seg)))
  assert m.shape == (2, 1, 8, 8) and m.dtype == bool
  np.testing.assert_array_equal(m[:, 0], ref_mask(seg))
  np.testing.assert_array_equal(m[1, 0], np.tril(np.ones((8, 8), bool)))
  # document 2 (positions 3, 4) sees only itself, causally
  np.testing.assert_array_equal(m[0, 0, 3:5], [[0, 0, 0, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0]])
  assert m[0, 0].diagonal().all()  # every query sees at least itself (no empty softmax rows)


def ref_attend(q, k, v, mask, scale):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  logits = np.where(np.asarray(mask), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("fn", sorted(ATTENTION) + sorted(PALLAS))
@pytest.mark.parametrize("dv", [8, 12])
def test_attention_narrow_values_vs_reference(dv, fn):
  """Every attention core `impl.attention` can choose: fused dot_product_attention, the CPU query
  blocks, and the Pallas flash-attention kernels for TPU (splash) and GPU (flash), which on this CPU
  run in the Pallas interpreter and take the segment ids instead of the dense mask."""
  rng = np.random.default_rng(0)
  b, s, h, dk = 2, 7, 3, 12
  q, k = (rng.standard_normal((b, s, h, dk)).astype(np.float32) for _ in range(2))
  v = rng.standard_normal((b, s, h, dv)).astype(np.float32)
  seg = np.array([[1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0]])
  mask = mla.attention_mask(jnp.asarray(seg))
  scale = 0.37
  args = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  if fn in PALLAS:
    out = PALLAS[fn](*args, jnp.asarray(seg), scale, interpret=True)
  else:
    out = ATTENTION[fn](*args, mask, scale)
  out = np.asarray(out)
  assert out.shape == (b, s, h, dv)
  np.testing.assert_allclose(out, ref_attend(q, k, v, ref_mask(seg)[:, None], scale), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dk, dv", [(48, 32), (12, 24), (80, 16)])
def test_mla_flash_kernel_and_its_gradients_vs_reference(dk, dv):
  """moe/kernels/mla_flash.py in the Pallas interpreter: q/k's head size as its power-of-two parts
  (48 = 32 + 16; 12 padded to 16; 80 = 64 + 16), v's likewise, 3 blocks of 16 positions (the causal
  loops' bounds: the forward and dq over the key blocks at or before a query block, dk/dv over the
  query blocks at or after a key block), packed documents and padding: the output and the gradients of
  q, k and v against autodiff of the float32 reference on the dense mask."""
  from moe.kernels import mla_flash
  rng = np.random.default_rng(4)
  b, s, h, scale = 2, 48, 2, 0.3
  q, k = (jnp.asarray(rng.standard_normal((b, s, h, dk)), jnp.float32) for _ in range(2))
  v, do = (jnp.asarray(rng.standard_normal((b, s, h, dv)), jnp.float32) for _ in range(2))
  seg = np.ones((b, s), np.int32)
  seg[0, 20:], seg[0, 35:], seg[1, 40:] = 2, 3, 0  # documents across block edges, padding
  mask = jnp.asarray(ref_mask(seg)[:, None])

  def reference(q, k, v):
    logits = jnp.where(mask, jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") * scale, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v, precision="highest")

  kernel = lambda q, k, v: mla_flash.attention(q, k, v, jnp.asarray(seg), scale, 16, True)
  got, pull = jax.vjp(kernel, q, k, v)
  want, pull_ref = jax.vjp(reference, q, k, v)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  for name, g, w in zip("qkv", pull(do), pull_ref(do)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4, err_msg=name)
  assert mla_flash.parts(192) == (128, 64) and mla_flash.parts(128) == (128,) and mla_flash.parts(12) == (16,)


def test_device_checks_mla_flash_against_float64():
  """train.device_check's attention check (V3's head sizes in bf16, its float64 NumPy backward written
  out) in the Pallas interpreter: within its bound, and the bound not loose (measured 3.4e-3 here)."""
  from train import device_check
  err = device_check.attention_error(interpret=True)
  assert err < device_check.BOUNDS["attention"] / 4, err


@pytest.mark.parametrize("block", [3, 7, 128])
def test_causal_block_attention_vs_reference(block):
  """The CPU attention (query blocks reading only earlier keys) at several block sizes."""
  rng = np.random.default_rng(3)
  b, s, h, dk, dv = 2, 7, 2, 12, 8
  q, k = (rng.standard_normal((b, s, h, dk)).astype(np.float32) for _ in range(2))
  v = rng.standard_normal((b, s, h, dv)).astype(np.float32)
  seg = np.array([[1, 1, 2, 2, 2, 3, 0], [1, 1, 1, 1, 1, 1, 1]])
  out = cpu.causal_block_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                   mla.attention_mask(jnp.asarray(seg)), 0.3, block=block)
  np.testing.assert_allclose(np.asarray(out), ref_attend(q, k, v, ref_mask(seg)[:, None], 0.3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [3, 64])
def test_causal_block_attention_gradients(block):
  """Its hand-written backward (custom_vjp) against autodiff of the plain softmax attention in float64
  (x64 enabled locally), on packed documents with a padded tail."""
  rng = np.random.default_rng(5)
  b, s, h, dk, dv = 2, 7, 2, 12, 8
  q, k = (rng.standard_normal((b, s, h, dk)) for _ in range(2))
  v, cot = rng.standard_normal((b, s, h, dv)), rng.standard_normal((b, s, h, dv))
  seg = jnp.asarray(np.array([[1, 1, 2, 2, 2, 3, 0], [1, 1, 1, 1, 1, 1, 1]]))
  mask = mla.attention_mask(seg)

  def plain(q, k, v):
    logits = jnp.where(mask, jnp.einsum("bthd,bshd->bhts", q, k) * 0.3, -jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v)

  with jax.enable_x64():
    want = jax.grad(lambda *a: jnp.sum(plain(*a) * cot), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(lambda *a: jnp.sum(cpu.causal_block_attention(*a, mask, 0.3, block=block) * cot.astype(np.float32)),
                 argnums=(0, 1, 2))(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
  for name, g, w in zip("qkv", got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5, err_msg=name)
    assert np.abs(np.asarray(w)).max() > 1e-2, name


# ------------------------------------------------------------------ the MLA module
def ref_yarn_inv_freq(d, theta, factor, orig, beta_fast, beta_slow):
  i = np.arange(d // 2, dtype=np.float64)
  inv_freq = theta ** (-2.0 * i / d)
  low = max(math.floor(d * math.log(orig / (beta_fast * 2 * math.pi)) / (2 * math.log(theta))), 0)
  high = min(math.ceil(d * math.log(orig / (beta_slow * 2 * math.pi)) / (2 * math.log(theta))), d - 1)
  ramp = np.clip((i - low) / max(high - low, 1e-3), 0.0, 1.0)
  return inv_freq / factor * ramp + inv_freq * (1.0 - ramp)


def ref_mla(x, w, cfg, positions, segment_ids):
  """MLA from the V2 report / REFERENCE.md in float64, RoPE on adjacent pairs as complex numbers."""
  x = np.asarray(x, np.float64)
  w = {k: np.asarray(v, np.float64) for k, v in w.items()}
  b, s, _ = x.shape
  h, nope, r, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim

  def rms(a, g):
    return a / np.sqrt(np.mean(a * a, -1, keepdims=True) + cfg.rms_norm_eps) * g

  q = (rms(x @ w["q_a"], w["q_a_norm"]) @ w["q_b"]).reshape(b, s, h, nope + r)
  ckv = x @ w["kv_a"]
  c_kv, k_pe = ckv[..., : cfg.kv_lora_rank], ckv[..., cfg.kv_lora_rank:]
  kv = (rms(c_kv, w["kv_a_norm"]) @ w["kv_b"]).reshape(b, s, h, nope + dv)
  k_nope, v = kv[..., :nope], kv[..., nope:]

  rs = cfg.rope_scaling
  freq = ref_yarn_inv_freq(r, cfg.rope_theta, rs.factor, rs.original_max_position_embeddings, rs.beta_fast,
                           rs.beta_slow)

  def m(scale, ms):
    return 0.1 * ms * math.log(scale) + 1.0

  rot = np.exp(1j * positions[..., None].astype(np.float64) * freq) * (m(rs.factor, rs.mscale)
                                                                        / m(rs.factor, rs.mscale_all_dim))
  zq = (q[..., nope::2] + 1j * q[..., nope + 1::2]) * rot[:, :, None, :]  # [b, s, h, r/2]
  zk = (k_pe[..., 0::2] + 1j * k_pe[..., 1::2]) * rot  # [b, s, r/2], one head shared by all
  scores = np.einsum("bqhd,bkhd->bhqk", q[..., :nope], k_nope)
  scores += np.einsum("bqhd,bkd->bhqk", zq, np.conj(zk)).real
  scores *= (nope + r) ** -0.5 * m(rs.factor, rs.mscale_all_dim) ** 2
  scores = np.where(ref_mask(segment_ids)[:, None], scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, s, h * dv)
  return out @ w["o"]


def test_mla_module_vs_reference():
  cfg = ModelConfig(hidden_size=24, num_attention_heads=3, q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6,
                    qk_rope_head_dim=8, v_head_dim=5, rope_theta=10000.0,
                    rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=16, beta_fast=32.0,
                                             beta_slow=1.0, mscale=1.0, mscale_all_dim=0.5))
  # eval_shape + NumPy weights (norm weights near one): no per-shape init compiles
  graphdef, state = nnx.split(nnx.eval_shape(lambda: mla.MLA(cfg, Runtime.resolve(announce=False), rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(2)
  state = jax.tree.map(lambda leaf: jnp.asarray(
      (1.0 if leaf.ndim == 1 else 0.0) + 0.3 * rng.standard_normal(leaf.shape), leaf.dtype), state)
  attn = nnx.merge(graphdef, state)
  w = dict(q_a=attn.q_a_proj.kernel[...], q_a_norm=attn.q_a_layernorm.scale[...], q_b=attn.q_b_proj.kernel[...],
           kv_a=attn.kv_a_proj_with_mqa.kernel[...], kv_a_norm=attn.kv_a_layernorm.scale[...],
           kv_b=attn.kv_b_proj.kernel[...], o=attn.o_proj.kernel[...])
  x = rng.standard_normal((2, 7, cfg.hidden_size)).astype(np.float32)
  seg = np.array([[1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 1, 1]])
  pos = np.array([[0, 1, 2, 3, 0, 1, 2], [3, 4, 5, 6, 7, 8, 9]])
  @jax.jit
  def run(state, x, pos, seg):
    return nnx.merge(graphdef, state)(x, rope.rope_tables(pos, cfg), mla.document_mask(seg))[0]

  got = run(state, jnp.asarray(x), jnp.asarray(pos), jnp.asarray(seg))
  want = ref_mla(x, w, cfg, pos, seg)
  assert got.shape == (2, 7, cfg.hidden_size)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ packed documents, whole model
CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                  num_hidden_layers=3, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                  qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                  n_group=2, topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=1,
                  max_position_embeddings=64, initializer_range=0.1)


@pytest.mark.parametrize("attention", ["blocked", "fused", "splash", "flash"])
def test_packed_documents_equal_separate_runs(attention):
  graphdef, state = random_state(CFG, rt=Runtime.resolve(ImplConfig(attention=attention), announce=False))

  # LLVM opt level 0: faster XLA:CPU compiles, same HLO.
  @jax.jit
  def run(state, tokens, seg, pos):
    out = nnx.merge(graphdef, state).forward(tokens, seg, pos)
    return out.logits, out.mtp_logits[0]

  rng = np.random.default_rng(1)
  n = 5  # both documents of length 5: one compile for the separate runs, one for the packed row
  doc1, doc2 = rng.integers(0, CFG.vocab_size, (1, n)), rng.integers(0, CFG.vocab_size, (1, n))
  packed = np.concatenate([doc1, doc2], axis=1)
  seg = np.array([[1] * n + [2] * n])
  pos = np.array([list(range(n)) * 2])
  ones, arange = jnp.ones((1, n), jnp.int32), jnp.arange(n)[None]
  got, got_mtp = (np.asarray(a) for a in run(state, jnp.asarray(packed), jnp.asarray(seg), jnp.asarray(pos)))
  one, one_mtp = (np.asarray(a) for a in run(state, jnp.asarray(doc1), ones, arange))
  two, two_mtp = (np.asarray(a) for a in run(state, jnp.asarray(doc2), ones, arange))
  assert got.shape == (1, 2 * n, CFG.vocab_size)
  np.testing.assert_allclose(got[:, :n], one, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[:, n:], two, rtol=1e-5, atol=1e-5)
  # MTP logits too, except at each document's last token (its MTP target lies in the next document).
  np.testing.assert_allclose(got_mtp[:, : n - 1], one_mtp[:, : n - 1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_mtp[:, n:-1], two_mtp[:, :-1], rtol=1e-5, atol=1e-5)
  # Without the segment ids (one long document) document 2 would see document 1.
  whole, _ = run(state, jnp.asarray(packed), jnp.ones((1, 2 * n), jnp.int32), jnp.asarray(pos))
  whole = np.asarray(whole)
  assert np.abs(whole[:, n:] - two).max() > 1e-3
  np.testing.assert_allclose(whole[:, :n], one, rtol=1e-5, atol=1e-5)
