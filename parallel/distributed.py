"""Multi-process start-up: `initialize()` wraps `jax.distributed.initialize`.

Call it first thing, before anything touches a JAX device (`python -m train` does). Resolution order:

  1. explicit arguments (the trainer's --coordinator / --num-processes / --process-id flags), else
     the environment: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES,
     JAX_PROCESS_ID (and optionally JAX_LOCAL_DEVICE_IDS, comma-separated);
  2. a detected cluster, where JAX finds everything itself: SLURM (`srun`, SLURM_NTASKS > 1), Open
     MPI (OMPI_COMM_WORLD_SIZE > 1), a multi-host Cloud TPU slice (TPU_WORKER_HOSTNAMES lists more
     than one host), or `auto=True` (--distributed) to ask JAX to detect whatever it can (Cloud TPU
     via the metadata server, Kubernetes, mpi4py);
  3. otherwise a single process: nothing to do.

`select_platform()` chooses JAX's platform from the host once (an installed libtpu is not loaded on a
host without TPUs); `python -m train` and the tools call it first. On CPU, cross-process collectives
need an implementation: this selects gloo
(`jax_cpu_collectives_implementation`), which is what the multi-process CPU tests use.
Every process waits at most `timeout_s` (the trainer's --init-timeout, default 300 s) for all of them
to connect, saying for what and how long, then stops with one line (exit 2); Ctrl-C ends the wait.
A coordinator address without a port or a process id outside 0..N-1 is a one-line ConfigError.
After initialization every process sees all devices (`jax.devices()`) and its own
(`jax.local_devices()`); the trainer builds one global mesh over all of them and each process feeds
its own rows of every batch (parallel.sharding.place_batch).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import signal
import sys
import threading

import jax

from parallel.common.errors import ConfigError

log = logging.getLogger("parallel")


def host_accelerator() -> str | None:
  """'tpu' or 'gpu' when this host has one (its device files), else None."""
  if glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"):
    return "tpu"
  if os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/version") or glob.glob("/dev/kfd"):
    return "gpu"
  return None


# The share of a GPU's memory this project's processes let JAX's allocator take (XLA_CLIENT_MEM_FRACTION,
# set by select_platform unless the user set it): JAX preallocates 75% by default, which could leave a
# step that train.aot found to fit short of memory; the rest is for CUDA, cuBLAS and NCCL's buffers
# (NVIDIA's JAX-Toolbox sets 0.8-0.9). train.aot checks a GPU step against this share (parallel/targets.py).
GPU_MEMORY_FRACTION = 0.9
_FRACTION_VARIABLES = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR")


def select_platform() -> None:
  """Pick JAX's platform once, before anything touches a device: JAX_PLATFORMS if it is set, else
  cpu on a host without an accelerator. (With the tpu extra installed, JAX would otherwise load libtpu
  on every CPU run, which probes for TPU chips and workers and logs about them.) With simulated CPU
  devices, also room in XLA:CPU's thread pool (`cpu_threads`); on a GPU host, JAX's allocator given
  GPU_MEMORY_FRACTION of the memory unless the user chose a fraction or an allocator."""
  cpu_threads()
  accelerator = host_accelerator()
  if accelerator == "gpu" and not any(os.environ.get(v) for v in _FRACTION_VARIABLES):
    os.environ["XLA_CLIENT_MEM_FRACTION"] = str(GPU_MEMORY_FRACTION)
  if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
    return
  if accelerator is None:
    jax.config.update("jax_platforms", "cpu")


THREADS_PER_SIMULATED_DEVICE = 4


def cpu_threads() -> None:
  """With N > 1 simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N), PJRT_NPROC
  = 4N unless it is set. XLA:CPU runs every device's program on one pool of max(cores, N) threads, and
  a collective holds its thread until all its devices have joined. Two collectives that do not depend
  on each other can start on a device in either order: with N threads, N - 1 devices waiting in one and
  the last device's thread in the other, no thread is left to start the last device's first one, and
  XLA aborts after 40 s ("Termination timeout ... only 7 of them arrived"). 4N threads leave room."""
  m = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
  if m and int(m.group(1)) > 1:
    os.environ.setdefault("PJRT_NPROC", str(THREADS_PER_SIMULATED_DEVICE * int(m.group(1))))


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def cluster_detected() -> str | None:
  """Name of a multi-process environment JAX can configure itself from, or None."""
  if (_env_int("SLURM_NTASKS") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
    return "slurm"
  if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
    return "openmpi"
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_PROCESS_ADDRESSES") or ""
  if len([h for h in hosts.split(",") if h]) > 1:
    return "cloud-tpu"
  return None


def check_processes(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
  """ConfigError (one line) for a coordinator address without a port, or a process id outside
  0..num_processes-1, before JAX is asked (it raises IndexError / ValueError for them)."""
  if coordinator_address is not None:
    host, sep, port = coordinator_address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ConfigError(f"distributed: coordinator {coordinator_address!r} is not host:port (e.g."
                        f" {host or coordinator_address or 'localhost'}:12355): give the port process 0 listens on")
    if num_processes is None or process_id is None:
      raise ConfigError("distributed: a coordinator address needs num_processes and process_id too"
                        " (flags --num-processes/--process-id or JAX_NUM_PROCESSES/JAX_PROCESS_ID)")
  if num_processes is not None and num_processes < 1:
    raise ConfigError(f"distributed: num_processes={num_processes} must be at least 1")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ConfigError(f"distributed: process_id={process_id} is not one of the {num_processes} processes: give each"
                      f" process its own id in 0..{num_processes - 1}")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None, auto: bool = False,
               timeout_s: int = 300) -> bool:
  """Start JAX's distributed runtime if this is a multi-process run; True if it was started. Waits at
  most `timeout_s` for every process to connect, then ends the process with one line (exit 2)."""
  if jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  if local_device_ids is None and os.environ.get("JAX_LOCAL_DEVICE_IDS"):
    local_device_ids = [int(i) for i in os.environ["JAX_LOCAL_DEVICE_IDS"].split(",")]
  check_processes(coordinator_address, num_processes, process_id)
  if timeout_s < 1:
    raise ConfigError(f"distributed: init timeout {timeout_s} s must be at least 1 s")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address is not None:
    if num_processes == 1:
      return False
    how = f"coordinator {coordinator_address}"
    _connect(lambda t: jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids,
                                                  initialization_timeout=t),
             f"process {process_id} of {num_processes} at the coordinator {coordinator_address}", timeout_s)
  else:
    how = cluster_detected() or ("auto-detected" if auto else None)
    if how is None:
      return False
    _connect(lambda t: jax.distributed.initialize(local_device_ids=local_device_ids, initialization_timeout=t),
             f"this process of the {how} cluster", timeout_s)
  log.info("distributed (%s): process %d of %d, %d local / %d global devices", how, jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def _connect(initialize, who: str, timeout_s: int) -> None:
  """Run `initialize(jax_timeout)` under a watchdog: JAX's own timeout aborts the process with a C++
  stack trace, and the wait ignores Ctrl-C (the main thread is in C++). So after `timeout_s` the
  watchdog thread prints one line and exits 2 (JAX's timeout is set later, as a backstop), and
  SIGINT ends the process while it waits (there is nothing to save yet)."""
  log.info("distributed: %s, waiting up to %d s for every process to connect (--init-timeout)", who, timeout_s)
  done = threading.Event()

  def watchdog():
    if not done.wait(timeout_s):
      print(f"error: distributed: {who} waited {timeout_s} s (--init-timeout) and not every process connected;"
            " start all of them with the same coordinator host:port and number of processes and distinct"
            " process ids, or raise --init-timeout", file=sys.stderr, flush=True)
      os._exit(2)

  threading.Thread(target=watchdog, name="distributed-init-watchdog", daemon=True).start()
  interrupt = threading.current_thread() is threading.main_thread() and \
      signal.getsignal(signal.SIGINT) is signal.default_int_handler
  if interrupt:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
  try:
    initialize(timeout_s + 60)
  finally:
    done.set()
    if interrupt:
      signal.signal(signal.SIGINT, signal.default_int_handler)
