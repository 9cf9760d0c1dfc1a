"""train.checkpoint in process: what a save holds, async saves under donation, the data iterator,
keep_last/keep_every, resume=false, interrupted (tmp) saves, foreign and corrupted directories, a
changed process count. The runs of `python -m train` (resume exactness, SIGTERM, kill -9) and the
restore onto other meshes are in tests/test_checkpoint_runs.py."""

import json
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe.model import Transformer
from train.core import checkpoint as ckpt_lib
from train.core import input_pipeline as data_lib
from train.core import loop
from train.core import metrics as metrics_lib
from train.core import optimizer as optimizer_lib
from train.core import step as step_lib
from train.core.train_config import load_train_config

ROOT = Path(__file__).resolve().parents[1]
SMALL_MODEL = ["model.vocab_size=260", "model.hidden_size=32", "model.intermediate_size=64",
               "model.moe_intermediate_size=16", "model.num_hidden_layers=2", "model.num_attention_heads=2",
               "model.q_lora_rank=16", "model.kv_lora_rank=16", "model.qk_nope_head_dim=8",
               "model.qk_rope_head_dim=4", "model.v_head_dim=8"]


def config(run_dir, *extra):
  return load_train_config(ROOT / "configs/tiny.yaml", [*SMALL_MODEL, "batch_size=2", "seq_len=32", "eval_every=0",
                                                        f"run_dir={run_dir}", *extra])


def host(tree):
  return [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(tree)]


def toy_state(value=0.0):
  """A state-shaped pytree without a model: fast saves for the bookkeeping tests."""
  return {"params": {"w": jnp.full((4, 3), value)}, "rest": {"b": jnp.full((2,), value)},
          "opt": {"m": jnp.full((4, 3), -value)}, "step": jnp.asarray(int(value), jnp.int32),
          "guard": {"loss_mean": jnp.asarray(value, jnp.float32), "accepted": jnp.asarray(int(value), jnp.int32)}}


def save_toy(cfg, steps):
  with ckpt_lib.Checkpoints(cfg) as ck:
    for s in steps:
      ck.save(s, toy_state(s), None, force=True)


def one_line_error(excinfo, *words):
  msg = str(excinfo.value)
  assert "\n" not in msg, msg
  for w in words:
    assert w in msg, (w, msg)


@pytest.fixture(scope="module")
def model_state():
  """(cfg, state) of the tiny model: parameters, router biases, AdamW state, step (jitted init)."""
  cfg = config("unused")
  tx = optimizer_lib.make_optimizer(cfg, optimizer_lib.make_schedule(cfg))
  state = jax.jit(lambda: step_lib.init_state(Transformer(cfg.model, rngs=nnx.Rngs(0)), tx)[1])()
  return cfg, state


def test_async_save_holds_the_state_at_save_time_and_the_data_position(tmp_path, model_state):
  cfg, state = model_state
  cfg = cfg.replace(run_dir=str(tmp_path))
  # a donating update, as the training step is: the next steps must not change what is being saved
  bump = jax.jit(lambda s: jax.tree.map(lambda x: x + jnp.ones((), x.dtype), s), donate_argnums=0)
  state = bump(jax.tree.map(jnp.copy, state))
  tok = data_lib.load_tokenizer("byte")
  make = lambda: iter(data_lib.make_dataset("default", seq_len=32, batch_size=2, seed=cfg.seed, split="train",
                                             tokenizer=tok))
  it = make()
  for _ in range(3):
    next(it)
  saved = host(state)
  ck = ckpt_lib.Checkpoints(cfg)
  assert ck.resume_plan() is None
  assert ck.save(5, state, it, force=True)
  for _ in range(3):
    state = bump(state)  # donates the buffers the save copied
  expected = [next(it) for _ in range(2)]
  ck.close()

  step_dir = tmp_path / "checkpoints" / "5"
  assert sorted(p.name for p in step_dir.iterdir() if p.is_dir()) == sorted(ckpt_lib.ITEMS)
  assert (step_dir / "data" / "process_0-of-1.json").is_file()
  meta = ckpt_lib.validate_step_dir(step_dir)
  assert meta["step"] == 5 and meta["process_count"] == 1 and meta["data_seed"] == cfg.seed
  assert ckpt_lib.read_config(step_dir) == cfg

  ck = ckpt_lib.Checkpoints(cfg)
  plan = ck.resume_plan()
  assert plan["step"] == 5 and plan["restore_data"]
  it2 = make()
  restored = ck.restore(plan, jax.eval_shape(lambda: state), it2)
  ck.close()
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(host(restored), saved, strict=True):
    np.testing.assert_array_equal(a, b)
  for want in expected:  # the iterator continues where it was saved
    got = next(it2)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_keep_last_and_keep_every(tmp_path):
  cfg = config(tmp_path, "keep_last=2", "keep_every=4")
  save_toy(cfg, range(1, 11))
  with ckpt_lib.Checkpoints(cfg) as ck:
    assert ck.steps() == [4, 8, 9, 10]
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [4, 8, 9, 10]


def test_due_steps(tmp_path):
  ck = ckpt_lib.Checkpoints(config(tmp_path, "save_every=3"))
  assert [s for s in range(1, 10) if ck.due(s)] == [3, 6, 9]
  ck.close()
  ck = ckpt_lib.Checkpoints(config(tmp_path, "save_every=0"))
  assert not any(ck.due(s) for s in range(1, 10))
  ck.close()


