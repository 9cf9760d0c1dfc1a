"""Benchmark full training steps: `python -m train.bench CONFIG [key=value ...]`.

Times forward + backward + optimiser on a synthetic batch (random tokens, one document per row)
after warm-up and prints one JSON line: tokens_per_s, step_s, model_flops_per_token (moe.params:
6 x active matmul params + attention), achieved TFLOP/s, the peak TFLOP/s of this machine measured
on the spot with a large matmul in the compute dtype, and MFU = achieved / peak.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from moe import params as params_lib
from moe.config import ConfigError


def measure_peak_flops(dtype, n: int | None = None, iters: int = 30) -> float:
  """FLOP/s of an n x n x n matmul in `dtype` (best of `iters` timed runs)."""
  if n is None:
    n = 2048 if jax.default_backend() == "cpu" else 8192
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype))
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(iters):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def synthetic_batch(batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch_size, seq_len + 1), dtype=np.int32)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.ones((batch_size, seq_len), np.int32),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy(),
          "loss_mask": np.ones((batch_size, seq_len), np.float32)}


def fp8_path(model_cfg) -> str:
  """How the FP8 GEMMs run here (precision=fp8): native FP8 dots, or quantise->dequantise (CPU: slower
  than bf16, it adds the quantisation work to float32 matmuls). MFU stays against the bf16 peak."""
  from moe import fp8 as fp8_lib

  return fp8_lib.describe(fp8_lib.Recipe.of(model_cfg))


def run(cfg, steps: int = 10, warmup: int = 2) -> dict:
  from train import loop

  model_cfg = loop.model_config(cfg)
  par = loop.parallelism(cfg)
  # The peak is the best of measurements before and after the steps: on a shared or throttling
  # machine a single low reading would inflate MFU.
  peak = measure_peak_flops(jnp.dtype(model_cfg.dtype))
  state, train_step, _ = loop.build(cfg, model_cfg, par)
  batch = loop.to_device(synthetic_batch(cfg.batch_size, cfg.seq_len, model_cfg.vocab_size, cfg.seed), par)
  for _ in range(warmup):
    state, metrics = train_step(state, batch)
  jax.block_until_ready(metrics)
  t = time.perf_counter()
  for _ in range(steps):
    state, metrics = train_step(state, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t) / steps
  tokens = cfg.batch_size * cfg.seq_len
  flops_per_token = params_lib.count(model_cfg, cfg.seq_len)["flops_per_token"]
  achieved = flops_per_token * tokens / step_s
  peak = max(peak, measure_peak_flops(jnp.dtype(model_cfg.dtype)))
  return {"config": cfg.run_dir, "backend": jax.default_backend(), "devices": jax.device_count(),
          "mesh": dict(par.mesh.shape), "ep_transport": par.ep_transport,
          **({"dropped_tokens": int(metrics["dropped_tokens"])} if "dropped_tokens" in metrics else {}),
          "dtype": model_cfg.dtype, "precision": cfg.precision,
          **({"fp8": fp8_path(model_cfg)} if model_cfg.fp8 else {}),
          "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
          "tokens_per_s": round(tokens / step_s, 1), "step_s": round(step_s, 4),
          "model_flops_per_token": flops_per_token, "achieved_tflops": round(achieved / 1e12, 4),
          "peak_tflops": round(peak / 1e12, 4), "mfu": round(achieved / peak, 4)}


def main(argv=None) -> int:
  from train.config import load_train_config

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("config")
  p.add_argument("overrides", nargs="*",
                 help="key=value, e.g. batch_size=16 precision=bf16 mesh.data=2 mesh.expert=4")
  p.add_argument("--steps", type=int, default=10, help="timed steps (after warm-up)")
  p.add_argument("--warmup", type=int, default=2)
  args = p.parse_args(argv)
  try:
    cfg = load_train_config(args.config, args.overrides)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(run(cfg, args.steps, args.warmup)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
