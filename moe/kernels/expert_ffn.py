"""The routed experts' grouped matmul: each row's expert FFN, down(silu(x gate) * (x up)), for rows
[N, D] with expert ids [N] (an id equal to the number of experts E marks an empty row: output 0).
One function per implementation; `impl.experts` picks one when the model is built (moe/runtime.py).

  ragged_dot  rows sorted by expert, `jax.lax.ragged_dot` (FP8: moe.kernels.fp8.fp8_ragged_dot):
              GPU/TPU, dropless, no padding
  blocked     moe.kernels.cpu.blocked_ffn: block-padded batched matmul (the CPU choice; XLA:CPU
              lowers ragged_dot densely)
  dense       every expert on every row, the one-hot selection after: the reference (E times the work)

The single-device MoE layer and every expert-parallel transport call the same function
(parallel.expert_parallel.dispatch_combine takes it as `expert_fn`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe.kernels import cpu
from moe.kernels import fp8 as fp8_lib


def ragged_ffn(x_NxD, expert_N, gate_ExDxF, up_ExDxF, down_ExFxD, fp8=None):
  """Rows sorted by expert (the empty ones last, past every group), three ragged_dots, unsorted."""
  if fp8 is None:
    ragged_dot = jax.lax.ragged_dot
  else:
    ragged_dot = lambda a, b, sizes: fp8_lib.fp8_ragged_dot(a, b, sizes, fp8)
  e = gate_ExDxF.shape[0]
  order = jnp.argsort(expert_N, stable=True)
  sizes = jnp.bincount(expert_N, length=e + 1)[:e].astype(jnp.int32)
  x_sorted = x_NxD[order]
  h = jax.nn.silu(ragged_dot(x_sorted, gate_ExDxF, sizes)) * ragged_dot(x_sorted, up_ExDxF, sizes)
  y_sorted = ragged_dot(h, down_ExFxD, sizes)
  return jnp.zeros_like(y_sorted).at[order].set(y_sorted)


def dense_ffn(x_NxD, expert_N, gate_ExDxF, up_ExDxF, down_ExFxD, fp8=None):
  """Reference: every expert on every row, then each row's own (none for an empty row)."""
  if fp8 is not None:
    raise ValueError("the dense experts are the float reference: they have no FP8 path")
  e = gate_ExDxF.shape[0]
  h = jax.nn.silu(jnp.einsum("nd,edf->nef", x_NxD, gate_ExDxF)) * jnp.einsum("nd,edf->nef", x_NxD, up_ExDxF)
  y = jnp.einsum("nef,efd->ned", h, down_ExFxD)
  return jnp.einsum("ned,ne->nd", y, jax.nn.one_hot(expert_N, e, dtype=y.dtype))


EXPERTS = {"ragged_dot": ragged_ffn, "blocked": cpu.blocked_ffn, "dense": dense_ffn}
