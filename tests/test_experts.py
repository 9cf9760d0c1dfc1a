"""moe.kernels.expert_ffn (every grouped-matmul implementation) == the dense reference == a float64 NumPy
loop; the MoE block."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe import experts
from moe.config import ModelConfig
from moe.kernels import cpu
from moe.kernels.expert_ffn import dense_ffn, megablox_ffn, ragged_ffn, triton_ffn
from moe.runtime import ImplConfig, Runtime
from parallel.expert_parallel import combine

T, E, K, D, F = 24, 8, 3, 16, 8
EMPTY = 5  # an expert that receives no tokens


def silu(x):
  return x / (1.0 + np.exp(-x))


def ref_experts(x, idx, w, gate, up, down):
  """y_t = sum_k w_tk down_e(silu(x_t gate_e) * (x_t up_e)), e = idx_tk; float64 loops."""
  x, w, gate, up, down = (np.asarray(a, np.float64) for a in (x, w, gate, up, down))
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    for k in range(idx.shape[1]):
      e = int(idx[t, k])
      h = silu(x[t] @ gate[e]) * (x[t] @ up[e])
      y[t] += w[t, k] * (h @ down[e])
  return y


def routed(ffn, x, idx, w, gate, up, down, **kw):
  """sum_k w[t, k] FFN_{idx[t, k]}(x[t]) through a row-wise grouped-matmul implementation `ffn`."""
  k = idx.shape[1]
  return combine(ffn(jnp.repeat(x, k, axis=0), jnp.asarray(idx).reshape(-1), gate, up, down, **kw), w)


sorted_experts = functools.partial(routed, ragged_ffn)
megablox_experts = functools.partial(routed, megablox_ffn, interpret=True)  # TPU's kernel, interpreted
triton_experts = functools.partial(routed, triton_ffn, interpret=True)  # GPU's kernel, interpreted
dense_experts = functools.partial(routed, dense_ffn)


def blocked_experts(*args, block=128):
  return routed(cpu.blocked_ffn, *args, block=block)


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  choices = [e for e in range(E) if e != EMPTY]
  idx = np.stack([rng.choice(choices, K, replace=False) for _ in range(T)]).astype(np.int32)
  w = rng.uniform(0.1, 1.0, (T, K)).astype(np.float32)
  x = rng.standard_normal((T, D)).astype(np.float32)
  gate = (rng.standard_normal((E, D, F)) * 0.3).astype(np.float32)
  up = (rng.standard_normal((E, D, F)) * 0.3).astype(np.float32)
  down = (rng.standard_normal((E, F, D)) * 0.3).astype(np.float32)
  assert EMPTY not in idx and len(np.unique(idx)) == E - 1
  return x, idx, w, gate, up, down


@pytest.mark.parametrize("sorted_experts", [sorted_experts, megablox_experts, triton_experts],
                         ids=["ragged_dot", "megablox", "triton"])
def test_sorted_equals_dense_equals_reference(inputs, sorted_experts):
  want = ref_experts(*inputs)
  args = [jnp.asarray(a) for a in inputs]
  y_sorted = np.asarray(sorted_experts(*args))
  y_dense = np.asarray(dense_experts(*args))
  assert y_sorted.shape == (T, D) and y_sorted.dtype == np.float32
  np.testing.assert_allclose(y_sorted, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y_dense, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y_sorted, y_dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sorted_experts", [sorted_experts, megablox_experts, triton_experts],
                         ids=["ragged_dot", "megablox", "triton"])
def test_sorted_experts_unbalanced_and_single_expert(sorted_experts):
  """Every token on the same two experts (the other six empty), and K = 1."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((T, D)).astype(np.float32)
  gate, up = (rng.standard_normal((E, D, F)).astype(np.float32) * 0.3 for _ in range(2))
  down = rng.standard_normal((E, F, D)).astype(np.float32) * 0.3
  for idx in (np.tile([[6, 2]], (T, 1)), rng.integers(0, E, (T, 1))):
    idx = idx.astype(np.int32)
    w = rng.uniform(0.1, 1.0, idx.shape).astype(np.float32)
    got = sorted_experts(*(jnp.asarray(a) for a in (x, idx, w, gate, up, down)))
    np.testing.assert_allclose(np.asarray(got), ref_experts(x, idx, w, gate, up, down), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("f", [F, 128], ids=["two_matmuls", "gate_up_as_one"])
@pytest.mark.parametrize("ffn", [ragged_ffn, functools.partial(megablox_ffn, interpret=True),
                                 functools.partial(triton_ffn, interpret=True)],
                         ids=["ragged_dot", "megablox", "triton"])
def test_rows_that_come_sorted_are_used_where_they_lie(inputs, ffn, f):
  """`group_sizes`: rows already sorted by expert (the ragged exchange's receive buffer: each expert's
  rows from the first row, an empty expert among them, empty rows after) give the reference's outputs
  and gradients on the real rows, with no sort in the program; the empty rows' outputs are never read
  (the kernels leave them undefined: NaN in the interpreter). At F = 128 gate and up run as one
  grouped matmul (_grouped_ffn), at F = 8 as two."""
  x, idx = jnp.asarray(inputs[0]), jnp.asarray(inputs[1])
  rng = np.random.default_rng(4)
  gate, up = (jnp.asarray(rng.standard_normal((E, D, f)) * 0.3, jnp.float32) for _ in range(2))
  down = jnp.asarray(rng.standard_normal((E, f, D)) * 0.3, jnp.float32)
  expert_N = idx.reshape(-1)
  order = np.argsort(np.asarray(expert_N), kind="stable")
  rows = jnp.concatenate([jnp.repeat(x, K, axis=0)[order], jnp.zeros((13, D))])  # 13 empty rows after
  ids = jnp.concatenate([expert_N[order], jnp.full((13,), E, jnp.int32)])
  sizes = jnp.bincount(expert_N, length=E).astype(jnp.int32)
  n = T * K
  cot = jnp.asarray(rng.standard_normal((n, D)), jnp.float32)

  def loss(fn):
    return lambda r, g, u, d: jnp.sum(fn(r, ids, g, u, d)[:n] * cot)

  given = functools.partial(ffn, group_sizes=sizes)
  jaxpr = str(jax.make_jaxpr(loss(given))(rows, gate, up, down))
  assert "name=_permute" not in jaxpr
  assert "name=_permute" in str(jax.make_jaxpr(loss(ffn))(rows, gate, up, down))  # (the check can fail)
  assert ("concatenate[dimension=2]" in jaxpr) == (f == 128)  # (gate and up as one [E, D, 2F])
  np.testing.assert_allclose(np.asarray(given(rows, ids, gate, up, down)[:n]),
                             np.asarray(dense_ffn(rows, ids, gate, up, down)[:n]), rtol=1e-5, atol=1e-5)
  got = jax.grad(loss(given), argnums=(0, 1, 2, 3))(rows, gate, up, down)
  want = jax.grad(loss(dense_ffn), argnums=(0, 1, 2, 3))(rows, gate, up, down)
  for name, a, b in zip(("rows", "gate", "up", "down"), got, want):
    a, b = np.asarray(a), np.asarray(b)
    if name == "rows":
      a, b = a[:n], b[:n]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
    assert np.abs(b).max() > 1e-3, name
  assert np.all(np.asarray(got[1])[EMPTY] == 0)  # the expert without rows: no gradient


@pytest.mark.parametrize("block", [4, 5, 128])
def test_blocked_experts_equals_reference(inputs, block):
  """The CPU path (block-padded batched matmul): same result for any block size."""
  want = ref_experts(*inputs)
  got = blocked_experts(*(jnp.asarray(a) for a in inputs), block=block)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # all tokens on one expert (one group of T*K rows, the rest empty)
  x, _, w, gate, up, down = inputs
  idx = np.zeros((T, 1), np.int32)
  got = blocked_experts(*(jnp.asarray(a) for a in (x, idx, w[:, :1], gate, up, down)), block=block)
  np.testing.assert_allclose(np.asarray(got), ref_experts(x, idx, w[:, :1], gate, up, down), rtol=1e-5, atol=1e-5)


def test_blocked_experts_layouts_and_gradients(inputs):
  """Each layout of the CPU path (capacity tiers [E, C, D] or the worst-case blocks, picked at run
  time by the largest expert group) gives the reference output and the dense path's gradients."""
  x, _, w, gate, up, down = (jnp.asarray(a) for a in inputs)
  balanced = (np.arange(T * K).reshape(T, K) % E).astype(np.int32)  # 9 rows per expert
  skewed = balanced.copy()
  skewed[:5, 0] = 0  # expert 0: 13 rows (> 1.25 x 9 = 12 rows of block 4, <= 16)
  one = np.zeros((T, 1), np.int32)  # every row on expert 0: only the worst-case layout holds it
  cot = jnp.asarray(np.random.default_rng(4).standard_normal((T, D)), jnp.float32)
  for idx, want_branch, n_layouts in ((balanced, 0, 4), (skewed, 1, 4), (one, 2, 3)):
    branch, fns = cpu.blocked_branches(4, None, cpu.CAPACITY_TIERS, jnp.asarray(idx).reshape(-1), E)
    assert (int(branch), len(fns)) == (want_branch, n_layouts)
    ww = w[:, :idx.shape[1]]
    got = blocked_experts(x, jnp.asarray(idx), ww, gate, up, down, block=4)
    np.testing.assert_allclose(np.asarray(got), ref_experts(x, idx, ww, gate, up, down), rtol=1e-5, atol=1e-5)
    loss = lambda fn: jax.grad(lambda *a: jnp.sum(fn(a[0], jnp.asarray(idx), *a[1:]) * cot), argnums=range(5))
    g_blocked = loss(functools.partial(blocked_experts, block=4))(x, ww, gate, up, down)
    g_dense = loss(dense_experts)(x, ww, gate, up, down)
    for name, a, b in zip(("x", "w", "gate", "up", "down"), g_blocked, g_dense):  # |g| up to ~5
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=name)


