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
from parallel import mesh as mesh_lib
from parallel import sharding as sharding_lib
from train import checkpoint as checkpoint_lib
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


def parallelism(cfg: TrainConfig) -> mesh_lib.Parallelism:
  """The device mesh (cfg.mesh over all devices) with its sharding rules and expert-parallel options."""
  par = mesh_lib.Parallelism.from_config(cfg.mesh)
  log.info("parallel: %s, expert-parallel transport %s", par.describe(), par.ep_transport)
  return par


def build(cfg: TrainConfig, model_cfg, par: mesh_lib.Parallelism | None = None):
  """(state, jitted train step, jitted eval step) for a freshly initialised model.

  `par` (default: `parallelism(cfg)`): on a multi-device mesh the state is created by a jitted init
  whose outputs are already sharded (parallel.sharding.state_shardings: parameters and optimizer
  moments by their logical axes), and the steps trace and run with the mesh current, so the model's
  activation constraints and expert-parallel MoE apply. Feed the steps `to_device(batch, par)`.
  """
  par = parallelism(cfg) if par is None else par
  schedule = optimizer_lib.make_schedule(cfg)
  tx = optimizer_lib.make_optimizer(cfg, schedule)
  box = {}

  def init():
    graphdef, state = step_lib.init_state(Transformer(model_cfg, rngs=nnx.Rngs(cfg.seed)), tx)
    box["graphdef"] = graphdef
    return state

  if par.mesh.size == 1:
    # committed to the mesh's device with the sharding the step returns, so the second step does not
    # compile again for a new input sharding
    replicated = jax.sharding.NamedSharding(par.mesh, jax.sharding.PartitionSpec())
    state, shardings = jax.device_put(init(), replicated), None
  else:
    shardings = sharding_lib.state_shardings(jax.eval_shape(init), par.mesh, par.rules)
    with mesh_lib.activate(par):
      state = jax.jit(init, out_shardings=shardings)()
  graphdef = box["graphdef"]
  train_step = mesh_lib.under(par, step_lib.make_train_step(graphdef, tx, schedule, cfg, shardings))
  return state, train_step, mesh_lib.under(par, step_lib.make_eval_step(graphdef))


def to_device(batch: dict, par: mesh_lib.Parallelism | None = None, global_batch_size: int | None = None) -> dict:
  """Host batch -> device arrays; with `par`, global arrays sharded over the batch axes (with several
  processes `batch` is this process's rows of a global batch of `global_batch_size`)."""
  return sharding_lib.place_batch(batch, par, global_batch_size)


def evaluate(eval_step, state, cfg: TrainConfig, tokenizer, max_seq_len, par=None) -> float:
  """Mean next-token loss over up to `eval_steps` batches of the held-out split. With several
  processes every process runs exactly `eval_steps` steps (empty batches once its split runs out),
  since each step is one collective program."""
  n_proc, local_batch = jax.process_count(), cfg.batch_size // jax.process_count()
  ds = data_lib.make_dataset(cfg.data, seq_len=cfg.seq_len, batch_size=local_batch, seed=cfg.seed,
                             split="eval", tokenizer=tokenizer, max_seq_len=max_seq_len,
                             process_index=jax.process_index(), process_count=n_proc)
  total, count, it, empty = 0.0, 0.0, iter(ds), None
  for _ in range(cfg.eval_steps):
    batch = next(it, None)
    if batch is None:
      if n_proc == 1:
        break
      batch = empty
    if empty is None:
      empty = {k: np.zeros_like(v) for k, v in batch.items()}
    s, c = eval_step(state, to_device(batch, par, cfg.batch_size))
    total, count = total + float(s), count + float(c)
  return total / max(count, 1.0)


