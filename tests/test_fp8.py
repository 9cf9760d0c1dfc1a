"""moe.kernels.fp8 against float64 NumPy references; the FP8 model; a short bf16-vs-fp8 training comparison.

Bounds used here (E4M3: 3 mantissa bits, max 448, smallest normal 2^-6):
- one quantisation: |dq - x| <= 2^-4 |x| where |x| / scale >= 2^-6 (normal range), else
  <= 2^-10 scale (subnormal spacing 2^-9 scale, rounding to nearest);
- GEMMs: equal to the float64 product of the NumPy-quantised operands within 1e-5 relative
  Frobenius error (float32 accumulation; rare float32-vs-float64 rounding ties in the scaling);
- FP8 linear outputs and gradients against the float32 linear: relative Frobenius error < 5%
  (each product carries two independent E4M3 roundings, about 2.6% RMS each).
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from moe.config import ModelConfig
from moe.kernels import cpu, fp8
from moe.kernels.expert_ffn import ragged_ffn
from moe.model import Transformer
from moe.runtime import ImplConfig, Runtime
from parallel.expert_parallel import combine

ROOT = Path(__file__).resolve().parents[1]

# "xla": real float8 dot_generals (XLA:CPU upcasts them); "kernels": moe/kernels/fp8_pallas.py's
# Pallas kernels, which on a CPU run in the Pallas interpreter (on a GPU they compile to Triton).
BACKENDS = ("qdq", "xla", "kernels")


def make_recipe(backend, **kw):
  """The Recipe `impl.fp8_gemm=backend` resolves to on this CPU."""
  return fp8.resolve_recipe(backend, jax.devices(), **kw)


# ----------------------------------------------------------------------------- NumPy references
def np_quant(x, tile):
  """float64 reference: (scale [R/tr, C/tc], dequantised x) per `tile`, zero-padded partial tiles."""
  x = np.asarray(x, np.float64)
  r, c = x.shape
  tr, tc = tile
  xp = np.pad(x, ((0, -r % tr), (0, -c % tc)))
  t = xp.reshape(xp.shape[0] // tr, tr, xp.shape[1] // tc, tc)
  scale = np.maximum(np.abs(t).max((1, 3)), 1e-4) / 448.0
  q = (t / scale[:, None, :, None]).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
  return scale, (q * scale[:, None, :, None]).reshape(xp.shape)[:r, :c]


def np_qdq(x, tile):
  return np_quant(x, tile)[1]


def np_qdq_rows(x, segments):
  """Dequantised x with one scale per (row segment, column): the experts' 128x1 Wgrad tiles."""
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  for a, b in segments:
    out[a:b] = np_qdq(x[a:b], (b - a, 1)) if b > a else x[a:b]
  return out


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


QDQ = jax.jit(lambda x, tile, pow2: (q := fp8.quantize(x, tile, pow2), fp8.dequantize(q)), static_argnums=(1, 2))


def jit_vjp(f, *args, cot=None):
  """(f(*args), VJP of f at args with cotangent `cot`, default ones) in one compiled call."""

  @jax.jit
  def run(args, cot):
    y, vjp = jax.vjp(f, *args)
    return y, vjp(jnp.ones_like(y) if cot is None else cot.astype(y.dtype))

  return run(args, cot)


def wide(shape, seed=0):
  """Normal values times per-row and per-column magnitudes spanning ~e^+-2: tile choice matters."""
  rng = np.random.default_rng(seed)
  rows = np.exp(rng.standard_normal((*shape[:-1], 1)))
  cols = np.exp(rng.standard_normal(shape[-1]))
  return (rng.standard_normal(shape) * rows * cols).astype(np.float32)


