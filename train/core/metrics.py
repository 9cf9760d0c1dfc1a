"""Training metrics: RUN_DIR/metrics.jsonl, TensorBoard events in RUN_DIR, a progress display, and
the peak FLOP/s that model-FLOPs utilisation (MFU) is measured against.

Each logged step appends one JSON object: `step`, `elapsed_s` (since the logger opened) and every
metric passed in, scalars as floats and 1-D vectors (such as per-MoE-layer expert-load CV) as
lists. TensorBoard gets the same scalars under their names, a vector `name` as `name/layer_i`.
Eval metrics go to the same file and TensorBoard with an `eval_` prefix. Only the main process
writes; on the others every method does nothing.

metrics.jsonl describes one history: a run that starts at step S (from a checkpoint of step S, or
S = 0 when none completed) first moves the records of steps after S, which no checkpoint covers and
which are trained again, to RUN_DIR/metrics.dropped.jsonl (`trim_metrics`, said in a log line). A
metrics.jsonl deleted, moved or replaced while the run writes it is written again at its path with
every record of the file the run had open (checked at each write), so the path the run reports holds
the whole history.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from parallel.common.errors import RunFailed
from train.core import jsonl

log = logging.getLogger("train")
METRICS, DROPPED = "metrics.jsonl", "metrics.dropped.jsonl"


def measure_peak_flops(dtype, n: int | None = None, iters: int = 30) -> float:
  """FLOP/s of an n x n x n matmul in `dtype` on the default device (best of `iters` timed runs):
  the peak MFU is reported against, measured on the spot."""
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


def device_memory() -> dict | None:
  """{peak_GiB, limit_GiB} of the first local device's memory in use so far, where the backend
  reports it (GPU, TPU; CPU does not): to check a compile-time estimate (train.aot) against a run."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - a backend without memory statistics
    return None
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  out = {"peak_GiB": round(stats["peak_bytes_in_use"] / 2**30, 2)}
  if stats.get("bytes_limit"):
    out["limit_GiB"] = round(stats["bytes_limit"] / 2**30, 2)
  return out


def to_python(value) -> float | list[float] | str | None:
  """A Python/NumPy/JAX scalar -> float; a 1-D array or sequence -> list of floats; NaN and +-Inf ->
  None (JSON null: metrics.jsonl stays JSON); a string (a name, e.g. the pipeline schedule) as is."""
  if isinstance(value, str):
    return value
  a = np.asarray(value, dtype=np.float64)
  if a.ndim > 1:
    raise ValueError(f"metrics must be scalars or 1-D vectors, got shape {a.shape}")
  if a.ndim == 0:
    return float(a) if np.isfinite(a) else None
  return [float(x) if np.isfinite(x) else None for x in a]


