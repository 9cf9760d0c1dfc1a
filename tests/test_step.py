"""train.step: gradient accumulation, the auxiliary-loss-free router-bias update, donation, lr.

Also the balancing demo: a router skewed so two experts take every token is evened out by the
bias update alone (no gradient steps).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moe import decoder
from moe import model as model_lib
from moe.config import ModelConfig
from moe.runtime import ImplConfig, Runtime
from tests.random_weights import initialised
from train.core import loss as loss_lib
from train.core import optimizer as optimizer_lib
from train.core import step as step_lib
from train.core.train_config import LossConfig, OptimizerConfig, TrainConfig

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                  num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                  qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                  n_group=2, topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=1,
                  max_position_embeddings=64, initializer_range=0.02)
B, S = 4, 16
GAMMA = 1e-2
PEAK, FINAL = 1e-2, 1e-3


def train_cfg(grad_accum: int) -> TrainConfig:
  """3 steps; lr: peak at steps 0 and 1, half-way down the cosine at step 2; the bias moves at
  steps 0 and 1 (stop fraction 0.34: round(3 * 0.66) = 2) and is frozen (gamma 0) at step 2."""
  return TrainConfig(model=CFG, steps=3, batch_size=B, seq_len=S, grad_accum=grad_accum,
                     optimizer=OptimizerConfig(lr=PEAK, final_lr=FINAL, warmup_steps=0, decay_start=1, decay_steps=2,
                                               moment_dtype="float32"),
                     loss=LossConfig(bias_update_gamma=GAMMA, bias_update_stop_fraction=0.34))


def capture_grads() -> optax.GradientTransformation:
  """Passes gradients through unchanged and keeps the last ones in its state."""
  return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p), lambda g, s, p=None: (g, g))


def make_batch(seed=0):
  """Packed rows: two documents then padding, one document, a split tail + a document, padding."""
  rng = np.random.default_rng(seed)
  seg = np.zeros((B, S), np.int32)
  seg[0, :9], seg[0, 9:14] = 1, 2
  seg[1, :] = 1
  seg[2, :5], seg[2, 5:] = 1, 2
  seg[3, :12] = 1
  pos = np.zeros((B, S), np.int32)
  for r in range(B):
    for s in range(1, S):
      pos[r, s] = pos[r, s - 1] + 1 if seg[r, s] == seg[r, s - 1] and seg[r, s] else 0
  real = seg > 0
  tokens = np.where(real, rng.integers(0, CFG.vocab_size, (B, S)), 0).astype(np.int32)
  targets = np.where(real, rng.integers(0, CFG.vocab_size, (B, S)), 0).astype(np.int32)
  return {"tokens": tokens, "targets": targets, "segment_ids": seg, "positions": pos,
          "loss_mask": real.astype(np.float32)}


class Setup:
  """A model, its state and the jitted step for one TrainConfig; the optimiser is the real AdamW
  chained after `capture_grads`, so state['opt'][0] holds the step's (accumulated) gradients."""

  def __init__(self, cfg: TrainConfig):
    self.cfg = cfg
    self.schedule = optimizer_lib.make_schedule(cfg)
    tx = optax.chain(capture_grads(), optimizer_lib.make_optimizer(cfg, self.schedule))
    rt = Runtime.resolve(cfg.impl, announce=False)
    self.graphdef, state = step_lib.init_state(initialised(cfg.model, rt), tx)
    self._init = jax.tree.map(np.asarray, state)
    self.step = step_lib.make_train_step(self.graphdef, cfg.model, tx, self.schedule, cfg)

    @jax.jit
    def load(params, rest, batch):
      out = nnx.merge(self.graphdef, params, rest).forward(batch["tokens"], batch["segment_ids"], batch["positions"])
      return out.moe_stats.load

    self.load = load

  def fresh_state(self):
    return jax.tree.map(jnp.array, self._init)


@pytest.fixture(scope="module")
def setups():
  return {n: Setup(train_cfg(n)) for n in (1, 2)}


