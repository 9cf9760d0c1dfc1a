"""moe.router against float64 NumPy references of DeepSeek's routing and balance statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import router
from moe.config import ModelConfig

BASE = ModelConfig(hidden_size=16, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
V3_LIKE = BASE.replace(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5)
V2_LIKE = BASE.replace(topk_method="group_limited_greedy", scoring_func="softmax", norm_topk_prob=False,
                       routed_scaling_factor=16.0, num_experts_per_tok=3)
LITE_LIKE = BASE.replace(topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                         routed_scaling_factor=1.0, n_group=1, topk_group=1, num_experts_per_tok=6)
GREEDY_NORM = LITE_LIKE.replace(norm_topk_prob=True, routed_scaling_factor=2.0, num_experts_per_tok=2)


# ------------------------------------------------------------------ references (float64)
def ref_scores(logits, cfg):
  logits = np.asarray(logits, np.float64)
  if cfg.scoring_func == "sigmoid":
    return 1.0 / (1.0 + np.exp(-logits))
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def ref_route(scores, bias, cfg):
  """Per token: (sorted expert ids, their weights). Dropped groups are masked with -inf (official)."""
  scores = np.asarray(scores, np.float64)
  t, e = scores.shape
  k, g = cfg.num_experts_per_tok, cfg.n_group
  ids, weights = [], []
  for s in scores:
    choice = s + (0.0 if bias is None else np.asarray(bias, np.float64))
    if cfg.topk_method != "greedy" and g > 1:
      groups = choice.reshape(g, e // g)
      if cfg.topk_method == "noaux_tc":
        gscore = np.sort(groups, axis=-1)[:, -2:].sum(-1)  # sum of the top-2
      else:
        gscore = groups.max(-1)
      kept = np.argsort(-gscore, kind="stable")[: cfg.topk_group]
      allowed = np.zeros(g, bool)
      allowed[kept] = True
      choice = np.where(np.repeat(allowed, e // g), choice, -np.inf)
    top = np.argsort(-choice, kind="stable")[:k]
    w = s[top]  # unbiased scores
    if cfg.norm_topk_prob:
      w = w / (w.sum() + 1e-20)
    w = w * cfg.routed_scaling_factor
    order = np.argsort(top)
    ids.append(top[order])
    weights.append(w[order])
  return np.array(ids), np.array(weights)


def sort_by_expert(idx, w):
  idx, w = np.asarray(idx), np.asarray(w, np.float64)
  order = np.argsort(idx, axis=-1)
  return np.take_along_axis(idx, order, -1), np.take_along_axis(w, order, -1)


def random_scores(cfg, t, seed):
  logits = np.random.default_rng(seed).standard_normal((t, cfg.n_routed_experts)) * 2.0
  return ref_scores(logits, cfg).astype(np.float32)


# One compile per config instead of one per eager op (LLVM opt level 0: faster XLA:CPU compiles).
select = jax.jit(router.select, static_argnums=2)


def run_select(scores, bias, cfg):
  w, idx = select(jnp.asarray(scores), None if bias is None else jnp.asarray(bias, jnp.float32), cfg)
  assert w.dtype == jnp.float32 and idx.dtype == jnp.int32
  assert w.shape == idx.shape == (scores.shape[0], cfg.num_experts_per_tok)
  return sort_by_expert(idx, w)


# ------------------------------------------------------------------ select
@pytest.mark.parametrize("cfg, with_bias", [(V3_LIKE, True), (V3_LIKE, False), (V2_LIKE, False),
                                            (LITE_LIKE, False), (GREEDY_NORM, False)],
                         ids=["noaux_tc+bias", "noaux_tc", "group_limited_greedy", "greedy", "greedy_norm"])
def test_select_vs_reference(cfg, with_bias):
  scores = random_scores(cfg, 64, seed=0)
  bias = np.random.default_rng(1).standard_normal(cfg.n_routed_experts) * 0.3 if with_bias else None
  idx, w = run_select(scores, bias, cfg)
  want_idx, want_w = ref_route(scores, bias, cfg)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(w, want_w, rtol=2e-6, atol=1e-7)
  assert len(set(map(tuple, idx))) > 5  # routing actually varies across tokens


def test_select_group_limit_respected():
  cfg = V3_LIKE
  scores = random_scores(cfg, 64, seed=2)
  idx, _ = run_select(scores, None, cfg)
  groups = idx // (cfg.n_routed_experts // cfg.n_group)
  assert all(len(set(row)) <= cfg.topk_group for row in groups)
  # with 4 of 16 experts from 2 of 4 groups the result differs from plain top-k for some token
  plain = np.sort(np.argsort(-scores, axis=-1)[:, : cfg.num_experts_per_tok], axis=-1)
  assert np.any(plain != idx)


def test_group_limit_with_ties_keeps_what_top_k_keeps():
  """Group scores with many exact ties (small integers): the groups kept and the top-2 sums (computed
  without lax.top_k, which XLA's partitioner gathers to every device) equal lax.top_k's, ties to the
  lower index, and the whole selection equals the float64 reference's stable ordering."""
  r = np.random.default_rng(5)
  x = jnp.asarray(r.integers(0, 4, (500, 8, 6)).astype(np.float32))
  np.testing.assert_array_equal(router.top2_sum(x), jax.lax.top_k(x, 2)[0].sum(-1))
  scores = x.max(-1)
  for k in (1, 3, 4, 8):
    want = np.zeros(scores.shape, bool)
    np.put_along_axis(want, np.asarray(jax.lax.top_k(scores, k)[1]), True, axis=-1)
    np.testing.assert_array_equal(router.top_mask(scores, k), want)
  cfg = V3_LIKE.replace(n_routed_experts=32, n_group=8, topk_group=3)
  tied = r.integers(1, 4, (200, 32)) / 4.0  # sigmoid scores need not be distinct
  idx, w = run_select(tied, None, cfg)
  want_idx, want_w = ref_route(tied, None, cfg)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(w, want_w, rtol=2e-6)


def test_noaux_tc_group_score_is_sum_of_top2_not_max():
  """Group 0 holds the single best expert but group 1 has the better top-2 sum."""
  cfg = BASE.replace(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2, topk_method="noaux_tc")
  s = np.array([[0.95, 0.10, 0.10, 0.10, 0.90, 0.80, 0.05, 0.05]], np.float32)
  idx, _ = run_select(s, None, cfg)
  np.testing.assert_array_equal(idx, [[4, 5]])
  # group_limited_greedy (group score = max) keeps group 0 instead
  idx, _ = run_select(s, None, cfg.replace(topk_method="group_limited_greedy"))
  np.testing.assert_array_equal(idx, [[0, 1]])


def test_bias_changes_selection_not_weights():
  cfg = V3_LIKE
  scores = random_scores(cfg, 48, seed=3)
  bias = np.zeros(cfg.n_routed_experts)
  bias[[1, 2, 5, 6]] = 2.0  # two experts in each of groups 0 and 1: those groups and experts always win
  idx0, w0 = run_select(scores, None, cfg)
  idx, w = run_select(scores, bias, cfg)
  assert np.any(idx != idx0)
  # Biased experts win every token: groups 0 and 1 kept (top-2 sums >= 4 > 2), top-4 = the biased four.
  np.testing.assert_array_equal(idx, np.tile([1, 2, 5, 6], (48, 1)))
  # Weights are the unbiased scores at the chosen experts, normalised, times the scaling factor.
  s = scores.astype(np.float64)[:, [1, 2, 5, 6]]
  np.testing.assert_allclose(w, s / s.sum(-1, keepdims=True) * 2.5, rtol=2e-6)
  biased = s + 2.0
  assert not np.allclose(w, biased / biased.sum(-1, keepdims=True) * 2.5, rtol=1e-3)
  np.testing.assert_allclose(w.sum(-1), 2.5, rtol=1e-6)
  # Without normalisation the weights are the raw unbiased scores times the factor.
  _, w_raw = run_select(scores, bias, cfg.replace(norm_topk_prob=False))
  np.testing.assert_allclose(w_raw, s * 2.5, rtol=2e-6)
  # A constant bias changes nothing at all.
  idx_c, w_c = run_select(scores, np.full(cfg.n_routed_experts, 0.25), cfg)
  np.testing.assert_array_equal(idx_c, idx0)
  np.testing.assert_allclose(w_c, w0, rtol=1e-6)


def test_negative_biased_scores_stay_in_kept_groups():
  """Official masking (-inf), not transformers' 0.0 fill: matters when biased scores are negative."""
  cfg = V3_LIKE
  scores = random_scores(cfg, 32, seed=4)
  bias = np.random.default_rng(5).standard_normal(cfg.n_routed_experts) * 0.1 - 2.0  # all choices < 0
  idx, w = run_select(scores, bias, cfg)
  want_idx, want_w = ref_route(scores, bias, cfg)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(w, want_w, rtol=2e-6)
  groups = idx // (cfg.n_routed_experts // cfg.n_group)
  assert all(len(set(row)) <= cfg.topk_group for row in groups)


def test_router_module_scores_and_routing():
  from flax import nnx
  cfg = V3_LIKE.replace(initializer_range=0.5)
  from moe.runtime import Runtime

  gate = router.Router(cfg, Runtime.resolve(announce=False), rngs=nnx.Rngs(0))
  assert isinstance(gate.e_score_correction_bias, router.RouterBias)
  assert not isinstance(gate.e_score_correction_bias, nnx.Param)
  x = np.random.default_rng(6).standard_normal((2, 5, cfg.hidden_size)).astype(np.float32)
  w, idx, scores = gate(jnp.asarray(x))
  kernel = np.asarray(gate.kernel[...], np.float64)
  want_scores = ref_scores(x.reshape(10, -1).astype(np.float64) @ kernel, cfg)
  np.testing.assert_allclose(np.asarray(scores).reshape(10, -1), want_scores, rtol=1e-5, atol=1e-6)
  got_idx, got_w = sort_by_expert(np.asarray(idx).reshape(10, -1), np.asarray(w).reshape(10, -1))
  want_idx, want_w = ref_route(want_scores, None, cfg)
  np.testing.assert_array_equal(got_idx, want_idx)
  np.testing.assert_allclose(got_w, want_w, rtol=1e-5)


# ------------------------------------------------------------------ statistics
def ref_balance_loss(scores, idx, valid, n_experts, k):
  """V3 eq. 17-20 per sequence over its valid tokens, averaged over sequences with tokens."""
  losses = []
  for s_b, idx_b, v_b in zip(scores, idx, valid):
    s_b, idx_b = np.asarray(s_b, np.float64)[v_b], np.asarray(idx_b)[v_b]
    t = len(s_b)
    if t == 0:
      continue
    f = np.zeros(n_experts)
    for row in idx_b:
      for i in row:
        f[i] += 1
    f *= n_experts / (k * t)
    p = (s_b / s_b.sum(-1, keepdims=True)).sum(0) / t
    losses.append(float(np.sum(f * p)))
  return float(np.mean(losses))


def test_sequence_balance_loss_vs_hand_computation():
  cfg = V3_LIKE
  b, s, e, k = 4, 6, cfg.n_routed_experts, cfg.num_experts_per_tok
  scores = random_scores(cfg, b * s, seed=7)
  _, idx = select(jnp.asarray(scores), None, cfg)
  scores, idx = scores.reshape(b, s, e), np.asarray(idx).reshape(b, s, k)
  valid = np.ones((b, s), bool)
  valid[1, 4:] = False  # padded tail
  valid[2, :] = False  # an all-padding row: not a sequence, left out of the average
  valid[3, 0] = False
  got = float(router.sequence_balance_loss(jnp.asarray(scores), jnp.asarray(idx), jnp.asarray(valid), cfg))
  assert got == pytest.approx(ref_balance_loss(scores, idx, valid, e, k), rel=1e-5)
  # Padding tokens do not count: change their scores and experts, same loss.
  scores2, idx2 = scores.copy(), idx.copy()
  scores2[~valid] = np.random.default_rng(8).uniform(0.01, 1, (int((~valid).sum()), e))
  idx2[~valid] = np.arange(k)
  got2 = float(router.sequence_balance_loss(jnp.asarray(scores2), jnp.asarray(idx2), jnp.asarray(valid), cfg))
  assert got2 == pytest.approx(got, rel=1e-6)
  # ... while treating them as valid changes it.
  all_valid = float(router.sequence_balance_loss(jnp.asarray(scores2), jnp.asarray(idx2),
                                                 jnp.ones((b, s), bool), cfg))
  assert all_valid != pytest.approx(got, rel=1e-3)


def test_sequence_balance_loss_is_one_when_perfectly_balanced():
  """f_i = 1 and P_i = 1/E for every expert gives L = sum_i 1/E = 1."""
  cfg = BASE.replace(n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2)
  idx = np.array([[[0, 1], [2, 3]]])  # T = 2, every expert once: f_i = 4/(2*2) * 1 = 1
  scores = np.full((1, 2, 4), 0.3, np.float32)
  loss = router.sequence_balance_loss(jnp.asarray(scores), jnp.asarray(idx), jnp.ones((1, 2), bool), cfg)
  assert float(loss) == pytest.approx(1.0, rel=1e-6)
  # all tokens on experts 0, 1 with all the score mass there: f = [2, 2, 0, 0], P = [.5, .5, 0, 0] -> 2
  idx = np.array([[[0, 1], [0, 1]]])
  scores = np.array([[[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]]], np.float32)
  loss = router.sequence_balance_loss(jnp.asarray(scores), jnp.asarray(idx), jnp.ones((1, 2), bool), cfg)
  assert float(loss) == pytest.approx(2.0, rel=1e-6)


def test_expert_load_counts():
  rng = np.random.default_rng(9)
  t, e, k = 30, 8, 3
  idx = np.stack([rng.choice(e - 1, k, replace=False) for _ in range(t)])  # expert 7 never chosen
  valid = rng.random(t) > 0.3
  load = np.asarray(router.expert_load(jnp.asarray(idx, jnp.int32), jnp.asarray(valid, jnp.float32), e))
  want = np.bincount(idx[valid].ravel(), minlength=e)
  np.testing.assert_array_equal(load, want)
  assert load[7] == 0 and load.sum() == valid.sum() * k
