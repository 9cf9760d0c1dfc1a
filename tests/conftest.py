"""The tests run on the CPU (simulated devices in subprocess workers), whatever JAX could find.

pytest-xdist runs them on two workers, a file at a time (`--dist loadfile` in pyproject.toml: a
file's module fixtures start their subprocesses once); the longest files go first, so that neither
core waits for the other at the end."""

import os

# XLA:CPU's new fusion emitters take twice as long to compile the tiny models as the old ones, and
# compiling is most of these tests' time (CPU-only flag: the TPU and GPU targets train.aot compiles
# for are untouched); so is the second, which gives a collective on a loaded host more than 40 s for
# its devices to arrive. The subprocess workers get both (tests.processes.FAST_COMPILE).
os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_use_fusion_emitters=false"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=600").strip()

from parallel.distributed import select_platform  # noqa: E402

select_platform()

# Files that take minutes (their 8-device workers or CLI runs), longest first; the rest follow in order.
LONGEST = ("test_pipeline.py", "test_ep.py", "test_parallel.py", "test_checkpoint_runs.py", "test_aot.py",
           "test_reliability.py", "test_hf_pod.py", "test_hf.py", "test_sweep.py", "test_bench.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST)))
