"""Orbax's noise when a checkpoint fails, and only that: the one-line error `Checkpoints` prints is
the report. `quiet()` (idempotent) is called where orbax is used (train/core/checkpoint.py):

  - absl logs every save at INFO (level WARNING for the `absl` logger), and a failed save once per
    background thread with a traceback (78 for one full disk): those three messages from orbax's files;
  - a failed restore or save leaves tensorstore callbacks on orbax's closed asyncio loop ("Event loop
    is closed", reported as unraisable) and orbax coroutines abandoned with it ("coroutine
    '_read_array_index_and_device_put' was never awaited", a RuntimeWarning, or unraisable if it
    comes at shutdown): dropped by that message or by the coroutine's file (orbax);
  - asyncio logs "Task exception was never retrieved" for orbax's abandoned reads (a traceback through
    orbax or tensorstore) and writes (an OCDBT error naming orbax's temporary step directory).

Everything else still surfaces: another task's exception, another object's unraisable exception, a
coroutine of anyone else never awaited (tests/test_reliability.py).
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
import warnings

TMP_MARK = ".orbax-checkpoint-tmp"  # orbax writes a step into <step>.orbax-checkpoint-tmp-<time>


def quiet() -> None:
  _quiet_absl()
  _ignore_closed_loop_callbacks()


def _ignore_closed_loop_callbacks():
  """When a restore or a save fails, the tensorstore reads and writes still in flight finish on (or
  are dropped with) orbax's asyncio loop, each reporting an unraisable exception or a never-awaited
  coroutine at exit; drop those so that a bad checkpoint gives one line of error. Installed once."""
  previous = sys.unraisablehook
  if getattr(previous, "_drops_closed_loop", False):
    return

  def hook(unraisable):
    if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
      return
    if not _of_orbax(unraisable.object):
      previous(unraisable)

  hook._drops_closed_loop = True
  sys.unraisablehook = hook
  # CPython reports a coroutine collected unawaited through this function of `warnings`, looked up at
  # each report; only if that fails (at shutdown) does it go to sys.unraisablehook
  warn_unawaited = warnings._warn_unawaited_coroutine

  def warn_unless_orbax(coro):
    if not _of_orbax(coro):
      warn_unawaited(coro)

  warnings._warn_unawaited_coroutine = warn_unless_orbax
  logging.getLogger("asyncio").addFilter(_drop_abandoned_orbax_tasks)


def _of_orbax(obj) -> bool:
  """A coroutine of orbax's, abandoned by a failed restore or save."""
  code = getattr(obj, "cr_code", None)
  return code is not None and "orbax" in code.co_filename


def _drop_abandoned_orbax_tasks(record: logging.LogRecord) -> bool:
  """asyncio logs "Task exception was never retrieved" with a traceback when it collects a failed
  task nobody awaited: after a failed restore, orbax's reads of the other arrays end that way (at a
  moment that depends on the garbage collector). The failure itself was already reported in one line.
  A failed save's writes end the same way, as futures with no traceback whose error names the
  OCDBT database of orbax's temporary step directory."""
  if not re.match(r"\w*(Task|Future) exception was never retrieved", str(record.msg)):  # also _GatheringFuture
    return True
  exc = record.exc_info[1] if record.exc_info else None
  if exc is not None and TMP_MARK in str(exc) and "OCDBT" in str(exc):
    return False
  tb = record.exc_info[2] if record.exc_info else None
  files = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(tb)]
  return not any("orbax" in f or "tensorstore" in f for f in files)


def _quiet_absl():
  """Orbax and Grain log every save at INFO through absl; keep the training log readable. A save that
  fails (a full disk) makes orbax's background threads log the same error with a traceback once per
  thread (78 tracebacks for one failed save): those records are dropped, since `Checkpoints` reports
  the failure itself in one line; every other orbax error is still logged."""
  absl = logging.getLogger("absl")
  absl.setLevel(logging.WARNING)
  if _drop_orbax_save_failures not in absl.filters:
    absl.addFilter(_drop_orbax_save_failures)


ORBAX_SAVE_FAILURES = re.compile(r"_SignalingThread\.run\(\) raised an exception|Handler Commit operations or the"
                                 r" Commit callback in background save thread|\[wait_until_finished\] Save Finalize"
                                 r" thread \(.*\) failed")


def _drop_orbax_save_failures(record: logging.LogRecord) -> bool:
  return not ("orbax" in record.pathname and ORBAX_SAVE_FAILURES.search(str(record.msg)))