@pytest.fixture(scope="module")
def batch():
  return {k: jnp.asarray(v) for k, v in make_batch().items()}


def as_np(tree):
  """A float64 NumPy copy, read from on-device copies: converting a jax.Array to NumPy keeps a
  zero-copy view of its buffer alive, and a viewed buffer cannot be donated."""
  return jax.tree.map(lambda x: np.asarray(jnp.copy(x), np.float64), tree)


def biases(state):
  """(main MoE layers [L, E], MTP block [E]) correction biases as float32 NumPy (copies)."""
  rest = jax.tree.map(jnp.copy, state["rest"])
  return (np.asarray(rest["moe_layers"]["layers"]["mlp"]["gate"]["e_score_correction_bias"][...]),
          np.asarray(rest["mtp"][0]["block"]["mlp"]["gate"]["e_score_correction_bias"][...]))


def path_names(tree):
  return ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def test_grad_accum_matches_single_batch(setups, batch):
  results = {}
  for n, s in setups.items():
    state, metrics = s.step(s.fresh_state(), batch)
    results[n] = (as_np(state["params"]), as_np(state["opt"][0]), jax.device_get(metrics), biases(state))
  (p1, g1, m1, b1), (p2, g2, m2, b2) = results[1], results[2]
  for k in ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "tokens"):
    np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, err_msg=k)
  for k in ("expert_load_cv", "expert_load_max", "expert_load_min"):  # load summed over micro-batches
    np.testing.assert_allclose(m2[k], m1[k], rtol=1e-6, err_msg=k)
  assert m1["tokens"] == make_batch()["loss_mask"].sum()
  np.testing.assert_array_equal(b2[0], b1[0])
  np.testing.assert_array_equal(b2[1], b1[1])
  flat1, flat2 = jax.tree.leaves(g1), jax.tree.leaves(g2)
  assert len(flat1) == len(flat2) > 10
  norm1 = np.sqrt(sum((g**2).sum() for g in flat1))
  np.testing.assert_allclose(norm1, m1["grad_norm"], rtol=1e-5)
  assert norm1 > 0
  for name, a, b in zip(path_names(g1), flat1, flat2):
    assert np.abs(b - a).max() <= 1e-5 * np.abs(a).max() + 1e-9, name
  # Updated params. Adam's first update is lr * g / (|g| + eps) (after clipping): tight wherever
  # |g| >> eps; where |g| is near eps it magnifies float rounding (up to lr * 1e6 * |dg|).
  changed = 0
  for name, a, b, p0, g in zip(path_names(p1), jax.tree.leaves(p1), jax.tree.leaves(p2),
                               jax.tree.leaves(as_np(setups[1]._init["params"])), flat1):
    big = np.abs(g) > 1e-5
    np.testing.assert_allclose(b[big], a[big], rtol=1e-5, atol=1e-8, err_msg=name)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-3 * PEAK, err_msg=name)
    changed += not np.array_equal(a, p0)
  assert changed == len(jax.tree.leaves(p1))  # lr > 0 at step 0: every parameter moved


@pytest.mark.parametrize("policy", ["full", "full_offload"])
def test_layer_stacks_add_their_gradient_into_the_accumulator(setups, batch, monkeypatch, policy):
  """With remat full (and full_offload, the layer inputs in host memory), 2 micro-batches: both layer
  stacks (dense and MoE) add their gradient into the accumulator in their backward scans
  (moe/decoder.py: accumulating); the step's gradients, loss and balance statistics equal autodiff's
  of the same micro-batches (remat none) within float32 rounding, and the update follows."""
  calls = []
  monkeypatch.setattr(decoder, "accumulating", lambda *a, f=decoder.accumulating, **k: calls.append(1) or f(*a, **k))
  full = Setup(dataclasses.replace(train_cfg(2), impl=ImplConfig(remat_policy=policy)))
  state, metrics = full.step(full.fresh_state(), batch)
  assert len(calls) == 2  # traced once per stack
  ref_state, ref_metrics = setups[2].step(setups[2].fresh_state(), batch)
  for k in ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "expert_load_cv"):
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-6, err_msg=k)
  got, want = as_np(state["opt"][0]), as_np(ref_state["opt"][0])
  for name, a, b in zip(path_names(want), jax.tree.leaves(want), jax.tree.leaves(got)):
    assert np.abs(b - a).max() <= 1e-6 * np.abs(a).max() + 1e-12, name
  for a, b in zip(jax.tree.leaves(as_np(ref_state["params"])), jax.tree.leaves(as_np(state["params"]))):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-3 * PEAK)