def trim_metrics(run_dir, step: int) -> int:
  """Move the records of steps after `step` from RUN_DIR/metrics.jsonl to the end of
  RUN_DIR/metrics.dropped.jsonl (they were trained after the checkpoint a run starts from, or by a run
  that left no checkpoint, and are trained again); returns how many moved. metrics.jsonl is replaced
  atomically, after the dropped records are on disk: a crash in between loses none."""
  path = Path(run_dir) / METRICS
  if not path.is_file():
    return 0
  keep, drop = [], []
  for line in path.read_text().splitlines(keepends=True):
    try:
      later = json.loads(line).get("step", 0) > step
    except (ValueError, AttributeError):
      later = True  # a torn or foreign line: not part of the history either
    (drop if later else keep).append(line if line.endswith("\n") else line + "\n")
  if drop:
    with open(path.parent / DROPPED, "a") as f:
      f.write("".join(drop))
      f.flush()
      os.fsync(f.fileno())
    tmp = path.with_name(f".{METRICS}.tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)
    log.warning("%s: %d record(s) of steps after %d, which no checkpoint covers, moved to %s (this run trains"
                " those steps again)", path, len(drop), step, path.parent / DROPPED)
  return len(drop)


def tb_scalars(record: Mapping) -> dict[str, float]:
  """{name: float} for TensorBoard; a vector `v` under `name` becomes `name/layer_i` = v[i]."""
  out = {}
  for name, v in record.items():
    if isinstance(v, list):
      out.update({f"{name}/layer_{i}": x for i, x in enumerate(v) if x is not None})
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      out[name] = v
  return out


def summary(step: int, total: int, record: Mapping, eta_s: float | None = None) -> str:
  """One line: step, loss and, when given, tokens/s, MFU (a fraction, shown in %) and ETA."""
  loss = record["loss"]
  line = f"step {step}/{total}  loss {'nan' if loss is None else f'{loss:.4f}'}"
  if record.get("tokens_per_s") is not None:
    line += f"  tok/s {record['tokens_per_s']:,.0f}"
  if record.get("skipped_steps"):
    line += f"  skipped {int(record['skipped_steps'])}"
  if record.get("mfu") is not None:
    line += f"  mfu {100 * record['mfu']:.1f}%"
  if eta_s is not None:
    line += f"  eta {int(eta_s) // 60}:{int(eta_s) % 60:02d}"
  return line


def eta_seconds(step: int, total: int, start_step: int, elapsed_s: float) -> float | None:
  """Remaining time at the average pace of the `elapsed_s` since `start_step` (the logger times from
  its first logged step: the interval before it holds the compilation)."""
  done = step - start_step
  return None if done <= 0 else elapsed_s / done * (total - step)


class MetricsLogger:
  """`log(step, metrics)` needs `loss`; `tokens_per_s` and `mfu` (model-FLOPs utilisation, a fraction)
  show on the progress display when given. Non-finite values are written as null and named in the
  record's `nonfinite` list.

  progress: a tqdm bar (step, loss, tokens/s, MFU, ETA) on stderr when it is a terminal, else a
  `summary` line per logged step; False shows nothing.
  """

  def __init__(self, run_dir, total_steps: int, *, is_main: bool = True, progress: bool = True,
               start_step: int = 0):
    self.total_steps = total_steps
    self.is_main = is_main
    self._closed = not is_main
    if not is_main:
      return
    from tensorboardX import SummaryWriter
    from tqdm import tqdm

    self.run_dir = Path(run_dir)
    self.run_dir.mkdir(parents=True, exist_ok=True)
    self.path = self.run_dir / METRICS
    trim_metrics(self.run_dir, start_step)
    self._file = open(self.path, "a+")  # "+": what it holds can be read back if it is deleted under us
    self._tb = SummaryWriter(str(self.run_dir))
    self._start = time.time()
    self._paced = None  # (step, time) of the first log
    self._lines = progress and not sys.stderr.isatty()
    self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                     disable=not progress or self._lines)

  def log(self, step: int, metrics: Mapping) -> None:
    if not self.is_main:
      return
    if "loss" not in metrics:
      raise ValueError("MetricsLogger.log needs a loss")
    record = self._write(step, metrics)
    if self._lines:
      self._paced = self._paced or (step, time.time())  # the pace starts after the compilation
      eta = eta_seconds(step, self.total_steps, self._paced[0], time.time() - self._paced[1])
      print(summary(step, self.total_steps, record, eta), file=sys.stderr, flush=True)
    elif not self._bar.disable:
      post = {"loss": "nan" if record["loss"] is None else f"{record['loss']:.4f}"}
      if record.get("tokens_per_s") is not None:
        post["tok/s"] = f"{record['tokens_per_s']:,.0f}"
      if record.get("mfu") is not None:
        post["mfu"] = f"{100 * record['mfu']:.1f}%"
      self._bar.set_postfix(post, refresh=False)
      self._bar.update(max(0, step - self._bar.n))

  def write_eval(self, step: int, metrics: Mapping) -> None:
    """Eval metrics, each named `eval_<name>` (kept as is when it already starts with eval_)."""
    if not self.is_main:
      return
    named = {k if k.startswith("eval_") else f"eval_{k}": v for k, v in metrics.items()}
    record = self._write(step, named)
    if not self._bar.disable or self._lines:
      text = "  ".join(f"{k} {'nan' if v is None else f'{v:.4f}'}" for k, v in record.items()
                       if v is None or isinstance(v, float))
      self._bar.write(f"step {step}  {text}", file=sys.stderr)

  def _write(self, step: int, metrics: Mapping) -> dict:
    record = {k: to_python(v) for k, v in metrics.items()}
    bad = [k for k, v in record.items() if v is None or (isinstance(v, list) and None in v)]
    line = {"step": int(step), "elapsed_s": round(time.time() - self._start, 3), **record}
    if bad:
      line["nonfinite"] = bad
    try:
      self._reopen_if_gone()
      self._file.write(jsonl.dumps(line) + "\n")
      self._file.flush()
    except OSError as e:
      raise RunFailed(f"step {step}: cannot write {self.path} ({e.strerror or e}); the checkpoints are kept:"
                      " fix the run directory and run the same command to resume") from None
    for name, v in tb_scalars(record).items():
      self._tb.add_scalar(name, v, int(step))
    self._tb.flush()
    return record

  def _reopen_if_gone(self) -> None:
    """metrics.jsonl deleted, moved or replaced since it was opened: write the records of the file
    the run holds open (all of the history) at its path again and go on appending there."""
    mine = os.fstat(self._file.fileno())
    try:
      there = os.stat(self.path)
      if (there.st_ino, there.st_dev) == (mine.st_ino, mine.st_dev):
        return
    except FileNotFoundError:
      pass
    self._file.seek(0)
    history = self._file.read()
    self._file.close()
    self._file = open(self.path, "w+")
    self._file.write(history)
    log.warning("%s was deleted, moved or replaced while the run wrote it: written again there with the %d"
                " record(s) it held", self.path, history.count("\n"))

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    self._bar.close()
    self._tb.close()
    try:
      self._reopen_if_gone()  # the last record (e.g. the final eval) is not lost to a deletion after it
    except OSError as e:
      raise RunFailed(f"cannot write {self.path} ({e.strerror or e}); the checkpoints are kept") from None
    finally:
      self._file.close()

  def __enter__(self) -> MetricsLogger:
    return self

  def __exit__(self, exc_type, *exc) -> None:
    try:
      self.close()
    except RunFailed:
      if exc_type is None:  # else the error in flight is the one to report
        raise