def test_blocked_experts_empty_assignments(inputs):
  """idx == E is no assignment (expert-parallel buffers' empty rows): output 0, and the layout is
  chosen by the real rows alone (here the first capacity tier, though the empty ones outnumber any
  expert's); output and gradients equal the dense path's, where idx == E selects nothing."""
  x, _, w, gate, up, down = (jnp.asarray(a) for a in inputs)
  spread = (np.arange(T * K).reshape(T, K) % E).astype(np.int32)
  spread[np.arange(T * K).reshape(T, K) % 2 == 0] = E  # 36 empty, 4-5 real rows per expert
  heavy = np.full((T, K), E, np.int32)
  heavy[:, 0] = 0  # 24 real rows on expert 0 (> 2 x the mean of 9): the worst-case block layout
  cot = jnp.asarray(np.random.default_rng(5).standard_normal((T, D)), jnp.float32)
  for idx, last in ((spread, False), (heavy, True)):
    branch, fns = cpu.blocked_branches(4, None, cpu.CAPACITY_TIERS, jnp.asarray(idx).reshape(-1), E)
    assert int(branch) == (len(fns) - 1 if last else 0)
    real = np.where(idx < E, idx, 0), np.where(idx < E, np.asarray(w), 0.0)
    got = blocked_experts(x, jnp.asarray(idx), w, gate, up, down, block=4)
    np.testing.assert_allclose(np.asarray(got), ref_experts(x, *real, gate, up, down), rtol=1e-5, atol=1e-5)
    loss = lambda fn: jax.grad(lambda *a: jnp.sum(fn(a[0], jnp.asarray(idx), *a[1:]) * cot), argnums=range(5))
    g_blocked = loss(functools.partial(blocked_experts, block=4))(x, w, gate, up, down)
    g_dense = loss(dense_experts)(x, w, gate, up, down)
    assert np.all(np.asarray(g_blocked[1])[idx == E] == 0)
    for name, a, b in zip(("x", "w", "gate", "up", "down"), g_blocked, g_dense):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("sorted_experts", [sorted_experts, megablox_experts, triton_experts],
                         ids=["ragged_dot", "megablox", "triton"])
