"""FP8 vs bf16 for each GEMM of a model, alone: `python -m train.bench_fp8 CONFIG [key=value ...]`.

For every distinct linear of a layer (shapes from the config; rows = batch_size x seq_len tokens) and
the routed experts' two grouped GEMM shapes (tokens x top-k rows over the experts, random uniform
routing), times `jit(value_and_grad)` - Fprop, Dgrad and Wgrad - with bf16 operands and with the FP8
recipe on the path `impl.fp8_gemm` resolves to here (moe.kernels.fp8.Recipe), best of `--iters`. Prints one JSON line per GEMM
(count per layer, bf16 and fp8 seconds, speed-up) and a last line with the layer totals: what FP8
can win in the step before a full `train.bench` run, and which GEMM to look at when it does not.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from moe.config import ModelConfig
from moe.kernels import fp8 as fp8_lib
from moe.runtime import Runtime
from parallel.common.errors import ConfigError
from train.bench import best_of
from train.core import jsonl
from train.core.train_config import load_train_config


def linear_shapes(m: ModelConfig) -> dict[str, tuple[int, int, int]]:
  """name -> (in features, out features, count per MoE layer) of the FP8 linears; `dense_mlp` is in
  the first_k_dense_replace layers instead of the MoE."""
  d, h = m.hidden_size, m.num_attention_heads
  shapes = {"q_a_proj": (d, m.q_lora_rank, 1), "q_b_proj": (m.q_lora_rank, h * m.qk_head_dim, 1)} if m.q_lora_rank \
      else {"q_proj": (d, h * m.qk_head_dim, 1)}
  shapes |= {"kv_a_proj_with_mqa": (d, m.kv_lora_rank + m.qk_rope_head_dim, 1),
             "kv_b_proj": (m.kv_lora_rank, h * (m.qk_nope_head_dim + m.v_head_dim), 1),
             "o_proj": (h * m.v_head_dim, d, 1)}
  if m.n_shared_experts:
    shared = m.n_shared_experts * m.moe_intermediate_size
    shapes |= {"shared_experts.gate/up_proj": (d, shared, 2), "shared_experts.down_proj": (shared, d, 1)}
  shapes |= {"dense_mlp.gate/up_proj": (d, m.intermediate_size, 0), "dense_mlp.down_proj": (m.intermediate_size, d, 0)}
  return shapes


def _time_grad(loss, args, iters):
  return best_of(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), *args, iters=iters)


def run(cfg, iters: int = 10) -> list[dict]:
  m = cfg.model
  recipe = Runtime.resolve(cfg.impl, dtype="bfloat16", fp8=True, devices=jax.devices()[:1], announce=False).fp8
  t = cfg.batch_size * cfg.seq_len
  key = iter(jax.random.split(jax.random.key(cfg.seed), 32))
  rows = []
  for name, (k, n, count) in linear_shapes(m).items():
    x = jax.random.normal(next(key), (t, k), jnp.bfloat16)
    w = jax.random.normal(next(key), (k, n), jnp.float32) * k**-0.5
    bf16 = _time_grad(lambda x, w: jnp.dot(x, w.astype(jnp.bfloat16)).astype(jnp.float32).sum(), (x, w), iters)
    fp8 = _time_grad(lambda x, w: fp8_lib.linear(x, w, recipe).astype(jnp.float32).sum(), (x, w), iters)
    rows.append({"gemm": name, "m": t, "k": k, "n": n, "per_layer": count, "bf16_s": bf16, "fp8_s": fp8})
  e, f, topk = m.n_routed_experts, m.moe_intermediate_size, m.num_experts_per_tok
  sizes = jnp.asarray(np.bincount(np.random.default_rng(cfg.seed).integers(0, e, t * topk), minlength=e), jnp.int32)
  for name, (k, n, count) in {"experts.gate/up": (m.hidden_size, f, 2), "experts.down": (f, m.hidden_size, 1)}.items():
    x = jax.random.normal(next(key), (t * topk, k), jnp.bfloat16)
    w = jax.random.normal(next(key), (e, k, n), jnp.float32) * k**-0.5
    bf16 = _time_grad(lambda x, w: jax.lax.ragged_dot(x, w.astype(jnp.bfloat16), sizes).astype(jnp.float32).sum(),
                      (x, w), iters)
    fp8 = _time_grad(lambda x, w: fp8_lib.fp8_ragged_dot(x, w, sizes, recipe).astype(jnp.float32).sum(), (x, w), iters)
    rows.append({"gemm": name, "m": t * topk, "k": k, "n": n, "experts": e, "per_layer": count,
                 "bf16_s": bf16, "fp8_s": fp8})
  for r in rows:
    r["speedup"] = r["bf16_s"] / r["fp8_s"]
  bf16_total = sum(r["bf16_s"] * r["per_layer"] for r in rows)
  fp8_total = sum(r["fp8_s"] * r["per_layer"] for r in rows)
  rows.append({"moe_layer_gemms_bf16_s": bf16_total, "moe_layer_gemms_fp8_s": fp8_total,
               "speedup": bf16_total / fp8_total, "backend": jax.default_backend(),
               "device": jax.devices()[0].device_kind, "fp8_path": recipe.describe()})
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("config")
  p.add_argument("overrides", nargs="*", help="key=value, e.g. batch_size=4 impl.fp8_gemm=xla")
  p.add_argument("--iters", type=int, default=10, help="timed runs per GEMM (best is reported)")
  args = p.parse_args(argv)
  try:
    cfg = load_train_config(args.config, args.overrides)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for row in run(cfg, args.iters):
    print(jsonl.dumps(row), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
