"""`python -m train CONFIG [key=value ...]`: train a DeepSeek-style MoE (train/core/loop.py)."""

from __future__ import annotations

import logging
import os
import signal
import sys

from parallel import distributed
from parallel.common.errors import InputError, RunFailed
from train.core import checkpoint, loop, preemption, train_config


def main(argv=None) -> int:
  import argparse

  p = argparse.ArgumentParser(prog="python -m train", description="Train a DeepSeek-style MoE.")
  p.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
  p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=100 optimizer.lr=1e-3")
  p.add_argument("--peak-tflops", type=float, default=None,
                 help="report MFU against this peak (TFLOP/s per device) instead of one measured here")
  g = p.add_argument_group("multi-process (parallel/distributed.py; default: single process, or detected"
                           " SLURM / Open MPI / multi-host Cloud TPU)")
  g.add_argument("--coordinator", help="host:port of process 0 (env JAX_COORDINATOR_ADDRESS)")
  g.add_argument("--num-processes", type=int, help="env JAX_NUM_PROCESSES")
  g.add_argument("--process-id", type=int, help="env JAX_PROCESS_ID")
  g.add_argument("--distributed", action="store_true", help="let JAX auto-detect the cluster")
  g.add_argument("--init-timeout", type=int, default=300, metavar="SECONDS",
                 help="how long to wait for every process to connect before stopping (default 300)")
  args = p.parse_intermixed_args(argv)  # overrides may follow the flags
  logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # absl (orbax) may have set one up
  cfg = None
  try:
    distributed.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed,
                           timeout_s=args.init_timeout)
    cfg = train_config.load_train_config(args.config, args.overrides)
    peak = None if args.peak_tflops is None else args.peak_tflops * 1e12
    result = loop.train(cfg, peak_flops=peak)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except RunFailed as e:
    print(f"error: {e}", file=sys.stderr)
    return 4
  except KeyboardInterrupt as e:  # a second SIGINT/SIGTERM (train/core/preemption.py), or Ctrl-C before the loop
    signum = getattr(e, "signum", signal.SIGINT)
    what = f"{'a second ' if hasattr(e, 'signum') else ''}{signal.Signals(signum).name}"
    hint = checkpoint.resume_hint(checkpoint.checkpoint_dir(cfg.run_dir)) if cfg else "nothing was started"
    print(preemption.abort_line(what, hint), file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(128 + signum)  # now, not after a save still being written by Orbax's (non-daemon) threads
  if result["stopped_by"]:
    print(f"stopped by {result['stopped_by']} at step {result['last_step']}: checkpoint in"
          f" {result['run_dir']}/checkpoints/{result['last_step']}; run the same command to resume")
  elif result["first_loss"] is None:
    print(f"done: {result['run_dir']} is already at step {result['last_step']} (steps={result['steps']})")
  else:
    print(f"done: loss {result['first_loss']:.3f} -> {result['last_loss']:.3f} over steps {result['start_step']}.."
          f"{result['last_step']}; metrics in {result['run_dir']}/metrics.jsonl (plot: python -m train.plot"
          f" {result['run_dir']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
