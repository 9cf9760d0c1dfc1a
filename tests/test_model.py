"""moe.model: shapes, statistics, remat, parameter count, initialisation, causality and MTP."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe import params, router
from moe.config import ModelConfig
from moe.model import Transformer
from moe.runtime import ImplConfig, Runtime
from tests.random_weights import random_state

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                  num_hidden_layers=3, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                  qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                  n_group=2, topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=1,
                  max_position_embeddings=64, initializer_range=0.02)
B, S = 2, 8


def abstract_model(cfg, rt=None):
  return nnx.eval_shape(lambda: Transformer(cfg, rt, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def model_fn():
  """(state, jitted forward(state, tokens, segment_ids) -> ModelOutput)."""
  graphdef, state = random_state(CFG)

  def forward(state, tokens, seg):
    return nnx.merge(graphdef, state).forward(tokens, seg)

  return state, jax.jit(forward)


def tokens_of(seed, shape=(B, S)):
  return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, shape), jnp.int32)


# ------------------------------------------------------------------ forward
def test_forward_shapes_and_load(model_fn):
  state, forward = model_fn
  seg = jnp.asarray([[1] * S, [1] * 5 + [0] * 3], jnp.int32)  # row 2: three padding tokens
  out = forward(state, tokens_of(0), seg)
  v, e, k = CFG.vocab_size, CFG.n_routed_experts, CFG.num_experts_per_tok
  assert out.logits.shape == (B, S, v) and out.logits.dtype == jnp.float32
  assert len(out.mtp_logits) == 1 and out.mtp_logits[0].shape == (B, S, v)
  n_moe = CFG.num_moe_layers + CFG.num_nextn_predict_layers
  assert out.moe_stats.load.shape == (n_moe, e)
  assert out.moe_stats.balance_loss.shape == (n_moe,)
  np.testing.assert_array_equal(np.asarray(out.moe_stats.load).sum(-1), np.full(n_moe, (S + 5) * k))
  assert np.all(np.isfinite(np.asarray(out.logits))) and np.all(np.isfinite(np.asarray(out.mtp_logits[0])))
  assert np.all(np.asarray(out.moe_stats.balance_loss) > 0)


def test_a_forward_leaves_the_state_as_it_found_it():
  """A forward adds no variables (QK-clip's max_logit is kept only when the trainer asks: a model
  split before a forward must merge with the state split after it)."""
  graphdef, state = random_state(CFG)
  model = nnx.merge(graphdef, state)
  n = len(jax.tree.leaves(nnx.state(model)))
  model.forward(tokens_of(0))
  assert len(jax.tree.leaves(nnx.state(model))) == n
  model.set_attributes(keep_max_logit=True)
  model.forward(tokens_of(0))
  kept = nnx.pop(model, nnx.Intermediate)
  assert len(jax.tree.leaves(kept)) == 3  # the dense layer's MLA, the MoE layers' (stacked), the MTP block's


def test_causality(model_fn):
  state, forward = model_fn
  seg = jnp.ones((B, S), jnp.int32)
  tokens = tokens_of(1)
  base = forward(state, tokens, seg)
  for t in (0, 3, S - 1):
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % CFG.vocab_size)
    out = forward(state, changed, seg)
    np.testing.assert_allclose(np.asarray(out.logits[:, :t]), np.asarray(base.logits[:, :t]), rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(out.logits[:, t]) - np.asarray(base.logits[:, t])).max() > 1e-4


def test_mtp_sees_exactly_one_token_ahead(model_fn):
  """Depth 1 at position i uses tokens <= i + 1: h_i (tokens <= i) and Emb(t_{i+1})."""
  state, forward = model_fn
  seg = jnp.ones((B, S), jnp.int32)
  tokens = tokens_of(2)
  base = np.asarray(forward(state, tokens, seg).mtp_logits[0])
  for j in (1, 4, S - 1):  # change token j: mtp logits at i < j - 1 unchanged, at i = j - 1 changed
    changed = tokens.at[:, j].set((tokens[:, j] + 1) % CFG.vocab_size)
    out = np.asarray(forward(state, changed, seg).mtp_logits[0])
    np.testing.assert_allclose(out[:, : j - 1], base[:, : j - 1], rtol=1e-6, atol=1e-6)
    assert np.abs(out[:, j - 1] - base[:, j - 1]).max() > 1e-4


# ------------------------------------------------------------------ remat
def test_remat_policies_and_unrolled_layers_same_loss_and_grads():
  """Every remat policy and scan_layers=False. nnx.value_and_grad of a scalar loss; the MTP block is not remat'd, so it is left out (with_mtp=False)."""
  graphdef, state = random_state(CFG, seed=3)
  tokens, seg = tokens_of(4), jnp.asarray([[1] * S, [1] * 4 + [2] * 4], jnp.int32)
  targets = tokens_of(5)

  def loss(model):
    out = model.forward(tokens, seg, with_mtp=False)
    logp = jax.nn.log_softmax(out.logits)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1)) + 0.1 * out.moe_stats.balance_loss.sum()

  results = {}
  for variant in ("none", "full", "full_offload", "save_dots", "unrolled"):  # unrolled: scan_layers=False, no remat
    policy = "none" if variant == "unrolled" else variant
    impl = ImplConfig(remat_policy=policy, scan_layers=variant != "unrolled")
    g = nnx.split(abstract_model(CFG, Runtime.resolve(impl, announce=False)))[0]
    assert nnx.merge(g, state).moe_layers.remat_policy == policy
    assert nnx.merge(g, state).moe_layers.unroll == (variant == "unrolled")

    def value_and_grad(state, g=g):
      loss_value, grads = nnx.value_and_grad(loss)(nnx.merge(g, state))
      return loss_value, nnx.state(grads, nnx.Param)

    jaxpr = str(jax.make_jaxpr(value_and_grad)(state))
    assert ("remat" in jaxpr or "checkpoint" in jaxpr) == (policy != "none"), policy
    loss_value, grads = jax.jit(value_and_grad)(state)
    results[variant] = (float(loss_value), grads)
  loss0, grads0 = results["none"]
  leaves0 = jax.tree.leaves(grads0)
  assert np.isfinite(loss0)
  assert len(leaves0) == len(jax.tree.leaves(nnx.filter_state(state, nnx.Param)))
  for policy in ("full", "full_offload", "save_dots", "unrolled"):
    loss_value, grads = results[policy]
    assert loss_value == pytest.approx(loss0, rel=1e-6)
    assert jax.tree.structure(grads) == jax.tree.structure(grads0)
    for a, b in zip(jax.tree.leaves(grads), leaves0):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7, err_msg=policy)
  # gradients reach the main model's parameters (all but the MTP module's, unused here)
  main = [np.asarray(v) for path, v in nnx.to_flat_state(grads0) if path[0] != "mtp"]
  assert all(np.abs(v).max() > 0 for v in main)