def test_gradients_sorted_match_dense(inputs, sorted_experts):
  x, idx, w, gate, up, down = (jnp.asarray(a) for a in inputs)
  cot = jnp.asarray(np.random.default_rng(2).standard_normal((T, D)), jnp.float32)

  def loss(fn):
    def f(x, w, gate, up, down):
      return jnp.sum(fn(x, idx, w, gate, up, down) * cot)
    grad = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4)))
    return grad(x, w, gate, up, down)

  g_sorted, g_dense = loss(sorted_experts), loss(dense_experts)
  for name, a, b in zip(("x", "w", "gate", "up", "down"), g_sorted, g_dense):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, name
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.abs(b).max() > 1e-3, name
  # The expert without tokens gets exactly zero gradient.
  for g in g_sorted[2:]:
    assert np.all(np.asarray(g)[EMPTY] == 0)

  # The x-gradient against the float64 NumPy loop: a central-difference directional derivative.
  v = np.random.default_rng(3).standard_normal((T, D))
  eps = 1e-6
  xs = np.asarray(inputs[0], np.float64)
  rest = inputs[1:]
  fd = (np.sum(ref_experts(xs + eps * v, *rest) * np.asarray(cot))
        - np.sum(ref_experts(xs - eps * v, *rest) * np.asarray(cot))) / (2 * eps)
  assert float(np.sum(np.asarray(g_sorted[0], np.float64) * v)) == pytest.approx(fd, rel=1e-4)


