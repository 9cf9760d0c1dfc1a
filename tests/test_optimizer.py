"""Schedules at hand-computed steps; AdamW against a NumPy float64 reference; mask; moment dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from train.core.train_config import OptimizerConfig, TrainConfig
from train.core.optimizer import decay_mask, make_optimizer, make_schedule, scale_by_adam


def _cfg(steps=1000, **opt):
  return TrainConfig(steps=steps, optimizer=OptimizerConfig(**opt))


# cos(π/4) = 0.70710678: lr at u = 1/4 of a cosine decay from 1 to 0.1 is 0.1 + 0.9·0.8535534.
COS_QUARTER = 0.1 + 0.9 * 0.5 * (1 + 0.70710678)


@pytest.mark.parametrize(
    "kind, steps, extra, expected",
    [
        ("warmup_constant_cosine", 1000, dict(decay_start=100, decay_steps=200),
         {0: 0.0, 5: 0.5, 10: 1.0, 99: 1.0, 100: 1.0, 150: COS_QUARTER, 200: 0.55, 300: 0.1, 999: 0.1}),
        # decay_start null: the last 200 of 1000 steps; 1 - √u: u = 1/4 → 0.5, u = 1/2 → 0.2928932
        ("wsd", 1000, dict(decay_steps=200),
         {5: 0.5, 799: 1.0, 800: 1.0, 850: 0.55, 900: 0.1 + 0.9 * 0.29289322, 1000: 0.1, 1200: 0.1}),
        ("cosine", 110, dict(decay_steps=0), {0: 0.0, 5: 0.5, 10: 1.0, 35: COS_QUARTER, 60: 0.55, 110: 0.1}),
    ],
)
def test_schedule_values(kind, steps, extra, expected):
  sched = make_schedule(_cfg(steps, schedule=kind, lr=1.0, final_lr=0.1, warmup_steps=10, **extra))
  for t, want in expected.items():
    assert float(sched(t)) == pytest.approx(want, abs=1e-6), (kind, t)


def test_schedule_jits():
  sched = make_schedule(_cfg(decay_start=100, decay_steps=200, lr=1.0, final_lr=0.1, warmup_steps=10))
  got = jax.jit(jax.vmap(sched))(jnp.array([5, 200]))
  np.testing.assert_allclose(got, [0.5, 0.55], atol=1e-6)


# ------------------------------------------------------------------ AdamW
def _params():
  k = jax.random.split(jax.random.key(0), 3)
  return {
      "layer": {"kernel": jax.random.normal(k[0], (3, 4)), "bias": jax.random.normal(k[1], (4,))},
      "norm": {"scale": 1 + 0.1 * jax.random.normal(k[2], (2, 4))},  # stacked over 2 layers: 2-D
  }


def _numpy_adamw(params, grads_seq, lr, b1, b2, eps, wd, clip, decayed):
  """Reference AdamW in float64: clip by global norm, Adam with bias correction, decoupled decay."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, grads in enumerate(grads_seq, 1):
    g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
    norm = np.sqrt(sum(np.sum(x**2) for x in g.values()))
    g = {k: x * min(1.0, clip / norm) for k, x in g.items()}
    for k in p:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      upd = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
      p[k] = p[k] - lr * (upd + wd * decayed[k] * p[k])
  return p


def _flat(tree):
  return {"/".join(str(e.key) for e in path): x for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _run(moment_dtype, grads_seq, lr=0.01, clip=1.0):
  tx = make_optimizer(_cfg(moment_dtype=moment_dtype, clip_norm=clip), optax.constant_schedule(lr))
  params = _params()
  state = tx.init(params)
  for g in grads_seq:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _grads(scales):
  keys = jax.random.split(jax.random.key(1), len(scales))
  return [jax.tree.map(lambda p, k=k, s=s: s * jax.random.normal(k, p.shape), _params()) for k, s in zip(keys, scales)]


@pytest.mark.parametrize("moment_dtype, tol", [("float32", 1e-4), ("bfloat16", 1e-2)])
def test_adamw_matches_numpy(moment_dtype, tol):
  """Three steps; compares the parameter change p - p0 (decay is ~10% of it for the kernel)."""
  grads = _grads([30.0, 0.05, 1.0])  # the first is clipped (norm ≫ 1), the second is not
  got, _ = _run(moment_dtype, grads)
  p0 = _flat(_params())
  decayed = {"layer/kernel": 1.0, "layer/bias": 0.0, "norm/scale": 0.0}
  want = _numpy_adamw(p0, [_flat(g) for g in grads], 0.01, 0.9, 0.95, 1e-8, 0.1, 1.0, decayed)
  for k, x in _flat(got).items():
    assert x.dtype == jnp.float32, k  # master weights stay float32
    moved = want[k] - np.asarray(p0[k], np.float64)
    np.testing.assert_allclose(x - p0[k], moved, rtol=tol, atol=tol * np.abs(moved).max(), err_msg=k)


def test_clipping_changes_the_result():
  """Adam is scale-invariant on one step, so clipping shows from the second step on."""
  grads = _grads([30.0, 0.05])
  clipped, _ = _run("float32", grads, clip=1.0)
  unclipped, _ = _run("float32", grads, clip=1e9)
  decayed = {"layer/kernel": 1.0, "layer/bias": 0.0, "norm/scale": 0.0}
  want = _numpy_adamw(_flat(_params()), [_flat(g) for g in grads], 0.01, 0.9, 0.95, 1e-8, 0.1, 1e9, decayed)
  np.testing.assert_allclose(_flat(unclipped)["layer/kernel"], want["layer/kernel"], rtol=2e-6)
  assert np.abs(_flat(clipped)["layer/kernel"] - want["layer/kernel"]).max() > 1e-3


@pytest.mark.parametrize("moment_dtype", ["bfloat16", "float32"])
def test_moment_dtype(moment_dtype):
  _, state = _run(moment_dtype, _grads([1.0]))
  adam = next(s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "nu")) if hasattr(s, "nu"))
  for tree in (adam.mu, adam.nu):
    assert {x.dtype for x in jax.tree.leaves(tree)} == {jnp.dtype(moment_dtype)}
  assert int(adam.count) == 1


