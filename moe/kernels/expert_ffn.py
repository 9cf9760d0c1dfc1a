"""The routed experts' grouped matmul: each row's expert FFN, down(silu(x gate) * (x up)), for rows
[N, D] with expert ids [N]. An id equal to the number of experts E marks an empty row, whose output
and gradient are undefined: the Pallas kernels (megablox, triton) leave the rows past every group
unwritten, in their outputs and their gradients' (NaN in the interpreter, whatever memory held on a
chip), and masking them would cost a pass over a dropless exchange's mostly empty buffers. Callers
use only the real rows' outputs (parallel/expert_parallel/exchange.py masks the one place that
multiplies every row by its weight).
One function per implementation; `impl.experts` picks one when the model is built (moe/runtime.py).

  ragged_dot  rows sorted by expert, `jax.lax.ragged_dot` (FP8: moe.kernels.fp8.fp8_ragged_dot, the
              FP8 choice). XLA:GPU rewrites a bf16 ragged_dot into a dense matmul over a [rows,
              experts, K] masked copy (local experts times the work), and libtpu its weight gradient
  triton      rows sorted by expert, the Pallas (Triton) grouped matmul of moe/kernels/grouped_pallas.py
              (gmm, and for its gradients gmm against w^T and tgmm): the GPU choice. Elsewhere it runs
              in the Pallas interpreter (tests).
  megablox    rows sorted by expert, the Pallas TPU grouped matmul (megablox's gmm, whose backward is
              gmm for the rows and tgmm for the weights): the TPU choice. libtpu compiles ragged_dot's
              weight gradient to a dense matmul per local expert over every row of the buffer (local
              experts x buffer rows / routed rows times the work: 256x for V3 with expert=8); tgmm
              visits only the tiles that hold a group's rows. Elsewhere it runs in the Pallas
              interpreter (tests).
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


@jax.custom_vjp
def _permute(x_NxD, perm_N, inverse_N):
  """x[perm] for a permutation perm of the rows (inverse = argsort(perm)); its gradient is the inverse
  permutation, a gather too, not the scatter-add JAX writes for a gather's transpose (over a dropless
  exchange's worst-case buffer, V3's largest memory-bound kernels)."""
  return x_NxD[perm_N]


_permute.defvjp(lambda x, perm, inverse: (x[perm], (perm, inverse)),
                lambda res, ct: (ct[res[1]], None, None))


def _sorted_ffn(x_NxD, expert_N, gate_ExDxF, up_ExDxF, down_ExFxD, grouped_matmul, rows_multiple=1):
  """Rows sorted by expert (the empty ones last, past every group; then zero rows up to a multiple of
  `rows_multiple`), the FFN's three grouped matmuls grouped_matmul(rows, [E, K, N], sizes [E]),
  unsorted."""
  e, n = gate_ExDxF.shape[0], x_NxD.shape[0]
  order = jnp.argsort(expert_N, stable=True)
  inverse = jnp.argsort(order)
  sizes = jnp.bincount(expert_N, length=e + 1)[:e].astype(jnp.int32)
  x_sorted = jnp.pad(_permute(x_NxD, order, inverse), ((0, -n % rows_multiple), (0, 0)))
  h = jax.nn.silu(grouped_matmul(x_sorted, gate_ExDxF, sizes)) * grouped_matmul(x_sorted, up_ExDxF, sizes)
  y_sorted = grouped_matmul(h, down_ExFxD, sizes)[:n]
  return _permute(y_sorted, inverse, order)


def ragged_ffn(x_NxD, expert_N, gate_ExDxF, up_ExDxF, down_ExFxD, fp8=None):
  """Three ragged_dots over the rows sorted by expert."""
  if fp8 is None:
    ragged_dot = jax.lax.ragged_dot
  else:
    ragged_dot = lambda a, b, sizes: fp8_lib.fp8_ragged_dot(a, b, sizes, fp8)
  return _sorted_ffn(x_NxD, expert_N, gate_ExDxF, up_ExDxF, down_ExFxD, ragged_dot)


def _tile(size: int, largest: int) -> int:
  """A TPU block for a dimension: the largest multiple of 128 up to `largest` that divides it, else the
  whole dimension (Mosaic's blocks are multiples of 128 lanes or the whole array)."""
  return next((t for t in (1024, 512, 256, 128) if t <= largest and size % t == 0), size)


def megablox_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
  """(rows, contraction, output) tiles for megablox: MaxText's defaults (512, 1024, 1024) where they
  divide. Called by the kernel for each of its problems (the backward's gmm and tgmm swap k and n)."""
  return _tile(m, 512), _tile(k, 1024), _tile(n, 1024)


def megablox_ffn(x_NxD, expert_N, gate_ExDxF, up_ExDxF, down_ExFxD, fp8=None, interpret: bool = False):
  """Three megablox grouped matmuls over the rows sorted by expert (zero rows up to a multiple of 512,
  or 128 for fewer: past every group, so no tile computes them), in the rows' dtype."""
  from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

  if fp8 is not None:
    raise ValueError("impl.experts=megablox has no FP8 path: precision=fp8 takes ragged_dot (auto)")
  multiple = 512 if x_NxD.shape[0] > 512 else 128

  def gmm(a_MxK, w_ExKxN, sizes):
    return megablox.gmm(a_MxK, w_ExKxN, sizes, a_MxK.dtype, megablox_tiling, None, None, False, interpret)

  return _sorted_ffn(x_NxD, expert_N, gate_ExDxF, up_ExDxF, down_ExFxD, gmm, rows_multiple=multiple)


def triton_ffn(x_NxD, expert_N, gate_ExDxF, up_ExDxF, down_ExFxD, fp8=None, interpret: bool = False):
  """Three Pallas (Triton) grouped matmuls over the rows sorted by expert (zero rows up to a multiple of
  the kernels' 128-row tile, past every group), in the rows' dtype."""
  from moe.kernels import grouped_pallas

  if fp8 is not None:
    raise ValueError("impl.experts=triton has no FP8 path: precision=fp8 takes ragged_dot (auto)")
  gmm = lambda a_MxK, w_ExKxN, sizes: grouped_pallas.grouped_matmul(a_MxK, w_ExKxN, sizes, interpret)
  return _sorted_ffn(x_NxD, expert_N, gate_ExDxF, up_ExDxF, down_ExFxD, gmm, rows_multiple=grouped_pallas.TILE)


def dense_ffn(x_NxD, expert_N, gate_ExDxF, up_ExDxF, down_ExFxD, fp8=None):
  """Reference: every expert on every row, then each row's own (none for an empty row)."""
  if fp8 is not None:
    raise ValueError("the dense experts are the float reference: they have no FP8 path")
  e = gate_ExDxF.shape[0]
  h = jax.nn.silu(jnp.einsum("nd,edf->nef", x_NxD, gate_ExDxF)) * jnp.einsum("nd,edf->nef", x_NxD, up_ExDxF)
  y = jnp.einsum("nef,efd->ned", h, down_ExFxD)
  return jnp.einsum("ned,ne->nd", y, jax.nn.one_hot(expert_N, e, dtype=y.dtype))


EXPERTS = {"ragged_dot": ragged_ffn, "megablox": megablox_ffn, "triton": triton_ffn, "blocked": cpu.blocked_ffn,
           "dense": dense_ffn}
