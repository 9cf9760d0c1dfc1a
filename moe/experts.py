"""DeepSeekMoE feed-forward: shared experts + top-k routed SwiGLU experts.

  y = shared(x) + sum_k w_k expert_{i_k}(x),   expert(x) = down(silu(x gate) * (x up))

The routed experts run dropless: each (token, k) assignment is one row for the grouped matmul the
Runtime chose (moe/kernels/expert_ffn.py: megablox on TPU, ragged_dot on GPU, block-padded batched matmul on
CPU).
With a multi-device mesh the rows first go to the ranks that own their experts
(parallel.expert_parallel.dispatch_combine, which is handed the grouped matmul as its expert_fn).

FP8 (`precision: fp8`, moe/kernels/fp8.py): the same paths with FP8 GEMMs, given the weights' compute-
dtype copies: `fp8_ragged_dot` in `ragged_ffn`; `fp8_matmul` over the 128-row blocks in `blocked_ffn`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moe import router as router_lib
from moe.config import ModelConfig
from moe.layers import MLP, param
from moe.runtime import Runtime
from parallel.common.errors import ConfigError
from parallel import eplb
from parallel.expert_parallel import add_copy_grads, dispatch_combine, ep_size, make_copies
from parallel.sharding import constrain

# Logical axes of the stacked expert weights as they enter the expert-parallel dispatch: the hidden
# dimension is gathered whole there (FSDP), the FFN width stays split over `tensor`.
DISPATCH_AXES = (("expert", None, "moe_mlp"), ("expert", None, "moe_mlp"), ("expert", "moe_mlp", None))


class MoEStats(NamedTuple):
  """What training needs from one MoE layer."""

  load: jax.Array  # [E] tokens routed to each expert (padding excluded)
  balance_loss: jax.Array  # [] V3 sequence-wise balance loss, before alpha
  dropped: jax.Array  # [] (token, expert) assignments dropped by expert-parallel capacity (int32)
  fallbacks: jax.Array  # [] 1 where the dropless exchange's fast path fell back to its chunks (int32)


def exchange_counts(stats) -> dict:
  """What the expert-parallel exchanges of MoEStats `stats` (of layer stacks) report, summed: dropped
  assignments and layers whose fast path fell back, int32 scalars (0 without MoE layers)."""
  return {k: sum((getattr(s, k).sum() for s in stats), jnp.zeros((), jnp.int32)) for k in ("dropped", "fallbacks")}


class ExpertCopies(nnx.Variable):
  """The logical expert held by each redundant expert slot (mesh.redundant_experts): re-placed from
  the measured loads every mesh.redundant_every steps (parallel/eplb.py), never by gradients."""


class CopyWeights(nnx.Variable):
  """The weights of the redundant slots' copies [R, ...], in the dtype the experts compute with: state,
  not parameters (the optimizer and export never see them; checkpoints keep them with the placement
  they were made for), made from the experts' weights after every optimizer step (`make_copies`), so
  that a copy always equals its expert. The training step differentiates them like parameters and
  sums their gradients into their experts' once per step (`add_copy_grads`)."""


COPY_NAMES = ("copy_gate_proj", "copy_up_proj", "copy_down_proj")  # CopyWeights of gate_proj, up_proj, down_proj


