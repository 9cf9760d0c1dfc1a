"""Checkpoints across real processes: the trainer's CLI (train/__main__.py, as `python -m train` runs it)
in subprocesses, stopped and resumed; and a restore onto other meshes on 8 simulated devices.

  - exactness: 6 steps straight == 3 steps, then resumed to 6 (bitwise equal losses, gradient norms),
    also with the data read by 2 worker processes (data_workers=2)
  - SIGTERM: the run finishes its step, writes a checkpoint, exits 0; the resumed run equals the
    straight one
  - two SIGINTs: the second aborts at once in one line; the next start resumes
  - kill -9 during a save: no complete-looking checkpoint is left for that step; the next start
    resumes from the previous good one and again equals the straight run
  - restore of a data=2 x fsdp=4 save onto fsdp=8 and onto one device (tests/checkpoint_worker.py)

The subprocesses run the CLI with a given peak FLOP/s (no matmul benchmark) and, where a signal must
land mid-run, with a pause before each step (TEST_STEP_PAUSE); neither changes what is computed.
They share the session's compilation cache (tests.processes.cpu_env: most of them do not compile the
step again) and overlap.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.processes import cpu_env, free_port, last_json, run_together

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "checkpoint_worker.py"
CLI = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a background job of a script inherits it (issue 29)
from train.__main__ import main
from train.core import loop, preemption
pause = float(os.environ.get("TEST_STEP_PAUSE", "0"))
if pause:
  to_device = loop.to_device
  def slow(*args, **kwargs):
    time.sleep(pause)
    return to_device(*args, **kwargs)
  loop.to_device = slow
if os.environ.get("TEST_HOLD_AFTER_STOP"):  # wait for a second signal once the first is seen
  requested = preemption.StopSignal.requested
  def held(self, step):
    if requested(self, step):
      time.sleep(120)
      return True
    return False
  preemption.StopSignal.requested = held
sys.exit(main(sys.argv[1:] + ["--peak-tflops", "1"]))  # --peak-tflops: skip the 2048^3 matmul benchmark
"""
SMALL_MODEL = ["model.vocab_size=260", "model.hidden_size=32", "model.intermediate_size=64",
               "model.moe_intermediate_size=16", "model.num_hidden_layers=2", "model.num_attention_heads=2",
               "model.q_lora_rank=16", "model.kv_lora_rank=16", "model.qk_nope_head_dim=8",
               "model.qk_rope_head_dim=4", "model.v_head_dim=8", "model.num_nextn_predict_layers=0"]
# the schedule must not depend on `steps` for the 3-then-6 run: warm-up 2, constant until 100
RUN = [*SMALL_MODEL, "batch_size=2", "seq_len=32", "eval_every=0", "log_every=1", "optimizer.warmup_steps=2",
       "optimizer.decay_start=100"]
STEPS = 6
VOLATILE = {"elapsed_s", "tokens_per_s", "mfu"}  # timings; everything else must match bitwise


class Run:
  """One trainer process with its output in files."""

  def __init__(self, run_dir: Path, *overrides, pause: float = 0.0, name: str = "run", **env_extra):
    run_dir.mkdir(parents=True, exist_ok=True)
    self.run_dir = run_dir
    self.out, self.err = run_dir.parent / f"{name}.out", run_dir.parent / f"{name}.err"
    env = cpu_env(**env_extra)
    env["TEST_STEP_PAUSE"] = str(pause)
    args = ["configs/tiny.yaml", *RUN, f"run_dir={run_dir}", *overrides]
    with open(self.out, "w") as out, open(self.err, "w") as err:
      self.proc = subprocess.Popen([sys.executable, "-c", CLI, *args], cwd=ROOT, env=env, stdout=out, stderr=err)

  def wait(self, timeout=600) -> "Run":
    self.proc.wait(timeout=timeout)
    return self

  def stdout(self) -> str:
    return self.out.read_text()

  def stderr(self) -> str:
    return self.err.read_text()

  def signal_when(self, predicate, sig, poll=0.0005, then=None):
    """In a thread: send `sig` as soon as `predicate()` holds (and again once `then()` holds, if
    given); then `self.at_signal` records the checkpoint directory as the signal left it (None if
    the run ended first)."""
    self.at_signal = None

    def watch():
      for condition in (predicate, then) if then else (predicate,):
        while not condition():
          if self.proc.poll() is not None:
            return
          time.sleep(poll)
        self.proc.send_signal(sig)
      if sig == signal.SIGKILL:
        self.proc.wait()
      self.at_signal = {"complete": complete_steps(self.run_dir), "tmp": tmp_dirs(self.run_dir)}

    self.watcher = threading.Thread(target=watch, daemon=True)
    self.watcher.start()
    return self

  def check(self) -> "Run":
    self.wait()
    assert self.proc.returncode == 0, self.stderr()[-3000:]
    return self


