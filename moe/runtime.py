"""How the model runs on its target, decided once when it is built: dtypes, kernels, FP8 GEMM path,
rematerialisation, parallelism. Nothing of this is in the architecture (moe.config.ModelConfig) or
in an HF config.json.

`ImplConfig` holds the user's choices (the `impl:` section of a training config), "auto" meaning "from
the target devices"; `Runtime.resolve` turns them, with the compute dtype and the parallelism, into a
`Runtime` with every choice made, and logs it in one line. The model's modules keep the Runtime and
never ask JAX which backend they run on, so compiling for a TPU or GPU target from a CPU host
(`jax.experimental.topologies`) builds exactly the model that target would run, and every path can be
chosen on CPU (tests, or to compare kernels).

  attention  splash (Pallas flash attention; TPU) | flash (Pallas Triton flash attention; GPU) |
             blocked (moe.kernels.cpu: CPU) | fused (jax.nn.dot_product_attention) | latent (MLA over
             key blocks of the gathered latent, moe.kernels.latent_attention: the choice with
             mesh.context > 1, where each slice's queries see every key; fused also runs there) |
             ring (mesh.context_attention: ring; moe.kernels.ring_attention: the latent passed around
             the context axis, only the causally visible tiles computed)
  experts    megablox (Pallas grouped matmul; TPU, interpreter elsewhere) | triton (Pallas Triton grouped
             matmul; GPU, interpreter elsewhere) | ragged_dot (precision=fp8 on GPU and TPU) | blocked
             (moe.kernels.cpu: CPU) | dense (reference, E x the work)
  fp8_gemm   kernels (Pallas; GPUs with FP8 tensor cores, interpreter elsewhere) | xla | qdq (CPU, TPU)
             used when the compute is FP8 (`precision: fp8`; moe/kernels/fp8.py)
  ep transport  parallel.expert_parallel.resolve_transport (the mesh's `ep_transport`)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Literal

import jax
import jax.numpy as jnp

from moe.kernels import fp8 as fp8_lib
from moe.kernels.expert_ffn import EXPERTS
from parallel.common.errors import ConfigError
from parallel.common.typed_config import check_fields

log = logging.getLogger("moe")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
RematPolicy = Literal["none", "full", "full_offload", "save_dots", "save_dots_no_batch"]


@dataclasses.dataclass(frozen=True)
class ImplConfig:
  """Implementation choices (`auto`: from the target devices) and speed settings.

  `remat_policy`: what the backward pass recomputes per layer (none | full | full_offload |
  save_dots | save_dots_no_batch; full_offload: as full, the layer inputs kept in host memory).
  `scan_layers`: True runs each layer stack as one lax.scan (compile time independent of depth);
  False runs the same stacked parameters as an unrolled loop, which XLA schedules across layers
  (bench-cpu: 9% faster steps, docs/perf.md; compile time grows with depth).
  `fp8_pow2_scales`: round every FP8 scale up to a power of two. `ep_remat`: whether the backward pass
  of a chunked dropless expert-parallel exchange runs the exchange again (recompute: only one chunk's
  buffers live at a time) or keeps the rows each chunk received and returned (keep: no all-to-all
  repeated, all chunks' rows held; parallel/expert_parallel/exchange.py: in_chunks)."""

  attention: Literal["auto", "fused", "blocked", "splash", "flash", "latent"] = "auto"
  experts: Literal["auto", "megablox", "triton", "ragged_dot", "blocked", "dense"] = "auto"
  fp8_gemm: fp8_lib.GemmChoice = "auto"
  fp8_pow2_scales: bool = False
  remat_policy: RematPolicy = "none"
  ep_remat: Literal["recompute", "keep"] = "recompute"
  scan_layers: bool = True
  # The unpipelined step's grad_accum (>= 2) micro-batches with micro-batch m's forward beside m-1's
  # backward, layer by layer, so that each one's all-to-alls run under the other's compute (remat full or
  # full_offload; train/core/overlapped.py).
  fb_overlap: bool = False

  def __post_init__(self):
    check_fields(self, "impl.")


@dataclasses.dataclass(frozen=True)
class Runtime:
  """Every choice made: what the model's modules read. Build with `Runtime.resolve`."""

  dtype: str = "float32"  # activations and matmuls
  param_dtype: str = "float32"
  attention: str = "fused"
  experts: str = "ragged_dot"
  fp8: fp8_lib.Recipe | None = None  # None: no FP8 GEMMs
  remat_policy: RematPolicy = "none"
  scan_layers: bool = True
  par: object = None  # parallel.mesh.Parallelism, or None: one device
  platform: str = "cpu"  # of the target devices
  ep_remat: str = "recompute"

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  @classmethod
  def resolve(cls, impl: ImplConfig = ImplConfig(), *, dtype: str = "float32", param_dtype: str | None = None,
              fp8: bool = False, par=None, devices=None, announce: bool = True) -> Runtime:
    """The Runtime for `impl` on the target: `par.mesh`'s devices, else `devices`, else jax.devices()."""
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype or dtype)):
      if value not in DTYPES:
        raise ConfigError(f"{name}={value!r} must be one of {', '.join(DTYPES)}")
    if par is not None:
      devices = list(par.mesh.devices.flat)
    devices = list(jax.devices() if devices is None else devices)
    platform = devices[0].platform
    on_cpu = platform == "cpu"
    attention = impl.attention
    context = par.context if par is not None else 1
    ring = context > 1 and par.context_attention == "ring"
    if ring and attention not in ("auto", "latent"):
      raise ConfigError(f"impl.attention={attention} with mesh.context_attention=ring: the ring runs the latent-block"
                        " core on each slice's tiles; set impl.attention=auto")
    if attention == "auto":
      by_platform = {"cpu": "blocked", "tpu": "splash", "gpu": "flash"}.get(platform, "fused")
      attention = "latent" if context > 1 else by_platform
    if ring:
      attention = "ring"
    elif context > 1 and attention not in ("latent", "fused"):
      raise ConfigError(f"impl.attention={attention} with mesh.context={context}: context-parallel attention runs"
                        " each slice's queries against the gathered latent; set impl.attention=auto, latent or fused")
    if context == 1 and attention == "latent":
      raise ConfigError("impl.attention=latent is context-parallel attention: it needs mesh.context > 1 (use auto)")
    experts = impl.experts
    if experts == "auto":
      experts = ("blocked" if on_cpu else "ragged_dot" if fp8 else
                 {"tpu": "megablox", "gpu": "triton"}.get(platform, "ragged_dot"))
    recipe = None
    if fp8:
      if experts in ("dense", "megablox", "triton"):
        raise ConfigError(f"impl.experts={experts} has no FP8 path: use auto, ragged_dot or blocked with precision=fp8")
      recipe = fp8_lib.resolve_recipe(impl.fp8_gemm, devices, impl.fp8_pow2_scales)
    rt = cls(dtype, param_dtype or dtype, attention, experts, recipe, impl.remat_policy, impl.scan_layers, par,
             platform, impl.ep_remat)
    if announce:
      log.info("impl: %s", rt.describe())
    return rt

  def expert_fn(self):
    """The routed experts' grouped matmul, expert_fn(rows, expert ids, gate, up, down)
    (moe.kernels.expert_ffn), its FP8 recipe and, for a Pallas kernel off its hardware, the
    interpreter bound."""
    fn = functools.partial(EXPERTS[self.experts], fp8=self.fp8)
    home = {"megablox": "tpu", "triton": "gpu"}.get(self.experts)  # a Pallas kernel's hardware
    return functools.partial(fn, interpret=self.platform != home) if home else fn

  def describe(self) -> str:
    target = self.par.describe() if self.par is not None else f"1 {self.platform} device"
    fp8 = self.fp8.describe() if self.fp8 is not None else "off"
    return (f"{self.dtype} compute, {self.param_dtype} parameters; attention {self.attention}, experts"
            f" {self.experts}, remat {self.remat_policy} (expert-parallel exchange: {self.ep_remat}),"
            f" {'scanned' if self.scan_layers else 'unrolled'} layers;"
            f" fp8 {fp8}; {target}")
