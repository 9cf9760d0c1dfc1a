"""The hardware check: `python -m train.device_check` on a machine with one NVIDIA GPU.

In order, each a subprocess with its own time limit (all together under 8 minutes on an H100):
  kernels   the FP8 Pallas kernels (block-scaled matmul, grouped matmul: moe/kernels/fp8_pallas.py)
            and the MLA flash-attention kernel (moe/kernels/mla_flash.py, V3's head sizes, its output
            and gradients) compiled for the GPU and run on it, against float64 NumPy
            (tests/test_fp8_gpu.py and tests/test_mla.py run the same in the Pallas interpreter);
            relative errors, each under its BOUNDS
  bench     train.bench on configs/bench-gpu.yaml in bf16 and in FP8: step time, tokens/s, MFU
            against the GPU's published peak (configs/hardware/chips.yaml) and against a matmul peak
            measured on the spot
  forecast  train.aot's forecast of the same bf16 step for this GPU (h100x1, h200x1, b200x1), and
            the measured step's error against it
Prints one JSON line and a short table. Without an NVIDIA GPU it checks that its plan is complete
(every module, config and test it would run is there) and says so in one line, exit 0.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = "configs/bench-gpu.yaml"
PLAN = [  # (name, argv after python, seconds)
    ("kernels", ["-m", "train.device_check", "--kernels"], 120),
    ("bench_bf16", ["-m", "train.bench", BENCH, "precision=bf16", "--steps", "5"], 150),
    ("bench_fp8", ["-m", "train.bench", BENCH, "precision=fp8", "--steps", "5"], 150),
    ("forecast", ["-m", "train.aot", BENCH, "--target", "{target}", "precision=bf16"], 60),
]


def missing(plan=PLAN) -> list[str]:
  """What the plan would run that is not here: modules, configs, test files."""
  out = []
  for _, argv, _ in plan:
    for i, a in enumerate(argv):
      if argv[i - 1] == "-m" and a != "pytest" and importlib.util.find_spec(a) is None:
        out.append(f"module {a}")
      elif a.endswith((".yaml", ".py")) and not (ROOT / a).is_file():
        out.append(a)
  return out


BOUNDS = {"blockscaled": 1e-5, "grouped": 1e-5,  # exact products of FP8 values, summed in float32
          "attention": 2e-2}  # bf16 inputs, the softmax weights rounded to bf16 for the PV matmuls


def attention_error(interpret: bool = False) -> float:
  """The MLA flash-attention kernel at V3's head sizes (q/k 192 = 128 + 64, v 128) on bf16 inputs,
  two documents, 256 positions in blocks of 64: the largest relative error of its output and of q's,
  k's and v's gradients against float64 NumPy on the same (bf16-rounded) values."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from moe import mla
  from moe.kernels import mla_flash

  r = np.random.default_rng(1)
  b, s, h, dk, dv, scale = 1, 256, 2, 192, 128, 0.1
  q, k, v, do = (jnp.asarray(r.normal(size=(b, s, h, d)), jnp.bfloat16) for d in (dk, dk, dv, dv))
  seg = np.ones((b, s), np.int32)
  seg[:, 100:] = 2
  out, pull = jax.vjp(lambda q, k, v: mla_flash.attention(q, k, v, jnp.asarray(seg), scale, 64, interpret), q, k, v)
  got = [out, *pull(do)]
  q, k, v, do = (np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v, do))
  visible = np.asarray(mla.attention_mask(jnp.asarray(seg)))  # [B, 1, q, k]
  logits = np.where(visible, np.einsum("bqhd,bkhd->bhqk", q, k) * scale, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  dp = np.einsum("bqhd,bkhd->bhqk", do, v)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * scale
  want = [np.einsum("bhqk,bkhd->bqhd", p, v), np.einsum("bhqk,bkhd->bqhd", ds, k),
          np.einsum("bhqk,bqhd->bkhd", ds, q), np.einsum("bhqk,bqhd->bkhd", p, do)]
  return max(float(np.abs(np.asarray(g, np.float64) - w).max() / np.abs(w).max()) for g, w in zip(got, want))


def kernels() -> dict:
  """The Pallas kernels on this GPU against float64 NumPy: {blockscaled, grouped, attention} relative errors."""
  import jax.numpy as jnp
  import numpy as np

  from moe.kernels import fp8
  from moe.kernels import fp8_pallas

  r = np.random.default_rng(0)
  a = jnp.asarray(r.normal(size=(200, 384)) * 30).astype(fp8.E4M3)
  b = jnp.asarray(r.normal(size=(384, 260)) * 30).astype(fp8.E4M3)
  sa, sb = r.uniform(0.01, 2, (200, 3)), r.uniform(0.01, 2, (3, 260))
  y = np.asarray(fp8_pallas.blockscaled_matmul(a, b, jnp.asarray(sa, jnp.float32), jnp.asarray(sb, jnp.float32)))
  f64 = lambda x: np.asarray(x.astype(jnp.float32), np.float64)
  want = (f64(a) * np.repeat(sa, 128, 1)) @ (f64(b) * np.repeat(sb, 128, 0))
  rel = lambda got, ref: float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
  sizes = np.array([70, 0, 200, 3, 90])
  q = jnp.asarray(r.normal(size=(383, 256)) * 30).astype(fp8.E4M3)
  wq = jnp.asarray(r.normal(size=(5, 256, 256)) * 30).astype(fp8.E4M3)
  sq, sw = r.uniform(0.01, 2, (383, 2)), r.uniform(0.01, 2, (5, 2, 2))
  g = np.asarray(fp8_pallas.grouped_matmul(q, jnp.asarray(sq, jnp.float32), wq, jnp.asarray(sw, jnp.float32),
                                           jnp.asarray(sizes, jnp.int32)))
  q64, errors, start = f64(q) * np.repeat(sq, 128, 1), [], 0
  for e, n in enumerate(sizes):
    if n:
      w64 = f64(wq[e]) * np.repeat(np.repeat(sw[e], 128, 0), 128, 1)
      errors.append(rel(g[start:start + n], q64[start:start + n] @ w64))
    start += n
  return {"blockscaled": rel(y, want), "grouped": max(errors), "attention": attention_error()}


def gpu() -> str | None:
  """The first NVIDIA GPU's name (nvidia-smi), or None."""
  try:
    r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                       timeout=20)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None


