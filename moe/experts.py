"""DeepSeekMoE feed-forward: shared experts + top-k routed SwiGLU experts.

  y = shared(x) + sum_k w_k expert_{i_k}(x),   expert(x) = down(silu(x gate) * (x up))

Routed experts run dropless on one device: the T*K (token, expert) assignments are sorted by
expert and fed to grouped matmuls. On GPU/TPU that is `jax.lax.ragged_dot` (`sorted_experts`).
XLA:CPU lowers ragged_dot densely (every row times every expert: E times the work), so on CPU
`blocked_experts` pads each expert's group to a multiple of `block` rows and runs one batched
matmul over blocks (at most E - 1 padding blocks; measured 10x faster than ragged_dot for the
bench-cpu layer, see docs/perf.md). `dense_experts` is the every-expert-on-every-token reference.

FP8 (`cfg.fp8`, moe/fp8.py): the same paths with FP8 GEMMs, given the float32 master weights:
`fp8_ragged_dot` in `sorted_experts`; `fp8_matmul` over the 128-row blocks in `blocked_experts`
(a block holds one expert's tokens, so Wgrad's 128x1 token tiles never mix experts).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moe import fp8 as fp8_lib
from moe import router as router_lib
from moe.config import ModelConfig
from moe.layers import MLP, dtype_of, param
from parallel import expert_parallel


class MoEStats(NamedTuple):
  """What training needs from one MoE layer."""

  load: jax.Array  # [E] tokens routed to each expert (padding excluded)
  balance_loss: jax.Array  # [] V3 sequence-wise balance loss, before alpha
  dropped: jax.Array  # [] (token, expert) assignments dropped by expert-parallel capacity (int32)


def sorted_experts(x_TxD, idx_TxK, w_TxK, gate_ExDxF, up_ExDxF, down_ExFxD, fp8=None):
  """Dropless grouped-matmul experts: sort (token, k) pairs by expert, ragged_dot, unsort, combine.
  `fp8`: a moe.fp8.Recipe to run the grouped GEMMs in FP8."""
  ragged_dot = jax.lax.ragged_dot if fp8 is None else lambda a, b, s: fp8_lib.fp8_ragged_dot(a, b, s, fp8)
  t, k = idx_TxK.shape
  e = gate_ExDxF.shape[0]
  flat = idx_TxK.reshape(-1)
  order = jnp.argsort(flat, stable=True)  # [T*K] assignment ids sorted by expert
  x_sorted = x_TxD[order // k]
  sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
  h = jax.nn.silu(ragged_dot(x_sorted, gate_ExDxF, sizes)) * ragged_dot(x_sorted, up_ExDxF, sizes)
  y_sorted = ragged_dot(h, down_ExFxD, sizes)
  y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(t, k, -1)
  return jnp.einsum("tkd,tk->td", y, w_TxK.astype(y.dtype))


# Expert capacities (multiples of the mean T*K/E rows) tried in turn by `blocked_experts` before its
# worst-case layout. bench-cpu's routers at initialisation have their largest expert at 1.2-1.6x the
# mean (random tokens); the tiny run on text has 2.6-3.8x at step 10, where the worst-case layout runs.
CAPACITY_TIERS = (1.25, 1.5, 2.0)


@jax.custom_vjp
def take_rows(x_NxD, idx_M, inv_N):
  """x[idx] with zero rows where idx is out of range; each row of x is taken at most once and inv is
  the inverse map (out of range for rows not taken), so the gradient is a gather too: XLA:CPU runs
  the scatter-add that autodiff would make one row at a time."""
  return jnp.take(x_NxD, idx_M, axis=0, mode="fill", fill_value=0)


def _take_rows_fwd(x_NxD, idx_M, inv_N):
  return take_rows(x_NxD, idx_M, inv_N), (idx_M, inv_N)


def _take_rows_bwd(res, g_MxD):
  idx_M, inv_N = res
  return jnp.take(g_MxD, inv_N, axis=0, mode="fill", fill_value=0), None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def _slots(idx_TxK, e: int, block: int, cap_blocks: int | None):
  """Where each (token, k) assignment goes in a block-padded, expert-sorted row layout.

  cap_blocks None: each expert's rows rounded up to whole blocks, n/block + E blocks (the static
  bound); owner_B: the expert of each block. Else every expert gets exactly cap_blocks blocks
  (the caller checks that every group fits). An assignment to expert E is no assignment (an empty
  row of expert-parallel buffers): it gets no slot. Returns (slot_of_assignment [N] (out of range:
  none), assignment_of_slot [B*block] (N = empty slot), owner_B)."""
  n = idx_TxK.size
  flat = idx_TxK.reshape(-1)
  order = jnp.argsort(flat, stable=True)  # assignments sorted by expert, the empty ones (E) last
  expert_sorted = flat[order]
  sizes = jnp.bincount(flat, length=e + 1)
  rank = jnp.arange(n) - (jnp.cumsum(sizes) - sizes)[expert_sorted]  # position within its expert
  sizes = sizes[:e]
  if cap_blocks is None:
    padded = (sizes + block - 1) // block * block
    n_blocks = -(-n // block) + e
    slot = jnp.where(expert_sorted < e, (jnp.cumsum(padded) - padded)[expert_sorted] + rank, n_blocks * block)
    owner = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(n_blocks) * block, side="right")
    owner = jnp.minimum(owner, e - 1)  # trailing all-padding blocks: any expert, rows are zero
  else:
    slot = expert_sorted * (cap_blocks * block) + rank
    n_blocks = e * cap_blocks
    owner = jnp.arange(n_blocks) // cap_blocks
  slot = slot.astype(jnp.int32)
  slot_of_assignment = jnp.zeros(n, jnp.int32).at[order].set(slot)
  assignment_of_slot = jnp.full(n_blocks * block, n, jnp.int32).at[slot].set(order.astype(jnp.int32))
  return slot_of_assignment, assignment_of_slot, owner


def blocked_experts(x_TxD, idx_TxK, w_TxK, gate_ExDxF, up_ExDxF, down_ExFxD, block: int = 128, fp8=None,
                    tiers=CAPACITY_TIERS):
  """Dropless grouped matmul as a batched matmul over expert-sorted, block-padded rows (the CPU
  path; same result as sorted_experts). `fp8`: a moe.fp8.Recipe to run the batched GEMMs in FP8.
  idx == E (the number of experts) marks an empty assignment: output 0, no room taken.

  If every expert's rows fit in the first capacity tier that holds them (tier * T*K/E rows, whole
  blocks), the rows form [E, C, D] and each expert is one matmul with its weights as stored.
  Otherwise (a badly unbalanced router) the worst-case layout: T*K/block + E blocks, each expert
  padded to whole blocks, each block's weights picked by a one-hot matmul. The layout is chosen at
  run time (lax.switch) and no assignment is ever dropped. The backward pass recomputes the
  forward inside the chosen branch (custom_vjp): differentiating the switch directly would make
  every branch write the residuals of all the others.
  """
  return _blocked(block, fp8, tuple(tiers), idx_TxK, x_TxD, w_TxK, gate_ExDxF, up_ExDxF, down_ExFxD)


def _blocked_branches(block, fp8, tiers, idx_TxK, e):
  """(branch index, one function (x, w, gate, up, down) -> y per layout)."""
  bmm = (lambda a, b: jnp.einsum("nij,njk->nik", a, b)) if fp8 is None else lambda a, b: fp8_lib.fp8_matmul(a, b, fp8)
  t, k = idx_TxK.shape
  n = t * k
  caps = []  # blocks per expert of each tier, up to one that holds any routing (all n rows)
  for f in sorted(tiers):
    c = max(1, math.ceil(f * n / (e * block)))
    if c not in caps:
      caps.append(c)
    if c * block >= n:
      break

  def layout(cap_blocks):
    def f(x_TxD, w_TxK, gate, up, down):
      d = x_TxD.shape[1]
      slot_of, assignment_of, owner_B = _slots(idx_TxK, e, block, cap_blocks)
      x_NxD = jnp.repeat(x_TxD, k, axis=0)  # row t*k + j: token t for its j-th expert
      rows = block if cap_blocks is None else cap_blocks * block
      x_GxRxD = take_rows(x_NxD, assignment_of, slot_of).reshape(-1, rows, d)
      if cap_blocks is None:
        one_hot_GxE = jax.nn.one_hot(owner_B, e, dtype=gate.dtype)
        gate, up, down = (jnp.einsum("ge,e...->g...", one_hot_GxE, p) for p in (gate, up, down))
      h = jax.nn.silu(bmm(x_GxRxD, gate)) * bmm(x_GxRxD, up)
      y_NxD = take_rows(bmm(h, down).reshape(-1, d), slot_of, assignment_of)
      return jnp.einsum("tkd,tk->td", y_NxD.reshape(t, k, d), w_TxK.astype(y_NxD.dtype))
    return f

  largest = jnp.bincount(idx_TxK.reshape(-1), length=e).max()
  branch = sum((largest > c * block).astype(jnp.int32) for c in caps)
  fallback = [] if caps and caps[-1] * block >= n else [layout(None)]
  return branch, [layout(c) for c in caps] + fallback


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _blocked(block, fp8, tiers, idx_TxK, *args):
  branch, fns = _blocked_branches(block, fp8, tiers, idx_TxK, args[2].shape[0])
  return jax.lax.switch(branch, fns, *args)


def _blocked_fwd(block, fp8, tiers, idx_TxK, *args):
  return _blocked(block, fp8, tiers, idx_TxK, *args), (idx_TxK, args)


def _blocked_bwd(block, fp8, tiers, res, g_TxD):
  idx_TxK, args = res
  branch, fns = _blocked_branches(block, fp8, tiers, idx_TxK, args[2].shape[0])
  vjps = [lambda g, *a, fn=fn: jax.vjp(fn, *a)[1](g) for fn in fns]
  return (None, *jax.lax.switch(branch, vjps, g_TxD, *args))


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def grouped_experts(*args, fp8=None):
  """The dropless single-device path for this backend (see module docstring)."""
  return (blocked_experts if jax.default_backend() == "cpu" else sorted_experts)(*args, fp8=fp8)


def dense_experts(x_TxD, idx_TxK, w_TxK, gate_ExDxF, up_ExDxF, down_ExFxD):
  """Reference: every expert on every token, weighted by the (mostly zero) routing matrix."""
  e = gate_ExDxF.shape[0]
  w_TxE = (jax.nn.one_hot(idx_TxK, e, dtype=jnp.float32) * w_TxK[..., None]).sum(1)
  h = jax.nn.silu(jnp.einsum("td,edf->tef", x_TxD, gate_ExDxF)) * jnp.einsum("td,edf->tef", x_TxD, up_ExDxF)
  y = jnp.einsum("tef,efd->ted", h, down_ExFxD)
  return jnp.einsum("ted,te->td", y, w_TxE.astype(y.dtype))


class RoutedExperts(nnx.Module):
  """n_routed_experts SwiGLU experts stored stacked: gate/up [E, D, F], down [E, F, D]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    self.dtype = dtype_of(cfg.dtype)
    self.fp8 = fp8_lib.Recipe.of(cfg) if cfg.fp8 else None
    self.gate_proj = param(rngs, (e, d, f), ("expert", "embed", "moe_mlp"), cfg)
    self.up_proj = param(rngs, (e, d, f), ("expert", "embed", "moe_mlp"), cfg)
    self.down_proj = param(rngs, (e, f, d), ("expert", "moe_mlp", "embed"), cfg)

  def weights(self):
    return tuple(p[...].astype(self.dtype) for p in (self.gate_proj, self.up_proj, self.down_proj))

  def __call__(self, x_TxD, idx_TxK, w_TxK):
    if self.fp8 is not None:  # FP8: the float32 master weights go in (float32 weight gradients)
      masters = (self.gate_proj[...], self.up_proj[...], self.down_proj[...])
      return grouped_experts(x_TxD.astype(self.dtype), idx_TxK, w_TxK, *masters, fp8=self.fp8)
    return grouped_experts(x_TxD.astype(self.dtype), idx_TxK, w_TxK, *self.weights())


