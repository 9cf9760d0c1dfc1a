"""The training loop: data -> jitted step -> metrics, eval, checkpoints and profiling.

`build` makes everything a run needs from the config, once: the mesh (parallel.mesh.Parallelism),
the model's runtime (moe.runtime.Runtime: dtypes, kernels, FP8 path, logged), the sharded state and
the jitted steps. `train` runs the loop; `python -m train CONFIG` (train/__main__.py) is its CLI.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import yaml
from flax import nnx

from moe import params as params_lib
from moe.model import Transformer
from moe.runtime import Runtime
from parallel import sharding as sharding_lib
from parallel.errors import ConfigError
from parallel.mesh import Parallelism
from train.core import checkpoint as checkpoint_lib
from train.core import data as data_lib
from train.core import optimizer as optimizer_lib
from train.core import step as step_lib
from train.core.config import TrainConfig
from train.core.evaluation import EvalSet
from train.core.metrics import MetricsLogger, device_memory, measure_peak_flops

log = logging.getLogger("train")


def parallelism(cfg: TrainConfig, devices=None) -> Parallelism:
  """The device mesh (cfg.mesh over `devices`, default all) with its sharding rules and transport."""
  par = Parallelism.from_config(cfg.mesh, devices)
  log.info("parallel: %s", par.describe())
  return par


def runtime(cfg: TrainConfig, par: Parallelism) -> Runtime:
  """How the model runs on `par`'s devices: `precision` sets the compute dtype (fp8: bf16 plus FP8
  GEMMs), master weights are float32, `impl` picks the kernels; logged once."""
  return Runtime.resolve(cfg.impl, dtype=cfg.compute_dtype, param_dtype="float32", fp8=cfg.fp8, par=par)


class Setup(NamedTuple):
  """Everything a run is made of but the arrays: what `build` initialises and `train.aot` compiles."""

  par: Parallelism
  rt: Runtime
  init: object  # () -> the freshly initialised state {params, rest, opt, step}
  abstract_state: dict  # ShapeDtypeStructs of the state, with their shardings
  shardings: object  # the state's NamedShardings (None on one device)
  train_step: object  # jitted (state, batch) -> (state, metrics)
  eval_step: object  # jitted (state, batch) -> (summed NLL, target count)

  def batch_spec(self, batch_size: int, seq_len: int) -> dict:
    """ShapeDtypeStructs of a global training batch, sharded as `to_device` places it."""
    shape = (batch_size, seq_len)
    sharding = sharding_lib.batch_sharding(self.par.mesh, shape, self.par.rules)
    return {k: jax.ShapeDtypeStruct(shape, jax.numpy.float32 if k == "loss_mask" else jax.numpy.int32,
                                    sharding=sharding)
            for k in ("tokens", "targets", "segment_ids", "positions", "loss_mask")}


def setup(cfg: TrainConfig, par: Parallelism | None = None, rt: Runtime | None = None) -> Setup:
  """The mesh, runtime, state layout and jitted steps of `cfg`, without allocating anything.

  On a multi-device mesh the state's shardings come from its parameters' logical axes
  (parallel.sharding.state_shardings); the model carries the mesh (its Runtime) for its activation
  constraints and expert-parallel MoE. `par` may be built on compile-only devices (train.aot).
  """
  par = parallelism(cfg) if par is None else par
  rt = runtime(cfg, par) if rt is None else rt
  schedule = optimizer_lib.make_schedule(cfg)
  tx = optimizer_lib.make_optimizer(cfg, schedule)

  def init():
    return step_lib.init_state(Transformer(cfg.model, rt, rngs=nnx.Rngs(cfg.seed)), tx)[1]

  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg.model, rt, rngs=nnx.Rngs(cfg.seed))))
  abstract = jax.eval_shape(init)
  if par.mesh.size == 1:
    # the sharding the step returns, so that the second step does not compile again
    replicated = jax.sharding.NamedSharding(par.mesh, jax.sharding.PartitionSpec())
    layout, shardings = jax.tree.map(lambda _: replicated, abstract), None
  else:
    layout = shardings = sharding_lib.state_shardings(abstract, par.mesh, par.rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, layout)
  train_step = step_lib.make_train_step(graphdef, cfg.model, tx, schedule, cfg, shardings)
  return Setup(par, rt, init, abstract, shardings, train_step, step_lib.make_eval_step(graphdef))


class Built(NamedTuple):
  state: dict  # {params, rest, opt, step}, laid out on the mesh
  train_step: object  # jitted (state, batch) -> (state, metrics)
  eval_step: object  # jitted (state, batch) -> (summed NLL, target count)
  rt: Runtime
  shardings: object  # the state's NamedShardings (None on one device)


def build(cfg: TrainConfig, par: Parallelism | None = None, rt: Runtime | None = None) -> Built:
  """A freshly initialised state, laid out on the mesh, and the jitted steps (see `setup`).
  Feed the steps `to_device(batch, par)`."""
  s = setup(cfg, par, rt)
  if s.shardings is None:
    state = jax.device_put(s.init(), jax.tree.map(lambda a: a.sharding, s.abstract_state))
  else:
    state = jax.jit(s.init, out_shardings=s.shardings)()
  return Built(state, s.train_step, s.eval_step, s.rt, s.shardings)


def to_device(batch: dict, par: Parallelism | None = None, global_batch_size: int | None = None) -> dict:
  """Host batch -> device arrays; with `par`, global arrays sharded over the batch axes (with several
  processes `batch` is this process's rows of a global batch of `global_batch_size`)."""
  return sharding_lib.place_batch(batch, par, global_batch_size)


def eval_set(cfg: TrainConfig, tokenizer) -> EvalSet:
  """This process's `eval_steps` batches of the held-out split (read once per run)."""
  n_proc = jax.process_count()
  return EvalSet(cfg.data, tokenizer, seq_len=cfg.seq_len, batch_size=cfg.batch_size // n_proc,
                 max_seq_len=cfg.model.max_position_embeddings, max_batches=cfg.eval_steps,
                 process_index=jax.process_index(), process_count=n_proc)


def evaluate(eval_step, state, cfg: TrainConfig, evals: EvalSet, par=None) -> float:
  """Mean next-token loss over the eval batches; with several processes every process runs exactly
  `eval_steps` steps."""
  steps = cfg.eval_steps if jax.process_count() > 1 else None
  return evals.run(eval_step, state, lambda b: to_device(b, par, cfg.batch_size), steps)["loss"]


def train(cfg: TrainConfig, progress: bool = True, peak_flops: float | None = None) -> dict:
  """Train per `cfg`; returns {first_loss, last_loss, steps, ...}. Resumes from the newest checkpoint
  in RUN_DIR/checkpoints and saves checkpoints as train/core/checkpoint.py describes; SIGTERM/SIGINT
  stop after the current step with a checkpoint (`stopped_by` in the result). `peak_flops`: the
  FLOP/s MFU is measured against (default: measured here, train.core.metrics.measure_peak_flops)."""
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
  tokenizer = data_lib.load_tokenizer(cfg.tokenizer)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise ConfigError(f"tokenizer {cfg.tokenizer!r} has {tokenizer.vocab_size} ids but model.vocab_size is"
                      f" {cfg.model.vocab_size}: raise model.vocab_size")
  max_len = cfg.model.max_position_embeddings
  n_proc = jax.process_count()
  if cfg.batch_size % n_proc:
    raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the {n_proc} processes")
  batches = iter(data_lib.make_dataset(cfg.data, seq_len=cfg.seq_len, batch_size=cfg.batch_size // n_proc,
                                       seed=ckpt.data_seed, split="train", tokenizer=tokenizer, max_seq_len=max_len,
                                       process_index=jax.process_index(), process_count=n_proc,
                                       num_workers=cfg.data_workers))
  par = parallelism(cfg)
  state, train_step, eval_step, rt, _ = build(cfg, par)
  start = 0
  if plan is not None:
    state, start = ckpt.restore(plan, state, batches, par), plan["step"]
  counts = params_lib.count(cfg.model, cfg.seq_len)
  log.info("model: %.2fM params (%.2fM active), %s compute on %d %s device(s)", counts["total_params"] / 1e6,
           counts["active_params"] / 1e6, rt.dtype, jax.device_count(), rt.platform)
  peak = measure_peak_flops(rt.compute_dtype) if peak_flops is None else peak_flops
  tokens_per_step = cfg.batch_size * cfg.seq_len
  evals = None
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
        if (memory := device_memory()) is not None:
          log.info("device memory after the first step: peak %s GiB in use of %s GiB", memory["peak_GiB"],
                   memory.get("limit_GiB", "?"))
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
        evals = evals or eval_set(cfg, tokenizer)
        logger.write_eval(step + 1, {"loss": evaluate(eval_step, state, cfg, evals, par)})
        t0, timed = time.perf_counter(), 0
      if ckpt.save(step + 1, state, batches, force=stopped or step + 1 == cfg.steps, par=par):
        t0, timed = time.perf_counter(), 0
      if stopped:
        log.info("%s: stopped after step %d; the checkpoint is being written", stop.received, step + 1)
        break
    if (memory := device_memory()) is not None:
      log.info("device memory: peak %s GiB in use of %s GiB", memory["peak_GiB"], memory.get("limit_GiB", "?"))
  return {"first_loss": first, "last_loss": last, "steps": cfg.steps, "run_dir": str(run_dir), "start_step": start,
          "stopped_by": stop.received if stopped else None, "last_step": step + 1 if start < cfg.steps else start}