def test_resume_false_refuses_and_leaves_the_run_alone(tmp_path):
  save_toy(config(tmp_path), [2, 4])
  (tmp_path / "config.yaml").write_text("original\n")
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    loop.train(config(tmp_path, "resume=false"), progress=False)
  one_line_error(e, str(tmp_path / "checkpoints"), "steps 2, 4", "resume=false",
                 "pick another run_dir or delete them")
  assert (tmp_path / "config.yaml").read_text() == "original\n"


def test_interrupted_save_is_ignored_and_cleaned(tmp_path):
  cfg = config(tmp_path)
  save_toy(cfg, [3])
  root = tmp_path / "checkpoints"
  partial = root / f"5{ckpt_lib.TMP_MARK}"  # what kill -9 during a save leaves
  shutil.copytree(root / "3", partial)
  shutil.rmtree(partial / "optimizer")
  with ckpt_lib.Checkpoints(cfg) as ck:
    assert ck.resume_plan()["step"] == 3
  assert not partial.exists()


def test_foreign_and_corrupted_directories(tmp_path):
  cfg = config(tmp_path)
  save_toy(cfg, [3])
  root = tmp_path / "checkpoints"
  (root / "7").mkdir()
  (root / "7" / "notes.txt").write_text("not a checkpoint")
  with ckpt_lib.Checkpoints(cfg) as ck, pytest.raises(ckpt_lib.CheckpointError) as e:
    ck.resume_plan()
  one_line_error(e, str(root / "7"), "not a checkpoint written by `python -m train`")
  shutil.rmtree(root / "7")

  for f in (root / "3" / "model").rglob("*"):  # corrupt every data file of the model item
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(b"\0garbage" * 4)
  ck = ckpt_lib.Checkpoints(cfg)
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ck.restore(ck.resume_plan(), jax.eval_shape(toy_state), None)
  ck.close()
  one_line_error(e, str(root / "3"), "unreadable", "is corrupt", "no checkpoint of")
  assert (root / "3.corrupt").is_dir()  # set aside, not deleted
  (root / "3.corrupt").rename(root / "3")

  (root / "3" / "meta" / "metadata").write_text("{]")
  with ckpt_lib.Checkpoints(cfg) as ck, pytest.raises(ckpt_lib.CheckpointError) as e:
    ck.resume_plan()
  one_line_error(e, str(root / "3"), "unreadable meta")

  other = tmp_path / "file_run"
  other.mkdir()
  (other / "checkpoints").write_text("a file where the checkpoints directory goes")
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ckpt_lib.Checkpoints(config(other))
  one_line_error(e, str(other / "checkpoints"), "not a directory")


def test_changed_process_count_or_pipeline_restarts_the_data_with_a_new_seed(tmp_path, caplog):
  cfg = config(tmp_path, "seed=5")
  tok = data_lib.load_tokenizer("byte")
  it = iter(data_lib.make_dataset("default", seq_len=32, batch_size=2, seed=5, split="train", tokenizer=tok))
  next(it)
  with ckpt_lib.Checkpoints(cfg) as ck:
    ck.save(4, toy_state(4), it, force=True)
  meta_file = tmp_path / "checkpoints" / "4" / "meta" / "metadata"
  with ckpt_lib.Checkpoints(cfg) as ck:
    plan = ck.resume_plan()
  assert plan["restore_data"] and plan["data_seed"] == 5
  meta = json.loads(meta_file.read_text())
  meta["process_count"] = 2  # as if two processes had written it
  meta_file.write_text(json.dumps(meta))
  with caplog.at_level(logging.WARNING, logger="train"), ckpt_lib.Checkpoints(cfg) as ck:
    plan = ck.resume_plan()
    assert not plan["restore_data"]
    assert plan["data_seed"] == ck.data_seed == ckpt_lib.data_seed_after(5, 4) != 5
    state = ck.restore(plan, jax.eval_shape(toy_state), None)  # the arrays still restore
  assert "2 process(es)" in caplog.text and "shuffle seed" in caplog.text
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.full((4, 3), 4.0))
  meta["process_count"] = 1
  meta_file.write_text(json.dumps(meta))
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="train"), ckpt_lib.Checkpoints(cfg.replace(seq_len=64)) as ck:
    plan = ck.resume_plan()  # another pipeline: its iterator state does not fit either
    assert not plan["restore_data"] and plan["data_seed"] == ckpt_lib.data_seed_after(5, 4)
  assert "the data pipeline changed (seq_len 32 -> 64)" in caplog.text


def test_config_changes_and_trim_metrics(tmp_path):
  a, b = config(tmp_path).to_dict(), config(tmp_path, "steps=20", "optimizer.lr=0.5").to_dict()
  assert ckpt_lib.config_changes(a, b) == ["optimizer.lr 0.002 -> 0.5", "steps 300 -> 20"]
  lines = [{"step": s, "loss": 1.0} for s in (1, 2, 3, 4)] + [{"step": 2, "eval_loss": 1.0}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  assert metrics_lib.trim_metrics(tmp_path, 2) == 2
  kept = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in kept] == [1, 2, 2]
