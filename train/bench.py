"""Benchmark full training steps: `python -m train.bench CONFIG [key=value ...]`.

Times forward + backward + optimiser on a synthetic batch (random tokens, one document per row)
after warm-up and prints one JSON line: tokens_per_s, step_s, model_flops_per_token (moe.params:
6 x active matmul params + attention), achieved TFLOP/s, the peak TFLOP/s of this machine measured
on the spot with a large matmul in the compute dtype, and MFU = achieved / peak.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax

from moe import params as params_lib
from parallel.common.errors import InputError
from train.core import jsonl
from train.core import loop
from train.core.train_config import load_train_config
from train.core.input_pipeline import synthetic_batch
from train.core.metrics import device_memory, measure_peak_flops


def best_of(fn, *args, iters=5):
  """Best wall time of `iters` calls of `fn(*args)` after one warm-up call."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def run(cfg, steps: int = 10, warmup: int = 2) -> dict:
  par = loop.parallelism(cfg)
  rt = loop.runtime(cfg, par)
  # The peak is the best of measurements before and after the steps: on a shared or throttling
  # machine a single low reading would inflate MFU.
  peak = measure_peak_flops(rt.compute_dtype)
  state, train_step, *_ = loop.build(cfg, par, rt)
  batch = loop.to_device(synthetic_batch(cfg.batch_size, cfg.seq_len, cfg.model.vocab_size, cfg.seed), par)
  for _ in range(warmup):
    state, metrics = train_step(state, batch)
  jax.block_until_ready(metrics)
  t = time.perf_counter()
  for _ in range(steps):
    state, metrics = train_step(state, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t) / steps
  tokens = cfg.batch_size * cfg.seq_len
  flops_per_token = params_lib.count(cfg.model, cfg.seq_len)["flops_per_token"]
  achieved = flops_per_token * tokens / step_s
  peak = max(peak, measure_peak_flops(rt.compute_dtype))
  return {"config": cfg.run_dir, "backend": rt.platform, "devices": par.mesh.size,
          "mesh": dict(par.mesh.shape), "ep_transport": par.ep_transport,
          **({"dropped_tokens": int(metrics["dropped_tokens"])} if "dropped_tokens" in metrics else {}),
          "dtype": rt.dtype, "precision": cfg.precision, "attention": rt.attention, "experts": rt.experts,
          **({"fp8": rt.fp8.describe()} if rt.fp8 is not None else {}),
          "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
          "tokens_per_s": round(tokens / step_s, 1), "step_s": round(step_s, 4),
          "model_flops_per_token": flops_per_token, "achieved_tflops": round(achieved / 1e12, 4),
          "peak_tflops": round(peak / 1e12, 4), "mfu": round(achieved / peak, 4),
          **({"device_memory": device_memory()} if device_memory() is not None else {})}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("config")
  p.add_argument("overrides", nargs="*",
                 help="key=value, e.g. batch_size=16 precision=bf16 mesh.data=2 mesh.expert=4")
  p.add_argument("--steps", type=int, default=10, help="timed steps (after warm-up)")
  p.add_argument("--warmup", type=int, default=2)
  args = p.parse_args(argv)
  def bench() -> int:
    print(jsonl.dumps(run(load_train_config(args.config, args.overrides), args.steps, args.warmup)))
    return 0

  return one_line_errors(bench)


def one_line_errors(fn) -> int:
  """fn()'s exit code, or 2 after one line on stderr for a bad config, mesh or data (the benchmarks' CLIs)."""
  try:
    return fn()
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
