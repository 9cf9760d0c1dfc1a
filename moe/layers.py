"""Building blocks: RMSNorm, Linear, Embed and the SwiGLU MLP.

Every parameter carries logical axis names in its `axes` metadata (for example
`("embed", "mlp")`); `parallel/sharding.py` maps those names to mesh axes. Nothing here
names a device or a mesh axis. Linear kernels are stored `[in, out]` (HF stores `[out, in]`).
Each module is built with the model's `moe.runtime.Runtime` (dtypes, FP8, parallelism).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe.config import ModelConfig
from moe.kernels import fp8 as fp8_lib
from moe.runtime import Runtime
from parallel import lookup
from parallel import sharding


def param(rngs: nnx.Rngs, shape, axes, cfg: ModelConfig, rt: Runtime, init="normal") -> nnx.Param:
  """A parameter initialised as DeepSeek-V3 does: normal(0, initializer_range), norms at one."""
  assert len(shape) == len(axes), (shape, axes)
  if init == "normal":
    value = cfg.initializer_range * jax.random.normal(rngs.params(), shape, jnp.float32)
  elif init == "ones":
    value = jnp.ones(shape, jnp.float32)
  else:
    raise ValueError(init)
  return nnx.Param(value.astype(rt.weight_dtype), axes=tuple(axes))


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32 (as the reference)."""

  def __init__(self, dim: int, cfg: ModelConfig, rt: Runtime, *, rngs: nnx.Rngs, axis_name: str = "norm"):
    self.eps = cfg.rms_norm_eps
    self.scale = param(rngs, (dim,), (axis_name,), cfg, rt, init="ones")

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


class Linear(nnx.Module):
  """y = x @ kernel, kernel [in, out]; the one matmul every projection goes through.

  With FP8 (`rt.fp8`) the GEMMs are FP8 (`moe.kernels.fp8.linear`: a custom_vjp with E4M3 forward,
  input- and weight-gradient GEMMs, each accumulating in float32). Like the bf16 matmul it takes the
  kernel's compute-dtype copy, so that FSDP gathers bf16 rather than the float32 master kernel, and
  the weight gradient comes back in it (summed over the devices in it, then added to the float32
  master's). `fp8=False` keeps a layer in the compute dtype (the output head and the MTP projection).
  """

  def __init__(self, d_in: int, d_out: int, axes, cfg: ModelConfig, rt: Runtime, *, rngs: nnx.Rngs,
               fp8: bool = True):
    self.dtype = rt.compute_dtype
    self.fp8 = rt.fp8 if fp8 else None
    self.par = rt.par
    self.kernel = param(rngs, (d_in, d_out), axes, cfg, rt)

  def __call__(self, x):
    x, w = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
    if self.fp8 is not None:
      fp8 = lambda x, w: fp8_lib.linear(x, w, self.fp8)
      if self.fp8.gemm == "kernels":  # Pallas custom calls, which XLA does not partition: per device's rows
        axes = self.kernel.get_metadata()["axes"][-2:]  # (a stacked layer's also name "layers" first)
        return sharding.per_row_block(fp8, x, w, self.par, axes)
      return fp8(x, w)
    return jnp.dot(x, w)


class Embed(nnx.Module):
  """Token embedding table [vocab, hidden]; `attend` is the tied output head."""

  def __init__(self, cfg: ModelConfig, rt: Runtime, *, rngs: nnx.Rngs):
    self.dtype = rt.compute_dtype
    self.par = rt.par
    self.embedding = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg, rt)

  def __call__(self, tokens_BxS):
    return lookup.take_rows(self.embedding[...], tokens_BxS, self.par, self.dtype)  # (the table stays sharded)

  def attend(self, x_BxSxD):
    return jnp.dot(x_BxSxD.astype(self.dtype), self.embedding[...].T.astype(self.dtype))


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

  def __init__(self, cfg: ModelConfig, rt: Runtime, width: int, *, rngs: nnx.Rngs, axis_name: str = "mlp"):
    d = cfg.hidden_size
    self.gate_proj = Linear(d, width, ("embed", axis_name), cfg, rt, rngs=rngs)
    self.up_proj = Linear(d, width, ("embed", axis_name), cfg, rt, rngs=rngs)
    self.down_proj = Linear(width, d, (axis_name, "embed"), cfg, rt, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