class MoE(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.gate = router_lib.Router(cfg, rngs=rngs)
    self.experts = RoutedExperts(cfg, rngs=rngs)
    if cfg.n_shared_experts:
      self.shared_experts = MLP(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts, rngs=rngs, axis_name="moe_mlp")

  def __call__(self, x_BxSxD, valid_BxS):
    b, s, d = x_BxSxD.shape
    w, idx, scores = self.gate(x_BxSxD)
    x_TxD, idx_TxK, w_TxK = x_BxSxD.reshape(b * s, d), idx.reshape(b * s, -1), w.reshape(b * s, -1)
    # With a multi-device mesh current (the trainer sets it), parallel/expert_parallel.py runs the
    # routed experts in shard_map (tokens exchanged with the ranks owning their experts).
    dispatch = expert_parallel.dispatcher(self.cfg.n_routed_experts)
    if dispatch is None:
      y, dropped = self.experts(x_TxD, idx_TxK, w_TxK), jnp.zeros((), jnp.int32)
    else:
      fp8 = self.experts.fp8  # FP8 takes the float32 master weights, as RoutedExperts does
      weights = self.experts.weights() if fp8 is None else (
          self.experts.gate_proj[...], self.experts.up_proj[...], self.experts.down_proj[...])
      y, dropped = dispatch(x_TxD.astype(self.experts.dtype), idx_TxK, w_TxK, *weights, fp8=fp8)
    y = y.reshape(b, s, d).astype(x_BxSxD.dtype)
    if self.cfg.n_shared_experts:
      y = y + self.shared_experts(x_BxSxD)
    stats = MoEStats(
        load=router_lib.expert_load(idx.reshape(b * s, -1), valid_BxS.reshape(-1).astype(jnp.float32),
                                    self.cfg.n_routed_experts),
        balance_loss=router_lib.sequence_balance_loss(scores, idx, valid_BxS, self.cfg),
        dropped=dropped,
    )
    return y, stats