def train(cfg: TrainConfig, progress: bool = True) -> dict:
  """Train per `cfg`; returns {first_loss, last_loss, steps, ...}. Resumes from the newest checkpoint
  in RUN_DIR/checkpoints and saves checkpoints as train/checkpoint.py describes; SIGTERM/SIGINT stop
  after the current step with a checkpoint (`stopped_by` in the result)."""
  run_dir = Path(cfg.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  ckpt = checkpoint_lib.Checkpoints(cfg)
  try:
    plan = ckpt.resume_plan()  # before anything is written: resume=false must leave the run untouched
  except BaseException:
    ckpt.close()
    raise
  if jax.process_index() == 0:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
  model_cfg = model_config(cfg)
  tokenizer = data_lib.load_tokenizer(cfg.tokenizer)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ConfigError(f"tokenizer {cfg.tokenizer!r} has {tokenizer.vocab_size} ids but model.vocab_size is"
                      f" {model_cfg.vocab_size}: raise model.vocab_size")
  max_len = model_cfg.max_position_embeddings
  n_proc = jax.process_count()
  if cfg.batch_size % n_proc:
    raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the {n_proc} processes")
  batches = iter(data_lib.make_dataset(cfg.data, seq_len=cfg.seq_len, batch_size=cfg.batch_size // n_proc,
                                       seed=ckpt.data_seed, split="train", tokenizer=tokenizer, max_seq_len=max_len,
                                       process_index=jax.process_index(), process_count=n_proc,
                                       num_workers=cfg.data_workers))
  par = parallelism(cfg)
  state, train_step, eval_step = build(cfg, model_cfg, par)
  start = 0
  if plan is not None:
    state, start = ckpt.restore(plan, state, batches, par), plan["step"]
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
  stopped = False
  if start >= cfg.steps:
    log.info("nothing to train: the checkpoint is at step %d and steps=%d", start, cfg.steps)
  # StopSignal outlives ckpt: a signal while the last save is being written must not cut it short
  with checkpoint_lib.StopSignal() as stop, ckpt, \
      MetricsLogger(run_dir, cfg.steps, progress=progress, start_step=start,
                    is_main=jax.process_index() == 0) as logger:
    t0, pending, timed = time.perf_counter(), [], 0
    for step in range(start, cfg.steps):
      if cfg.profile_steps and step == cfg.profile_steps[0]:
        jax.profiler.start_trace(str(run_dir / "profile"))
      state, metrics = train_step(state, to_device(next(batches), par, cfg.batch_size))
      if cfg.profile_steps and step + 1 == cfg.profile_steps[1]:
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
      pending.append(metrics)
      if step == start:  # keep compilation out of tokens/s
        jax.block_until_ready(metrics)
        log.info("first step (compilation included): %.1f s", time.perf_counter() - t0)
        t0, timed = time.perf_counter(), -1
      timed += 1
      stopped = stop.requested(step + 1)
      if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps or stopped:
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
        logger.write_eval(step + 1, {"loss": evaluate(eval_step, state, cfg, tokenizer, max_len, par)})
        t0, timed = time.perf_counter(), 0
      if ckpt.save(step + 1, state, batches, force=stopped or step + 1 == cfg.steps, par=par):
        t0, timed = time.perf_counter(), 0
      if stopped:
        log.info("%s: stopped after step %d; the checkpoint is being written", stop.received, step + 1)
        break
  return {"first_loss": first, "last_loss": last, "steps": cfg.steps, "run_dir": str(run_dir), "start_step": start,
          "stopped_by": stop.received if stopped else None, "last_step": step + 1 if start < cfg.steps else start}


def main(argv=None) -> int:
  import argparse

  p = argparse.ArgumentParser(prog="python -m train", description="Train a DeepSeek-style MoE.")
  p.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
  p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=100 optimizer.lr=1e-3")
  g = p.add_argument_group("multi-process (parallel/distributed.py; default: single process, or detected"
                           " SLURM / Open MPI / multi-host Cloud TPU)")
  g.add_argument("--coordinator", help="host:port of process 0 (env JAX_COORDINATOR_ADDRESS)")
  g.add_argument("--num-processes", type=int, help="env JAX_NUM_PROCESSES")
  g.add_argument("--process-id", type=int, help="env JAX_PROCESS_ID")
  g.add_argument("--distributed", action="store_true", help="let JAX auto-detect the cluster")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # absl (orbax) may have set one up
  from parallel import distributed

  distributed.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
  try:
    cfg = load_train_config(args.config, args.overrides)
    result = train(cfg)
  except (ConfigError, data_lib.DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if result["stopped_by"]:
    print(f"stopped by {result['stopped_by']} at step {result['last_step']}: checkpoint in"
          f" {result['run_dir']}/checkpoints/{result['last_step']}; run the same command to resume")
  elif result["first_loss"] is None:
    print(f"done: {result['run_dir']} is already at step {result['last_step']} (steps={result['steps']})")
  else:
    print(f"done: loss {result['first_loss']:.3f} -> {result['last_loss']:.3f} over steps {result['start_step']}.."
          f"{result['last_step']}; metrics in {result['run_dir']}/metrics.jsonl (plot: python -m train.plot"
          f" {result['run_dir']})")
  return 0
