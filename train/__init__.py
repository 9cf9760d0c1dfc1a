"""Training (train/core/) and its tools (train/*.py); importing it picks JAX's platform for this host
once (parallel.distributed.select_platform)."""

from parallel.distributed import select_platform

select_platform()