# ----------------------------------------------------------------------------- quantisation
@pytest.mark.parametrize("tile,want", [((1, 128), (200, 3)), ((128, 1), (2, 300)), ((128, 128), (2, 3))])
def test_scale_shapes_and_values(tile, want):
  x = wide((200, 300))
  x[:, 256:] *= 1e-7  # the last (partial) column tiles: amax below the 1e-4 floor
  qt, dq = QDQ(jnp.asarray(x), tile, False)
  ref_scale, ref_dq = np_quant(x, tile)
  assert qt.scale.shape == want and qt.scale.dtype == jnp.float32
  assert qt.q.dtype == jnp.float8_e4m3fn and qt.q.shape == (-(-200 // tile[0]) * tile[0], -(-300 // tile[1]) * tile[1])
  np.testing.assert_allclose(np.asarray(qt.scale), ref_scale, rtol=1e-6)
  if tile[1] == 128:
    np.testing.assert_allclose(np.asarray(qt.scale)[:, -1], 1e-4 / 448, rtol=1e-6)  # the floor
  dq = np.asarray(dq)
  assert dq.shape == (200, 300)
  same = np.abs(dq - ref_dq) <= 1e-6 * np.abs(ref_dq)  # the same E4M3 value, float32 scale
  assert same.mean() > 0.999  # all but rare float32-vs-float64 rounding ties
  assert np.all(np.asarray(qt.q.astype(jnp.float32))[200:, 300:] == 0)  # padding stays zero


def check_bound(x, dq, scale_per_elem):
  """E4M3's bound: 2^-4 relative in the normal range, 2^-10 * scale absolute below it."""
  x, dq = np.asarray(x, np.float64), np.asarray(dq, np.float64)
  err = np.abs(dq - x)
  normal = np.abs(x) / scale_per_elem >= 2.0**-6
  assert np.all(err[normal] <= 2.0**-4 * np.abs(x[normal]) * (1 + 1e-6))
  assert np.all(err[~normal] <= 2.0**-10 * scale_per_elem[~normal] * (1 + 1e-6))
  return normal.mean()


@pytest.mark.parametrize("dist", ["normal", "student_t2", "wide", "tiny"])
@pytest.mark.parametrize("pow2", [False, True])
def test_quantisation_error_bound(dist, pow2):
  rng = np.random.default_rng(1)
  x = {"normal": lambda: rng.standard_normal((64, 384)),
       "student_t2": lambda: rng.standard_t(2, (64, 384)),  # heavy tails: outliers up to ~1e2
       "wide": lambda: wide((64, 384)),
       "tiny": lambda: rng.standard_normal((64, 384)) * 1e-3}[dist]().astype(np.float32)
  for tile in ((1, 128), (128, 1), (128, 128)):
    qt, dq = QDQ(jnp.asarray(x), tile, pow2)
    scale = np.repeat(np.repeat(np.asarray(qt.scale, np.float64), tile[0], 0), tile[1], 1)[:64, :384]
    frac_normal = check_bound(x, dq, scale)
    if dist == "normal" and tile[0] == 1:
      assert frac_normal > 0.9
    if pow2:
      m, _ = np.frexp(np.asarray(qt.scale))
      assert np.all(m == 0.5), "power-of-two scales"
      exact, _ = np_quant(x, tile)
      assert np.all(np.asarray(qt.scale) >= exact * (1 - 1e-6)) and np.all(np.asarray(qt.scale) < 2 * exact)


def test_zeros_stay_zero():
  quant = jax.jit(lambda x: [(q.scale, fp8.dequantize(q)) for q in (fp8.quantize(x, t) for t in
                                                                     ((1, 128), (128, 1), (128, 128)))])
  for scale, dq in quant(jnp.zeros((130, 200), jnp.bfloat16)):
    np.testing.assert_allclose(np.asarray(scale), 1e-4 / 448, rtol=1e-6)
    assert np.all(np.asarray(dq) == 0)
  y, (gx, gw) = jit_vjp(fp8.linear, jnp.zeros((5, 200)), jnp.zeros((200, 7)))
  assert np.all(np.asarray(y) == 0) and np.all(np.asarray(gx) == 0) and np.all(np.asarray(gw) == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate(backend, monkeypatch):
  """A NaN/Inf makes its whole tile NaN (documented), and every GEMM output touching it NaN."""
  x = wide((6, 300))
  x[1, 5] = np.nan
  x[4, 200] = np.inf
  dq = np.asarray(jax.jit(fp8.qdq, static_argnums=1)(jnp.asarray(x), (1, 128)))
  assert np.all(np.isnan(dq[1, :128])) and np.all(np.isnan(dq[4, 128:256]))
  ok = np.ones_like(dq, bool)
  ok[1, :128] = ok[4, 128:256] = False
  assert np.all(np.isfinite(dq[ok]))
  w = jnp.asarray(wide((300, 40), 1) * 0.05)
  recipe = make_recipe(backend)
  lin = jax.jit(lambda x, w: fp8.linear(x, w, recipe))
  y = np.asarray(lin(jnp.asarray(x), w))
  assert np.all(np.isnan(y[[1, 4]])) and np.all(np.isfinite(y[[0, 2, 3, 5]]))
  w_bad = w.at[7, 3].set(-jnp.inf)  # a bad weight: its 128x128 block, so output columns 0..39
  y = np.asarray(lin(jnp.asarray(wide((6, 300))), w_bad))
  assert np.all(np.isnan(y))


# ----------------------------------------------------------------------------- the FP8 linear
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_forward_and_gradients_vs_numpy(backend, monkeypatch):
  """200 x 300 @ 300 x 260 (no dimension a multiple of 128): Fprop, Dgrad and Wgrad equal the
  float64 products of NumPy-quantised operands with the recipe's tiles, and are within 5% of the
  unquantised float32 linear."""
  m, k, n = 200, 300, 260
  x, w, dy = wide((m, k), 0), wide((k, n), 1) * 0.05, wide((m, n), 2)
  recipe = make_recipe(backend)
  y, (dx, dw) = jit_vjp(lambda x, w: fp8.linear(x, w, recipe), jnp.asarray(x), jnp.asarray(w), cot=jnp.asarray(dy))
  y_ref = np_qdq(x, (1, 128)) @ np_qdq(w, (128, 128))
  dx_ref = np_qdq(dy, (1, 128)) @ np_qdq(w, (128, 128)).T
  dw_ref = np_qdq(x, (128, 1)).T @ np_qdq(dy, (128, 1))
  assert rel(y, y_ref) < 1e-5 and rel(dx, dx_ref) < 1e-5 and rel(dw, dw_ref) < 1e-5
  # The tiles matter: Wgrad with per-token (1x128) tiles is a different (wrong) quantisation.
  dw_wrong = np_qdq(x, (1, 128)).T @ np_qdq(dy, (1, 128))
  assert rel(dw_wrong, dw_ref) > 1e-3
  x64, w64, dy64 = (np.asarray(a, np.float64) for a in (x, w, dy))
  assert rel(y, x64 @ w64) < 0.05
  assert rel(dx, dy64 @ w64.T) < 0.05
  assert rel(dw, x64.T @ dy64) < 0.05


def test_xla_equals_qdq_and_scan_grouping():
  x, w = jnp.asarray(wide((130, 600))), jnp.asarray(wide((600, 200), 1) * 0.05)
  f = lambda r: jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(fp8.linear(x, w, r) ** 2), (0, 1)))(x, w)
  (lq, gq), (ln, gn) = f(fp8.Recipe("qdq")), f(fp8.Recipe("xla"))
  ls, gs = f(fp8.Recipe("xla", xla_partial_bytes=130 * 256 * 4 * 2))  # groups of 2 of the 5 K-chunks
  for a, b in ((ln, lq), (ls, lq)):
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
  for a, b in zip(gn + gs, gq + gq):
    assert rel(a, b) < 1e-5


@pytest.mark.parametrize("backend", ("qdq", "kernels"))
def test_linear_dtypes_and_batch_axes(backend, monkeypatch):
  """bf16 activations, float32 master kernel: y and dx bf16, dW float32; leading axes are tokens."""
  recipe = make_recipe(backend)
  x = jnp.asarray(wide((2, 3, 130)), jnp.bfloat16)
  w = jnp.asarray(wide((130, 20), 1) * 0.05)
  y, (dx, dw) = jit_vjp(lambda x, w: fp8.linear(x, w, recipe), x, w)
  assert y.shape == (2, 3, 20) and y.dtype == dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  xb, wb = jnp.asarray(wide((3, 40, 130))), jnp.asarray(wide((3, 130, 24), 1))

  @jax.jit
  def run(x, xb, wb):  # flattened tokens; fp8_matmul with batch axes == each batch alone
    return (fp8.linear(x.reshape(6, 130), w, recipe), fp8.fp8_matmul(xb, wb, recipe),
            jnp.stack([fp8.linear(xb[i], wb[i], recipe) for i in range(3)]))

  y_flat, yb, yb_each = run(x, xb, wb)
  np.testing.assert_array_equal(np.asarray(y.reshape(6, 20)), np.asarray(y_flat))
  np.testing.assert_allclose(np.asarray(yb), np.asarray(yb_each), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- routed experts
@pytest.mark.parametrize("backend", ("qdq", "kernels"))
def test_ragged_dot_vs_numpy(backend, monkeypatch):
  """Groups of 100, 0, 156 and 44 rows: group boundaries fall inside 128-row tiles, so Wgrad's
  128x1 token tiles restart at each boundary (never one scale for two experts)."""
  sizes = np.array([100, 0, 156, 44])
  m, d, f = int(sizes.sum()), 130, 70
  x, dy = wide((m, d), 0), wide((m, f), 2)
  w = np.stack([wide((d, f), 10 + e) * 0.1 for e in range(4)])
  recipe = make_recipe(backend)
  y, (dx, dw) = jit_vjp(lambda x, w: fp8.fp8_ragged_dot(x, w, jnp.asarray(sizes, jnp.int32), recipe),
                        jnp.asarray(x), jnp.asarray(w), cot=jnp.asarray(dy))
  ends = np.cumsum(sizes)
  starts = ends - sizes
  segments = []  # (tile x group) runs of rows
  for a, b in zip(starts, ends):
    cuts = sorted({a, b, *range((a // 128 + 1) * 128, b, 128)})
    segments += [(c0, c1) for c0, c1 in zip(cuts[:-1], cuts[1:])]
  xq, dyq = np_qdq(x, (1, 128)), np_qdq(dy, (1, 128))
  xt, dyt = np_qdq_rows(x, segments), np_qdq_rows(dy, segments)
  y_ref, dx_ref, dw_ref = np.zeros((m, f)), np.zeros((m, d)), np.zeros((4, d, f))
  for e, (a, b) in enumerate(zip(starts, ends)):
    we = np_qdq(w[e], (128, 128))
    y_ref[a:b] = xq[a:b] @ we
    dx_ref[a:b] = dyq[a:b] @ we.T
    dw_ref[e] = xt[a:b].T @ dyt[a:b]
  assert rel(y, y_ref) < 1e-5 and rel(dx, dx_ref) < 1e-5 and rel(dw, dw_ref) < 1e-5
  assert np.all(np.asarray(dw[1]) == 0)
  seg, n_seg = fp8.token_tile_segments(m, jnp.asarray(sizes, jnp.int32))
  assert int(seg[-1]) + 1 == len(segments) <= n_seg


def ref_experts(x, idx, w, gate, up, down):
  """float64 y_t = sum_k w_tk down_e(silu(x_t gate_e) * (x_t up_e))."""
  x, gate, up, down = (np.asarray(a, np.float64) for a in (x, gate, up, down))
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    for k in range(idx.shape[1]):
      e = int(idx[t, k])
      h = x[t] @ gate[e]
      y[t] += w[t, k] * ((h / (1 + np.exp(-h)) * (x[t] @ up[e])) @ down[e])
  return y


@pytest.mark.parametrize("f", [40, 128], ids=["two_matmuls", "gate_up_as_one"])
def test_fp8_experts_sorted_and_blocked(f):
  """Both grouped-matmul paths with FP8: equal to each other (same quantisation: at F = 128 the sorted
  path runs gate and up as one matmul, whose 128-wide scale tiles are the blocked path's) and,
  through the chain of three FP8 GEMMs of a SwiGLU expert (errors compound: each GEMM ~3.7%, and
  backward cotangents carry the forward's), within 8% (forward) of the float32 paths and, at F = 40,
  12% (gradients; measured: <= 7% and <= 11.1%); float32 master-weight gradients."""
  rng = np.random.default_rng(3)
  t, k, e, d = 96, 2, 4, 136
  idx = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
  w = rng.uniform(0.2, 1.0, (t, k)).astype(np.float32)
  x = wide((t, d), 4)
  gate, up = (rng.standard_normal((e, d, f)).astype(np.float32) * 0.1 for _ in range(2))
  down = rng.standard_normal((e, f, d)).astype(np.float32) * 0.1
  args = [jnp.asarray(a) for a in (x, idx, w, gate, up, down)]
  cot = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
  recipe = fp8.Recipe()

  def routed(ffn, x, w, gate, up, down, r):  # each (token, k) a row, then the weighted combine
    return combine(ffn(jnp.repeat(x, k, axis=0), args[1].reshape(-1), gate, up, down, fp8=r), w)

  @jax.jit
  def run(x, w, gate, up, down):
    out = {}
    for name, ffn in (("sorted", ragged_ffn), ("blocked", cpu.blocked_ffn)):
      for r in (None, recipe):
        loss = lambda *p: jnp.sum(routed(ffn, *p, r) * cot)
        y = routed(ffn, x, w, gate, up, down, r)
        out[name, r is not None] = (y, jax.grad(loss, argnums=(0, 1, 2, 3, 4))(x, w, gate, up, down))
    return out

  out = run(*args[:1], *args[2:])
  want = ref_experts(x, idx, w, gate, up, down)
  for name in ("sorted", "blocked"):
    y8, g8 = out[name, True]
    y32, g32 = out[name, False]
    assert rel(y8, want) < 0.08 and rel(y32, want) < 1e-5
    for a, b in zip(g8, g32):
      assert a.dtype == jnp.float32 and (f != 40 or rel(a, b) < 0.12)
  assert rel(out["sorted", True][0], out["blocked", True][0]) < 1e-5


SMALL = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                    num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                    qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                    n_group=2, topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=1,
                    max_position_embeddings=64, initializer_range=0.05)
FP8 = Runtime.resolve(dtype="bfloat16", param_dtype="float32", fp8=True, announce=False)


def test_model_uses_fp8_where_the_recipe_says():
  """Attention projections, dense/shared FFNs and routed experts FP8; head, MTP projection, router,
  embedding not (end to end: test_fp8_check_short_run)."""
  from moe.layers import Linear

  model = nnx.eval_shape(lambda: Transformer(SMALL, FP8, rngs=nnx.Rngs(0)))
  fp8_layers = {".".join(map(str, p)) for p, m in nnx.iter_graph(model) if isinstance(m, Linear) and m.fp8}
  plain = {".".join(map(str, p)) for p, m in nnx.iter_graph(model) if isinstance(m, Linear) and not m.fp8}
  assert plain == {"lm_head", "mtp.0.eh_proj"}
  for name in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj"):
    assert any(n.endswith("self_attn." + name) or n.endswith("mlp." + name) for n in fp8_layers), name
  assert any("shared_experts.down_proj" in n for n in fp8_layers)
  assert model.moe_layers.layers.mlp.experts.fp8 == fp8.Recipe()
  assert not hasattr(model.moe_layers.layers.mlp.gate, "fp8")  # the router: float32, no FP8


def test_precision_fp8_maps_to_the_runtime():
  from parallel.common.errors import ConfigError
  from train.core import loop
  from train.core.train_config import load_train_config

  cfg = load_train_config(ROOT / "configs/tiny.yaml", ["precision=fp8", "impl.fp8_pow2_scales=true"])
  par = loop.parallelism(cfg)
  rt = loop.runtime(cfg, par)
  assert (rt.dtype, rt.param_dtype, rt.fp8) == ("bfloat16", "float32", fp8.Recipe("qdq", pow2_scales=True))
  assert loop.runtime(cfg.replace(precision="bf16"), par).fp8 is None
  assert "fp8" not in cfg.model.to_hf_dict()  # runtime fields stay out of config.json
  assert "quantise->dequantise" in rt.fp8.describe()  # CPU: the emulated path, said so
  for choice, want in (("xla", fp8.Recipe("xla")), ("kernels", fp8.Recipe("kernels", interpret=True))):
    assert Runtime.resolve(ImplConfig(fp8_gemm=choice), fp8=True, announce=False).fp8 == want
  with pytest.raises(ConfigError, match="impl.experts=dense has no FP8 path"):
    Runtime.resolve(ImplConfig(experts="dense"), fp8=True, announce=False)
  for kernel in ("megablox", "triton"):
    with pytest.raises(ConfigError, match=f"impl.experts={kernel} has no FP8 path"):
      Runtime.resolve(ImplConfig(experts=kernel), fp8=True, announce=False)


TINY_OVERRIDES = [
    "model.hidden_size=32", "model.intermediate_size=64", "model.moe_intermediate_size=32",
    "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.q_lora_rank=16", "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8", "model.n_routed_experts=4",
    "model.num_nextn_predict_layers=0", "seq_len=32", "batch_size=2", "optimizer.warmup_steps=2", "log_every=100",
]


def test_fp8_check_short_run(tmp_path, capsys):
  """`python -m train.fp8_check`: same seed, same data, bf16 vs fp8 on a very small model for 8
  steps; the last stdout line is the JSON summary; losses agree within 2% (the V3 report's 0.25%
  is for long runs: docs/fp8.md has the 300-step tiny.yaml measurement)."""
  from train import fp8_check

  rc = fp8_check.main([str(ROOT / "configs/tiny.yaml"), *TINY_OVERRIDES, "--steps", "8", "--tail", "0.25",
                       "--no-eval", "--out", str(tmp_path), "--plot", str(tmp_path / "curves.png")])
  assert rc == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert {"bf16_loss", "fp8_loss", "rel_loss_diff", "fp8_path"} <= summary.keys()
  assert summary["tail_steps"] == 2 and summary["steps"] == 8
  assert np.isfinite(summary["fp8_loss"]) and abs(summary["rel_loss_diff"]) < 0.02
  runs = json.loads((tmp_path / "losses.json").read_text())["runs"]
  assert len(runs["bf16"]["lm_loss"]) == len(runs["fp8"]["lm_loss"]) == 8
  assert runs["bf16"]["lm_loss"][0] == pytest.approx(runs["fp8"]["lm_loss"][0], rel=0.02)  # same init, same batch
  assert runs["fp8"]["lm_loss"][-1] < runs["fp8"]["lm_loss"][0]  # it learns
  assert (tmp_path / "curves.png").stat().st_size > 0


def test_bench_fp8_covers_the_models_fp8_linears(capsys):
  """`train.bench_fp8`'s GEMM shapes are the FP8 Linear kernels of the model (V3-style and the plain
  q_proj of V2-Lite), and the CLI prints one JSON line per GEMM and a total."""
  from moe.layers import Linear
  from train import bench_fp8

  for cfg in (SMALL, SMALL.replace(q_lora_rank=None)):
    model = nnx.eval_shape(lambda: Transformer(cfg, FP8, rngs=nnx.Rngs(0)))
    got = {}
    for path, m in nnx.iter_graph(model):
      if isinstance(m, Linear) and m.fp8 and "mtp" not in path:
        got.setdefault(path[-1], set()).add(tuple(m.kernel.shape[-2:]))  # stacked layers: [L, in, out]
    want = {}
    for name, (k, n, _) in bench_fp8.linear_shapes(cfg).items():
      for leaf in ([name.split(".")[-1]] if "/" not in name else ["gate_proj", "up_proj"]):
        want.setdefault(leaf, set()).add((k, n))
    assert got == want
  assert bench_fp8.main(["configs/tiny.yaml", *TINY_OVERRIDES, "--iters", "1"]) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert len(rows) == len(bench_fp8.linear_shapes(SMALL)) + 3
  assert all(r["bf16_s"] > 0 and r["fp8_s"] > 0 for r in rows[:-1]) and rows[-1]["speedup"] > 0


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_config_traces_a_fp8_train_step(config):
  """precision=fp8 builds and traces the full train step (forward, backward, AdamW) of every config,
  V3-671B included (abstractly: jax.eval_shape, nothing allocated)."""
  from train.core import optimizer as optimizer_lib
  from train.core import step as step_lib
  from train.core.train_config import load_train_config

  cfg = load_train_config(ROOT / "configs" / config, ["precision=fp8", "batch_size=1", "seq_len=128", "grad_accum=1"])
  rt = Runtime.resolve(cfg.impl, dtype=cfg.compute_dtype, param_dtype="float32", fp8=cfg.fp8, announce=False)
  schedule = optimizer_lib.make_schedule(cfg)
  tx = optimizer_lib.make_optimizer(cfg, schedule)
  make = lambda: Transformer(cfg.model, rt, rngs=nnx.Rngs(0))
  state = jax.eval_shape(lambda: step_lib.init_state(make(), tx)[1])
  step = step_lib.make_train_step(nnx.graphdef(nnx.eval_shape(make)), cfg.model, tx, schedule, cfg)
  batch = {k: jax.ShapeDtypeStruct((1, 128), jnp.float32 if k == "loss_mask" else jnp.int32)
           for k in ("tokens", "targets", "segment_ids", "positions", "loss_mask")}
  new_state, metrics = jax.eval_shape(step, state, batch)
  assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32
  assert jax.tree.map(lambda a: (a.shape, a.dtype), new_state["params"]) == jax.tree.map(
      lambda a: (a.shape, a.dtype), state["params"])
