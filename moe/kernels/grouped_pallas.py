"""The routed experts' grouped matmul as Pallas (Triton) kernels for CUDA GPUs, in the rows' dtype.

XLA:GPU rewrites `jax.lax.ragged_dot` into a dense matmul: the rows [M, K] are masked into a
[M, E, K] copy, one per group, and multiplied by all E groups' weights at once (E times the FLOPs,
and for DeepSeek-V3 with 16 local experts a 14 GiB buffer per exchange chunk; measured in the
compiled program, tests/test_aot.py::test_experts_on_gpu_run_only_their_rows). These kernels visit
only the tiles that hold a group's rows:

  gmm   y [M, N] = x [M, K] @ w[g] (or w[g]^T) for the rows of group g: one program per
        (128-row tile, group) pair that shares a row (at most M/128 + E of them) and 128 columns,
        looping over K; a tile that two groups share is computed once per group, each storing its
        own rows. Rows past every group are left unwritten (undefined; ragged_dot's are 0): zeroing
        them would be a pass over the whole buffer, and the experts' callers never read them
        (moe/kernels/expert_ffn.py).
  tgmm  dw [E, K, N] = x_g^T @ dy_g: one program per (group, 128 x 128 output block), looping over
        the group's row tiles only.

`grouped_matmul(x, w, sizes)` is gmm with its gradients: gmm against w^T for the rows, tgmm for the
weights. `interpret=True` runs them in the Pallas interpreter (the tests on CPU); the FP8 kernels of
moe/kernels/fp8_pallas.py share the work items. Tile sizes are first choices, not tuned.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

TILE = 128  # rows per program, and the FP8 kernels' K step and scale tile
BLOCK_N = 128  # output columns per program
BLOCK_K = 64  # the contraction step of the bf16 kernels
PARAMS = plgpu.CompilerParams(num_warps=8, num_stages=3)


def pad_to(x, axis: int, multiple: int):
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def bounds(group_sizes):
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  return ends - group_sizes.astype(jnp.int32), ends  # [E] first row, [E] one past the last row


def work_items(group_sizes, m_tiles: int):
  """(group, row tile, first row, end row) per program of a grouped matmul: every (tile, group) pair
  that shares a row; at most m_tiles + E - 1 of them, padded to m_tiles + E with empty items."""
  e = group_sizes.shape[0]
  starts, ends = bounds(group_sizes)
  first = starts // TILE
  count = jnp.where(group_sizes > 0, (ends - 1) // TILE - first + 1, 0)
  count_end = jnp.cumsum(count)
  w = jnp.arange(m_tiles + e)
  g = jnp.minimum(jnp.searchsorted(count_end, w, side="right"), e - 1)
  valid = w < count_end[-1]
  tile = jnp.where(valid, first[g] + w - (count_end - count)[g], 0)
  return (g.astype(jnp.int32), tile.astype(jnp.int32), jnp.where(valid, starts[g], 0).astype(jnp.int32),
          jnp.where(valid, ends[g], 0).astype(jnp.int32))


def rows_call(kernel, group_sizes, operands, mp: int, np_: int, dtype, name: str, interpret: bool,
              block_n: int = BLOCK_N, params=PARAMS, zero_rest: bool = True):
  """[mp, np_] from `kernel(work items..., operands..., out)`: one program per work item (a 128-row tile
  and a group sharing a row; `work_items`) and `block_n` output columns, each ref whole (the kernel
  indexes them itself). No program stores the rows past every group: `zero_rest` sets them to 0 (a
  pass over the whole output), else they are left undefined."""
  items = work_items(group_sizes, mp // TILE)
  args = (*items, *operands)
  full = lambda a: pl.BlockSpec(a.shape, lambda i, j: (0,) * a.ndim)
  y = pl.pallas_call(
      kernel,
      grid=(items[0].shape[0], np_ // block_n),
      in_specs=[full(a) for a in args],
      out_specs=pl.BlockSpec((mp, np_), lambda i, j: (0, 0)),
      out_shape=jax.ShapeDtypeStruct((mp, np_), dtype),
      compiler_params=params, interpret=interpret, name=name,
  )(*args)
  return jnp.where((jnp.arange(mp) < group_sizes.sum())[:, None], y, jnp.zeros((), dtype)) if zero_rest else y


def _precision(dtype):
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None  # float32: no TF32 (the tests' exactness)


def _dot(a, b, a_contract: int, b_contract: int, precision):
  """[.., ..] float32: a 2-D product contracting a's and b's given axes (what pl.dot did; removed in jax 0.12)."""
  return lax.dot_general(a, b, (((a_contract,), (b_contract,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _gmm_kernel(g_ref, t_ref, lo_ref, hi_ref, x_ref, w_ref, o_ref, *, transpose_w: bool):
  # x_ref [Mp, Kp], w_ref [E, Kp, Np] (transpose_w: [E, Np, Kp]), o_ref [Mp, Np]; program (item, column block)
  item, j = pl.program_id(0), pl.program_id(1)
  g, t, lo, hi = g_ref[item], t_ref[item], lo_ref[item], hi_ref[item]
  rows, cols = pl.ds(t * TILE, TILE), pl.ds(j * BLOCK_N, BLOCK_N)
  precision = _precision(x_ref.dtype)

  def step(k, acc):
    ks = pl.ds(k * BLOCK_K, BLOCK_K)
    w = w_ref[g, cols, ks] if transpose_w else w_ref[g, ks, cols]
    return acc + _dot(x_ref[rows, ks], w, 1, 1 if transpose_w else 0, precision)

  acc = lax.fori_loop(0, x_ref.shape[1] // BLOCK_K, step, jnp.zeros((TILE, BLOCK_N), jnp.float32))
  r = t * TILE + lax.broadcasted_iota(jnp.int32, (TILE, 1), 0)
  plgpu.store(o_ref.at[rows, cols], acc.astype(o_ref.dtype), mask=(r >= lo) & (r < hi))


@functools.partial(jax.jit, static_argnames=("transpose_w", "interpret"))
def gmm(x, w, group_sizes, transpose_w: bool = False, interpret: bool = False):
  """[M, N] in x's dtype: row r of x (groups of rows in order, `group_sizes` [E]) times w[group of r],
  w [E, K, N] (transpose_w: [E, N, K], times its transpose)."""
  m = x.shape[0]
  n = w.shape[1] if transpose_w else w.shape[2]
  x = pad_to(pad_to(x, 0, TILE), 1, BLOCK_K)
  w = pad_to(pad_to(w, 2 if transpose_w else 1, BLOCK_K), 1 if transpose_w else 2, BLOCK_N)
  w = w.astype(x.dtype)
  mp, np_ = x.shape[0], w.shape[1] if transpose_w else w.shape[2]
  y = rows_call(functools.partial(_gmm_kernel, transpose_w=transpose_w), group_sizes, (x, w), mp, np_, x.dtype,
                "grouped_gmm", interpret, zero_rest=False)
  return y[:m, :n]


def _tgmm_kernel(lo_ref, hi_ref, x_ref, dy_ref, o_ref):
  # x_ref [Mp, Kp], dy_ref [Mp, Np], o_ref [E, Kp, Np] float32; program (group, K block, N block)
  g, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  lo, hi = lo_ref[g], hi_ref[g]
  kcols, ncols = pl.ds(i * TILE, TILE), pl.ds(j * BLOCK_N, BLOCK_N)
  precision = _precision(x_ref.dtype)

  def step(t, acc):  # one 128-row tile of group g's rows, the other groups' rows masked out
    r = t * TILE + lax.broadcasted_iota(jnp.int32, (TILE, 1), 0)
    inside = (r >= lo) & (r < hi)
    x = jnp.where(inside, x_ref[pl.ds(t * TILE, TILE), kcols], 0)
    dy = jnp.where(inside, dy_ref[pl.ds(t * TILE, TILE), ncols], 0)
    return acc + _dot(x, dy, 0, 0, precision)

  acc = lax.fori_loop(lo // TILE, (hi + TILE - 1) // TILE, step, jnp.zeros((TILE, BLOCK_N), jnp.float32))
  o_ref[g, kcols, ncols] = acc


@functools.partial(jax.jit, static_argnames=("interpret",))
def tgmm(x, dy, group_sizes, interpret: bool = False):
  """float32 [E, K, N]: dw[g] = x_g^T @ dy_g over the rows of group g, x [M, K] and dy [M, N]
  (0 for a group without rows)."""
  e, k, n = group_sizes.shape[0], x.shape[1], dy.shape[1]
  x = pad_to(pad_to(x, 0, TILE), 1, TILE)
  dy = pad_to(pad_to(dy, 0, TILE), 1, BLOCK_N)
  starts, ends = bounds(group_sizes)
  full = lambda a: pl.BlockSpec(a.shape, lambda g, i, j: (0,) * a.ndim)
  args = (starts, ends, x, dy)
  out = pl.pallas_call(
      _tgmm_kernel,
      grid=(e, x.shape[1] // TILE, dy.shape[1] // BLOCK_N),
      in_specs=[full(a) for a in args],
      out_specs=pl.BlockSpec((e, x.shape[1], dy.shape[1]), lambda g, i, j: (0, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((e, x.shape[1], dy.shape[1]), jnp.float32),
      compiler_params=PARAMS, interpret=interpret, name="grouped_tgmm",
  )(*args)
  return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def grouped_matmul(x_MxK, w_ExKxN, sizes_E, interpret: bool = False):
  """ragged_dot(x, w, sizes) as gmm, with gmm (against w^T) and tgmm as its gradients."""
  return gmm(x_MxK, w_ExKxN, sizes_E, interpret=interpret)


def _fwd(x, w, sizes, interpret):
  return gmm(x, w, sizes, interpret=interpret), (x, w, sizes)


def _bwd(interpret, res, dy):
  x, w, sizes = res
  dx = gmm(dy.astype(x.dtype), w, sizes, transpose_w=True, interpret=interpret)
  dw = tgmm(x, dy.astype(x.dtype), sizes, interpret=interpret).astype(w.dtype)
  return dx, dw, None


grouped_matmul.defvjp(_fwd, _bwd)
