"""train.loop: a short run of configs/tiny.yaml (shrunk) writes every artefact; the CLI's errors."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train.core import loop
from train.core.train_config import load_train_config

ROOT = Path(__file__).resolve().parents[1]
SMALL_MODEL = ["model.vocab_size=260", "model.hidden_size=32", "model.intermediate_size=64",
               "model.moe_intermediate_size=16", "model.num_hidden_layers=2", "model.num_attention_heads=2",
               "model.q_lora_rank=16", "model.kv_lora_rank=16", "model.qk_nope_head_dim=8",
               "model.qk_rope_head_dim=4", "model.v_head_dim=8"]
STEP_KEYS = {"step", "loss", "tokens_per_s", "mfu", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "lr",
             "expert_load_cv"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("run")
  cfg = load_train_config(ROOT / "configs/tiny.yaml", [
      "steps=6", "log_every=2", "eval_every=3", "eval_steps=1", "batch_size=2", "seq_len=64",
      f"run_dir={run_dir}", "profile_steps=[2, 3]", "optimizer.warmup_steps=2", *SMALL_MODEL])
  result = loop.train(cfg, progress=False, peak_flops=1e12)  # a given peak: no 2048^3 matmul benchmark
  return run_dir, cfg, result


def test_metrics_jsonl(run):
  run_dir, cfg, result = run
  records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  steps = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in steps] == [2, 4, 6]
  assert [r["step"] for r in evals] == [3, 6]
  n_moe = cfg.model.num_moe_layers + cfg.model.num_nextn_predict_layers  # main MoE layers, then MTP
  for r in steps:
    assert STEP_KEYS <= set(r), STEP_KEYS - set(r)
    for k in STEP_KEYS - {"step", "expert_load_cv"}:
      assert isinstance(r[k], float) and math.isfinite(r[k]), (k, r[k])
    assert isinstance(r["expert_load_cv"], list) and len(r["expert_load_cv"]) == n_moe
    assert all(math.isfinite(x) and x >= 0 for x in r["expert_load_cv"])
    assert r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["grad_norm"] > 0
    assert 0 < r["lm_loss"] < 10 and 0 < r["mtp_loss"] < 10 and r["balance_loss"] > 0
  assert steps[0]["lr"] == pytest.approx(cfg.optimizer.lr / 2)  # step index 1 of a 2-step warm-up
  assert steps[-1]["lr"] == pytest.approx(cfg.optimizer.lr)
  for r in evals:
    assert math.isfinite(r["eval_loss"]) and 0 < r["eval_loss"] < 10
  assert result["steps"] == 6 and math.isfinite(result["first_loss"]) and math.isfinite(result["last_loss"])
  assert result["last_loss"] == pytest.approx(steps[-1]["loss"])


def test_artefacts(run):
  run_dir, cfg, _ = run
  assert list(run_dir.glob("events.out.tfevents.*")), sorted(p.name for p in run_dir.iterdir())
  traces = [p for p in (run_dir / "profile").rglob("*") if p.is_file() and ".xplane.pb" in p.name]
  assert traces and traces[0].stat().st_size > 0
  written = yaml.safe_load((run_dir / "config.yaml").read_text())
  assert written["steps"] == 6 and written["model"]["num_hidden_layers"] == 2
  assert written["profile_steps"] == [2, 3] and written["run_dir"] == str(run_dir)
  assert load_train_config(run_dir / "config.yaml") == cfg  # the written config reads back identically


@pytest.mark.parametrize("args, words", [
    (["configs/tiny.yaml", "stepz=3"], ["stepz", "did you mean 'steps'"]),
    (["configs/missing.yaml"], ["configs/missing.yaml"]),
])
def test_cli_errors(args, words):
  p = subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert p.returncode == 2, p.stderr
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1, p.stderr
  assert lines[0].startswith("error: ")
  for w in words:
    assert w in lines[0]
  assert p.stdout == ""


def test_nothing_to_train_leaves_the_run_as_it_was(run):
  """steps=4 on a run at step 6: "nothing to train", and config.yaml still says steps=6 (it was
  rewritten with the smaller count, which the next resume would have read as the run's plan)."""
  run_dir, cfg, _ = run
  before = (run_dir / "config.yaml").read_text()
  result = loop.train(cfg.replace(steps=4), progress=False, peak_flops=1e12)
  assert result["first_loss"] is None and result["last_step"] == 6
  assert (run_dir / "config.yaml").read_text() == before


def _stage(run_dir, tmp_path, *more):
  """A long-context stage of the `run` fixture's model: twice its seq_len, with YaRN, from its weights."""
  return load_train_config(ROOT / "configs/tiny.yaml", [
      "steps=2", "batch_size=2", "seq_len=128", f"run_dir={tmp_path / 'stage'}", f"init_from={run_dir}",
      "model.rope_scaling.factor=2.0", "model.rope_scaling.original_max_position_embeddings=64",
      "model.max_position_embeddings=128", *SMALL_MODEL, *more])


def test_a_long_context_stage_starts_from_a_runs_weights(run, tmp_path):
  """init_from=RUN_DIR (the long-context stages): the run's newest checkpoint's weights, bitwise, at
  another seq_len and with YaRN added, a fresh optimizer and step 0; a model whose weights have other
  shapes is one line naming what changed."""
  import jax
  import numpy as np
  from flax import nnx

  from parallel.common.errors import ConfigError
  from train.core import model_io
  from train.core.checkpoint import step_dir

  run_dir, _, _ = run
  built = loop.build(_stage(run_dir, tmp_path), init_from=str(run_dir))
  saved = model_io.load_model(step_dir(run_dir))  # the fixture's last checkpoint (step 6), float32
  _, want, _ = nnx.split(saved, nnx.Param, ...)
  got, want = jax.tree.leaves(built.state["params"]), jax.tree.leaves(want)
  assert len(got) == len(want) > 10
  assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, want))
  assert int(built.state["step"]) == 0
  assert all(not np.asarray(m).any() for m in jax.tree.leaves(built.state["opt"]) if np.ndim(m) > 0)

  with pytest.raises(ConfigError, match=r"do not fit this model \(model.intermediate_size 64 -> 128"):
    loop.build(_stage(run_dir, tmp_path, "model.intermediate_size=128"), init_from=str(run_dir))
  with pytest.raises(ConfigError, match="no such directory"):
    loop.build(_stage(run_dir, tmp_path), init_from=str(tmp_path / "nowhere"))
