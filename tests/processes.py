"""Tests that start processes: JAX on CPU with N simulated devices, several at once, one JSON line each.

The parent side: `cpu_env`, `free_port`, `run_together`, `last_json`. The worker side: `start_worker`
(call it before importing jax) and `TINY`, the model the multi-device workers train.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A tiny DeepSeek-V3-style model for one training step on 8 simulated devices (tests/parallel_worker.py,
# tests/pipeline_worker.py). update = -lr * g / (|g| + eps) on the first step: with eps=1 the update
# follows the gradient smoothly, so comparing updated parameters compares gradients.
TINY = [
    "model.vocab_size=64", "model.hidden_size=32", "model.intermediate_size=64", "model.moe_intermediate_size=16",
    "model.num_hidden_layers=2", "model.num_attention_heads=4", "model.q_lora_rank=16", "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8", "model.n_routed_experts=8",
    "model.num_experts_per_tok=2", "model.n_group=2", "model.topk_group=1", "seq_len=16", "batch_size=8",
    "optimizer.lr=1.0", "optimizer.eps=1.0", "optimizer.weight_decay=0.0", "optimizer.warmup_steps=0",
    "optimizer.clip_norm=1e9", "optimizer.moment_dtype=float32", "steps=300", "eval_every=0",
]


def start_worker(devices: dict[str, int], default: int = 8, xla_flags: str = "") -> str:
  """A worker's start-up, before it imports jax: JAX on CPU with the simulated device count its mode
  (sys.argv[1]) asks for in `devices` (else `default`), plus `xla_flags`; in mode "multi" (argv: multi
  PORT ID N ...) JAX's distributed runtime joined as process ID of N on 127.0.0.1:PORT. Returns the mode."""
  mode = sys.argv[1]
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count="
                             f"{devices.get(mode, default)} {xla_flags}").strip()
  from parallel import distributed

  distributed.cpu_threads()  # XLA:CPU's thread pool sized for the simulated devices
  if mode == "multi":
    distributed.initialize(f"127.0.0.1:{sys.argv[2]}", int(sys.argv[4]), int(sys.argv[3]))
  return mode


# What every test process shares (the pytest processes too, tests/conftest.py): XLA:CPU's LLVM
# optimisations and new fusion emitters off. Compiling is most of the tests' time and running the tiny
# models almost none: a 6-step Muon run compiles in 16 s instead of 88 (same HLO passes, so the same
# fusions and remat). All three are XLA:CPU flags: train.aot's TPU programs are unchanged (tiny on
# v5p-8: the same memory, FLOPs and collectives). The fourth gives a collective's devices 600 s, not
# 40, to arrive: two workers, each with 8 device threads, share the 2-core CI host (the thread pool
# they run on is parallel.distributed.cpu_threads's). The subprocesses also share one persistent
# compilation cache for the session, so that a program compiled by one process (the tiny model's init
# and step, above all) is read by the next.
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false --xla_cpu_collective_call_terminate_timeout_seconds=600")
_cache: list[str] = []


def compilation_cache() -> str:
  """This test session's persistent compilation cache for subprocesses (removed at exit)."""
  if not _cache:
    import atexit
    import shutil
    import tempfile

    _cache.append(tempfile.mkdtemp(prefix="tests_jax_cache_"))
    atexit.register(shutil.rmtree, _cache[0], True)
  return _cache[0]


def cpu_env(devices: int | None = None, **extra) -> dict:
  """This environment on JAX's CPU platform, compiling fast into the session's compilation cache;
  with `devices`, that many simulated devices (else the process sets XLA_FLAGS itself, after these)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = FAST_COMPILE + (f" --xla_force_host_platform_device_count={devices}" if devices else "")
  env.update(JAX_COMPILATION_CACHE_DIR=compilation_cache(), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.3",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.update(extra)
  return env


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def run_together(commands, env: dict, timeout: float = 900) -> list[str]:
  """Start every command (an argv without the interpreter) at once, wait for all; each must exit 0
  (else the assertion shows its stderr); their stdouts. Leftovers are killed."""
  procs = [subprocess.Popen([sys.executable, *map(str, c)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for c in commands]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=timeout)
      assert p.returncode == 0, err[-3000:]
      outs.append(out)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return outs


def last_json(stdout: str) -> dict:
  return json.loads(stdout.strip().splitlines()[-1])
