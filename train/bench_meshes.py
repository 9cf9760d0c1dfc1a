"""Compare training-step times of several meshes in one process, interleaved:
`python -m train.bench_meshes CONFIG MESH [MESH ...] [--rounds R] [--set key=value ...]`.

MESH is comma-separated `mesh.` keys, e.g. `data=1` `data=8` `expert=8,capacity_factor=2`
(unset axes: data=1, fsdp=1, expert=1, tensor=1), and for pipelines `pipeline.` keys: `stage=4,data=2,
schedule=1f1b,microbatches=8`. A pipelined mesh's line also gives its schedule's predictions
(parallel/pipeline.py): `bubble` (the masked share of the chunk work the executor runs), `predicted_ratio`
(its step time over an unpipelined run's: the chunk work it executes, bubbles included, over the
F_COST + B_COST = 3 units per micro-batch and chunk of an unpipelined forward + backward) and, against the
first unpipelined mesh given, the measured `ratio` and `measured_idle` = 1 - (the schedule's useful
work / 3MC) / ratio, to set against `bubble` (on simulated CPU devices every device shares the same
cores, so time is work). All meshes are built first (compiled and warmed
up); then each of R rounds times one step of every mesh in turn, so a change in the machine's load
hits all of them alike. Prints one JSON line per mesh: min and median step seconds, dropped tokens.
Meant for simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), where a 1-device
mesh and 8-device meshes can run side by side in one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import jax

from parallel.pipeline import B_COST, F_COST, PipelineConfig
from train.bench import one_line_errors
from train.core import jsonl
from train.core import loop
from train.core.train_config import load_train_config
from train.core.input_pipeline import synthetic_batch


PIPELINE_KEYS = {f.name for f in dataclasses.fields(PipelineConfig)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("config")
  p.add_argument("meshes", nargs="+")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--set", nargs="*", default=[], help="key=value overrides for every mesh")
  args = p.parse_args(argv)
  return one_line_errors(lambda: run(args))


def run(args) -> int:
  runs = []
  for spec in args.meshes:
    keys = dict(data=1, fsdp=1, expert=1, tensor=1)
    keys.update(kv.split("=", 1) for kv in spec.split(","))
    over = [f"{'pipeline' if k in PIPELINE_KEYS else 'mesh'}.{k}={v}" for k, v in keys.items()]
    cfg = load_train_config(args.config, list(args.set) + over)
    par = loop.parallelism(cfg)
    built = loop.build(cfg, par)
    state, step = built.state, built.train_step
    batch = loop.to_device(synthetic_batch(cfg.batch_size, cfg.seq_len, cfg.model.vocab_size, cfg.seed), par)
    t = time.perf_counter()
    state, metrics = step(state, batch)  # compile
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t
    state, metrics = step(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    runs.append({"mesh": spec, "state": state, "step": step, "batch": batch, "times": [], "compile_s": compile_s,
                 "dropped_tokens": int(metrics.get("dropped_tokens", 0)), "sched": built.pipe_schedule})
  for _ in range(args.rounds):
    for r in runs:
      t = time.perf_counter()
      r["state"], metrics = r["step"](r["state"], r["batch"])
      jax.block_until_ready(metrics)
      r["times"].append(time.perf_counter() - t)
  base = next((statistics.median(r["times"]) for r in runs if r["sched"] is None), None)
  for r in runs:
    line = {"mesh": r["mesh"], "devices": jax.device_count(), "min_step_s": round(min(r["times"]), 3),
            "median_step_s": round(statistics.median(r["times"]), 3),
            "first_step_s": round(r["compile_s"], 1), "dropped_tokens": r["dropped_tokens"]}
    if (s := r["sched"]) is not None:
      units = (F_COST + B_COST) * s.microbatches * s.stages * s.repeats  # unpipelined fwd + bwd of every chunk
      line.update(schedule=s.kind, bubble=round(s.bubble(), 3), textbook_bubble=round(s.textbook_bubble(), 3),
                  predicted_ratio=round(s.executed() / units, 3))
      if base is not None:
        ratio = statistics.median(r["times"]) / base
        line.update(ratio=round(ratio, 3), measured_idle=round(1 - s.work() / units / ratio, 3))
    print(jsonl.dumps(line))
  return 0


if __name__ == "__main__":
  sys.exit(main())
