"""E4M3 quantisation with fine-grained tile scales (DeepSeek-V3 report section 3.3): the bottom of the
FP8 kernels (moe/kernels/fp8.py and the Pallas kernels of moe/kernels/fp8_pallas.py both use it).

  scale = max(amax, 1e-4) / 448        q = x / scale  (rounded to float8_e4m3fn)

per tile of the last two axes (1x128, 128x128 or 128x1), optionally rounded up to a power of two.
Shapes that are not multiples of the tile are zero-padded to whole tiles before the amax (so a
partial tile is scaled by the amax of its real elements; zeros cannot raise an amax).

Precision of one quantisation (E4M3: 3 mantissa bits; normal range 2^-6 .. 448 after scaling):
  |dequant(q) - x| <= 2^-4 |x|              for |x| / scale >= 2^-6 (normal range),
  |dequant(q) - x| <= 2^-10 scale           below it (subnormals: spacing 2^-9 scale).
All-zero tiles give zeros (scale = 1e-4 / 448). A NaN or +-Inf anywhere in a tile makes that
tile's scale non-finite and so every dequantised element of that tile NaN (never a finite value).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
TILE = 128
AMAX_FLOOR = 1e-4


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
