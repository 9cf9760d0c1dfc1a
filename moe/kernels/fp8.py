"""FP8 (E4M3) GEMMs with DeepSeek-V3's fine-grained scaling (V3 report section 3.3).

Every GEMM of a linear layer - forward (Fprop), input gradient (Dgrad) and weight gradient
(Wgrad) - multiplies E4M3 operands quantised (moe/kernels/quant.py) with scales from the current
amax (online, no history), optionally rounded up to a power of two (`Recipe.pow2_scales`), per tile:

  GEMM   y = a @ b (contract K)  a's tiles                     b's tiles
  Fprop  y  = x  @ W             x:  1x128 (token x 128 of K)   W:    128x128 blocks
  Dgrad  dx = dy @ W^T           dy: 1x128 (token x 128 of N)   W^T:  the same 128x128 blocks
  Wgrad  dW = x^T @ dy           x:  128x1 (128 tokens x 1)     dy:   128x1 (128 tokens x 1)

so every scale is constant along a 128-wide stretch of the contraction axis K, and the GEMM is
  y = sum over 128-chunks c of K:  (q_a[:, c] @ q_b[c, :]) * s_a[:, c] * s_b[c, :]
with each chunk's partial product promoted to float32 (the paper's N_C = 128 promotion). Wgrad
contracts over tokens, so its operands are tiled along the token axis (128x1): 1x128 tiles of
dy would put one scale on a stretch of 128 channels, which is constant along N, not along the
contracted tokens, and the chunked sum above would not exist. Shapes that are not multiples of 128
are zero-padded to whole tiles and the padding is sliced off the result.

Three ways to run the same numerics (`Recipe.gemm`, chosen once by `resolve_recipe` from the config's
`impl.fp8_gemm` and the target devices, and logged with the model's other choices):
  kernels: the operands really are float8_e4m3fn, in the Pallas (Triton) kernels of
          moe/kernels/fp8_pallas.py: each output tile loops over K in 128-deep FP8 tensor-core dots
          whose float32 results are scaled and summed in registers (DeepGEMM's promotion), for the
          linears and for the routed experts' grouped GEMMs (Wgrad quantises its 128x1 tiles inside
          the kernel). "auto" picks it on CUDA GPUs with compute capability >= 8.9 (Ada, Hopper,
          Blackwell) once a start-up probe has run the kernels against the "xla" path; a failure
          there logs a warning and falls back to "xla". Chosen on a CPU, the kernels run in the
          Pallas interpreter (`Recipe.interpret`; slow, for tests).
  xla:    FP8 operands through XLA: one `lax.dot_general` of FP8 operands with
          `preferred_element_type=float32` per 128-chunk of K (batched over chunks), scaled and
          summed in float32. The float32 partial of every chunk goes to memory, so this is correct but
          not fast; the routed experts run qdq here (XLA has no FP8 ragged_dot). On CPU XLA upcasts:
          the tests check the numerics with it.
  qdq:    quantise -> dequantise to float32 (q * scale, exact up to float32 rounding) and one
          float32 matmul. Because every scale is constant along 128 of K this equals the chunked
          sum up to float32 summation order. "auto" on CPUs and on TPUs.
`fp8_matmul` also takes leading batch dimensions (`[n, M, K] @ [n, K, N]`), which the block-padded
CPU experts use (each 128-row block belongs to one expert, so Wgrad's 128x1 token tiles never
straddle two experts). A GEMM output that touches a tile holding NaN or Inf is NaN. Outputs are
float32-accumulated and returned in the input's dtype; the weight gradient in the weight's dtype
(float32 master weights: float32 grads).

What stays in higher precision is decided by the callers: `Linear(..., fp8=False)` for the output
head and the MTP projection; the embedding, the router (float32), the norms, the attention core and
the loss never call this module.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from moe.kernels.quant import E4M3, E4M3_MAX, TILE, QTensor, dequantize, qdq, quantize, tile_scale

log = logging.getLogger(__name__)

GemmChoice = Literal["auto", "kernels", "xla", "qdq"]
# The xla path materialises one float32 partial product per 128-chunk of K; chunks are summed in
# groups (a scan) so that those partials take at most this many bytes.
XLA_PARTIAL_BYTES = 1 << 29


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How FP8 GEMMs run: `gemm` "kernels", "xla" or "qdq" (see the module docstring; resolved, never
  "auto"); `interpret`: the kernels in the Pallas interpreter (not on a GPU); `pow2_scales`: round
  every scale up to a power of two."""

  gemm: Literal["kernels", "xla", "qdq"] = "qdq"
  pow2_scales: bool = False
  interpret: bool = False
  xla_partial_bytes: int = XLA_PARTIAL_BYTES

  def describe(self) -> str:
    linear, experts = {
        "kernels": ("Pallas FP8 kernels (float8_e4m3fn operands, 128-deep tensor-core dots promoted to"
                    " float32 in registers)" + (", in the Pallas interpreter" if self.interpret else ""),
                    "Pallas grouped FP8 kernels"),
        "xla": ("native FP8 dot_general (float8_e4m3fn operands, float32 accumulation, per-128-K chunks)",
                "quantise->dequantise + float32 grouped matmul"),
        "qdq": ("quantise->dequantise + float32 matmul (no native FP8 GEMM used)",
                "quantise->dequantise + float32 grouped matmul"),
    }[self.gemm]
    return (f"E4M3 GEMMs: linears {linear}; routed experts {experts};"
            f" scales 1x128 / 128x128 / 128x1 (Wgrad){', power-of-two' if self.pow2_scales else ''}")


