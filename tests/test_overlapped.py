"""impl.fb_overlap (train/core/overlapped.py): micro-batch m's forward beside m-1's backward gives the
plain gradient accumulation's step. On a mesh: tests/test_parallel.py (accumulate)."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.runtime import ImplConfig
from parallel.common.errors import ConfigError
from tests.test_step import CFG, S, Setup, as_np, path_names, train_cfg
from train.core import overlapped

MODEL = dataclasses.replace(CFG, num_hidden_layers=4)  # 1 dense + 3 MoE layers: an odd stack
ROWS = 6


def batch():
  rng = np.random.default_rng(0)
  seg = np.ones((ROWS, S), np.int32)
  seg[1, 10:], seg[3, 12:] = 2, 0  # two documents in a row, padding
  pos = np.tile(np.arange(S, dtype=np.int32), (ROWS, 1))
  pos[1, 10:] = np.arange(S - 10)
  tokens, targets = (rng.integers(0, MODEL.vocab_size, (ROWS, S)).astype(np.int32) for _ in range(2))
  return {"tokens": jnp.asarray(tokens), "targets": jnp.asarray(targets), "segment_ids": jnp.asarray(seg),
          "positions": jnp.asarray(pos), "loss_mask": jnp.asarray((seg > 0).astype(np.float32))}


def cfg(n_micro, model=MODEL, **impl):
  return dataclasses.replace(train_cfg(1), model=model, batch_size=ROWS, grad_accum=n_micro, impl=ImplConfig(**impl))


# V2's routing: softmax scores, the top experts within the best topk_group groups by their largest score
GROUP_LIMITED = dataclasses.replace(MODEL, topk_method="group_limited_greedy", scoring_func="softmax")


@pytest.mark.parametrize("n_micro, policy, model", [(2, "full", MODEL), (3, "full", MODEL),
                                                    (3, "full_offload", MODEL), (2, "full", GROUP_LIMITED)],
                         ids=["2-full", "3-full", "3-full_offload", "2-full-group_limited_greedy"])
def test_forward_beside_backward_gives_the_accumulated_step(n_micro, policy, model):
  """2 and 3 micro-batches (the last backward reads the layer inputs from either end of the shared
  buffer; with full_offload the buffer in host memory) through 3 MoE layers, with V3's routing
  (noaux_tc) and V2's (group_limited_greedy): loss, its parts, the expert loads, the gradients and the
  update equal the plain accumulation's (the same remat policy, moe/decoder.py: accumulating) within
  float32 rounding (measured: metrics equal, gradients 1e-7 of their largest entry; reading the
  buffer's slots in one order for every micro-batch made them 0.98 apart). (greedy routing, with
  dropping: tests/test_parallel.py, accumulate_dropping.)"""
  b = batch()
  runs = {}
  for on in (False, True):
    s = Setup(cfg(n_micro, model, remat_policy=policy, fb_overlap=on))
    state, metrics = s.step(s.fresh_state(), b)
    runs[on] = as_np(state["opt"][0]), as_np(state["params"]), jax.device_get(metrics)
  (g0, p0, m0), (g1, p1, m1) = runs[False], runs[True]
  for k in ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "expert_load_cv", "expert_load_max"):
    np.testing.assert_allclose(m1[k], m0[k], rtol=1e-6, err_msg=k)
  assert len(jax.tree.leaves(g0)) == len(jax.tree.leaves(g1)) > 10
  for name, a, c in zip(path_names(g0), jax.tree.leaves(g0), jax.tree.leaves(g1)):
    assert np.abs(c - a).max() <= 1e-6 * np.abs(a).max() + 1e-12, name
  for name, a, c in zip(path_names(p0), jax.tree.leaves(p0), jax.tree.leaves(p1)):
    np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("change, expect", [
    (dict(grad_accum=1), "needs grad_accum >= 2"),
    (dict(impl=ImplConfig(remat_policy="none", fb_overlap=True)), "needs impl.remat_policy=full or full_offload (has none)"),
    (dict(optimizer=dataclasses.replace(train_cfg(1).optimizer, name="muon", qk_clip_threshold=100.0)),
     "runs without QK-clip"),
])
def test_where_it_cannot_run_it_says_so_in_one_line(change, expect):
  c = dataclasses.replace(cfg(2, remat_policy="full", fb_overlap=True), **change)
  with pytest.raises(ConfigError, match=re.escape(expect)) as e:
    overlapped.check(c, None)
  assert "\n" not in str(e.value)
