"""The tests run on the CPU (simulated devices in subprocess workers), whatever JAX could find.

pytest-xdist runs them on two workers, a file at a time (`--dist loadfile` in pyproject.toml: a
file's module fixtures start their subprocesses once); the longest files go first, so that neither
core waits for the other at the end."""

import os

from tests.processes import FAST_COMPILE  # noqa: E402  (no jax: XLA_FLAGS are read when jax starts)

# XLA:CPU's compile-time flags for these tests (tests.processes.FAST_COMPILE says why).
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

from parallel.distributed import select_platform  # noqa: E402

select_platform()

# Files that take minutes (their 8-device workers or CLI runs), longest first; the rest follow in order.
LONGEST = ("test_pipeline.py", "test_ep.py", "test_parallel.py", "test_checkpoint_runs.py", "test_aot.py",
           "test_reliability.py", "test_hf_pod.py", "test_hf.py", "test_sweep.py", "test_bench.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST)))
