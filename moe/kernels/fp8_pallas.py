"""Pallas (Triton) kernels for the native FP8 GEMMs of moe/kernels/fp8.py on CUDA GPUs with FP8 tensor cores.

The scaled GEMM of moe/kernels/fp8.py, y = sum over 128-chunks c of K: (q_a[:, c] @ q_b[c, :]) * s_a[:, c] * s_b[c, :],
as DeepGEMM computes it: each output tile loops over K in steps of 128, one FP8 tensor-core dot per
step into a fresh float32 accumulator, scaled and added to the tile's float32 sum in registers (the
paper's promotion every N_C = 128 elements; nothing per-chunk goes to memory).

  blockscaled_matmul  a [M, K] @ b [K, N], scales [M, K/128] and [K/128, N]   (the linears' three GEMMs)
  grouped_matmul      x [M, K] @ w[g] for rows of group g (expert-sorted, ragged) (experts' Fprop, Dgrad)
  grouped_wgrad       dW[g] = x_g^T dy_g, x and dy quantised inside the kernel per 128 rows x 1
                      column of one group (moe.kernels.fp8.token_tile_segments' tiles)     (experts' Wgrad)

Shapes: operands come from `moe.kernels.quant.quantize` (K zero-padded to 128); other dimensions are padded
here to whole output tiles when needed and sliced off. `interpret=True` runs the kernels with the
Pallas interpreter (any backend): the tests check them on CPU against moe/kernels/fp8.py and NumPy, and
lower them for CUDA (Triton IR) without a GPU. Tile sizes and warps are first choices, not tuned.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import mlir
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from moe.kernels.grouped_pallas import bounds, pad_to, rows_call
from moe.kernels.quant import E4M3, E4M3_MAX, TILE, tile_scale  # TILE: the K step and the grouped row tile

log = logging.getLogger(__name__)
BLOCK_N = 128  # output columns per program (a multiple of TILE: one weight block scale per step)
PARAMS = plgpu.CompilerParams(num_warps=8, num_stages=3)


# --------------------------------------------------------------------------- the FP8 dot
# Pallas' Triton lowering of dot_general leaves tt.dot's maxNumImpreciseAcc unset (0: exact float32
# accumulation), and Triton then runs FP8 dots on Hopper as f16 MMAv2 with upcast operands instead of
# FP8 wgmma (checked by compiling the kernels' Triton IR for sm_90 with Triton 3.9: mma.sync f16
# without the attribute, wgmma ...e4m3.e4m3 with it). These dots are 128 deep and promoted to the
# float32 sum right after (the recipe's N_C = 128), so the tensor cores may accumulate them in their
# own precision: `fp8_dot` is a dot_general whose Triton lowering says maxNumImpreciseAcc = 128.
# (Triton's own frontend sets 2^30 for FP8 dots on Hopper.) Elsewhere (the interpreter) it is a dot.
fp8_dot_p = Primitive("fp8_dot")


def _fp8_dot_impl(a, b, *, contract):
  return lax.dot_general(a, b, ((contract, (0,)), ((), ())), preferred_element_type=jnp.float32)


fp8_dot_p.def_impl(_fp8_dot_impl)
fp8_dot_p.def_abstract_eval(lambda a, b, *, contract: jax.core.ShapedArray(
    (a.shape[1 - contract[0]], b.shape[1]), jnp.float32))
mlir.register_lowering(fp8_dot_p, mlir.lower_fun(_fp8_dot_impl, multiple_results=False))


def _register_triton_rule() -> bool:
  try:  # a private table: a JAX without it keeps the plain dot (correct, MMAv2 on Hopper)
    from jax._src.pallas.triton import lowering as triton_lowering
  except ImportError as e:
    log.warning("fp8: no Pallas Triton lowering table (%s); FP8 kernel dots use Pallas' dot_general", e)
    return False

  def rule(ctx, a, b, *, contract):
    out = triton_lowering._dot_general_lowering(
        ctx, a, b, dimension_numbers=((contract, (0,)), ((), ())), out_sharding=None, precision=None,
        preferred_element_type=jnp.float32)
    if out.owner.name == "tt.dot":
      i32 = mlir.ir.IntegerType.get_signless(32)
      out.owner.attributes["maxNumImpreciseAcc"] = mlir.ir.IntegerAttr.get(i32, TILE)
    return out

  triton_lowering.triton_lowering_rules[fp8_dot_p] = rule
  return True


_HAS_TRITON_RULE = _register_triton_rule()


def fp8_dot(a, b, contract: tuple[int] = (1,)):
  """float32 a @ b (contract=(1,)) or a^T @ b (contract=(0,)) of float8 tiles inside a kernel."""
  if _HAS_TRITON_RULE:
    return fp8_dot_p.bind(a, b, contract=contract)
  return _fp8_dot_impl(a, b, contract=contract)


# --------------------------------------------------------------------------- dense
def _blockscaled_kernel(a_ref, b_ref, sa_ref, sb_ref, o_ref):
  # a_ref [BM, K] e4m3, b_ref [K, BN] e4m3, sa_ref [BM, K/128], sb_ref [K/128, BN], o_ref [BM, BN]
  def step(k, acc):
    p = fp8_dot(a_ref[:, pl.ds(k * TILE, TILE)], b_ref[pl.ds(k * TILE, TILE), :])  # 128 deep, promoted here
    return acc + p * sa_ref[:, pl.ds(k, 1)] * sb_ref[pl.ds(k, 1), :]

  acc = lax.fori_loop(0, sa_ref.shape[1], step, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def blockscaled_matmul(a, b, sa, sb, interpret: bool = False):
  """float32 [M, N] = (a * sa) @ (b * sb): a [M, K], b [K, N] float8_e4m3fn with K a multiple of 128,
  sa [M, K/128] (one scale per row and 128 of K), sb [K/128, N] (one per 128 of K and column)."""
  m, n, kt = a.shape[0], b.shape[1], sa.shape[1]
  assert a.shape[1] == b.shape[0] == kt * TILE and sb.shape == (kt, n), (a.shape, b.shape, sa.shape, sb.shape)
  bm = TILE
  a, sa = pad_to(a, 0, bm), pad_to(sa, 0, bm)
  b, sb = pad_to(b, 1, BLOCK_N), pad_to(sb, 1, BLOCK_N)
  mp, np_, kp = a.shape[0], b.shape[1], a.shape[1]
  y = pl.pallas_call(
      _blockscaled_kernel,
      grid=(mp // bm, np_ // BLOCK_N),
      in_specs=[pl.BlockSpec((bm, kp), lambda i, j: (i, 0)), pl.BlockSpec((kp, BLOCK_N), lambda i, j: (0, j)),
                pl.BlockSpec((bm, kt), lambda i, j: (i, 0)), pl.BlockSpec((kt, BLOCK_N), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((bm, BLOCK_N), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((mp, np_), jnp.float32),
      compiler_params=PARAMS, interpret=interpret, name="fp8_blockscaled_matmul",
  )(a, b, sa.astype(jnp.float32), sb.astype(jnp.float32))
  return y[:m, :n]


# --------------------------------------------------------------------------- grouped (experts)
def _grouped_kernel(g_ref, t_ref, lo_ref, hi_ref, x_ref, sx_ref, w_ref, sw_ref, o_ref):
  # x_ref [Mp, K] e4m3, sx_ref [Mp, K/128], w_ref [E, K, N] e4m3, sw_ref [E, K/128, N/128], o_ref [Mp, N]
  item, j = pl.program_id(0), pl.program_id(1)
  g, t, lo, hi = g_ref[item], t_ref[item], lo_ref[item], hi_ref[item]
  rows = pl.ds(t * TILE, TILE)
  cols = pl.ds(j * BLOCK_N, BLOCK_N)

  def step(k, acc):
    p = fp8_dot(x_ref[rows, pl.ds(k * TILE, TILE)], w_ref[g, pl.ds(k * TILE, TILE), cols])
    sw = sw_ref[g, pl.ds(k, 1), pl.ds(j * (BLOCK_N // TILE), 1)]  # [1, 1]: one 128x128 weight block
    return acc + p * sx_ref[rows, pl.ds(k, 1)] * sw

  acc = lax.fori_loop(0, sx_ref.shape[1], step, jnp.zeros((TILE, BLOCK_N), jnp.float32))
  r = t * TILE + lax.broadcasted_iota(jnp.int32, (TILE, 1), 0)
  plgpu.store(o_ref.at[rows, cols], acc.astype(o_ref.dtype), mask=(r >= lo) & (r < hi))


@functools.partial(jax.jit, static_argnames=("interpret",))
def grouped_matmul(x, sx, w, sw, group_sizes, interpret: bool = False):
  """float32 [M, N]: row r of x (groups of rows in order, `group_sizes` [E]) times w[group of r].

  x [M, K] e4m3 with sx [M, K/128] (1x128 tiles); w [E, K, N] e4m3 with sw [E, K/128, N/128]
  (128x128 blocks; N a multiple of 128). Rows past sum(group_sizes) come out 0, as ragged_dot's."""
  m, n, e = x.shape[0], w.shape[2], w.shape[0]
  assert n % BLOCK_N == 0 and sw.shape == (e, sx.shape[1], n // TILE), (w.shape, sw.shape, sx.shape)
  x, sx = pad_to(x, 0, TILE), pad_to(sx, 0, TILE)
  y = rows_call(_grouped_kernel, group_sizes, (x, sx.astype(jnp.float32), w, sw.astype(jnp.float32)), x.shape[0],
                n, jnp.float32, "fp8_grouped_matmul", interpret, block_n=BLOCK_N, params=PARAMS)
  return y[:m]


def _quantize_columns(v, pow2: bool):
  """v [128, C] float32 -> (e4m3 [128, C], scale [1, C]): one scale per column (128x1 tiles)."""
  s = tile_scale(jnp.max(jnp.abs(v), axis=0, keepdims=True), pow2)
  return jnp.clip(v / s, -E4M3_MAX, E4M3_MAX).astype(E4M3), s


def _wgrad_kernel(lo_ref, hi_ref, x_ref, dy_ref, o_ref, *, pow2: bool):
  # x_ref [Mp, D], dy_ref [Mp, F] (bf16/f32), o_ref [E, D, F] float32; program (g, i, j)
  g, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  lo, hi = lo_ref[g], hi_ref[g]
  dcols, fcols = pl.ds(i * TILE, TILE), pl.ds(j * BLOCK_N, BLOCK_N)

  def step(t, acc):  # one 128-row tile of group g's rows: the tokens of one 128x1 scale tile
    r = t * TILE + lax.broadcasted_iota(jnp.int32, (TILE, 1), 0)
    inside = (r >= lo) & (r < hi)
    qx, sx = _quantize_columns(jnp.where(inside, x_ref[pl.ds(t * TILE, TILE), dcols].astype(jnp.float32), 0.0), pow2)
    qd, sd = _quantize_columns(jnp.where(inside, dy_ref[pl.ds(t * TILE, TILE), fcols].astype(jnp.float32), 0.0), pow2)
    p = fp8_dot(qx, qd, contract=(0,))  # x^T dy: [D_t, F_t]
    return acc + p * sx.T * sd

  acc = lax.fori_loop(lo // TILE, (hi + TILE - 1) // TILE, step, jnp.zeros((TILE, BLOCK_N), jnp.float32))
  o_ref[g, dcols, fcols] = acc


@functools.partial(jax.jit, static_argnames=("pow2", "interpret"))
def grouped_wgrad(x, dy, group_sizes, pow2: bool = False, interpret: bool = False):
  """float32 [E, D, F]: dW[g] = x_g^T @ dy_g over the rows of group g, x [M, D] and dy [M, F]
  quantised per 128-row tile x 1 column *within one group* (`moe.kernels.fp8.token_tile_segments`)."""
  e, d, f = group_sizes.shape[0], x.shape[1], dy.shape[1]
  x = pad_to(pad_to(x, 0, TILE), 1, TILE)
  dy = pad_to(pad_to(dy, 0, TILE), 1, BLOCK_N)
  starts, ends = bounds(group_sizes)
  full = lambda a: pl.BlockSpec(a.shape, lambda g, i, j: (0,) * a.ndim)
  args = (starts, ends, x, dy)
  out = pl.pallas_call(
      functools.partial(_wgrad_kernel, pow2=pow2),
      grid=(e, x.shape[1] // TILE, dy.shape[1] // BLOCK_N),
      in_specs=[full(a) for a in args],
      out_specs=pl.BlockSpec((e, x.shape[1], dy.shape[1]), lambda g, i, j: (0, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((e, x.shape[1], dy.shape[1]), jnp.float32),
      compiler_params=PARAMS, interpret=interpret, name="fp8_grouped_wgrad",
  )(*args)
  return out[:, :d, :f]
