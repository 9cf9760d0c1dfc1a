"""moe.kernels.latent_attention (MLA attention over key blocks of the latent, written-out backward)
against the dense formula in float64: outputs and the gradients of q, c_kv, k_pe and W_kv_b, with
packed documents, padding and a permuted (balanced context-parallel) layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.kernels import latent_attention

B, S, H, C, NOPE, ROPE, V = 2, 24, 3, 10, 6, 4, 5


def dense(q, c_kv, k_pe, w, q_index, k_index, q_seg, k_seg, scale):
  """softmax(q k^T scale + mask) v with k, v up-projected from the whole latent at once."""
  kv = jnp.einsum("bsc,chd->bshd", c_kv, w)
  k = jnp.concatenate([kv[..., :NOPE], jnp.broadcast_to(k_pe[:, :, None], (*kv.shape[:3], ROPE))], -1)
  visible = (k_index[None, :] <= q_index[:, None])[None] & (q_seg[:, :, None] == k_seg[:, None, :])
  s = jnp.where(visible[:, None], jnp.einsum("bthd,bshd->bhts", q, k) * scale, -jnp.inf)
  return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), kv[..., NOPE:])


def case(seed, layout):
  rng = np.random.default_rng(seed)
  seg = np.zeros((B, S), np.int32)
  seg[0] = np.repeat([1, 2, 3], [7, 9, 8])  # three documents
  seg[1, :17] = np.repeat([1, 2], [5, 12])  # two documents, then padding (0)
  order = np.arange(S)
  if layout == "balanced":  # context 3: slice i holds chunks i and 5 - i of 6
    chunks = np.arange(S).reshape(6, 4)
    order = np.concatenate([np.concatenate([chunks[i], chunks[5 - i]]) for i in range(3)])
  seg = seg[:, order]
  arrays = [rng.standard_normal(shape) for shape in ((B, S, H, NOPE + ROPE), (B, S, C), (B, S, ROPE), (C, H, NOPE + V))]
  return arrays, order, seg


@pytest.mark.parametrize("layout, groups", [("in_order", 1), ("balanced", 1), ("balanced", 3)])
@pytest.mark.parametrize("block", [4, 8, 24])
def test_matches_the_dense_formula_in_float64(layout, groups, block):
  """`groups`: the backward keeps the sums over each group of queries (a context slice's) apart until
  the end; the gradients are the same."""
  with jax.enable_x64(True):
    (q, c_kv, k_pe, w), order, seg = case(0, layout)
    idx, seg = jnp.asarray(order), jnp.asarray(seg)
    scale = 0.3
    args = tuple(map(jnp.asarray, (q, c_kv, k_pe, w)))
    got = latent_attention.attention(*args, idx, idx, seg, seg, scale, block=block)
    want = dense(*args, idx, idx, seg, seg, scale)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)

    cot = jnp.asarray(np.random.default_rng(1).standard_normal(want.shape))
    loss = lambda f: lambda *a: (f(*a, idx, idx, seg, seg, scale) * cot).sum()
    blocked = lambda *a: latent_attention.attention(*a, block=block, groups=groups)
    g_got = jax.grad(loss(blocked), argnums=(0, 1, 2, 3))(*args)
    g_want = jax.grad(loss(dense), argnums=(0, 1, 2, 3))(*args)
    for name, a, b in zip(("q", "c_kv", "k_pe", "w_kv_b"), g_got, g_want):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10, err_msg=name)


def test_queries_of_one_slice_against_the_whole_sequence():
  """A context slice's queries (its rows, their own places) against every key: the rows of the
  whole-sequence result."""
  with jax.enable_x64(True):
    (q, c_kv, k_pe, w), order, seg = case(2, "balanced")
    idx, seg = jnp.asarray(order), jnp.asarray(seg)
    args = tuple(map(jnp.asarray, (q, c_kv, k_pe, w)))
    whole = latent_attention.attention(*args, idx, idx, seg, seg, 0.5, block=6)
    rows = slice(8, 16)  # slice 1 of 3
    part = latent_attention.attention(args[0][:, rows], *args[1:], idx[rows], idx, seg[:, rows], seg, 0.5, block=6)
    np.testing.assert_allclose(part, whole[:, rows], rtol=1e-12, atol=1e-12)


def test_max_logit_is_the_largest_visible_logit():
  with jax.enable_x64(True):
    (q, c_kv, k_pe, w), order, seg = case(3, "balanced")
    idx, seg = jnp.asarray(order), jnp.asarray(seg)
    args = tuple(map(jnp.asarray, (q, c_kv, k_pe, w)))
    kv = jnp.einsum("bsc,chd->bshd", args[1], args[3])
    k = jnp.concatenate([kv[..., :NOPE], jnp.broadcast_to(args[2][:, :, None], (*kv.shape[:3], ROPE))], -1)
    visible = (idx[None, :] <= idx[:, None])[None] & (seg[:, :, None] == seg[:, None, :])
    logits = jnp.where(visible[:, None], jnp.einsum("bthd,bshd->bhts", args[0], k) * 0.7, -jnp.inf)
    got = latent_attention.max_logit(*args, idx, idx, seg, seg, 0.7, block=8)
    np.testing.assert_allclose(got, logits.max(axis=(0, 2, 3)), rtol=1e-6)
