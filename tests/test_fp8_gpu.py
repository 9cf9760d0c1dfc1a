"""moe/kernels/fp8_pallas.py: the Pallas FP8 kernels, run in the Pallas interpreter on CPU against
float64 NumPy, and lowered for CUDA (Triton IR is built without a GPU; compiling it to PTX needs one).
Through moe.kernels.fp8 (the linear and the experts' grouped GEMM) they are also in tests/test_fp8.py
("kernels" backend)."""

import logging
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.kernels import fp8
from moe.kernels import fp8_pallas as fp8_gpu
from moe.kernels import grouped_pallas
from moe.runtime import Runtime
from tests.test_fp8 import np_quant, rel, wide


def test_blockscaled_matmul_vs_numpy():
  """a [200, 384] @ b [384, 260] (M, N not multiples of the 128 tiles), random scales per row x 128
  of K and per 128 of K x column: the float64 sum of scaled chunks."""
  r = np.random.default_rng(0)
  a = jnp.asarray(r.normal(size=(200, 384)) * 30).astype(fp8.E4M3)
  b = jnp.asarray(r.normal(size=(384, 260)) * 30).astype(fp8.E4M3)
  sa, sb = r.uniform(0.01, 2, (200, 3)), r.uniform(0.01, 2, (3, 260))
  y = fp8_gpu.blockscaled_matmul(a, b, jnp.asarray(sa, jnp.float32), jnp.asarray(sb, jnp.float32), interpret=True)
  a64 = np.asarray(a.astype(jnp.float32), np.float64) * np.repeat(sa, 128, 1)
  b64 = np.asarray(b.astype(jnp.float32), np.float64) * np.repeat(sb, 128, 0)
  assert y.shape == (200, 260) and rel(y, a64 @ b64) < 1e-6


def test_work_items_cover_every_tile_and_group_once():
  sizes = jnp.asarray([100, 0, 156, 44, 0, 300], jnp.int32)
  m_tiles = 5  # 600 rows
  g, t, lo, hi = (np.asarray(v) for v in grouped_pallas.work_items(sizes, m_tiles))
  ends = np.cumsum(np.asarray(sizes))
  starts = ends - np.asarray(sizes)
  want = {(e, tile) for e in range(6) for tile in range(m_tiles)
          if max(starts[e], tile * 128) < min(ends[e], tile * 128 + 128)}
  got = [(int(a), int(b)) for a, b, l, h in zip(g, t, lo, hi) if h > l]
  assert sorted(got) == sorted(want) and len(g) == m_tiles + 6
  for a, l, h in zip(g, lo, hi):
    assert h == l == 0 or (l, h) == (starts[a], ends[a])


