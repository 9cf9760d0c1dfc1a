"""The tests run on the CPU (simulated devices in subprocess workers), whatever JAX could find."""

from parallel.distributed import select_platform

select_platform()
