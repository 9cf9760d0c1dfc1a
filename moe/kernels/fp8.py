"""FP8 (E4M3) GEMMs with DeepSeek-V3's fine-grained scaling (V3 report section 3.3).

Every GEMM of a linear layer - forward (Fprop), input gradient (Dgrad) and weight gradient
(Wgrad) - multiplies E4M3 operands quantised with scales from the current amax (online, no
history):

  scale = max(amax, 1e-4) / 448        q = x / scale  (rounded to float8_e4m3fn)

  (optionally rounded up to a power of two, `Recipe.pow2_scales`), per tile:

  GEMM   y = a @ b (contract K)  a's tiles                     b's tiles
  Fprop  y  = x  @ W             x:  1x128 (token x 128 of K)   W:    128x128 blocks
  Dgrad  dx = dy @ W^T           dy: 1x128 (token x 128 of N)   W^T:  the same 128x128 blocks
  Wgrad  dW = x^T @ dy           x:  128x1 (128 tokens x 1)     dy:   128x1 (128 tokens x 1)

so every scale is constant along a 128-wide stretch of the contraction axis K, and the GEMM is
  y = sum over 128-chunks c of K:  (q_a[:, c] @ q_b[c, :]) * s_a[:, c] * s_b[c, :]
with each chunk's partial product promoted to float32 (the paper's N_C = 128 promotion). Wgrad
contracts over tokens, so its operands are tiled along the token axis (128x1): 1x128 tiles of
dy would put one scale on a stretch of 128 channels, which is constant along N, not along the
contracted tokens, and the chunked sum above would not exist.

Shapes that are not multiples of 128 are zero-padded to whole tiles before the amax (so a partial
tile is scaled by the amax of its real elements; zeros cannot raise an amax) and the padding is
sliced off the result.

Three ways to run the same numerics (`gemm_path`; `Recipe.backend` "auto" picks per backend; logged once):
  kernels: the operands really are float8_e4m3fn, in the Pallas (Triton) kernels of moe/fp8_gpu.py:
          each output tile loops over K in 128-deep FP8 tensor-core dots whose float32 results are
          scaled and summed in registers (DeepGEMM's promotion), for the linears and for the routed
          experts' grouped GEMMs (Wgrad quantises its 128x1 tiles inside the kernel). "auto" and
          "native" pick it on CUDA GPUs with compute capability >= 8.9 (Ada, Hopper, Blackwell) once
          a start-up probe has run the kernels against the "xla" path; a failure there logs a warning
          and falls back to "xla". Tests run the kernels in the Pallas interpreter.
  xla:    FP8 operands through XLA: one `lax.dot_general` of FP8 operands with
          `preferred_element_type=float32` per 128-chunk of K (batched over chunks), scaled and
          summed in float32. The float32 partial of every chunk goes to memory, so this is correct but
          not fast; the routed experts run qdq here (XLA has no FP8 ragged_dot). Used by "native"
          where the kernels cannot run (on CPU XLA upcasts: the tests check the numerics with it).
  qdq:    quantise -> dequantise to float32 (q * scale, exact up to float32 rounding) and one
          float32 matmul. Because every scale is constant along 128 of K this equals the chunked
          sum up to float32 summation order. "auto" on CPU and TPUs without FP8.
`fp8_matmul` also takes leading batch dimensions (`[n, M, K] @ [n, K, N]`), which the block-padded
CPU experts use (each 128-row block belongs to one expert, so Wgrad's 128x1 token tiles never
straddle two experts).

Precision of one quantisation (E4M3: 3 mantissa bits; normal range 2^-6 .. 448 after scaling):
  |dequant(q) - x| <= 2^-4 |x|              for |x| / scale >= 2^-6 (normal range),
  |dequant(q) - x| <= 2^-10 scale           below it (subnormals: spacing 2^-9 scale).
All-zero tiles give zeros (scale = 1e-4 / 448). A NaN or +-Inf anywhere in a tile makes that
tile's scale non-finite and so every dequantised element of that tile NaN (never a finite value);
a GEMM output that touches such a tile is NaN. Outputs are float32-accumulated and returned in the
input's dtype; the weight gradient in the weight's dtype (float32 master weights: float32 grads).

Where this lives: moe/ (not train/) because `moe.layers.Linear` and `moe.experts` call it and the
model package does not import the trainer. What stays in higher precision is decided by the
callers: `Linear(..., fp8=False)` for the output head and the MTP projection; the embedding, the
router (float32), the norms, the attention core and the loss never call this module.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import math
from typing import Literal

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
TILE = 128
AMAX_FLOOR = 1e-4
# The native path materialises one float32 partial product per 128-chunk of K; chunks are summed
# in groups (a scan) so that those partials take at most this many bytes.
NATIVE_PARTIAL_BYTES = 1 << 29


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How FP8 GEMMs run. `backend`: "auto" (native where the device has FP8 GEMMs, else qdq),
  "native" or "qdq"; `pow2_scales`: round every scale up to a power of two."""

  pow2_scales: bool = False
  backend: Literal["auto", "native", "qdq"] = "auto"

  @classmethod
  def of(cls, cfg) -> Recipe:
    """The recipe of a ModelConfig (`fp8_pow2_scales`, `fp8_backend`)."""
    return cls(pow2_scales=cfg.fp8_pow2_scales, backend=cfg.fp8_backend)


