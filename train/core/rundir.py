"""The run directory: made and checked writable before anything runs, and locked while a run uses it.

A second `python -m train` on the same directory would write the same checkpoints and metrics; the
lock (`RUN_DIR/.lock`, an `fcntl` lock held for the life of the process, the holder's host, pid and
start time written in it) makes it refuse at once, naming the holder. The operating system drops the
lock of a process that died, so a lock file left by a killed run is taken over (with a log line).
With several processes, process 0 holds the lock.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

from parallel.common.errors import ConfigError
from train.core import jsonl

log = logging.getLogger("train")

LOCK = ".lock"


def prepare(run_dir) -> Path:
  """Make `run_dir` (and its parents) and check that files can be written in it; ConfigError else."""
  run_dir = Path(run_dir)
  try:
    run_dir.mkdir(parents=True, exist_ok=True)
  except FileExistsError:
    raise ConfigError(f"run_dir {run_dir}: a file of that name (or of a parent's) is in the way;"
                      " pick another run_dir") from None
  except OSError as e:
    raise ConfigError(f"run_dir {run_dir}: cannot create it ({e.strerror}); pick another run_dir") from None
  probe = run_dir / f".write-test-{os.getpid()}"
  try:
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise ConfigError(f"run_dir {run_dir}: cannot write in it ({e.strerror}); fix its permissions or pick"
                      " another run_dir") from None
  return run_dir


class RunLock:
  """Exclusive use of a run directory for this process (see the module docstring)."""

  def __init__(self, run_dir, active: bool = True):
    self.path = Path(run_dir) / LOCK
    self.active = active
    self.fd = None

  def __enter__(self) -> RunLock:
    if not self.active:
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read(fd)
      os.close(fd)
      who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}" if holder
             else "another process")
      raise ConfigError(f"run_dir {self.path.parent} is in use by {who}; wait for it to finish, stop it, or pick"
                        " another run_dir") from None
    previous = _read(fd)
    if previous:
      log.info("run_dir %s: taking over the lock of pid %s on %s (not running)", self.path.parent,
               previous.get("pid"), previous.get("host"))
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "since": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, jsonl.dumps(me).encode(), 0)
    self.fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self.fd is not None:
      os.ftruncate(self.fd, 0)  # a clean exit leaves no holder behind
      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None


def _read(fd) -> dict:
  try:
    return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
  except ValueError:
    return {}