def target_of(name: str) -> str | None:
  m = re.search(r"\b(H100|H200|B200)\b", name.upper())
  return f"{m.group(1).lower()}x1" if m else None


def last_json(text: str) -> dict:
  for line in reversed(text.strip().splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  return {}


def run(target: str) -> dict:
  out = {"gpu_target": target}
  for name, argv, limit in PLAN:
    t0 = time.perf_counter()
    argv = [a.format(target=target) for a in argv]
    try:
      r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=limit,
                         env={**os.environ, "DEVICE_CHECK": "1"})
      rc, text = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired:
      rc, text = 124, ""
    row = {"rc": rc, "s": round(time.perf_counter() - t0, 1)}
    row.update(last_json(text))
    out[name] = row
  bench, fc = out["bench_bf16"], out["forecast"].get("forecast", {})
  if bench.get("step_s") and fc.get("step_s"):
    out["measured_over_forecast"] = round(bench["step_s"] / fc["step_s"], 3)
  return out


def table(r: dict) -> str:
  rows = [f"{'check':12s} {'rc':>4s} {'s':>6s}  result"]
  for name in ("kernels", "bench_bf16", "bench_fp8", "forecast"):
    x = r[name]
    what = (f"rel. error blockscaled {x.get('blockscaled')}, grouped {x.get('grouped')}, attention {x.get('attention')}"
            if name == "kernels" else
            f"step {x.get('step_s')} s, {x.get('tokens_per_s')} tok/s, MFU {x.get('mfu')}" if name.startswith("bench")
            else f"forecast step {x.get('forecast', {}).get('step_s')} s")
    rows.append(f"{name:12s} {x['rc']:>4d} {x['s']:>6.1f}  {what}")
  if "measured_over_forecast" in r:
    rows.append(f"measured bf16 step / forecast: {r['measured_over_forecast']}")
  return "\n".join(rows)


def main(argv=None) -> int:
  from train.core import jsonl  # strict JSON (NaN -> null); the project is imported inside functions here

  if (argv if argv is not None else sys.argv[1:]) == ["--kernels"]:
    errors = kernels()
    print(jsonl.dumps(errors))
    return 0 if all(errors[k] < bound for k, bound in BOUNDS.items()) else 1
  gaps = missing()
  if gaps:
    print(f"device_check: its plan is incomplete, missing {', '.join(gaps)}", file=sys.stderr)
    return 2
  name = gpu()
  if name is None:
    print(f"device_check: no NVIDIA GPU here; the plan ({len(PLAN)} checks: {', '.join(n for n, _, _ in PLAN)})"
          " is complete")
    return 0
  target = target_of(name)
  if target is None:
    print(f"device_check: {name} is not a GPU with a forecast target (H100, H200, B200)", file=sys.stderr)
    return 2
  r = run(target)
  print(jsonl.dumps(r))
  print(table(r))
  return 0 if all(r[n]["rc"] == 0 for n, _, _ in PLAN) else 1


if __name__ == "__main__":
  sys.exit(main())
