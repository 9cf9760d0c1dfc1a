"""The training loop: data -> jitted step -> metrics, eval and profiling; `python -m train CONFIG`."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import jax
import numpy as np
import yaml
from flax import nnx

from moe import params as params_lib
from moe.config import ConfigError
from moe.model import Transformer
from train import data as data_lib
from train import optimizer as optimizer_lib
from train import step as step_lib
from train.config import TrainConfig, load_train_config
from train.metrics import MetricsLogger

log = logging.getLogger("train")

COMPUTE_DTYPE = {"float32": "float32", "bf16": "bfloat16", "fp8": "bfloat16"}


def model_config(cfg: TrainConfig):
  """The model as trained: `precision` sets the compute dtype (fp8: bf16 plus FP8 GEMMs in the
  linears and routed experts, `ModelConfig.fp8`); master weights stay float32."""
  return cfg.model.replace(dtype=COMPUTE_DTYPE[cfg.precision], param_dtype="float32",
                           fp8=cfg.precision == "fp8" or cfg.model.fp8)


def build(cfg: TrainConfig, model_cfg):
  """(state, jitted train step, jitted eval step) for a freshly initialised model."""
  model = Transformer(model_cfg, rngs=nnx.Rngs(cfg.seed))
  schedule = optimizer_lib.make_schedule(cfg)
  tx = optimizer_lib.make_optimizer(cfg, schedule)
  graphdef, state = step_lib.init_state(model, tx)
  return state, step_lib.make_train_step(graphdef, tx, schedule, cfg), step_lib.make_eval_step(graphdef)


def to_device(batch: dict) -> dict:
  return {k: jax.numpy.asarray(v) for k, v in batch.items()}


def evaluate(eval_step, state, cfg: TrainConfig, tokenizer, max_seq_len) -> float:
  """Mean next-token loss over up to `eval_steps` batches of the held-out split."""
  ds = data_lib.make_dataset(cfg.data, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                             split="eval", tokenizer=tokenizer, max_seq_len=max_seq_len)
  total, count = 0.0, 0.0
  for i, batch in enumerate(ds):
    if i >= cfg.eval_steps:
      break
    s, c = eval_step(state, to_device(batch))
    total, count = total + float(s), count + float(c)
  return total / max(count, 1.0)


def train(cfg: TrainConfig, progress: bool = True) -> dict:
  """Train per `cfg`; returns {first_loss, last_loss, steps, ...}."""
  run_dir = Path(cfg.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
  model_cfg = model_config(cfg)
  tokenizer = data_lib.load_tokenizer(cfg.tokenizer)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ConfigError(f"tokenizer {cfg.tokenizer!r} has {tokenizer.vocab_size} ids but model.vocab_size is"
                      f" {model_cfg.vocab_size}: raise model.vocab_size")
  max_len = model_cfg.max_position_embeddings
  batches = iter(data_lib.make_dataset(cfg.data, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                                       split="train", tokenizer=tokenizer, max_seq_len=max_len))
  state, train_step, eval_step = build(cfg, model_cfg)
  counts = params_lib.count(model_cfg, cfg.seq_len)
  log.info("model: %.2fM params (%.2fM active), %s on %d %s device(s)", counts["total_params"] / 1e6,
           counts["active_params"] / 1e6, model_cfg.dtype, jax.device_count(), jax.default_backend())
  from train.bench import measure_peak_flops

  if model_cfg.fp8:
    from moe import fp8 as fp8_lib

    log.info("fp8: %s", fp8_lib.describe(fp8_lib.Recipe.of(model_cfg)))
  peak = measure_peak_flops(jax.numpy.dtype(model_cfg.dtype))
  tokens_per_step = cfg.batch_size * cfg.seq_len
  first = last = None
  with MetricsLogger(run_dir, cfg.steps, progress=progress) as logger:
    t0, pending, timed = time.perf_counter(), [], 0
    for step in range(cfg.steps):
      if cfg.profile_steps and step == cfg.profile_steps[0]:
        jax.profiler.start_trace(str(run_dir / "profile"))
      state, metrics = train_step(state, to_device(next(batches)))
      if cfg.profile_steps and step + 1 == cfg.profile_steps[1]:
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
      pending.append(metrics)
      if step == 0:  # keep compilation out of tokens/s
        jax.block_until_ready(metrics)
        log.info("first step (compilation included): %.1f s", time.perf_counter() - t0)
        t0, timed = time.perf_counter(), -1
      timed += 1
      if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
        got = jax.device_get(pending)  # the one host sync per log interval
        dt = time.perf_counter() - t0
        record = {k: v for k, v in got[-1].items() if k != "tokens"}
        record["loss"] = float(np.mean([m["loss"] for m in got]))
        record["tokens_per_s"] = tokens_per_step * max(timed, 1) / dt
        record["mfu"] = record["tokens_per_s"] * counts["flops_per_token"] / peak
        logger.log(step + 1, record)
        first = record["loss"] if first is None else first
        last = record["loss"]
        t0, pending, timed = time.perf_counter(), [], 0
      if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
        logger.write_eval(step + 1, {"loss": evaluate(eval_step, state, cfg, tokenizer, max_len)})
        t0, timed = time.perf_counter(), 0
  return {"first_loss": first, "last_loss": last, "steps": cfg.steps, "run_dir": str(run_dir)}


def main(argv=None) -> int:
  import argparse

  p = argparse.ArgumentParser(prog="python -m train", description="Train a DeepSeek-style MoE.")
  p.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
  p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=100 optimizer.lr=1e-3")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    cfg = load_train_config(args.config, args.overrides)
    result = train(cfg)
  except (ConfigError, data_lib.DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"done: loss {result['first_loss']:.3f} -> {result['last_loss']:.3f} over {result['steps']} steps;"
        f" metrics in {result['run_dir']}/metrics.jsonl (plot: python -m train.plot {result['run_dir']})")
  return 0