# --------------------------------------------------------------------------- backend choice
def native_fp8_available() -> bool:
  """True on CUDA GPUs with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell)."""
  if jax.default_backend() != "gpu":
    return False
  try:
    cc = jax.devices()[0].compute_capability
    return tuple(int(v) for v in str(cc).split(".")[:2]) >= (8, 9)
  except (AttributeError, ValueError):  # ROCm (its FP8 is e4m3fnuz) or an unknown device
    return False


# Tests set this to run the Pallas kernels (moe/fp8_gpu.py) in the Pallas interpreter on CPU.
INTERPRET_KERNELS = False


@functools.cache
def _kernels_pass_probe() -> bool:
  """On a GPU: run the Pallas kernels once on small problems against the XLA path; a kernel that
  fails to compile or disagrees is reported (warning) and not used. Runs in its own thread, outside
  any trace that asks (JAX's trace state is per thread)."""
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(_probe_kernels).result()


def _probe_kernels() -> bool:
  import numpy as np

  try:  # the kernels' module is imported in here too: a JAX whose Pallas/Triton API moved falls back
    r = np.random.default_rng(0)
    x, w = jnp.asarray(r.normal(size=(200, 300)), jnp.float32), jnp.asarray(r.normal(size=(300, 260)), jnp.float32)
    xq, wq = quantize(x, (1, TILE)), quantize(w, (TILE, TILE))
    errs = [_rel_err(_kernel_matmul(xq, wq), _xla_matmul(xq, wq))]
    we, sizes = jnp.stack([w, -w, 2 * w]), jnp.asarray([90, 0, 70], jnp.int32)
    y = _kernel_grouped(quantize(x[:180], (1, TILE)), quantize(we, (TILE, TILE)), sizes)
    errs.append(_rel_err(y, _qdq_ragged(x[:180], we, sizes, False)))
    dw = _gpu().grouped_wgrad(x[:180], x[:180, :260], sizes, interpret=INTERPRET_KERNELS)
    _, pullback = jax.vjp(lambda v: fp8_ragged_dot(x[:180], v, sizes, Recipe(backend="qdq")), we)
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


def gemm_path(recipe: Recipe) -> Literal["qdq", "xla", "kernels"]:
  """How this process runs the recipe's GEMMs: "qdq" (emulated), or real FP8 operands through the
  Pallas "kernels" (GPUs where they pass the probe; tests: the interpreter) or "xla" dot_generals."""
  native = native_fp8_available() if recipe.backend == "auto" else recipe.backend == "native"
  if not native:
    return "qdq"
  if INTERPRET_KERNELS or (jax.default_backend() == "gpu" and _kernels_pass_probe()):
    return "kernels"
  return "xla"


