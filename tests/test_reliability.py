"""Runs that never lie and never lose work (docs/reliability.md): divergence, a shared run directory,
a save that cannot be written, errors found late, a rejected resume, one line for every bad input.

The faults go through `python -m train` in subprocesses (tests/test_checkpoint_runs.py's Run: the CLI
with a given peak FLOP/s and an optional pause before each step); the kill -9 during an asynchronous
save is tests/test_checkpoint_runs.py::test_kill_during_save_resumes_from_the_last_complete_checkpoint.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from parallel.errors import ConfigError, DataError, RunFailed
from tests.random_weights import initialised
from tests.test_checkpoint_runs import Run, complete_steps
from train import data as data_cli
from train.core import checkpoint as ckpt_lib
from train.core import data as data_lib
from train.core import optimizer as optimizer_lib
from train.core import rundir
from train.core import step as step_lib
from train.core.config import load_train_config

ROOT = Path(__file__).resolve().parents[1]
DIVERGE = ["optimizer.lr=1e6", "optimizer.warmup_steps=0"]


def last_line(run: Run) -> str:
  return run.stderr().strip().splitlines()[-1]


def metrics(run_dir: Path) -> list[dict]:
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]  # strict JSON


# ------------------------------------------------------------------ 1. divergence
def test_divergence_stops_with_the_last_good_checkpoint(tmp_path):
  """lr=1e6: the loss is NaN from step 3. The run stops there, exit 4, one line naming the step and
  checkpoint 2; no checkpoint after it; metrics.jsonl is JSON; checkpoint 2 restores finite weights."""
  run = Run(tmp_path / "run", "steps=6", "save_every=2", *DIVERGE).wait()
  assert run.proc.returncode == 4, run.stderr()[-2000:]
  line = last_line(run)
  assert line.startswith("error: step 3: the loss") and "not finite" in line, line
  assert f"the last good checkpoint is {tmp_path / 'run' / 'checkpoints' / '2'}" in line
  assert complete_steps(tmp_path / "run") == [2]
  assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2]
  model = ckpt_lib.load_any(tmp_path / "run")  # finite, or it would say so
  assert all(bool(jnp.isfinite(v[...]).all()) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def test_skip_mode_stops_after_max_skipped(tmp_path):
  run = Run(tmp_path / "run", "steps=8", "save_every=0", "on_nonfinite=skip", "max_skipped=2", *DIVERGE).wait()
  assert run.proc.returncode == 4
  assert "3 updates in a row were skipped" in last_line(run) and last_line(run).startswith("error: step 5:")
  records = metrics(tmp_path / "run")
  assert [r.get("skipped_steps") for r in records] == [0, 0, 1, 1]
  assert records[2]["nonfinite"] and records[2]["grad_norm"] is None


@pytest.fixture(scope="module")
def small():
  cfg = load_train_config(ROOT / "configs/tiny.yaml", [
      "model.vocab_size=260", "model.hidden_size=32", "model.intermediate_size=64", "model.moe_intermediate_size=16",
      "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.q_lora_rank=16", "model.kv_lora_rank=16",
      "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=4", "model.v_head_dim=8", "batch_size=2", "seq_len=16",
      "optimizer.warmup_steps=0", "spike_skip_factor=2"])
  schedule = optimizer_lib.make_schedule(cfg)
  tx = optimizer_lib.make_optimizer(cfg, schedule)
  graphdef, state = step_lib.init_state(initialised(cfg.model), tx)
  return cfg, jax.jit(step_lib.make_train_step(graphdef, cfg.model, tx, schedule, cfg)), state


def batch(vocab_hit=None):
  b = data_lib.synthetic_batch(2, 16, 260, seed=3)
  if vocab_hit is not None:
    b["tokens"][0, 5] = vocab_hit  # out of the vocabulary: a NaN embedding, a NaN loss
  return {k: jnp.asarray(v) for k, v in b.items()}


def test_skipped_step_leaves_the_state_bitwise_unchanged(small):
  """A non-finite loss: parameters, router biases, AdamW state and the spike guard's mean come out as
  they went in (the step counter advances); a normal step after it changes them."""
  _, step, state = small
  before = jax.tree.map(np.asarray, state)
  after, m = step(jax.tree.map(jnp.copy, state), batch(vocab_hit=260))
  assert int(m["nonfinite"]) == 1 and int(m["skipped"]) == 1 and not np.isfinite(float(m["loss"]))
  for key in ("params", "rest", "opt", "guard"):
    for a, b in zip(jax.tree.leaves(before[key]), jax.tree.leaves(after[key]), strict=True):
      np.testing.assert_array_equal(a, np.asarray(b), err_msg=key)
  assert int(after["step"]) == 1
  applied, m = step(after, batch())
  assert int(m["skipped"]) == 0 and int(applied["guard"]["accepted"]) == 1
  assert not np.array_equal(np.asarray(applied["params"]["embed"]["embedding"][...]),
                            before["params"]["embed"]["embedding"][...])


def test_spike_guard(small):
  """spike_skip_factor=2: with a running mean of 0.1 after 20 accepted steps, a loss of ~5.6 is a
  spike and is skipped; below 20 accepted steps the guard does not act."""
  _, step, state = small
  primed = dict(jax.tree.map(jnp.copy, state), guard={
      "loss_mean": jnp.float32(0.1 * (1 - step_lib.LOSS_DECAY ** 20)), "accepted": jnp.int32(20)})
  _, m = step(primed, batch())
  assert int(m["skipped"]) == 1 and int(m["nonfinite"]) == 0
  young = dict(jax.tree.map(jnp.copy, state), guard={"loss_mean": jnp.float32(0.0001), "accepted": jnp.int32(3)})
  _, m = step(young, batch())
  assert int(m["skipped"]) == 0


def test_a_dropless_exchange_that_lost_rows_stops_the_run(tmp_path):
  """The step never applies an update whose dropless exchange reported lost (token, expert) rows
  (train/core/step.py: `lost`, tested on 8 devices in tests/test_ep.py); the loop stops at it."""
  from train.core import loop

  class NoSaves:
    directory = tmp_path

    def wait(self):
      pass

    def steps(self):
      return []

  cfg = load_train_config(ROOT / "configs/tiny.yaml", ["mesh.ep_transport=ragged"])
  guard = loop.Guard(cfg, NoSaves())
  guard.check(6, [{"lost": 0, "skipped": 0, "nonfinite": 0}])
  with pytest.raises(RunFailed, match=r"^step 7: the dropless expert-parallel exchange \(mesh.ep_transport=ragged\)"
                                      r" could not send 3 \(token, expert\) assignments.*no checkpoint was written"):
    guard.check(7, [{"lost": 3, "skipped": 1, "nonfinite": 0}])


# ------------------------------------------------------------------ 2. one run per directory
def test_a_second_run_on_the_same_directory_refuses(tmp_path):
  first = Run(tmp_path / "run", "steps=40", pause=0.2, name="first")
  deadline = time.time() + 120
  while not (tmp_path / "run" / ".lock").exists() or not (tmp_path / "run" / ".lock").read_text():
    assert time.time() < deadline and first.proc.poll() is None, first.stderr()[-2000:]
    time.sleep(0.2)
  t0 = time.time()
  second = Run(tmp_path / "run", "steps=6", "optimizer.lr=1e-2", name="second").wait()
  first.proc.kill()
  first.wait()
  assert second.proc.returncode == 2 and time.time() - t0 < 30
  line = last_line(second)
  assert f"run_dir {tmp_path / 'run'} is in use by pid {first.proc.pid}" in line and len(second.stderr().splitlines()) \
      <= 3, second.stderr()
  # the killed holder's lock is taken over
  rundir.RunLock(tmp_path / "run").__enter__().__exit__()


# ------------------------------------------------------------------ 3. saves that fail
def test_a_save_that_cannot_be_written_fails_fast(tmp_path):
  """checkpoints/ made immutable (chattr +i: even root cannot write) after the save of step 2: the save
  of step 4 fails at once, exit 4, one line naming the step, the cause and checkpoint 2, which still
  restores."""
  run_dir = tmp_path / "run"
  Run(run_dir, "steps=2").check()
  subprocess.run(["chattr", "+i", str(run_dir / "checkpoints")], check=True)
  try:
    t0 = time.time()
    run = Run(run_dir, "steps=4", "save_every=2", name="fails").wait(timeout=120)
    elapsed = time.time() - t0
  finally:
    subprocess.run(["chattr", "-i", str(run_dir / "checkpoints")], check=True)
  assert run.proc.returncode == 4 and elapsed < 30, (elapsed, run.stderr()[-2000:])
  line = last_line(run)
  assert line.startswith("error: step 4: writing the checkpoint") and f"{run_dir / 'checkpoints' / '2'}" in line
  assert "Traceback" not in run.stderr()
  resumed = Run(run_dir, "steps=3", name="resumed").check()
  assert "resumed from step 2" in resumed.stderr()


# ------------------------------------------------------------------ 4. late errors, early
def test_errors_come_before_the_first_step(tmp_path):
  """A corpus that cannot be read stops the run before step 1 and writes nothing. (A one-document
  corpus, once the example here, now holds out its end: tests/test_cli_errors.py.)"""
  (tmp_path / "one.txt").write_bytes("café\n".encode("latin-1"))
  run = Run(tmp_path / "run", "steps=200", "eval_every=100", f"data={tmp_path / 'one.txt'}").wait()
  assert run.proc.returncode == 2 and "not UTF-8 text" in last_line(run)
  assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "config.yaml").exists()


def test_final_checkpoint_is_written_before_the_final_evaluation(tmp_path):
  run = Run(tmp_path / "run", "steps=2", "eval_every=2", "eval_steps=1").check()
  err = run.stderr()
  assert err.index("checkpoint: saving step 2") < err.index("eval_loss")


# ------------------------------------------------------------------ 5. a rejected resume
def test_rejected_resume_leaves_the_run_as_it_was(tmp_path):
  Run(tmp_path / "run", "steps=2").check()
  config = (tmp_path / "run" / "config.yaml").read_text()
  run = Run(tmp_path / "run", "steps=4", "model.hidden_size=64", name="rejected").wait()
  assert run.proc.returncode == 2
  assert "written for another model (model.hidden_size 32 -> 64)" in last_line(run)
  assert "Exception ignored" not in run.stderr() and len(run.stderr().splitlines()) <= 3, run.stderr()
  assert (tmp_path / "run" / "config.yaml").read_text() == config


def test_abandoned_orbax_reads_of_a_failed_restore_stay_quiet(tmp_path):
  """The other arrays' reads of a rejected restore end as failed asyncio tasks nobody awaits; asyncio
  logs each with a traceback when the garbage collector finds it (after the one-line error, at a
  moment CI's timing decides). Those are dropped; an unrelated task's failure is still reported."""
  script = """
import asyncio, gc, logging
import orbax.checkpoint as ocp
from train.core import checkpoint
checkpoint._ignore_closed_loop_callbacks()
async def orbax_read():
  ocp.type_handlers.get_type_handler(object)   # raises ValueError inside orbax
async def other():
  raise KeyError("not orbax")
async def main():
  tasks = [asyncio.ensure_future(orbax_read()), asyncio.ensure_future(other())]
  await asyncio.sleep(0.01)
  tasks.clear(); gc.collect()
asyncio.run(main())
"""
  err = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True).stderr
  assert "not orbax" in err and "Unknown type" not in err and "get_type_handler" not in err, err


# ------------------------------------------------------------------ 6. one line, not a traceback
def test_bad_inputs_are_one_line(tmp_path):
  with pytest.raises(ConfigError, match=r"^model.hidden_size=0 must be >= 1$"):
    load_train_config(ROOT / "configs/tiny.yaml", ["model.hidden_size=0"])
  (tmp_path / "file").write_text("")
  with pytest.raises(ConfigError, match="cannot create it"):
    rundir.prepare(tmp_path / "file" / "run")
  assert data_cli.main(["prepare", "default", "--out", str(tmp_path / "file")]) == 2
  prepared = tmp_path / "prepared"
  data_lib.prepare(["default"], prepared, data_lib.ByteTokenizer())
  shard = next(prepared.glob("shard-*"))
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) // 2)
  with pytest.raises(DataError, match="not a readable ArrayRecord shard"):
    data_lib.make_dataset(str(prepared), seq_len=16, batch_size=2, seed=0, split="train",
                          tokenizer=data_lib.ByteTokenizer())


def test_first_interval_reports_no_throughput(tmp_path):
  """The first logged interval holds the compilation: no tokens/s or MFU for it (it printed
  2.4M tok/s and 19270% MFU)."""
  Run(tmp_path / "run", "steps=3").check()
  records = metrics(tmp_path / "run")
  assert "tokens_per_s" not in records[0] and "mfu" not in records[0]
  assert all(0 < r["mfu"] < 1 for r in records[1:])
  shutil.rmtree(tmp_path / "run")