def test_the_loss_computes_the_logits_a_chunk_at_a_time(setups, batch, monkeypatch):
  """The trainer's loss runs the output head on 4-token chunks of each sequence (moe/model.py
  LOSS_CHUNK, 4 chunks of the 16 tokens here; main and MTP heads), recomputed in the backward: the
  same loss, gradients and update as the head on the whole sequence, within float32 rounding."""
  calls = []
  monkeypatch.setattr(model_lib, "LOSS_CHUNK", 4)
  monkeypatch.setattr(loss_lib, "token_nlls", lambda ds, ts, f=loss_lib.token_nlls: calls.append([d.chunks for d in ds])
                      or f(ds, ts))
  chunked = Setup(train_cfg(2))
  state, metrics = chunked.step(chunked.fresh_state(), batch)
  assert calls == [[4, 4]] * 2  # main and MTP together, in each of the 2 micro-batches
  monkeypatch.undo()
  whole = Setup(train_cfg(2))
  ref_state, ref_metrics = whole.step(whole.fresh_state(), batch)
  for k in ("loss", "lm_loss", "mtp_loss", "grad_norm"):
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-6, err_msg=k)
  got, want = as_np(state["opt"][0]), as_np(ref_state["opt"][0])
  for name, a, b in zip(path_names(want), jax.tree.leaves(want), jax.tree.leaves(got)):
    assert np.abs(b - a).max() <= 1e-6 * np.abs(a).max() + 1e-12, name


def expert_load(setup, state, batch):
  """Tokens per expert per MoE layer [L, E] (main layers, then MTP), from model.forward."""
  return np.asarray(setup.load(state["params"], state["rest"], batch))


def test_router_bias_sign_rule_stop_and_donation(setups, batch):
  s = setups[1]
  state = s.fresh_state()
  for names in (path_names(state["params"]), path_names(state["opt"])):
    assert not any("e_score_correction_bias" in n for n in names)  # never seen by the optimiser
  assert all(np.all(b == 0) for b in biases(state))
  lrs = []
  for t in range(3):
    load = expert_load(s, state, batch)  # [2, E]: the MoE layer, the MTP block
    assert load.shape == (2, CFG.n_routed_experts)
    np.testing.assert_array_equal(load.sum(-1), 2 * make_batch()["loss_mask"].sum())  # K per real token
    before, params_before = biases(state), as_np(state["params"])
    # the state the loop carries (the test's capture_grads state is unused by the step, so jit
    # prunes it and does not donate it)
    old_leaves = jax.tree.leaves({k: v for k, v in state.items() if k != "opt"}) + jax.tree.leaves(state["opt"][1])
    state_new, metrics = s.step(state, batch)
    metrics = jax.device_get(metrics)
    # donation: the old state's buffers are gone
    assert len(old_leaves) > 100 and all(x.is_deleted() for x in old_leaves)
    state = state_new
    after = biases(state)
    want = step_lib.load_stats(jnp.asarray(load))
    for k, v in want.items():
      np.testing.assert_allclose(metrics[k], np.asarray(v), rtol=1e-6, err_msg=k)
    sign = np.sign(load.mean(-1, keepdims=True) - load).astype(np.float32)
    gamma = np.float32(GAMMA) if t < 2 else np.float32(0.0)
    np.testing.assert_array_equal(after[0], before[0] + gamma * sign[:1])
    np.testing.assert_array_equal(after[1], before[1] + gamma * sign[1])
    if t < 2:
      assert (sign > 0).any() and (sign < 0).any()
      assert set(np.unique(np.round((after[0] - before[0]) / GAMMA, 6))) <= {-1.0, 0.0, 1.0}
    else:  # gamma 0 (after bias_update_stop_fraction): the bias stays exactly, the weights still move
      np.testing.assert_array_equal(after[0], before[0])
      np.testing.assert_array_equal(after[1], before[1])
      assert any(not np.array_equal(a, b) for a, b in
                 zip(jax.tree.leaves(as_np(state["params"])), jax.tree.leaves(params_before)))
    lrs.append(float(metrics["lr"]))
  assert int(state["step"]) == 3
  np.testing.assert_allclose(lrs, [float(s.schedule(t)) for t in range(3)], rtol=1e-6)
  np.testing.assert_allclose(lrs, [PEAK, PEAK, FINAL + (PEAK - FINAL) * 0.5], rtol=1e-6)