def test_grouped_kernels_vs_numpy():
  """Groups of 70, 0, 200, 3, 90 rows of 383 (the last 20 rows in no group). Fprop: each row's
  1x128-scaled FP8 values times its group's 128x128-block-scaled FP8 weights. Wgrad: x and dy
  quantised inside the kernel per (128-row tile within one group) x 1 column, as the recipe says."""
  r = np.random.default_rng(1)
  sizes = np.array([70, 0, 200, 3, 90])
  m, d, f = 383, 256, 130
  q = jnp.asarray(r.normal(size=(m, d)) * 30).astype(fp8.E4M3)
  wq = jnp.asarray(r.normal(size=(5, d, 256)) * 30).astype(fp8.E4M3)
  sq, sw = r.uniform(0.01, 2, (m, 2)), r.uniform(0.01, 2, (5, 2, 2))
  gs = jnp.asarray(sizes, jnp.int32)
  y = np.asarray(fp8_gpu.grouped_matmul(q, jnp.asarray(sq, jnp.float32), wq, jnp.asarray(sw, jnp.float32), gs,
                                        interpret=True))
  x, dy = wide((m, d), 2), wide((m, f), 3)
  dw = np.asarray(fp8_gpu.grouped_wgrad(jnp.asarray(x), jnp.asarray(dy), gs, interpret=True))
  q64 = np.asarray(q.astype(jnp.float32), np.float64) * np.repeat(sq, 128, 1)
  ends = np.cumsum(sizes)
  starts = ends - sizes
  for e, (a, b) in enumerate(zip(starts, ends)):
    if b == a:
      continue
    w64 = np.asarray(wq[e].astype(jnp.float32), np.float64) * np.repeat(np.repeat(sw[e], 128, 0), 128, 1)
    assert rel(y[a:b], q64[a:b] @ w64) < 1e-6
    cuts = sorted({a, b, *range((a // 128 + 1) * 128, b, 128)})
    xt = np.concatenate([np_quant(x[c0:c1], (c1 - c0, 1))[1] for c0, c1 in zip(cuts[:-1], cuts[1:])])
    dyt = np.concatenate([np_quant(dy[c0:c1], (c1 - c0, 1))[1] for c0, c1 in zip(cuts[:-1], cuts[1:])])
    assert rel(dw[e], xt.T @ dyt) < 1e-5
  assert np.all(y[ends[-1]:] == 0) and np.all(dw[1] == 0)


def test_gemm_choice_and_the_probe(caplog):
  """CPU: auto -> emulated (qdq); xla -> XLA FP8 dot_generals; kernels -> the Pallas interpreter. On a
  GPU with FP8 tensor cores auto takes the kernels when the start-up probe accepts them and falls back
  (with a warning) to xla from broken ones; a compile-only GPU target is not probed."""
  cpu = jax.devices()
  assert fp8.resolve_recipe("auto", cpu) == fp8.Recipe("qdq")
  assert fp8.resolve_recipe("xla", cpu) == fp8.Recipe("xla")
  assert fp8.resolve_recipe("kernels", cpu) == fp8.Recipe("kernels", interpret=True)
  assert "Pallas FP8 kernels" in fp8.Recipe("kernels").describe()
  h100 = types.SimpleNamespace(platform="gpu", compute_capability="9.0")
  a100 = types.SimpleNamespace(platform="gpu", compute_capability="8.0")
  assert fp8.resolve_recipe("auto", [h100], probe=lambda: True) == fp8.Recipe("kernels")
  assert fp8.resolve_recipe("auto", [h100], probe=lambda: False) == fp8.Recipe("xla")
  assert fp8.resolve_recipe("auto", [h100]) == fp8.Recipe("kernels")  # not this process's device: no probe
  assert fp8.resolve_recipe("auto", [a100]) == fp8.Recipe("qdq")
  assert fp8.probe_kernels(interpret=True)

  def broken(*a, **k):
    raise RuntimeError("ptxas fatal: unsupported")

  kernels = dict(blockscaled_matmul=fp8_gpu.blockscaled_matmul, grouped_matmul=fp8_gpu.grouped_matmul,
                 grouped_wgrad=fp8_gpu.grouped_wgrad)
  with caplog.at_level(logging.WARNING, logger="moe.kernels.fp8"):
    assert not fp8.probe_kernels(types.SimpleNamespace(**{**kernels, "blockscaled_matmul": broken}), interpret=True)
  assert "ptxas fatal" in caplog.text
  zeros = lambda a, b, sa, sb, interpret: jnp.zeros((a.shape[0], b.shape[1]))
  assert not fp8.probe_kernels(types.SimpleNamespace(**{**kernels, "blockscaled_matmul": zeros}), interpret=True)


@pytest.mark.parametrize("which", ("linear", "experts", "model-ragged_dot", "model-blocked"))
def test_fp8_gemms_lower_to_triton_kernels_for_cuda(which):
  """Lowered for CUDA, every FP8 GEMM of the linear / the experts' grouped matmul (Fprop, Dgrad,
  Wgrad) is a Triton kernel call and no FP8 dot is left to XLA; so is a whole FP8 model's fwd+bwd
  (layers under lax.scan; the experts as ragged GEMMs or as batched blocks under vmap; dimensions that
  are not multiples of 128)."""
  recipe = fp8.Recipe("kernels", pow2_scales=True)
  S = jax.ShapeDtypeStruct
  if which == "linear":
    f = lambda x, w: jax.value_and_grad(lambda x, w: fp8.linear(x, w, recipe).astype(jnp.float32).sum(), (0, 1))(x, w)
    args = (S((4, 256, 576), jnp.bfloat16), S((576, 1536), jnp.float32))
  elif which == "experts":
    def f(x, w):
      loss = lambda x, w: fp8.fp8_ragged_dot(x, w, jnp.asarray([300, 0, 500, 224], jnp.int32), recipe).sum()
      return jax.value_and_grad(loss, (0, 1))(x, w)
    args = (S((1024, 2048), jnp.bfloat16), S((4, 2048, 1408), jnp.float32))
  else:
    from flax import nnx

    from tests.random_weights import random_state
    from tests.test_fp8 import SMALL

    rt = Runtime(dtype="bfloat16", param_dtype="float32", attention="fused", experts=which.split("-")[1],
                 fp8=recipe, platform="gpu")
    graphdef, state = random_state(SMALL, rt=rt)
    f = lambda state, tokens: jax.value_and_grad(lambda s: nnx.merge(graphdef, s)(tokens).sum())(state)
    args = (state, S((2, 16), jnp.int32))
  hlo = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  n = hlo.count("xla.gpu.triton")
  assert n == 3 if not which.startswith("model") else n >= 3
  assert "f8E4M3FN" in hlo and not [l for l in hlo.splitlines() if "stablehlo.dot_general" in l and "f8E4M3FN" in l]


def test_kernel_dots_allow_tensor_core_fp8_accumulation(monkeypatch):
  """Every FP8 tt.dot of the kernels' Triton IR carries maxNumImpreciseAcc = 128 (without it Triton
  runs FP8 dots on Hopper as f16 MMAv2; with it, FP8 wgmma: checked once with Triton 3.9 for sm_90)."""
  from jax._src.pallas.triton import lowering

  modules, lower = [], lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = lower(*args, **kwargs)
    modules.append(result.module.operation.get_asm())
    return result

  monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", capture)  # to read the Triton IR
  recipe = fp8.Recipe("kernels")
  f = lambda x, w: jax.grad(lambda x, w: fp8.fp8_ragged_dot(x, w, jnp.asarray([100, 28], jnp.int32), recipe).sum(),
                            (0, 1))(x, w)
  g = lambda x, w: jax.grad(lambda x, w: fp8.linear(x, w, recipe).sum(), (0, 1))(x, w)
  S = jax.ShapeDtypeStruct
  for fn, args in ((f, (S((128, 256), jnp.bfloat16), S((2, 256, 128), jnp.float32))),
                   (g, (S((128, 256), jnp.bfloat16), S((256, 128), jnp.float32)))):
    jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  dots = [line for m in modules for line in m.splitlines() if "tt.dot" in line]
  names = {m.split("@", 1)[1].split(" ", 1)[0] for m in modules}  # identical kernels lower once
  assert names == {"fp8_blockscaled_matmul", "fp8_grouped_matmul", "fp8_grouped_wgrad"} and len(dots) == len(modules)
  assert all("f8E4M3FN" in d and "maxNumImpreciseAcc = 128" in d for d in dots), dots