_announced: set = set()


def use_path(recipe: Recipe) -> str:
  """`gemm_path`, logging the choice once per process."""
  path = gemm_path(recipe)
  if (path, recipe) not in _announced:
    _announced.add((path, recipe))
    log.info("fp8: %s", describe(recipe))
  return path


def describe(recipe: Recipe) -> str:
  """One line: the path the FP8 GEMMs take here."""
  path = gemm_path(recipe)
  linear, experts = {
      "kernels": ("Pallas FP8 kernels (float8_e4m3fn operands, 128-deep tensor-core dots promoted to"
                  " float32 in registers)", "Pallas grouped FP8 kernels"),
      "xla": ("native FP8 dot_general (float8_e4m3fn operands, float32 accumulation, per-128-K chunks)",
              "quantise->dequantise + float32 grouped matmul"),
      "qdq": ("quantise->dequantise + float32 matmul (no native FP8 GEMM used)",
              "quantise->dequantise + float32 grouped matmul"),
  }[path]
  return (f"E4M3 GEMMs on {jax.default_backend()} (backend={recipe.backend}): linears {linear};"
          f" routed experts {experts};"
          f" scales 1x128 / 128x128 / 128x1 (Wgrad){', power-of-two' if recipe.pow2_scales else ''}")


# --------------------------------------------------------------------------- quantisation
@functools.partial(jax.tree_util.register_dataclass, data_fields=["q", "scale"], meta_fields=["tile", "shape"])
@dataclasses.dataclass(frozen=True)
class QTensor:
  """`x[..., R, C]` quantised per (tile[0] x tile[1]) tile of its last two axes.

  q: float8_e4m3fn, zero-padded to whole tiles; scale: float32 [..., ceil(R/tr), ceil(C/tc)];
  shape: the unpadded (logical) shape; dequantised x = q * scale of its tile.
  """

  q: jax.Array
  scale: jax.Array
  tile: tuple[int, int]
  shape: tuple[int, ...]

  @property
  def mT(self) -> QTensor:
    """The transpose of the last two axes (a block-scaled weight's transpose is block-scaled)."""
    return QTensor(jnp.swapaxes(self.q, -1, -2), jnp.swapaxes(self.scale, -1, -2), self.tile[::-1],
                   (*self.shape[:-2], self.shape[-1], self.shape[-2]))


def tile_scale(amax, pow2: bool = False):
  """scale = max(amax, 1e-4) / 448, optionally rounded up to a power of two; NaN/Inf stay so."""
  s = jnp.maximum(amax.astype(jnp.float32), AMAX_FLOOR) / E4M3_MAX
  if pow2:  # the smallest power of two >= s: carry any mantissa bits into the exponent (s is normal)
    bits = jax.lax.bitcast_convert_type(s, jnp.int32)
    up = jax.lax.bitcast_convert_type((bits + 0x7FFFFF) & ~0x7FFFFF, jnp.float32)
    s = jnp.where(jnp.isfinite(s), up, s)
  return s


def _pad_last2(x, tile):
  pr, pc = -x.shape[-2] % tile[0], -x.shape[-1] % tile[1]
  if pr or pc:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pr), (0, pc)])
  return x