# --------------------------------------------------------------------------- the choice
def is_gpu(device) -> bool:
  return device.platform in ("gpu", "cuda")


def has_fp8_tensor_cores(device) -> bool:
  """A CUDA GPU with compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
  if not is_gpu(device):
    return False
  try:
    cc = device.compute_capability
    return tuple(int(v) for v in str(cc).split(".")[:2]) >= (8, 9)
  except (AttributeError, ValueError):  # a compile-only device (jax.experimental.topologies), ROCm, ...
    return any(name in device.device_kind for name in ("H100", "H200", "H800", "H20", "B200", "B300", "L40", "L4"))


def resolve_recipe(choice: GemmChoice, devices, pow2_scales: bool = False, probe=None) -> Recipe:
  """The Recipe for `impl.fp8_gemm = choice` on the target `devices` (those the model will run or be
  compiled for). "auto": the Pallas kernels on GPUs with FP8 tensor cores (after `probe`, default
  `probe_kernels`, where the GPU is this process's), else qdq."""
  device = devices[0]
  if choice == "auto":
    if not has_fp8_tensor_cores(device):
      return Recipe("qdq", pow2_scales)
    if probe is None:  # compile-only targets (jax.experimental.topologies) cannot be probed
      probe = probe_kernels if device in jax.devices() else lambda: True
    return Recipe("kernels" if probe() else "xla", pow2_scales)
  if choice == "kernels":
    return Recipe("kernels", pow2_scales, interpret=not is_gpu(device))
  return Recipe(choice, pow2_scales)


def probe_kernels(kernels=None, interpret: bool = False) -> bool:
  """Run the Pallas kernels (`kernels`: default moe.kernels.fp8_pallas; `interpret`: in the Pallas
  interpreter) once on small problems against the xla path; a kernel that fails to compile or
  disagrees is reported (warning) and not used. Call outside any trace."""
  r = np.random.default_rng(0)
  x, w = jnp.asarray(r.normal(size=(200, 300)), jnp.float32), jnp.asarray(r.normal(size=(300, 260)), jnp.float32)
  try:  # the kernels' module is imported in here too: a JAX whose Pallas/Triton API moved falls back
    kernels = kernels or _pallas()
    xq, wq = quantize(x, (1, TILE)), quantize(w, (TILE, TILE))
    errs = [_rel_err(_kernel_matmul(xq, wq, interpret, kernels), _xla_matmul(xq, wq))]
    we, sizes = jnp.stack([w, -w, 2 * w]), jnp.asarray([90, 0, 70], jnp.int32)
    y = _kernel_grouped(quantize(x[:180], (1, TILE)), quantize(we, (TILE, TILE)), sizes, interpret, kernels)
    errs.append(_rel_err(y, _qdq_ragged(x[:180], we, sizes, False)))
    dw = kernels.grouped_wgrad(x[:180], x[:180, :260], sizes, interpret=interpret)
    _, pullback = jax.vjp(lambda v: fp8_ragged_dot(x[:180], v, sizes, Recipe("qdq")), we)
    errs.append(_rel_err(dw, pullback(x[:180, :260])[0]))
  except Exception as e:  # noqa: BLE001 - any compile/runtime failure means: use the XLA path
    log.warning("fp8: the Pallas FP8 kernels failed on this GPU (%s: %s); using XLA FP8 dot_generals",
                type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    return False
  if max(errs) > 1e-5:
    log.warning("fp8: the Pallas FP8 kernels disagree with the XLA path (relative errors %s); not used", errs)
    return False
  return True


def _rel_err(a, b) -> float:
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def _pallas():
  """moe/kernels/fp8_pallas.py, imported on first use (it imports Pallas/Triton)."""
  from moe.kernels import fp8_pallas

  return fp8_pallas


# --------------------------------------------------------------------------- scaled GEMM
def scaled_matmul(a: QTensor, b: QTensor, recipe: Recipe):
  """float32 a @ b over the last two axes (leading axes batch), a [..., M, K], b [..., K, N].

  a's tiles must be (1 or 128) x 128 and b's 128 x (1 or 128): every scale constant along 128 of K.
  """
  assert a.tile[1] == TILE and b.tile[0] == TILE, (a.tile, b.tile)
  if recipe.gemm == "qdq":
    return jnp.matmul(dequantize(a), dequantize(b), preferred_element_type=jnp.float32)
  if recipe.gemm == "kernels":
    return _kernel_matmul(a, b, recipe.interpret)
  return _xla_matmul(a, b, recipe.xla_partial_bytes)


def _kernel_matmul(a: QTensor, b: QTensor, interpret: bool, kernels=None):
  sa = jnp.repeat(a.scale, a.tile[0], axis=-2)  # [..., Mp, Kt]: one scale per row and 128 of K
  sb = jnp.repeat(b.scale, b.tile[1], axis=-1)  # [..., Kt, Np]
  mm = functools.partial((kernels or _pallas()).blockscaled_matmul, interpret=interpret)
  for _ in a.q.shape[:-2]:
    mm = jax.vmap(mm)
  return mm(a.q, b.q, sa, sb)[..., : a.shape[-2], : b.shape[-1]]


def _xla_matmul(a: QTensor, b: QTensor, partial_bytes: int = XLA_PARTIAL_BYTES):
  """One FP8 dot_general per 128-chunk of K (batched over the chunks); partials scaled and summed in
  float32. Materialises the partials (at most `partial_bytes` at a time)."""
  m, n = a.shape[-2], b.shape[-1]
  *lead, mp, kp = a.q.shape
  np_ = b.q.shape[-1]
  kt, nb = kp // TILE, len(lead)
  aq = jnp.moveaxis(a.q.reshape(*lead, mp, kt, TILE), -2, nb)  # [..., Kt, Mp, 128]
  bq = b.q.reshape(*lead, kt, TILE, np_)  # [..., Kt, 128, Np]
  sa = jnp.moveaxis(jnp.repeat(a.scale, a.tile[0], axis=-2), -1, nb)[..., None]  # [..., Kt, Mp, 1]
  sb = jnp.repeat(b.scale, b.tile[1], axis=-1)[..., None, :]  # [..., Kt, 1, Np]
  batch = tuple(range(nb + 1))
  dims = (((nb + 2,), (nb + 1,)), (batch, batch))

  def chunks(aq, bq, sa, sb):  # the float32 partial product of each 128-chunk, scaled, summed
    p = jax.lax.dot_general(aq, bq, dims, preferred_element_type=jnp.float32)
    return (p * sa * sb).sum(nb)

  per_chunk = 4 * mp * np_ * math.prod(lead)
  g = max(1, min(kt, partial_bytes // max(per_chunk, 1)))
  if g >= kt:
    y = chunks(aq, bq, sa, sb)
  else:  # groups of g chunks in a scan, bounding the float32 partials' memory
    pad = -kt % g
    ops = [aq, bq, sa, sb]
    if pad:  # all-zero chunks (q = 0, scale = 0) add nothing
      ops = [jnp.pad(o, [(0, 0)] * nb + [(0, pad)] + [(0, 0)] * (o.ndim - nb - 1)) for o in ops]
    ops = [jnp.moveaxis(o.reshape(*o.shape[:nb], -1, g, *o.shape[nb + 1:]), nb, 0) for o in ops]
    y, _ = jax.lax.scan(lambda acc, xs: (acc + chunks(*xs), None),
                        jnp.zeros((*lead, mp, np_), jnp.float32), ops)
  return y[..., :m, :n]


def _like(ct, primal):
  """The cotangent `ct` with `primal`'s manual axes: inside a shard_map, a weight's gradient computed
  from tokens that vary over an axis the weight does not (a data axis) is summed over that axis, as
  JAX's own transposes do (custom_vjp requires it)."""
  varying = lambda x: set(jax.typeof(x).manual_axis_type.varying)
  extra = tuple(sorted(varying(ct) - varying(primal)))
  return jax.lax.psum(ct, extra) if extra else ct


# --------------------------------------------------------------------------- the FP8 linear
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def fp8_matmul(x, w, recipe: Recipe = Recipe()):
  """x [..., M, K] @ w [..., K, N] (same rank; leading axes batch) with FP8 Fprop, Dgrad and
  Wgrad. Returns x.dtype; the gradients come back in x's and w's dtypes."""
  return _fwd(x, w, recipe)[0]


def _fwd(x, w, recipe):
  assert x.ndim == w.ndim >= 2, (x.shape, w.shape)
  p2 = recipe.pow2_scales
  xq = quantize(x, (1, TILE), p2)  # 1x128: per token, per 128 channels of K
  wq = quantize(w, (TILE, TILE), p2)  # 128x128 blocks
  y = scaled_matmul(xq, wq, recipe).astype(x.dtype)
  return y, (x, wq, w.reshape(-1)[:0])  # the empty slice carries w's dtype (and manual axes)


def _bwd(recipe, res, dy):
  x, wq, w_dtype = res
  p2 = recipe.pow2_scales
  # Dgrad: dy in 1x128 tiles (per token, 128 channels of N, the contracted axis); W^T blocks.
  dx = scaled_matmul(quantize(dy, (1, TILE), p2), wq.mT, recipe)
  # Wgrad: contracts over tokens, so both operands in 128x1 tiles (128 tokens x 1 channel).
  xt = quantize(jnp.swapaxes(x, -1, -2), (1, TILE), p2)  # x^T [..., K, M] per 1x128 = x per 128x1
  dyt = quantize(dy, (TILE, 1), p2)
  dw = scaled_matmul(xt, dyt, recipe)
  return _like(dx.astype(x.dtype), x), _like(dw.astype(w_dtype.dtype), w_dtype)


fp8_matmul.defvjp(_fwd, _bwd)


def linear(x, w, recipe: Recipe = Recipe()):
  """x [..., K] @ w [K, N] with FP8 GEMMs: the one FP8 linear (moe.layers.Linear calls it).
  All leading axes of x are tokens (flattened for the 1x128 / 128x1 tiles)."""
  y = fp8_matmul(x.reshape(-1, x.shape[-1]), w, recipe)
  return y.reshape(*x.shape[:-1], w.shape[-1])


# --------------------------------------------------------------------------- routed experts
def token_tile_segments(m: int, group_sizes):
  """Wgrad tiles of a ragged (expert-sorted) token axis: (segment id [m], number of segments).

  A segment is a maximal run of rows inside one 128-row tile and one group, so a 128x1 tile never
  mixes two experts' tokens (a group boundary inside a tile starts a new segment). Rows past
  sum(group_sizes) form their own segments.
  """
  rows = jnp.arange(m)
  group = jnp.searchsorted(jnp.cumsum(group_sizes), rows, side="right")
  tile = rows // TILE
  new = jnp.concatenate([jnp.ones((1,), bool), (group[1:] != group[:-1]) | (tile[1:] != tile[:-1])])
  return jnp.cumsum(new) - 1, -(-m // TILE) + group_sizes.shape[0] + 1


def qdq_segments(x, segment_ids, num_segments: int, pow2: bool = False):
  """Quantise-dequantise x [M, C] with one scale per (row segment, column): 128x1-style tiles."""
  x32 = x.astype(jnp.float32)
  amax = jax.ops.segment_max(jnp.abs(x32), segment_ids, num_segments=num_segments, indices_are_sorted=True)
  scale = tile_scale(amax, pow2)[segment_ids]  # empty segments: amax -inf -> the floor; unused
  return jnp.clip(x32 / scale, -E4M3_MAX, E4M3_MAX).astype(E4M3).astype(jnp.float32) * scale


def _ragged(x, w, group_sizes):
  return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)


def _qdq_experts(w, pow2):
  return qdq(w, (TILE, TILE), pow2)  # [E, D, F]: 128x128 blocks per expert


def _qdq_ragged(x, w, group_sizes, pow2: bool):
  return _ragged(qdq(x, (1, TILE), pow2), _qdq_experts(w, pow2), group_sizes)


def _kernel_grouped(a: QTensor, b: QTensor, group_sizes, interpret: bool, kernels=None):
  """float32 [M, N] from the grouped Pallas kernel: rows of a [M, K] (1x128 tiles) in groups of
  `group_sizes`, each times its expert's b [E, K, N] (128x128 blocks)."""
  y = (kernels or _pallas()).grouped_matmul(a.q, a.scale, b.q, b.scale, group_sizes, interpret=interpret)
  return y[:, : b.shape[-1]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fp8_ragged_dot(x, w, group_sizes, recipe: Recipe = Recipe()):
  """`jax.lax.ragged_dot(x [M, D], w [E, D, F], group_sizes [E])` with FP8 numerics: x per 1x128
  tile, each expert's weight per 128x128 block; Dgrad dy per 1x128; Wgrad x and dy per 128 tokens
  x 1 within one expert (`token_tile_segments`). Real FP8 operands on the "kernels" path
  (moe/kernels/fp8_pallas.py); otherwise quantise->dequantise and a float32 `ragged_dot` (XLA has no
  FP8 one)."""
  return _ragged_fwd(x, w, group_sizes, recipe)[0]


def _ragged_fwd(x, w, group_sizes, recipe):
  w_dtype, p2 = w.reshape(-1)[:0], recipe.pow2_scales  # the empty slice carries w's dtype (and manual axes)
  if recipe.gemm == "kernels":
    wq = quantize(w, (TILE, TILE), p2)
    y = _kernel_grouped(quantize(x, (1, TILE), p2), wq, group_sizes, recipe.interpret)
    return y.astype(x.dtype), (x, wq, group_sizes, w_dtype)
  return _qdq_ragged(x, w, group_sizes, p2).astype(x.dtype), (x, w, group_sizes, w_dtype)


def _ragged_bwd(recipe, res, dy):
  x, w, group_sizes, w_dtype = res
  p2 = recipe.pow2_scales
  if recipe.gemm == "kernels":  # w is the forward's QTensor
    dx = _kernel_grouped(quantize(dy, (1, TILE), p2), w.mT, group_sizes, recipe.interpret)
    dw = _pallas().grouped_wgrad(x, dy, group_sizes, pow2=p2, interpret=recipe.interpret)
    return _like(dx.astype(x.dtype), x), _like(dw.astype(w_dtype.dtype), w_dtype), None
  wd = _qdq_experts(w, p2)
  dx = _ragged(qdq(dy, (1, TILE), p2), jnp.swapaxes(wd, 1, 2), group_sizes)
  seg, n_seg = token_tile_segments(x.shape[0], group_sizes)
  xt = qdq_segments(x, seg, n_seg, p2)
  dyt = qdq_segments(dy, seg, n_seg, p2)
  _, pullback = jax.vjp(lambda v: _ragged(xt, v, group_sizes), wd)
  (dw,) = pullback(dyt)
  return _like(dx.astype(x.dtype), x), _like(dw.astype(w_dtype.dtype), w_dtype), None


fp8_ragged_dot.defvjp(_ragged_fwd, _ragged_bwd)
