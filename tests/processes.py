"""Tests that start processes: JAX on CPU with N simulated devices, several at once, one JSON line each."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_env(devices: int | None = None, **extra) -> dict:
  """This environment on JAX's CPU platform; with `devices`, that many simulated devices (else the
  process sets XLA_FLAGS itself)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
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