def quantize(x, tile: tuple[int, int], pow2: bool = False) -> QTensor:
  """Quantise the last two axes of `x` per `tile` (e.g. (1, 128), (128, 128), (128, 1))."""
  shape = tuple(x.shape)
  tr, tc = tile
  xp = _pad_last2(x.astype(jnp.float32), tile)
  *lead, r, c = xp.shape
  t = xp.reshape(*lead, r // tr, tr, c // tc, tc)
  scale = tile_scale(jnp.max(jnp.abs(t), axis=(-3, -1)), pow2)
  # x / scale <= 448 by construction; the clip only guards float32 rounding (NaN passes through,
  # and an Inf input has made its tile's scale Inf, so x / scale is NaN or 0 there, never clipped
  # into a finite value that survives: dequantising multiplies by the Inf scale).
  q = jnp.clip(t / scale[..., :, None, :, None], -E4M3_MAX, E4M3_MAX).astype(E4M3)
  return QTensor(q.reshape(xp.shape), scale, (tr, tc), shape)


def dequantize(qt: QTensor):
  """float32 values of the quantised tensor, in its logical (unpadded) shape."""
  tr, tc = qt.tile
  *lead, r, c = qt.q.shape
  t = qt.q.astype(jnp.float32).reshape(*lead, r // tr, tr, c // tc, tc) * qt.scale[..., :, None, :, None]
  x = t.reshape(qt.q.shape)
  return x[..., : qt.shape[-2], : qt.shape[-1]]


def qdq(x, tile: tuple[int, int], pow2: bool = False):
  """Quantise then dequantise (float32): the value an FP8 GEMM sees for `x`."""
  return dequantize(quantize(x, tile, pow2))


# --------------------------------------------------------------------------- scaled GEMM
def scaled_matmul(a: QTensor, b: QTensor, path: str):
  """float32 a @ b over the last two axes (leading axes batch), a [..., M, K], b [..., K, N].

  a's tiles must be (1 or 128) x 128 and b's 128 x (1 or 128): every scale constant along 128 of K.
  `path`: "qdq", "xla" or "kernels" (`gemm_path`).
  """
  assert a.tile[1] == TILE and b.tile[0] == TILE, (a.tile, b.tile)
  if path == "qdq":
    return jnp.matmul(dequantize(a), dequantize(b), preferred_element_type=jnp.float32)
  if path == "kernels":
    return _kernel_matmul(a, b)
  return _xla_matmul(a, b)


def _gpu():
  """moe/fp8_gpu.py, imported on first use (it imports Pallas/Triton, and this module)."""
  from moe import fp8_gpu

  return fp8_gpu


def _kernel_matmul(a: QTensor, b: QTensor):
  sa = jnp.repeat(a.scale, a.tile[0], axis=-2)  # [..., Mp, Kt]: one scale per row and 128 of K
  sb = jnp.repeat(b.scale, b.tile[1], axis=-1)  # [..., Kt, Np]
  mm = functools.partial(_gpu().blockscaled_matmul, interpret=INTERPRET_KERNELS)
  for _ in a.q.shape[:-2]:
    mm = jax.vmap(mm)
  return mm(a.q, b.q, sa, sb)[..., : a.shape[-2], : b.shape[-1]]


def _xla_matmul(a: QTensor, b: QTensor):
  """One FP8 dot_general per 128-chunk of K (batched over the chunks); partials scaled and summed in
  float32. Materialises the partials (at most NATIVE_PARTIAL_BYTES at a time)."""
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
  g = max(1, min(kt, NATIVE_PARTIAL_BYTES // max(per_chunk, 1)))
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


# --------------------------------------------------------------------------- the FP8 linear
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def fp8_matmul(x, w, recipe: Recipe = Recipe()):
  """x [..., M, K] @ w [..., K, N] (same rank; leading axes batch) with FP8 Fprop, Dgrad and
  Wgrad. Returns x.dtype; the gradients come back in x's and w's dtypes."""
  return _fwd(x, w, recipe)[0]


def _fwd(x, w, recipe):
  assert x.ndim == w.ndim >= 2, (x.shape, w.shape)
  path, p2 = use_path(recipe), recipe.pow2_scales
  xq = quantize(x, (1, TILE), p2)  # 1x128: per token, per 128 channels of K
  wq = quantize(w, (TILE, TILE), p2)  # 128x128 blocks
  y = scaled_matmul(xq, wq, path).astype(x.dtype)
  return y, (x, wq, jnp.zeros((0,), w.dtype))  # the empty array carries w's dtype


def _bwd(recipe, res, dy):
  x, wq, w_dtype = res
  path, p2 = use_path(recipe), recipe.pow2_scales
  # Dgrad: dy in 1x128 tiles (per token, 128 channels of N, the contracted axis); W^T blocks.
  dx = scaled_matmul(quantize(dy, (1, TILE), p2), wq.mT, path)
  # Wgrad: contracts over tokens, so both operands in 128x1 tiles (128 tokens x 1 channel).
  xt = quantize(jnp.swapaxes(x, -1, -2), (1, TILE), p2)  # x^T [..., K, M] per 1x128 = x per 128x1
  dyt = quantize(dy, (TILE, 1), p2)
  dw = scaled_matmul(xt, dyt, path)
  return dx.astype(x.dtype), dw.astype(w_dtype.dtype)


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


def _kernel_grouped(a: QTensor, b: QTensor, group_sizes):
  """float32 [M, N] from the grouped Pallas kernel: rows of a [M, K] (1x128 tiles) in groups of
  `group_sizes`, each times its expert's b [E, K, N] (128x128 blocks)."""
  y = _gpu().grouped_matmul(a.q, a.scale, b.q, b.scale, group_sizes, interpret=INTERPRET_KERNELS)
  return y[:, : b.shape[-1]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fp8_ragged_dot(x, w, group_sizes, recipe: Recipe = Recipe()):
  """`jax.lax.ragged_dot(x [M, D], w [E, D, F], group_sizes [E])` with FP8 numerics: x per 1x128
  tile, each expert's weight per 128x128 block; Dgrad dy per 1x128; Wgrad x and dy per 128 tokens
  x 1 within one expert (`token_tile_segments`). Real FP8 operands on the "kernels" path
  (moe/fp8_gpu.py); otherwise quantise->dequantise and a float32 `ragged_dot` (XLA has no FP8 one)."""
  return _ragged_fwd(x, w, group_sizes, recipe)[0]


def _ragged_fwd(x, w, group_sizes, recipe):
  w_dtype, p2 = jnp.zeros((0,), w.dtype), recipe.pow2_scales  # the empty array carries w's dtype
  if use_path(recipe) == "kernels":
    wq = quantize(w, (TILE, TILE), p2)
    y = _kernel_grouped(quantize(x, (1, TILE), p2), wq, group_sizes)
    return y.astype(x.dtype), (x, wq, group_sizes, w_dtype)
  return _qdq_ragged(x, w, group_sizes, p2).astype(x.dtype), (x, w, group_sizes, w_dtype)


def _ragged_bwd(recipe, res, dy):
  x, w, group_sizes, w_dtype = res
  p2 = recipe.pow2_scales
  if use_path(recipe) == "kernels":  # w is the forward's QTensor
    dx = _kernel_grouped(quantize(dy, (1, TILE), p2), w.mT, group_sizes)
    dw = _gpu().grouped_wgrad(x, dy, group_sizes, pow2=p2, interpret=INTERPRET_KERNELS)
    return dx.astype(x.dtype), dw.astype(w_dtype.dtype), None
  wd = _qdq_experts(w, p2)
  dx = _ragged(qdq(dy, (1, TILE), p2), jnp.swapaxes(wd, 1, 2), group_sizes)
  seg, n_seg = token_tile_segments(x.shape[0], group_sizes)
  xt = qdq_segments(x, seg, n_seg, p2)
  dyt = qdq_segments(dy, seg, n_seg, p2)
  _, pullback = jax.vjp(lambda v: _ragged(xt, v, group_sizes), wd)
  (dw,) = pullback(dyt)
  return dx.astype(x.dtype), dw.astype(w_dtype.dtype), None


fp8_ragged_dot.defvjp(_ragged_fwd, _ragged_bwd)
