"""Preemption: SIGTERM or SIGINT asks the run to stop cleanly; a second one aborts it.

The first signal sets `StopSignal.received`: the loop finishes its step, saves a checkpoint, waits
for it to be written and returns. The second aborts: the step in progress and any save still being
written are abandoned (Orbax's temporary directory is deleted at the next start, which resumes from
the newest complete checkpoint), with exit 128 + the signal's number and one line on stderr.

The abort depends on nothing the process inherited. A run started in the background of a
non-interactive shell (`python -m train ... &` in a script, CI) inherits SIGINT *ignored*; restoring
the previous disposition and re-raising, as this once did, then did nothing at all.

Nor does it depend on what the main thread is doing. Python runs signal handlers in the main thread,
between bytecodes; while it waits in XLA (a compilation, a long step) or on Orbax no handler runs,
and two signals that land meanwhile run it once. So the handler only takes note, and a watcher
thread hears every signal at once through `signal.set_wakeup_fd` (written by the C-level handler):
it says that the stop was heard, and at the second signal gives the main thread `grace_s` to reach
the loop's next check (`requested`, which raises `Aborted`, a KeyboardInterrupt, so that a library
caller unwinds normally); if it does not, the watcher ends the process itself. An exception raised
from the handler instead would surface inside whatever library code the main thread was in (Orbax
logs it with a traceback).

Before the first step has finished (`StopSignal(started=False)` until `start()`: the run directory,
the data, the restore, the compilation of the first step) there is nothing to save, so the first
signal ends the process at once, with one line that says so and where the run resumes from.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Callable

log = logging.getLogger("train")


class Aborted(KeyboardInterrupt):
  """A second SIGINT/SIGTERM: stop now, save nothing."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


def abort_line(what: str, hint: str) -> str:
  """The one line an aborted run ends with (`hint`: where it can resume from)."""
  return f"error: aborted by {what}; {hint}"


def _last_word() -> int:
  """Keep the process's other threads from writing to stderr after the line it ends with (the main
  thread may be logging as it sets up): hold every logging handler's lock (a record being written
  finishes first; none starts after), then point file descriptor 2 at /dev/null for anything else
  (print, C++ logs). Returns a descriptor of the real stderr for the last line."""
  loggers = [logging.root, *(x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger))]
  for handler in {h for lg in loggers for h in lg.handlers}:
    if handler.lock is not None:
      handler.lock.acquire(timeout=1.0)  # never released: the process ends (a stuck stream: go on after 1 s)
  stderr = os.dup(2)
  null = os.open(os.devnull, os.O_WRONLY)
  os.dup2(null, 2)
  return stderr


class StopSignal:
  """While active (a `with` block in the main thread of a single-process run), SIGTERM and SIGINT
  request a clean stop: `requested(step)` turns true and `received` names the signal; after a second
  one it raises `Aborted`. `hint()`: what the abort line says about resuming (the newest complete
  checkpoint). With several processes JAX's preemption service catches SIGTERM and every process
  stops at the same step (`multihost_utils.reached_preemption_sync_point`)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, process_count: int = 1, grace_s: float = 3.0, hint: Callable[[], str] = lambda: "",
               started: bool = True):
    self.received: str | None = None
    self.aborted: int | None = None  # the second signal's number
    self.process_count = process_count
    self.grace_s = grace_s
    self.hint = hint
    self._old: dict = {}
    self._wakeup = None  # (read fd, write fd, the wakeup fd we replaced)
    self._done = threading.Event()
    self._watcher: threading.Thread | None = None
    self._started = started  # False: a first signal ends the process (nothing to save yet)
    self._lock = threading.Lock()  # start() against the watcher's decision

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread() or self.process_count > 1:
      return self
    self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    r, w = os.pipe()
    os.set_blocking(w, False)  # set_wakeup_fd's requirement: a signal never blocks on a full pipe
    self._wakeup = (r, w, signal.set_wakeup_fd(w, warn_on_full_buffer=False))
    self._watcher = threading.Thread(target=self._watch, args=(r,), name="StopSignal", daemon=True)
    self._watcher.start()
    return self

  def _handle(self, signum, frame):  # the main thread, when it next runs Python: only take note
    if self.received is None:
      self.received = signal.Signals(signum).name
    else:
      self.aborted = signum

  def _watch(self, r: int) -> None:  # its own thread: hears each signal at once
    heard = 0
    while True:
      for signum in os.read(r, 64):
        if signum == 0:  # __exit__'s wake-up
          return
        if signum not in self.SIGNALS or self._done.is_set():
          continue
        heard += 1
        name = signal.Signals(signum).name
        if heard == 1:
          with self._lock:
            if not self._started:
              self._end(f"error: stopped by {name} before the first step finished (setting up or compiling):"
                        " nothing to save; ", signum)
          log.warning("%s: finishing the current step, then saving a checkpoint and exiting (again to abort)", name)
        elif not self._done.wait(self.grace_s):  # the main thread did not get back to the loop: end it here
          self._end(abort_line(f"a second {name}", ""), signum)

  def _end(self, line: str, signum: int) -> None:
    """Write `line` + the resume hint to stderr as its last line and end the process with 128 + signum."""
    try:
      hint = self.hint()
    except Exception:  # noqa: BLE001 - the abort must happen whatever the hint does
      hint = "see the run's checkpoints"
    stderr = _last_word()
    os.write(stderr, (line + hint + "\n").encode())
    os._exit(128 + signum)

  def start(self) -> None:
    """The first step has finished: from now on the first signal stops after the current step."""
    with self._lock:
      self._started = True

  def requested(self, step: int) -> bool:
    """Whether to stop after `step` (raises Aborted after a second signal)."""
    if self.aborted is not None:
      raise Aborted(self.aborted)
    if self.process_count > 1:
      from jax.experimental import multihost_utils

      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.received = self.received or "preemption"
      except RuntimeError:  # preemption service off
        pass
    return self.received is not None

  def __exit__(self, *exc):
    self._done.set()
    for s, h in self._old.items():
      signal.signal(s, h)
    self._old = {}
    if self._wakeup is not None:
      r, w, previous = self._wakeup
      signal.set_wakeup_fd(previous)
      os.write(w, b"\0")  # one byte into a pipe the watcher drains: never blocks
      self._watcher.join()
      os.close(r)
      os.close(w)
      self._wakeup = None