def test_aux_free_balancing_evens_out_a_skewed_router():
  """Skew the router: every token's embedding carries a shared direction u and the gate gives
  experts 0 and 1 a large weight on u, so they take (almost) every token of the MoE layer. Then run
  only the bias update, b_i += gamma * sign(mean(load) - load_i), for 120 rounds at gamma 1e-2."""
  rng = np.random.default_rng(0)
  model = initialised(CFG)
  u = rng.standard_normal(CFG.hidden_size)
  u /= np.linalg.norm(u)
  model.embed.embedding[...] += jnp.asarray(0.2 * u, jnp.float32)
  gate = model.moe_layers.layers.mlp.gate
  offset = np.zeros(CFG.n_routed_experts)
  offset[0], offset[1] = 1.0, 0.7
  kernel = 15 * np.asarray(gate.kernel[...]) + np.einsum("d,e->de", u, offset)[None]
  gate.kernel[...] = jnp.asarray(kernel, jnp.float32)
  tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (8, 32)), jnp.int32)
  graphdef, params, rest = step_lib.split_model(model)

  @jax.jit
  def balance_round(rest, gamma):
    m = nnx.merge(graphdef, params, rest)
    load = m.forward(tokens).moe_stats.load
    m.update_router_biases(load, gamma)
    return step_lib.split_model(m)[2], load

  loads = []
  for _ in range(120):
    rest, load = balance_round(rest, GAMMA)
    loads.append(np.asarray(load))
  loads = np.stack(loads)  # [rounds, layers, E]
  cv = loads.std(-1) / loads.mean(-1)
  ratio = loads.max(-1) / loads.mean(-1)
  cv_end, ratio_end = cv[-20:].mean(0), ratio[-20:].mean(0)
  print(f"\nMoE layer: CV {cv[0, 0]:.3f} -> {cv_end[0]:.3f}, max/mean {ratio[0, 0]:.2f} -> {ratio_end[0]:.2f};"
        f" MTP block: CV {cv[0, 1]:.3f} -> {cv_end[1]:.3f}; first round: {loads[0, 0].astype(int).tolist()},"
        f" last: {loads[-1, 0].astype(int).tolist()}")
  assert loads[0, 0, :2].sum() > 0.85 * loads[0, 0].sum()  # experts 0 and 1 take almost everything
  assert cv[0, 0] > 1.4 and ratio[0, 0] > 3.0
  assert cv_end[0] < 0.2 and ratio_end[0] < 1.4  # mean over the last 20 rounds
  assert cv[-20:, 0].max() < 0.3
  assert cv_end[1] < 0.5 * cv[0, 1]  # the (unskewed-by-design) MTP block's router evens out too
  bias = np.asarray(rest["moe_layers"]["layers"]["mlp"]["gate"]["e_score_correction_bias"][...])[0]
  assert bias[0] < 0 and bias[1] < 0  # the overloaded experts were pushed down