class RoutedExperts(nnx.Module):
  """n_routed_experts SwiGLU experts stored stacked: gate/up [E, D, F], down [E, F, D].

  With redundant experts (mesh.redundant_experts = R over n_ep expert-parallel ranks) each rank also
  runs R / n_ep copies of hot experts: `copies` [R] says which, `copy_gate_proj`, `copy_up_proj`,
  `copy_down_proj` [R, ...] hold their weights (CopyWeights). The forward uses them as they are; the
  training step remakes them after each update and sums their gradients into the experts': the
  optimizer and export only ever see the E experts."""

  def __init__(self, cfg: ModelConfig, rt: Runtime, *, rngs: nnx.Rngs):
    e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    self.dtype = rt.compute_dtype
    self.fp8 = rt.fp8
    self.impl = rt.experts
    self.expert_fn = rt.expert_fn()
    self.par = rt.par
    self.keep_exchanged = rt.ep_remat == "keep"
    self.gathered = False  # set by a pipeline that hands each stage its weights gathered and cast (gather_once)
    self.gate_proj = param(rngs, (e, d, f), ("expert", "embed", "moe_mlp"), cfg, rt)
    self.up_proj = param(rngs, (e, d, f), ("expert", "embed", "moe_mlp"), cfg, rt)
    self.down_proj = param(rngs, (e, f, d), ("expert", "moe_mlp", "embed"), cfg, rt)
    self.routing = router_lib.reach(cfg)  # what the router enforces, which bounds the nodes a token reaches
    n_ep, r = ep_size(rt.par, e), rt.par.redundant_experts if rt.par is not None else 0
    if r:
      if n_ep == 1 or r % n_ep:
        raise ConfigError(f"mesh.redundant_experts={r} needs expert parallelism with the slots spread evenly:"
                          f" the {e} experts split over {n_ep} rank(s)")
      slots = eplb.initial(n_ep, r // n_ep, e // n_ep)
      self.copies = ExpertCopies(slots, axes=(None,))
      for name, w, axes in zip(COPY_NAMES, self._weights(), self._axes()):  # home copies of the initial weights
        setattr(self, name, CopyWeights(w[slots], axes=axes))
      self.placement = (n_ep, r // n_ep, rt.par.ep_nodes, rt.par.redundant_every)  # static

  def _weights(self):
    """The experts' weights as the expert FFN takes them: in the compute dtype (with FP8 too: each
    GEMM quantises the bf16 copy), each cast where its shard lies, so that FSDP gathers bf16 and not
    the float32 master weights: left to itself, XLA gathered the float32 weights and cast them after
    (V3 on h100x256: 1.2 of the 1.5 TB a GPU sends over the hosts' network in all-gathers a step)."""
    ws = [p[...].astype(self.dtype) for p in (self.gate_proj, self.up_proj, self.down_proj)]
    if self.gathered:
      return tuple(ws)
    # (a stack of layers' weights, [layers, experts, ...], may or may not name its leading axis)
    return tuple(constrain(w, ((None,) * w.ndim + tuple(axes))[-w.ndim:], self.par) for w, axes in zip(ws, self._axes()))

  def _axes(self):
    return tuple(v.get_metadata()["axes"] for v in (self.gate_proj, self.up_proj, self.down_proj))

  def replace_copies(self, load_E, step):
    """After `step` steps: every `redundant_every`-th, the copies re-placed for the loads `load_E`
    ([E], or [L, E] for a stack of layers), keeping the old placement where the new one would not
    lower the max/mean rank load (eplb.replace). A placement is valid for this mesh by construction,
    or made so where it was restored (`valid_placements`). Call `make_copies` after it."""
    n_ep, r_local, nodes, every = self.placement
    replace = lambda old, load: eplb.replace(old, load, n_ep, r_local, nodes)
    if load_E.ndim == 2:
      replace = jax.vmap(replace)
    old = self.copies[...]
    self.copies[...] = jax.lax.cond(step % every == 0, lambda: replace(old, load_E), lambda: old)

  def make_copies(self):
    """The copies' weights from the experts' current ones and placement: per layer one exchange inside
    each expert-parallel node (parallel.expert_parallel.make_copies)."""
    made = make_copies(self._weights(), self._axes(), self.copies[...], self.par)
    for name, w in zip(COPY_NAMES, made):
      getattr(self, name)[...] = w

  def add_copy_grads(self):
    """On a module whose Params and CopyWeights hold gradients (train/core/step.py merges them into
    the model's graph): the copies' gradients summed into their experts' (one exchange per layer),
    sent in the copies' dtype."""
    grads = add_copy_grads([self.gate_proj[...], self.up_proj[...], self.down_proj[...]],
                           [getattr(self, name)[...].astype(self.dtype) for name in COPY_NAMES],
                           self._axes(), self.copies[...], self.par)
    for v, g in zip((self.gate_proj, self.up_proj, self.down_proj), grads):
      v[...] = g

  def __call__(self, x_TxD, idx_TxK, w_TxK):
    """(sum_k w[t, k] expert_{idx[t, k]}(x[t]) [T, D], assignments dropped by expert parallelism,
    1 where the exchange's fast path fell back)."""
    # gathered once for every use (the exchange's forward and backward): gathered where each use
    # meets the shards, the weights were gathered again for the backward (FP8 on v5p-16: 2x)
    weights = tuple(constrain(w, axes, self.par) for w, axes in zip(self._weights(), DISPATCH_AXES))
    copies = None
    if hasattr(self, "copies"):  # (cast: the training step differentiates float32 views of them)
      copies = (self.copies[...], tuple(getattr(self, n)[...].astype(w.dtype) for n, w in zip(COPY_NAMES, weights)))
    return dispatch_combine(x_TxD.astype(self.dtype), idx_TxK, w_TxK, weights, DISPATCH_AXES, self.expert_fn, self.par,
                            self.routing, copies, self.keep_exchanged)


def valid_placements(rest, n_experts: int, n_ep: int, nodes: int):
  """`rest` (a model's non-parameter state) with each redundant-expert placement (`copies`, [R] or [L, R])
  made valid for a mesh of `n_ep` expert-parallel ranks in `nodes` nodes: a placement restored from a
  checkpoint of another mesh (another mesh.expert or ep_nodes) has each slot whose copy was made for
  an expert of another node marked empty (eplb.usable: nothing is routed there) until the next
  re-placement. Called where placements are restored (resume, init_from, the tools), so that no
  forward checks them."""
  fix = jax.jit(jnp.vectorize(lambda s: eplb.usable(s, n_experts, n_ep, nodes), signature="(r)->(r)"))
  holds_copies = lambda path: any(getattr(k, "key", None) == "copies" for k in path)
  return jax.tree_util.tree_map_with_path(lambda path, leaf: fix(leaf) if holds_copies(path) else leaf, rest)


def split_copies(rest):
  """(the CopyWeights of `rest`, a model's non-parameter state; the rest of it)."""
  return nnx.split_state(rest, CopyWeights, ...)


def copy_experts(model):
  """The RoutedExperts of `model` (moe_stats order) that have redundant copies."""
  return [m for m in model.moe_experts() if hasattr(m, "copies")]


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
    y, dropped, fallbacks = self.experts(x_BxSxD.reshape(b * s, d), idx_TxK, w.reshape(b * s, -1))
    y = y.reshape(b, s, d).astype(x_BxSxD.dtype)
    if self.cfg.n_shared_experts:
      y = y + self.shared_experts(x_BxSxD)
    stats = MoEStats(
        load=router_lib.expert_load(idx_TxK, valid_BxS.reshape(-1).astype(jnp.float32), self.cfg.n_routed_experts),
        balance_loss=router_lib.sequence_balance_loss(scores, idx, valid_BxS, self.cfg),
        dropped=dropped,
        fallbacks=fallbacks,
    )
    return y, stats