# ------------------------------------------------------------------ the MoE block
CFG = ModelConfig(hidden_size=D, moe_intermediate_size=F, n_routed_experts=E, num_experts_per_tok=2, n_group=2,
                  topk_group=1, n_shared_experts=1, topk_method="noaux_tc", scoring_func="sigmoid",
                  routed_scaling_factor=2.5)


def random_moe(cfg, seed, impl="auto"):
  """The MoE block's structure (eval_shape: no init compiles) with random NumPy weights."""
  rt = Runtime.resolve(ImplConfig(experts=impl), announce=False)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: experts.MoE(cfg, rt, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda leaf: jnp.asarray(0.3 * rng.standard_normal(leaf.shape), leaf.dtype), state)
  return graphdef, state


@pytest.mark.parametrize("n_shared, impl", [(1, "auto"), (0, "auto"), (1, "ragged_dot"), (1, "megablox"), (1, "triton"),
                                            (1, "dense")])
def test_moe_module_is_shared_plus_routed(n_shared, impl):
  """The block with each grouped-matmul implementation `impl.experts` chooses (auto: blocked on CPU)."""
  cfg = CFG.replace(n_shared_experts=n_shared)
  graphdef, state = random_moe(cfg, seed=n_shared, impl=impl)
  assert nnx.merge(graphdef, state).experts.impl == {"auto": "blocked"}.get(impl, impl)

  @jax.jit
  def run(state, x, valid):
    moe = nnx.merge(graphdef, state)
    y, stats = moe(x, valid)
    w, idx, _ = moe.gate(x)
    return y, stats, w, idx

  moe = nnx.merge(graphdef, state)
  assert hasattr(moe, "shared_experts") == bool(n_shared)
  b, s = 2, 6
  x = np.random.default_rng(4).standard_normal((b, s, D)).astype(np.float32)
  valid = np.ones((b, s), bool)
  valid[1, 4:] = False
  y, stats, w, idx = run(state, jnp.asarray(x), jnp.asarray(valid))
  assert y.shape == (b, s, D)

  idx = np.asarray(idx).reshape(b * s, -1)
  w = np.asarray(w).reshape(b * s, -1)
  xt = x.reshape(b * s, D).astype(np.float64)
  routed = ref_experts(xt, idx, w, moe.experts.gate_proj[...], moe.experts.up_proj[...], moe.experts.down_proj[...])
  want = routed
  if n_shared:
    mlp = moe.shared_experts
    g, u, dn = (np.asarray(p.kernel[...], np.float64) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    want = want + (silu(xt @ g) * (xt @ u)) @ dn
  np.testing.assert_allclose(np.asarray(y).reshape(b * s, D), want, rtol=1e-5, atol=1e-5)
  assert np.abs(routed).max() > 1e-2

  load = np.asarray(stats.load)
  np.testing.assert_array_equal(load, np.bincount(idx[valid.ravel()].ravel(), minlength=E))
  assert load.sum() == valid.sum() * cfg.num_experts_per_tok
  assert np.isfinite(float(stats.balance_loss))
