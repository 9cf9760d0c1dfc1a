"""DeepSeekMoE feed-forward: shared experts + top-k routed SwiGLU experts.

  y = shared(x) + sum_k w_k expert_{i_k}(x),   expert(x) = down(silu(x gate) * (x up))

The routed experts run dropless: each (token, k) assignment is one row for the grouped matmul the
Runtime chose (moe/kernels/experts.py: ragged_dot on GPU/TPU, block-padded batched matmul on CPU).
With a multi-device mesh the rows first go to the ranks that own their experts
(parallel.expert_parallel.dispatch_combine, which is handed the grouped matmul as its expert_fn).

FP8 (`precision: fp8`, moe/kernels/fp8.py): the same paths with FP8 GEMMs, given the float32 master
weights: `fp8_ragged_dot` in `ragged_ffn`; `fp8_matmul` over the 128-row blocks in `blocked_ffn`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moe import router as router_lib
from moe.config import ModelConfig
from moe.kernels.experts import EXPERTS
from moe.layers import MLP, param
from moe.runtime import Runtime
from parallel.errors import ConfigError
from parallel import eplb
from parallel.expert_parallel import dispatch_combine, ep_size

# Logical axes of the stacked expert weights as they enter the expert-parallel dispatch: the hidden
# dimension is gathered whole there (FSDP), the FFN width stays split over `tensor`.
DISPATCH_AXES = (("expert", None, "moe_mlp"), ("expert", None, "moe_mlp"), ("expert", "moe_mlp", None))


class MoEStats(NamedTuple):
  """What training needs from one MoE layer."""

  load: jax.Array  # [E] tokens routed to each expert (padding excluded)
  balance_loss: jax.Array  # [] V3 sequence-wise balance loss, before alpha
  dropped: jax.Array  # [] (token, expert) assignments dropped by expert-parallel capacity (int32)


class ExpertCopies(nnx.Variable):
  """The logical expert held by each redundant expert slot (mesh.redundant_experts): re-placed from
  the measured loads every mesh.redundant_every steps (parallel/eplb.py), never by gradients."""


class RoutedExperts(nnx.Module):
  """n_routed_experts SwiGLU experts stored stacked: gate/up [E, D, F], down [E, F, D].

  With redundant experts (mesh.redundant_experts = R over n_ep expert-parallel ranks) each rank also
  runs R / n_ep copies of hot experts; `copies` [R] says which. The copies are made from these
  weights for each step and their gradients sum into them: checkpoints, export and the optimizer
  only ever see the E experts."""

  def __init__(self, cfg: ModelConfig, rt: Runtime, *, rngs: nnx.Rngs):
    e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    self.dtype = rt.compute_dtype
    self.fp8 = rt.fp8
    self.impl = rt.experts
    self.par = rt.par
    self.keep_exchanged = rt.ep_remat == "keep"
    self.gate_proj = param(rngs, (e, d, f), ("expert", "embed", "moe_mlp"), cfg, rt)
    self.up_proj = param(rngs, (e, d, f), ("expert", "embed", "moe_mlp"), cfg, rt)
    self.down_proj = param(rngs, (e, f, d), ("expert", "moe_mlp", "embed"), cfg, rt)
    self.routing = router_lib.reach(cfg)  # what the router enforces, which bounds the nodes a token reaches
    n_ep, r = ep_size(rt.par, e), rt.par.redundant_experts if rt.par is not None else 0
    if r:
      if n_ep == 1 or r % n_ep:
        raise ConfigError(f"mesh.redundant_experts={r} needs expert parallelism with the slots spread evenly:"
                          f" the {e} experts split over {n_ep} rank(s)")
      self.copies = ExpertCopies(eplb.initial(n_ep, r // n_ep, e // n_ep), axes=(None,))
      self.placement = (n_ep, r // n_ep, rt.par.ep_nodes, rt.par.redundant_every)  # static

  def replace_copies(self, load_E, step):
    """After `step` steps: every `redundant_every`-th, the copies re-placed for the loads `load_E`
    ([E], or [L, E] for a stack of layers)."""
    n_ep, r_local, nodes, every = self.placement
    place = lambda load: eplb.place(load, n_ep, r_local, nodes)
    place_all = (lambda: jax.vmap(place)(load_E)) if load_E.ndim == 2 else (lambda: place(load_E))
    self.copies[...] = jax.lax.cond(step % every == 0, place_all, lambda: self.copies[...])

  def __call__(self, x_TxD, idx_TxK, w_TxK):
    """(sum_k w[t, k] expert_{idx[t, k]}(x[t]) [T, D], assignments dropped by expert parallelism)."""
    weights = (self.gate_proj[...], self.up_proj[...], self.down_proj[...])
    if self.fp8 is None:  # FP8 takes the float32 master weights (float32 weight gradients)
      weights = tuple(p.astype(self.dtype) for p in weights)
    expert_fn = functools.partial(EXPERTS[self.impl], fp8=self.fp8)
    copies = self.copies[...] if hasattr(self, "copies") else None
    return dispatch_combine(x_TxD.astype(self.dtype), idx_TxK, w_TxK, weights, DISPATCH_AXES, expert_fn, self.par,
                            self.routing, copies, self.keep_exchanged)


class MoE(nnx.Module):

  def __init__(self, cfg: ModelConfig, rt: Runtime, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.gate = router_lib.Router(cfg, rt, rngs=rngs)
    self.experts = RoutedExperts(cfg, rt, rngs=rngs)
    if cfg.n_shared_experts:
      self.shared_experts = MLP(cfg, rt, cfg.moe_intermediate_size * cfg.n_shared_experts, rngs=rngs,
                                axis_name="moe_mlp")

  def __call__(self, x_BxSxD, valid_BxS):
    b, s, d = x_BxSxD.shape
    w, idx, scores = self.gate(x_BxSxD)
    idx_TxK = idx.reshape(b * s, -1)
    y, dropped = self.experts(x_BxSxD.reshape(b * s, d), idx_TxK, w.reshape(b * s, -1))
    y = y.reshape(b, s, d).astype(x_BxSxD.dtype)
    if self.cfg.n_shared_experts:
      y = y + self.shared_experts(x_BxSxD)
    stats = MoEStats(
        load=router_lib.expert_load(idx_TxK, valid_BxS.reshape(-1).astype(jnp.float32), self.cfg.n_routed_experts),
        balance_loss=router_lib.sequence_balance_loss(scores, idx, valid_BxS, self.cfg),
        dropped=dropped,
    )
    return y, stats