def step_records(run_dir: Path) -> dict:
  records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
  out = {}
  for r in records:
    assert r["step"] not in out, f"step {r['step']} logged twice"
    out[r["step"]] = {k: v for k, v in r.items() if k not in VOLATILE}
  return out


def complete_steps(run_dir: Path) -> list[int]:
  d = run_dir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def tmp_dirs(run_dir: Path) -> list[str]:
  try:
    return [p for p in os.listdir(run_dir / "checkpoints") if ".orbax-checkpoint-tmp" in p]
  except FileNotFoundError:
    return []


class Scenario:
  """A first run, then (in a thread, as soon as it ends) a note of what it left and a second run
  resuming it with `resume_overrides`; the tests only check, so the scenarios overlap."""

  def __init__(self, make_first, *resume_overrides, name: str, after=None):
    self.first, self.second, self.left, self.error = None, None, None, None

    def chain():
      try:
        while after is not None and not after():
          time.sleep(0.05)
        self.first = first = make_first()
        first.wait()
        if getattr(first, "watcher", None) is not None:
          first.watcher.join()
        self.left = {"returncode": first.proc.returncode, "complete": complete_steps(first.run_dir),
                     "tmp": tmp_dirs(first.run_dir), "stdout": first.stdout(), "stderr": first.stderr(),
                     "records": step_records(first.run_dir) if (first.run_dir / "metrics.jsonl").exists() else {}}
        self.second = Run(first.run_dir, *resume_overrides, name=f"{name}_resumed")
      except BaseException as e:  # reported by the test
        self.error = e

    self.thread = threading.Thread(target=chain, daemon=True)
    self.thread.start()

  def finish(self):
    self.thread.join(timeout=900)
    if self.error is not None:
      raise self.error
    assert self.left["returncode"] in (0, -signal.SIGKILL, 128 + signal.SIGINT), self.left["stderr"][-3000:]
    return self.left, self.second.check()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The straight run, the first half of the split run and the mesh worker start at once; the runs
  to be stopped by a signal start once the straight run has compiled its step (so they load it from
  the cache); each resumed run starts as soon as its first run ends. The tests wait for their part."""
  base = tmp_path_factory.mktemp("ckpt_runs")
  straight = Run(base / "straight", f"steps={STEPS}", name="straight")
  compiled = lambda: "first step (compilation included)" in straight.stderr() or straight.proc.poll() is not None

  def sigterm():
    r = Run(base / "sigterm", f"steps={STEPS}", "save_every=0", pause=0.4, name="sigterm")
    return r.signal_when(lambda: f"step 2/{STEPS}" in r.stderr(), signal.SIGTERM)

  def sigint_twice():  # the second one while the run holds after the first: it must abort
    r = Run(base / "sigint", f"steps={STEPS}", "save_every=1", pause=0.4, name="sigint", TEST_HOLD_AFTER_STOP="1")
    return r.signal_when(lambda: f"step 2/{STEPS}" in r.stderr(), signal.SIGINT,
                         then=lambda: "SIGINT: finishing the current step" in r.stderr())

  def kill():  # once a first checkpoint is complete, kill -9 while the next one is being written
    r = Run(base / "kill", f"steps={STEPS}", "save_every=1", pause=0.3, name="kill")
    return r.signal_when(lambda: complete_steps(r.run_dir) and tmp_dirs(r.run_dir), signal.SIGKILL)

  worker = subprocess.Popen([sys.executable, str(WORKER), "meshes", str(base / "meshes")],
                            cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
  started = {
      "straight": straight, "worker": worker,
      "split": Scenario(lambda: Run(base / "split", f"steps={STEPS // 2}", name="split"), f"steps={STEPS}",
                        name="split"),
      "workers_straight": Run(base / "workers_straight", f"steps={STEPS}", "data_workers=2", name="workers_straight"),
      "workers_split": Scenario(lambda: Run(base / "workers_split", f"steps={STEPS // 2}", "data_workers=2",
                                            name="workers_split"), f"steps={STEPS}", "data_workers=2",
                                name="workers_split", after=compiled),
      "sigterm": Scenario(sigterm, f"steps={STEPS}", "save_every=0", name="sigterm", after=compiled),
      "kill": Scenario(kill, f"steps={STEPS}", "save_every=0", name="kill", after=compiled),
      "sigint": Scenario(sigint_twice, f"steps={STEPS}", "save_every=0", name="sigint", after=compiled),
  }
  yield started
  runs_left = [straight, started["workers_straight"]] + [r for sc in started.values() if isinstance(sc, Scenario) for r in (sc.first, sc.second)]
  for r in runs_left:
    if r is not None and r.proc.poll() is None:
      r.proc.kill()
  if worker.poll() is None:
    worker.kill()


@pytest.fixture(scope="module")
def straight(runs):
  r = runs["straight"].check()
  records = step_records(r.run_dir)
  assert sorted(records) == list(range(1, STEPS + 1))
  return records


def test_resume_is_bitwise_exact(runs, straight):
  left, second = runs["split"].finish()
  assert left["complete"] == [STEPS // 2] and sorted(left["records"]) == [1, 2, 3]
  assert f"resumed from step {STEPS // 2} " in second.stderr()
  assert "config changed: steps 3 -> 6" in second.stderr()
  assert step_records(second.run_dir) == straight  # losses, grad norms, lr, expert load: bitwise
  assert complete_steps(second.run_dir) == [STEPS // 2, STEPS]


def test_data_workers_resume_exactly(runs):
  """data_workers=2: the Grain worker processes' iterator state is checkpointed and restored too."""
  straight = step_records(runs["workers_straight"].check().run_dir)
  assert sorted(straight) == list(range(1, STEPS + 1))
  left, second = runs["workers_split"].finish()
  assert left["complete"] == [STEPS // 2] and sorted(left["records"]) == [1, 2, 3]
  assert f"resumed from step {STEPS // 2} " in second.stderr()
  assert step_records(second.run_dir) == straight


def test_sigterm_checkpoints_and_exits_0(runs, straight):
  left, resumed = runs["sigterm"].finish()
  assert left["returncode"] == 0, left["stderr"][-3000:]
  assert runs["sigterm"].first.at_signal is not None, "the run ended before step 2 was logged"
  stopped = left["complete"]
  assert len(stopped) == 1 and 2 <= stopped[0] < STEPS, stopped  # save_every=0: only the stop wrote one
  k = stopped[0]
  assert f"stopped by SIGTERM at step {k}" in left["stdout"]
  assert "SIGTERM: finishing the current step" in left["stderr"]
  assert not left["tmp"]  # the save was committed before exiting
  assert max(left["records"]) == k  # the steps since the last log line were logged
  assert f"resumed from step {k} " in resumed.stderr()
  assert step_records(resumed.run_dir) == straight


def test_second_sigint_aborts_in_one_line_and_the_run_resumes(runs, straight):
  """Started with SIGINT ignored (a background job of a non-interactive shell, where the second
  Ctrl-C was once lost): the first SIGINT asks for a stop, the second, while the run is held (by the
  test) before it saves, aborts within the grace of 3 s: exit 130, one line naming the newest
  complete checkpoint; the next start resumes from it."""
  left, resumed = runs["sigint"].finish()
  assert runs["sigint"].first.at_signal is not None, "the run ended before the second SIGINT"
  assert left["returncode"] == 128 + signal.SIGINT, left["stderr"][-3000:]
  assert "Traceback" not in left["stderr"] and "SIGINT: finishing the current step" in left["stderr"]
  good = left["complete"]
  assert good and max(good) < STEPS
  last = left["stderr"].strip().splitlines()[-1]
  named = re.fullmatch(r"error: aborted by a second SIGINT; nothing saved after step (\d+), the newest complete"
                       r" checkpoint; run the same command to resume from it", last)
  assert named and int(named[1]) in good, last  # (a save in flight may complete as the process ends)
  assert f"resumed from step {max(good)} " in resumed.stderr()
  records = step_records(resumed.run_dir)
  assert {s: records[s] for s in straight} == straight


def test_kill_9_during_a_save_resumes_from_the_previous_checkpoint(runs, straight):
  left, resumed = runs["kill"].finish()
  at_kill = runs["kill"].first.at_signal
  assert at_kill is not None and left["returncode"] == -signal.SIGKILL, "the run ended before the kill"
  partial, good = left["tmp"], left["complete"]
  assert partial, "the kill did not land during a save"
  assert partial == at_kill["tmp"] and good == at_kill["complete"]
  interrupted = int(partial[0].split(".")[0])
  assert interrupted not in good and max(good) < interrupted  # nothing of the interrupted save looks complete
  assert f"resumed from step {max(good)} " in resumed.stderr()
  assert not tmp_dirs(resumed.run_dir)
  records = step_records(resumed.run_dir)
  assert {s: records[s] for s in straight} == straight


def test_restore_onto_other_meshes(runs):
  worker = runs["worker"]
  out, err = worker.communicate(timeout=900)
  assert worker.returncode == 0, err[-3000:]
  result = json.loads(out.strip().splitlines()[-1])
  assert result["saved_mesh"] == {"stage": 1, "data": 2, "fsdp": 4, "context": 1, "expert": 1, "tensor": 1}
  for name, devices in (("fsdp8", 8), ("one_device", 1), ("context4", 8), ("fsdp2_context4", 8)):
    r = result[name]
    assert r["step"] == 7 and r["devices"] == devices, r
    assert r["equal"], f"{name}: restored arrays differ from the saved ones"
    assert r["shards_ok"] and r["data_continues"], r
  assert result["fsdp8"]["n_sharded"] > result["fsdp8"]["n_arrays"] // 3  # really laid out over fsdp=8
  # (with context the weights are ZeRO-sharded over fsdp x context: a checkpoint moves between context sizes)
  assert result["fsdp2_context4"]["n_sharded"] > result["fsdp2_context4"]["n_arrays"] // 3


def workers(base: Path, *args_per_process) -> list[dict]:
  return [last_json(o) for o in run_together([(WORKER, *a) for a in args_per_process], cpu_env())]


def test_two_processes_save_and_restore(tmp_path):
  """2 processes x 4 devices save (each its own iterator file); the same 2 processes continue their
  data exactly; one process with 8 devices restores the arrays and restarts the data (new seed)."""
  run = tmp_path / "run"
  run.mkdir()
  for phase in ("save", "restore"):
    port = free_port()
    results = workers(tmp_path, *[("multi", str(port), str(i), "2", str(run), phase) for i in range(2)])
    if phase == "save":
      want = ["process_0-of-2.json", "process_1-of-2.json"]
      assert all([f for f in r["data_files"] if f.endswith(".json")] == want for r in results), results
    else:
      for r in results:
        assert r["step"] == 7 and r["restore_data"] and r["equal"] and r["data_continues"], r
  (single,) = workers(tmp_path, ("single", str(run)))
  assert single["step"] == 7 and not single["restore_data"] and single["equal"], single
  assert single["new_order"] and single["data_seed"] != 0, single