def test_scale_by_adam_update_is_float32_from_bf16_moments():
  tx = scale_by_adam(0.9, 0.95, 1e-8, jnp.bfloat16)
  g = {"w": jnp.full((2, 2), 0.3, jnp.float32)}
  upd, _ = tx.update(g, tx.init(g))
  assert upd["w"].dtype == jnp.float32
  np.testing.assert_allclose(upd["w"], 1.0, rtol=1e-6)  # first step: m̂/√v̂ = sign(g)


# ------------------------------------------------------------------ mask
def test_mask_by_name_and_ndim():
  z = lambda *s: jnp.zeros(s)
  params = {
      "moe_layers": {"mlp": {"experts": {"gate_proj": z(2, 4, 8, 8)}, "shared_experts": {"up_proj": z(2, 8, 8)}},
                     "self_attn": {"q_a_proj": {"kernel": z(2, 8, 4)}, "q_a_layernorm": {"scale": z(2, 4)}}},
      "dense_layers": {"input_layernorm": {"scale": z(1, 8)}, "proj": {"bias": z(1, 8)}},
      "embed": {"embedding": z(16, 8)},
      "lm_head": {"kernel": z(8, 16)},
      "final_norm": {"scale": z(8)},
      "vector": z(8),
  }
  got = _flat(decay_mask(params))
  assert got == {
      "moe_layers/mlp/experts/gate_proj": True,
      "moe_layers/mlp/shared_experts/up_proj": True,
      "moe_layers/self_attn/q_a_proj/kernel": True,
      "moe_layers/self_attn/q_a_layernorm/scale": False,
      "dense_layers/input_layernorm/scale": False,
      "dense_layers/proj/bias": False,
      "embed/embedding": True,
      "lm_head/kernel": True,
      "final_norm/scale": False,
      "vector": False,
  }


class _RouterBias(nnx.Variable):
  """Like the MoE router's e_score_correction_bias: state, not a trainable Param."""


class _Tiny(nnx.Module):
  def __init__(self, rngs):
    self.proj = nnx.Linear(4, 4, rngs=rngs)
    self.norm = nnx.RMSNorm(4, rngs=rngs)
    self.layers = nnx.Dict(scale=nnx.Param(jnp.full((2, 4), 2.0)))
    self.e_score_correction_bias = _RouterBias(jnp.ones(4))


@pytest.mark.parametrize("pure", [False, True])
def test_mask_on_nnx_state(pure):
  """nnx.State paths end in `.value` unless made pure; the name before it decides."""
  state = nnx.state(_Tiny(nnx.Rngs(0)), nnx.Param)
  mask = decay_mask(nnx.as_pure(state) if pure else state)
  got = {"/".join(str(getattr(e, "key", getattr(e, "name", e))) for e in p): bool(m)
         for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  suffix = "" if pure else "/value"
  assert got == {f"proj/kernel{suffix}": True, f"proj/bias{suffix}": False, f"norm/scale{suffix}": False,
                 f"layers/scale{suffix}": False}


def test_nnx_optimizer_decays_only_matrices():
  """Zero gradients: Adam's update is 0, so only the decay moves parameters: p ← p·(1 - lr·wd)."""
  model = _Tiny(nnx.Rngs(0))
  model.proj.bias[...] = jnp.ones(4)
  before = jax.tree.map(jnp.copy, nnx.state(model))
  opt = nnx.Optimizer(model, make_optimizer(_cfg(), optax.constant_schedule(0.5)), wrt=nnx.Param)
  grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
  opt.update(model, grads)
  np.testing.assert_allclose(model.proj.kernel[...], before["proj"]["kernel"][...] * (1 - 0.5 * 0.1), rtol=1e-6)
  for got, old in [(model.proj.bias, before["proj"]["bias"]), (model.norm.scale, before["norm"]["scale"]),
                   (model.layers["scale"], before["layers"]["scale"]),
                   (model.e_score_correction_bias, before["e_score_correction_bias"])]:
    np.testing.assert_array_equal(got[...], old[...])
