"""The routed experts' grouped matmul: each row's expert FFN, down(silu(x gate) * (x up)), for rows
[N, D] with expert ids [N]. An id equal to the number of experts E marks an empty row, whose output
and gradient are undefined: the Pallas kernels (megablox, triton) leave the rows past every group
unwritten, in their outputs and their gradients' (NaN in the interpreter, whatever memory held on a
chip), and masking them would cost a pass over a dropless exchange's mostly empty buffers. Callers
use only the real rows' outputs (parallel/expert_parallel/exchange.py masks the one place that
multiplies every row by its weight). Rows may come sorted by expert already (`group_sizes` [E]: that
many of each from the first row, the empty ones after; the ragged exchange places them so): the
implementations that sort use them where they lie.
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
from moe.kernels import quant


@jax.custom_vjp
def _permute(x_NxD, perm_N, inverse_N):
  """x[perm] for a permutation perm of the rows (inverse = argsort(perm)); its gradient is the inverse
  permutation, a gather too, not the scatter-add JAX writes for a gather's transpose (over a dropless
  exchange's worst-case buffer, V3's largest memory-bound kernels)."""
  return x_NxD[perm_N]


_permute.defvjp(lambda x, perm, inverse: (x[perm], (perm, inverse)),
                lambda res, ct: (ct[res[1]], None, None))


def _grouped_ffn(x_NxD, sizes_E, gate_ExDxF, up_ExDxF, down_ExFxD, grouped_matmul, rows_multiple):
  """The FFN as two grouped matmuls grouped_matmul(rows, [E, K, N], sizes [E]) over rows sorted by
  expert (sizes_E of each from the first row; zero rows appended up to a multiple of `rows_multiple`
  where the rows are not one already): gate and up as one [E, D, 2F] (the rows read once, and their
  gradient one matmul rather than the sum of two), then down. Where F is not a multiple of FP8's
  128-wide tiles, gate and up stay two matmuls, so that no FP8 scale tile spans both (the FP8
  recipe's tiles are those of the blocked path, moe/kernels/cpu.py)."""
  n, f = x_NxD.shape[0], gate_ExDxF.shape[2]
  x = jnp.pad(x_NxD, ((0, -n % rows_multiple), (0, 0))) if n % rows_multiple else x_NxD
  if f % quant.TILE:
    h = jax.nn.silu(grouped_matmul(x, gate_ExDxF, sizes_E)) * grouped_matmul(x, up_ExDxF, sizes_E)
  else:
    gate_up_Nx2F = grouped_matmul(x, jnp.concatenate([gate_ExDxF, up_ExDxF], axis=2), sizes_E)
    h = jax.nn.silu(gate_up_Nx2F[:, :f]) * gate_up_Nx2F[:, f:]
  return grouped_matmul(h, down_ExFxD, sizes_E)[:n]


def _sorted_ffn(x_NxD, expert_N, gate_ExDxF, up_ExDxF, down_ExFxD, grouped_matmul, rows_multiple=1,
                group_sizes=None):
  """Rows sorted by expert (the empty ones last, past every group), the FFN's grouped matmuls,
  unsorted; rows that come sorted (`group_sizes` [E]: that many of each expert from the first row, the
  ragged exchange's) as they are."""
  if group_sizes is not None:
    return _grouped_ffn(x_NxD, group_sizes, gate_ExDxF, up_ExDxF, down_ExFxD, grouped_matmul, rows_multiple)
  e = gate_ExDxF.shape[0]
  order = jnp.argsort(expert_N, stable=True)
  inverse = jnp.argsort(order)
  sizes = jnp.bincount(expert_N, length=e + 1)[:e].astype(jnp.int32)
  y_sorted = _grouped_ffn(_permute(x_NxD, order, inverse), sizes, gate_ExDxF, up_ExDxF, down_ExFxD, grouped_matmul,
                          rows_multiple)
  return _permute(y_sorted, inverse, order)


def ragged_ffn(x_NxD, expert_N, gate_ExDxF, up_ExDxF, down_ExFxD, fp8=None, group_sizes=None):
  """ragged_dots over the rows sorted by expert (_grouped_ffn)."""
  if fp8 is None:
    ragged_dot = jax.lax.ragged_dot
  else:
    ragged_dot = lambda a, b, sizes: fp8_lib.fp8_ragged_dot(a, b, sizes, fp8)
  return _sorted_ffn(x_NxD, expert_N, gate_ExDxF, up_ExDxF, down_ExFxD, ragged_dot, group_sizes=group_sizes)


def _tile(size: int, largest: int) -> int:
  """A TPU block for a dimension: the largest multiple of 128 up to `largest` that divides it, else the
  whole dimension (Mosaic's blocks are multiples of 128 lanes or the whole array)."""
  return next((t for t in (1024, 512, 256, 128) if t <= largest and size % t == 0), size)


def megablox_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
  """(rows, contraction, output) tiles for megablox: MaxText's defaults (512, 1024, 1024) where they
  divide. Called by the kernel for each of its problems (the backward's gmm and tgmm swap k and n)."""
  return _tile(m, 512), _tile(k, 1024), _tile(n, 1024)


def megablox_ffn(x_NxD, expert_N, gate_ExDxF, up_ExDxF, down_ExFxD, fp8=None, interpret: bool = False,
                 group_sizes=None):
  """megablox grouped matmuls over the rows sorted by expert (zero rows up to a multiple of 512,
  or 128 for fewer: past every group, so no tile computes them), in the rows' dtype."""
  from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

  if fp8 is not None:
    raise ValueError("impl.experts=megablox has no FP8 path: precision=fp8 takes ragged_dot (auto)")
  multiple = 512 if x_NxD.shape[0] > 512 else 128

  def gmm(a_MxK, w_ExKxN, sizes):
    return megablox.gmm(a_MxK, w_ExKxN, sizes, a_MxK.dtype, megablox_tiling, None, None, False, interpret)

  return _sorted_ffn(x_NxD, expert_N, gate_ExDxF, up_ExDxF, down_ExFxD, gmm, multiple, group_sizes)


def triton_ffn(x_NxD, expert_N, gate_ExDxF, up_ExDxF, down_ExFxD, fp8=None, interpret: bool = False,
               group_sizes=None):
  """Pallas (Triton) grouped matmuls over the rows sorted by expert (zero rows up to a multiple of
  the kernels' 128-row tile, past every group), in the rows' dtype."""
  from moe.kernels import grouped_pallas

  if fp8 is not None:
    raise ValueError("impl.experts=triton has no FP8 path: precision=fp8 takes ragged_dot (auto)")
  gmm = lambda a_MxK, w_ExKxN, sizes: grouped_pallas.grouped_matmul(a_MxK, w_ExKxN, sizes, interpret)
  return _sorted_ffn(x_NxD, expert_N, gate_ExDxF, up_ExDxF, down_ExFxD, gmm, grouped_pallas.TILE, group_sizes)


def dense_ffn(x_NxD, expert_N, gate_ExDxF, up_ExDxF, down_ExFxD, fp8=None, group_sizes=None):
  """Reference: every expert on every row, then each row's own (none for an empty row; `group_sizes`
  unused: the rows' order does not matter here)."""
  if fp8 is not None:
    raise ValueError("the dense experts are the float reference: they have no FP8 path")
  e = gate_ExDxF.shape[0]
  h = jax.nn.silu(jnp.einsum("nd,edf->nef", x_NxD, gate_ExDxF)) * jnp.einsum("nd,edf->nef", x_NxD, up_ExDxF)
  y = jnp.einsum("nef,efd->ned", h, down_ExFxD)
  return jnp.einsum("ned,ne->nd", y, jax.nn.one_hot(expert_N, e, dtype=y.dtype))


EXPERTS = {"ragged_dot": ragged_ffn, "megablox": megablox_ffn, "triton": triton_ffn, "blocked": cpu.blocked_ffn,
           "dense": dense_ffn}