# ------------------------------------------------------------------ parameters
def count_model(cfg):
  model = abstract_model(cfg)
  n_param = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  n_bias = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, router.RouterBias)))
  return n_param, n_bias


@pytest.mark.parametrize("cfg", [CFG, ModelConfig.load(ROOT / "configs" / "tiny.yaml"),
                                 CFG.replace(topk_method="group_limited_greedy", scoring_func="softmax",
                                             tie_word_embeddings=True, q_lora_rank=None, n_shared_experts=2,
                                             num_nextn_predict_layers=2)],
                         ids=["tiny-test", "tiny.yaml", "v2-style"])
def test_parameter_count_matches_analytic(cfg):
  n_param, n_bias = count_model(cfg)
  want = params.count(cfg, 16)
  assert n_param + n_bias == want["total_params"] + want["mtp_params"]
  n_moe_blocks = cfg.num_moe_layers + cfg.num_nextn_predict_layers
  assert n_bias == (n_moe_blocks * cfg.n_routed_experts if cfg.topk_method == "noaux_tc" else 0)


@pytest.fixture(scope="module")
def initialised():
  """The real initialiser, run once (jit: one compile instead of one per parameter shape)."""
  graphdef = nnx.split(abstract_model(CFG))[0]
  state = jax.jit(lambda: nnx.state(Transformer(CFG, rngs=nnx.Rngs(0))))()
  return nnx.merge(graphdef, state)


def test_initialisation(initialised):
  model = initialised
  std = CFG.initializer_range
  experts = np.asarray(model.moe_layers.layers.mlp.experts.gate_proj[...])  # [2, 8, 32, 16]: 8192 values
  assert experts.size >= 8192
  assert abs(experts.std() / std - 1) < 0.05 and abs(experts.mean()) < 0.1 * std
  for kernel in (model.embed.embedding, model.lm_head.kernel, model.mtp[0].eh_proj.kernel):
    k = np.asarray(kernel[...])
    assert abs(k.std() / std - 1) < 0.1, kernel
  # the stacked layers are not copies of one another
  a = np.asarray(model.moe_layers.layers.self_attn.q_a_proj.kernel[...])
  assert not np.allclose(a[0], a[1])
  # every RMSNorm weight is one
  scales = [v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if path[-1] == "scale"]
  # dense stack 4 (stacked [1, .]), MoE stack 4 (stacked [2, .]), final norm, MTP: enorm, hnorm, norm + block 4
  assert len(scales) == 4 + 4 + 1 + 3 + 4
  for v in scales:
    np.testing.assert_array_equal(np.asarray(v[...]), 1.0)
  # router biases: zero, and not trainable parameters
  biases = model.router_bias_variables()
  assert len(biases) == 2 and biases[0].shape == (CFG.num_moe_layers, CFG.n_routed_experts)
  for b in biases:
    assert isinstance(b, router.RouterBias) and not isinstance(b, nnx.Param)
    np.testing.assert_array_equal(np.asarray(b[...]), 0.0)
  assert jax.tree.leaves(nnx.filter_state(nnx.state(model, nnx.Param), router.RouterBias)) == []
  n_param, n_bias = count_model(CFG)
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == n_param
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, router.RouterBias))) == n_bias
