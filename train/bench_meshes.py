"""Compare training-step times of several meshes in one process, interleaved:
`python -m train.bench_meshes CONFIG MESH [MESH ...] [--rounds R] [--set key=value ...]`.

MESH is comma-separated `mesh.` keys, e.g. `data=1` `data=8` `expert=8,capacity_factor=2`
(unset axes: data=1, fsdp=1, expert=1, tensor=1). All meshes are built first (compiled and warmed
up); then each of R rounds times one step of every mesh in turn, so a change in the machine's load
hits all of them alike. Prints one JSON line per mesh: min and median step seconds, dropped tokens.
Meant for simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), where a 1-device
mesh and 8-device meshes can run side by side in one process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax

from train.core import loop
from train.core.config import load_train_config
from train.core.data import synthetic_batch


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("config")
  p.add_argument("meshes", nargs="+")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--set", nargs="*", default=[], help="key=value overrides for every mesh")
  args = p.parse_args(argv)
  runs = []
  for spec in args.meshes:
    keys = dict(data=1, fsdp=1, expert=1, tensor=1)
    keys.update(kv.split("=", 1) for kv in spec.split(","))
    cfg = load_train_config(args.config, list(args.set) + [f"mesh.{k}={v}" for k, v in keys.items()])
    par = loop.parallelism(cfg)
    state, step, *_ = loop.build(cfg, par)
    batch = loop.to_device(synthetic_batch(cfg.batch_size, cfg.seq_len, cfg.model.vocab_size, cfg.seed), par)
    t = time.perf_counter()
    state, metrics = step(state, batch)  # compile
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t
    state, metrics = step(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    runs.append({"mesh": spec, "state": state, "step": step, "batch": batch, "times": [], "compile_s": compile_s,
                 "dropped_tokens": int(metrics.get("dropped_tokens", 0))})
  for _ in range(args.rounds):
    for r in runs:
      t = time.perf_counter()
      r["state"], metrics = r["step"](r["state"], r["batch"])
      jax.block_until_ready(metrics)
      r["times"].append(time.perf_counter() - t)
  for r in runs:
    print(json.dumps({"mesh": r["mesh"], "devices": jax.device_count(), "min_step_s": round(min(r["times"]), 3),
                      "median_step_s": round(statistics.median(r["times"]), 3),
                      "first_step_s": round(r["compile_s"], 1), "dropped_tokens": r["dropped_tokens"]}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
